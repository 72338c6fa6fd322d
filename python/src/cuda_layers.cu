// The CUDA backend's entry points: the device count, and a run-time spec to one of the compiled CUDA
// pipelines on the device it names.
#include "layer.hpp"
#include "pipelines.hpp"

#include <cuda_runtime.h>

#include <string>

namespace nosa_python {

bool cuda_built() noexcept { return true; }

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error of a later call
    return 0;
  }
  return count;
}

problem make_cuda_layer(const layer_spec& spec, std::unique_ptr<layer_base>& out) {
  const int count = cuda_device_count();
  if (count == 0)
    return fail(nosa::status::not_supported, "no CUDA device is available (no GPU, or no driver)");
  if (spec.device < 0 || spec.device >= count) {
    return fail(nosa::status::invalid_argument, "cuda:" + std::to_string(spec.device) +
                                                    " does not exist; there are " + std::to_string(count) +
                                                    " CUDA devices");
  }
  return dispatch_layer(spec, [&](auto element, auto dim) {
    return make_cuda_layer_for<typename decltype(element)::type, decltype(dim)::value>(spec, out);
  });
}

}  // namespace nosa_python
