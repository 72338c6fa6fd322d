// The CUDA decode layer against the host decode layer at head dims 128 and 256, across storage types,
// variants, stores, GQA groups 1 to 16 and block sizes 32 to 128.
#include "twin.cuh"

#include <doctest/doctest.h>

namespace {

using nosa::bias_mode;
using nosa_cuda_test::make_config;
using nosa_cuda_test::ragged_spec;
using nosa_cuda_test::run_differential;
using nosa_cuda_test::scaled;

}  // namespace

TEST_CASE("head dim 128 decodes like the host backend") {
  NOSA_REQUIRE_GPU();
  const int steps = scaled(240, 8);
  using nosa_p = nosa::nosa_pipeline<nosa::bf16, 128>;
  using infllm = nosa::infllmv2_pipeline<nosa::fp16, 128>;
  using resident_nosi = nosa::pipeline<float, 128, nosa::eviction_score_pooling, nosa::resident_store,
                                       nosa::sparse_attention<bias_mode::before_scale>>;
  // Every free pick query-aware (k_qa = k): NOSA's query-agnostic part is empty.
  nosa_cuda_test::run_spec all_qa = ragged_spec(make_config(128, 6, 2, 5, 64), 301, steps);
  all_qa.config.selection.top_k_query_aware = all_qa.config.selection.top_k;
  run_differential<nosa_p, nosa::bf16>(all_qa, "G 3, k_qa = k, bf16 output");
  run_differential<nosa_p, float>(ragged_spec(make_config(64, 16, 1, 5, 64, 1), 302, steps),
                                  "G 16, budget 1, fp32 output");
  // Two sinks and one local block.
  nosa_cuda_test::run_spec sinks = ragged_spec(make_config(32, 5, 1, 5, 64), 303, steps);
  sinks.config.selection.n_init = 2;
  sinks.config.selection.n_local = 1;
  run_differential<infllm, float>(sinks, "G 5, two sinks, one local block, fp32 output");
  run_differential<resident_nosi, float>(ragged_spec(make_config(64, 4, 4, 5, 64), 304, steps), "G 1");
  run_differential<nosa::full_attention_pipeline<nosa::bf16, 128>, nosa::bf16>(
      ragged_spec(make_config(64, 16, 1, 5, 64), 305, steps), "full attention, G 16, bf16 output");
}

TEST_CASE("head dim 256 decodes like the host backend") {
  NOSA_REQUIRE_GPU();
  const int steps = scaled(180, 6);
  using nosa_p = nosa::nosa_pipeline<nosa::bf16, 256>;
  using infllm_resident = nosa::infllmv2_pipeline<float, 256, nosa::resident_store>;
  using infllm_biased = nosa::pipeline<nosa::fp16, 256, nosa::no_query_agnostic, nosa::offload_store,
                                       nosa::sparse_attention<bias_mode::after_scale>>;
  run_differential<nosa_p, nosa::bf16>(ragged_spec(make_config(64, 10, 2, 5, 64, 2), 401, steps),
                                       "G 5, budget 2, bf16 output");
  run_differential<infllm_resident, float>(ragged_spec(make_config(128, 16, 1, 5, 64), 402, steps), "G 16");
  // Windows that do not overlap (stride = window).
  nosa_cuda_test::run_spec tiled = ragged_spec(make_config(32, 6, 2, 5, 64), 403, steps);
  tiled.config.selection.stride = tiled.config.selection.window;
  run_differential<infllm_biased, nosa::fp16>(tiled, "G 3, windows without overlap, fp16 output");
}
