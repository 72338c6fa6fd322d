// The host backend's entry point: a run-time spec to one of the compiled host pipelines.
#include "layer.hpp"
#include "pipelines.hpp"

namespace nosa_python {

problem make_host_layer(const layer_spec& spec, std::unique_ptr<layer_base>& out) {
  return dispatch_layer(spec, [&](auto element, auto dim) {
    return make_host_layer_for<typename decltype(element)::type, decltype(dim)::value>(spec, out);
  });
}

}  // namespace nosa_python
