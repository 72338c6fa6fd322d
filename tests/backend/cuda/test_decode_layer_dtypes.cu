// The CUDA decode layer against the host decode layer with 16-bit storage (bf16, fp16), output in fp32 and
// in the storage type, GQA groups up to 16 (not only powers of two), blocks of 32, 64 and 128 tokens and
// hard budgets of 0 and 2 blocks (D = 64); full attention in both 16-bit types.
#include "twin.cuh"

#include <doctest/doctest.h>

namespace {

using nosa::bias_mode;
using nosa_cuda_test::make_config;
using nosa_cuda_test::ragged_spec;
using nosa_cuda_test::run_differential;
using nosa_cuda_test::scaled;

}  // namespace

TEST_CASE_TEMPLATE("16-bit storage decodes like the host backend, output in fp32 and in the storage type", T,
                   nosa::bf16, nosa::fp16) {
  NOSA_REQUIRE_GPU();
  const int steps = scaled(300, 10);
  using nosa_p = nosa::nosa_pipeline<T, 64>;
  using infllm_resident = nosa::infllmv2_pipeline<T, 64, nosa::resident_store>;
  using nosi = nosa::pipeline<T, 64, nosa::eviction_score_pooling, nosa::offload_store,
                              nosa::sparse_attention<bias_mode::before_scale>>;

  run_differential<nosa_p, float>(ragged_spec(make_config(32, 16, 1, 5, 64), 201, steps), "G 16, fp32 output");
  run_differential<nosa_p, T>(ragged_spec(make_config(64, 6, 2, 5, 64, 2), 202, steps),
                              "G 3, budget 2, storage-type output");
  run_differential<infllm_resident, T>(ragged_spec(make_config(128, 20, 4, 5, 64), 203, steps),
                                       "G 5, storage-type output");
  // No sinks and no local blocks: only the current block is forced.
  nosa_cuda_test::run_spec bare = ragged_spec(make_config(32, 14, 2, 5, 64, 0), 204, steps);
  bare.config.selection.n_init = 0;
  bare.config.selection.n_local = 0;
  bare.config.selection.top_k_query_aware = 4;
  run_differential<nosi, float>(bare, "G 7, budget 0, only the current block forced, fp32 output");
  // The gather on its own stream, overlapped with attention over the blocks that were already resident.
  nosa_cuda_test::run_spec overlapped = ragged_spec(make_config(32, 8, 2, 5, 64), 208, steps);
  overlapped.overlap = true;
  run_differential<nosa_p, T>(overlapped, "G 4, storage-type output");
  overlapped.config.selection.max_new_blocks = 1;
  run_differential<nosa_p, float>(overlapped, "G 4, budget 1, fp32 output");
  // A slot cache beyond k: dropped blocks stay until a miss needs their slot (least recently selected first).
  nosa_cuda_test::run_spec cached = ragged_spec(make_config(32, 8, 2, 5, 64), 209, steps);
  cached.config.limits.cache_slots = 6;
  run_differential<nosa_p, T>(cached, "G 4, 6 cache slots");
  cached.config.selection.max_new_blocks = 2;
  cached.config.limits.cache_slots = 20;
  cached.overlap = true;
  run_differential<nosa_p, float>(cached, "G 4, 20 cache slots, budget 2");
  // 48 sequences x 16 KV heads: 768 rows, so every stage's kernels run in several waves.
  run_differential<nosa_p, T>(nosa_cuda_test::many_rows_spec(make_config(32, 32, 16, 48, 64), 210, scaled(20, 4)),
                              "48 sequences, H_kv 16, G 2");
  // Blocks of 24 tokens: the tensor-core attention's 16-row tiles end part-way through every block.
  run_differential<nosa_p, T>(ragged_spec(make_config(24, 8, 2, 5, 64), 207, steps), "blocks of 24, G 4");
  // Full attention over every block (the dense baseline), plain and with the eviction-score bias.
  run_differential<nosa::full_attention_pipeline<T, 64>, T>(ragged_spec(make_config(32, 16, 1, 5, 64), 205, steps),
                                                           "full attention, G 16, storage-type output");
  run_differential<nosa::full_attention_pipeline<T, 64, bias_mode::after_scale>, float>(
      ragged_spec(make_config(64, 8, 2, 5, 64), 206, steps), "full attention with bias, G 4, fp32 output");
}
