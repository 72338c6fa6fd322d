#pragma once
/// \file
/// `make_cuda_stack_for<D>`: the CUDA engine's four attention methods at one head dim, instantiated by
/// `stack_64.cu` and `stack_128.cu`; `make_cuda_stack` and `cuda_stack_bytes` dispatch to them.

#include "../attention_stack.hpp"
#include "cuda_engine.cuh"

#include <nosa/backend/cuda/arena.cuh>
#include <nosa/backend/cuda/decode_layer.cuh>
#include <nosa/pipeline.hpp>

#include <memory>

namespace nosa_engine {

/// Creates the stack of method `m` into `*out`, or, when `out` is null, only sizes it into `*bytes`.
template <int D>
nosa::status make_cuda_stack_for(method m, const nosa::layer_config& config, int layers,
                                 std::unique_ptr<cuda_stack>* out, nosa::arena_sizes* bytes) {
  const auto make = [&]<class Pipeline>() -> nosa::status {
    using layer = nosa::decode_layer<Pipeline, nosa::cuda_backend>;
    using stage = typename layer::step_stage;
    static_assert(int(stage::begin) == int(step_stage_id::begin) && int(stage::diff) == int(step_stage_id::diff) &&
                      int(stage::merge) == int(step_stage_id::merge),
                  "step_stage_id numbers the stages as the library does");
    using stack = attention_stack_of<layer, nosa::bf16, cuda_step_hooks>;
    if (out == nullptr) return stack::required_bytes(config, layers, *bytes);
    auto s = std::make_unique<stack>();
    NOSA_TRY(s->create(config, layers));
    *out = std::move(s);
    return nosa::status::success;
  };
  return with_pipeline<D>(m, make);
}

extern template nosa::status make_cuda_stack_for<64>(method, const nosa::layer_config&, int,
                                                     std::unique_ptr<cuda_stack>*, nosa::arena_sizes*);
extern template nosa::status make_cuda_stack_for<128>(method, const nosa::layer_config&, int,
                                                      std::unique_ptr<cuda_stack>*, nosa::arena_sizes*);

}  // namespace nosa_engine
