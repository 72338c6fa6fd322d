// nosa-demo: a synthetic long-context decode that runs NOSA and InfLLMv2 side by side on identical inputs.
// The demo itself is demo.hpp; this file picks the backend and turns the run-time choices into template
// arguments.

#include "../common/cuda_device.hpp"
#include "demo.hpp"

#include <cstdio>
#include <string>
#include <string_view>

namespace demo {
namespace {

/// Sets `opt.backend` and `opt.backend_detail` from `opt.requested_backend`. Prints one line and returns
/// false when an explicitly requested backend cannot run here.
bool choose_backend(options& opt) {
  if (opt.requested_backend == backend_kind::host) {
    opt.backend = backend_kind::host;
    return true;
  }
  const bool explicit_cuda = opt.requested_backend == backend_kind::cuda;
#ifdef NOSA_DEMO_CUDA
  const cuda_device::probe_result device = cuda_device::probe();
  if (device.usable) {
    opt.backend = backend_kind::cuda;
    opt.backend_detail = std::string(explicit_cuda ? "" : " (auto)") + " on " + device.description;
    return true;
  }
  const std::string why = device.description;
#else
  const std::string why = "this build has no CUDA backend";
#endif
  if (explicit_cuda) {
    std::fprintf(stderr, "nosa-demo: --backend cuda is not available: %s\n", why.c_str());
    return false;
  }
  opt.backend = backend_kind::host;
  opt.backend_detail = " (auto; " + why + ")";
  return true;
}

/// Runs the demo for one storage element and head dimension on the chosen backend.
template <nosa::storage_element Element, int HeadDim>
run_error run_on_backend(const options& opt) {
#ifdef NOSA_DEMO_CUDA
  if (opt.backend == backend_kind::cuda) return run_demo_cuda<Element, HeadDim>(opt);
#endif
  return run_demo<Element, HeadDim, nosa::host_backend>(opt);
}

}  // namespace
}  // namespace demo

int main(int argc, char** argv) {
  demo::options opt;
  if (!demo::parse_options(argc, argv, opt)) return 2;
  if (opt.show_help) {
    std::fwrite(demo::usage_text.data(), 1, demo::usage_text.size(), stdout);
    return 0;
  }
  if (!demo::choose_backend(opt)) return 2;

  // Run-time choices become template arguments here: 2 storage types x 3 head dimensions, each
  // instantiating the NOSA and the InfLLMv2 pipeline on every backend of the build.
  demo::run_error err;
  bool element_compiled = false, dim_compiled = false;
  const nosa::status dispatched =
      nosa::dispatch_element<float, nosa::bf16>(opt.element, [&](auto element_tag) {
        using element = typename decltype(element_tag)::type;
        element_compiled = true;
        return nosa::dispatch_value<64, 128, 256>(opt.head_dim, [&](auto dim) {
          dim_compiled = true;
          err = demo::run_on_backend<element, decltype(dim)::value>(opt);
          return err.status;
        });
      });

  if (nosa::ok(dispatched)) return 0;
  std::string call = err.call;
  if (!element_compiled) {
    call = "dtype " + std::string(nosa::to_string(opt.element)) + " (this demo compiles fp32 and bf16)";
  } else if (!dim_compiled) {
    call = "head dimension " + std::to_string(opt.head_dim) + " (this demo compiles 64, 128 and 256)";
  }
  const std::string_view reason = nosa::to_string(dispatched);
  std::fprintf(stderr, "nosa-demo: %s: %.*s\n", call.c_str(), static_cast<int>(reason.size()), reason.data());
  return 1;
}
