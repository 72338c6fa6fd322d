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
    switch (m) {
    case method::full:
      return make<nosa::full_attention_pipeline<nosa::bf16, D>>(config, layers, out);
    case method::infllmv2_offload:
      return make<nosa::infllmv2_pipeline<nosa::bf16, D, nosa::offload_store>>(config, layers, out);
    case method::nosa_offload:
      return make<nosa::nosa_pipeline<nosa::bf16, D, nosa::offload_store>>(config, layers, out);
    case method::nosa_resident:
      return make<nosa::nosa_pipeline<nosa::bf16, D, nosa::resident_store>>(config, layers, out);
    }
    return nosa::status::invalid_argument;
  });
}

}  // namespace nosa_engine
