// The attention methods of the host engine, instantiated once: four pipelines at each of the two head dims
// the presets use.

#include "host_engine.hpp"

#include <nosa/backend/host/arena.hpp>
#include <nosa/backend/host/decode_layer.hpp>
#include <nosa/core/dispatch.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/pipeline.hpp>

namespace nosa_engine {

namespace {

template <class Pipeline>
nosa::status make(const nosa::layer_config& config, int layers, std::unique_ptr<host_stack>& out) {
  auto stack =
      std::make_unique<attention_stack_of<nosa::decode_layer<Pipeline, nosa::host_backend>, float>>();
  NOSA_TRY(stack->create(config, layers));
  out = std::move(stack);
  return nosa::status::success;
}

}  // namespace

nosa::status make_host_stack(method m, int head_dim, const nosa::layer_config& config, int layers,
                             std::unique_ptr<host_stack>& out) {
  return nosa::dispatch_value<64, 128>(head_dim, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    return with_pipeline<D>(m, [&]<class Pipeline>() { return make<Pipeline>(config, layers, out); });
  });
}

}  // namespace nosa_engine
