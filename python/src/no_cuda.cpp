// The CUDA entry points of a build without the CUDA backend (no CUDA compiler, or NOSA_PYTHON_CUDA=OFF).
#include "layer.hpp"

namespace nosa_python {

bool cuda_built() noexcept { return false; }

int cuda_device_count() noexcept { return 0; }

problem make_cuda_layer(const layer_spec&, std::unique_ptr<layer_base>&) {
  return fail(
      nosa::status::not_supported,
      "this build of nosa has no CUDA backend (it was built without a CUDA compiler); reinstall it where "
      "nvcc is on PATH");
}

}  // namespace nosa_python
