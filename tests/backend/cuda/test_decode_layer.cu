// The CUDA decode layer against the host decode layer: every policy combination (variant, store, bias
// mode) on random ragged batches with continuous batching, with and without a hard transfer budget (fp32
// storage, D = 64). Every admission, removal and step is compared: scores, selections in rank order, misses,
// slot maps, counters, outputs and the whole persistent state.
#include "twin.cuh"

#include <doctest/doctest.h>

namespace {

using nosa::bias_mode;
using nosa_cuda_test::make_config;
using nosa_cuda_test::many_rows_spec;
using nosa_cuda_test::ragged_spec;
using nosa_cuda_test::run_differential;
using nosa_cuda_test::run_spec;
using nosa_cuda_test::scaled;

template <class Agnostic, class Store, bias_mode Bias>
using fp32_combo = nosa::pipeline<float, 64, Agnostic, Store, nosa::sparse_attention<Bias>>;

// Spreads GQA groups, block sizes and window shapes over the combinations: G = 3, 5 or 1 by bias mode,
// blocks of 32 tokens for the offload store and 64 for the resident one, and for InfLLMv2-style selection
// windows longer than a block (48 tokens, stride 16: a window overlaps up to three blocks).
template <class P>
nosa::layer_config combo_config() {
  int hq = 6, hkv = 2;
  if (P::attention::bias == bias_mode::before_scale) {
    hq = 5;
    hkv = 1;
  } else if (P::attention::bias == bias_mode::none) {
    hq = 3;
    hkv = 3;
  }
  nosa::layer_config c = make_config(P::store::offloads ? 32 : 64, hq, hkv, 5, 64);
  if (!P::query_agnostic::enabled) {
    c.selection.window = 48;
    c.selection.stride = 16;
  }
  return c;
}

}  // namespace

TEST_CASE_TEMPLATE("every policy combination decodes like the host backend (fp32, D = 64)", P,
                   nosa::nosa_pipeline<float, 64>,
                   nosa::nosa_pipeline<float, 64, nosa::resident_store>,
                   nosa::infllmv2_pipeline<float, 64>,
                   nosa::infllmv2_pipeline<float, 64, nosa::resident_store>,
                   fp32_combo<nosa::eviction_score_pooling, nosa::offload_store, bias_mode::before_scale>,
                   fp32_combo<nosa::eviction_score_pooling, nosa::offload_store, bias_mode::none>,
                   fp32_combo<nosa::eviction_score_pooling, nosa::resident_store, bias_mode::before_scale>,
                   fp32_combo<nosa::eviction_score_pooling, nosa::resident_store, bias_mode::none>,
                   fp32_combo<nosa::no_query_agnostic, nosa::offload_store, bias_mode::after_scale>,
                   fp32_combo<nosa::no_query_agnostic, nosa::offload_store, bias_mode::before_scale>,
                   fp32_combo<nosa::no_query_agnostic, nosa::resident_store, bias_mode::after_scale>,
                   fp32_combo<nosa::no_query_agnostic, nosa::resident_store, bias_mode::before_scale>) {
  NOSA_REQUIRE_GPU();
  run_spec spec = ragged_spec(combo_config<P>(), 101, scaled(300, 10));
  run_differential<P>(spec, "no budget");
  if constexpr (P::store::offloads) {
    // A hard budget of one block per step: dropped misses are replaced by resident blocks.
    spec.config.selection.max_new_blocks = 1;
    spec.seed = 102;
    run_differential<P>(spec, "budget 1");
  }
}

TEST_CASE_TEMPLATE("sequences that share a prompt prefix share its pages and decode like the host backend", P,
                   nosa::nosa_pipeline<nosa::bf16, 64>, nosa::nosa_pipeline<nosa::bf16, 64, nosa::resident_store>) {
  NOSA_REQUIRE_GPU();
  nosa_cuda_test::run_shared_prefix<P>(111);
}

TEST_CASE_TEMPLATE("selection at the edges of its kernel's shapes decodes like the host backend", P,
                   nosa::nosa_pipeline<float, 64>, nosa::infllmv2_pipeline<float, 64>,
                   nosa::nosa_pipeline<float, 64, nosa::resident_store>) {
  NOSA_REQUIRE_GPU();
  SUBCASE("scores read from global memory: more blocks a sequence than shared memory stages") {
    run_spec spec = ragged_spec(combo_config<P>(), 111, scaled(100, 8));
    // Capacity only: the prompts stay short, the pool keeps its size.
    spec.config.limits.max_blocks_per_sequence = 4700;
    run_differential<P>(spec, "unstaged");
    if constexpr (P::store::offloads) {
      spec.config.selection.max_new_blocks = 2;
      spec.seed = 112;
      run_differential<P>(spec, "unstaged, budget 2");
    }
  }
  SUBCASE("the largest k: 256 selected blocks, 257 slots") {
    nosa::layer_config c = make_config(16, 6, 2, 5, 64);
    c.selection.top_k = 256;
    c.selection.top_k_query_aware = 100;
    c.selection.n_local = 5;
    run_spec spec = ragged_spec(c, 121, scaled(120, 6));
    run_differential<P>(spec, "k 256");
    if constexpr (P::store::offloads) {
      spec.config.selection.max_new_blocks = 3;
      spec.seed = 122;
      run_differential<P>(spec, "k 256, budget 3");
    }
  }
}

TEST_CASE_TEMPLATE("a batch of more rows than the device holds CTAs at once decodes like the host backend", P,
                   nosa::nosa_pipeline<float, 64>, nosa::infllmv2_pipeline<float, 64, nosa::resident_store>) {
  NOSA_REQUIRE_GPU();
  // 48 sequences x 16 KV heads: 768 (sequence, KV head) rows, so every stage's kernels run in several waves.
  run_differential<P>(many_rows_spec(make_config(32, 32, 16, 48, 64), 131, scaled(20, 4)), "48 sequences, H_kv 16");
}
