#pragma once
// A small layer configuration for host tests that decode for a few hundred steps: blocks of 16 tokens,
// windows of 8 with stride 4, k = 8 (5 query-aware), two local blocks.

#include <nosa/core/params.hpp>

namespace nosa_test {

inline nosa::layer_config small_layer_config(int q_heads, int kv_heads, int sequences, int max_blocks) {
  nosa::layer_config cfg;
  cfg.num_q_heads = q_heads;
  cfg.num_kv_heads = kv_heads;
  cfg.selection.block_size = 16;
  cfg.selection.window = 8;
  cfg.selection.stride = 4;
  cfg.selection.top_k = 8;
  cfg.selection.top_k_query_aware = 5;
  cfg.selection.n_local = 2;
  cfg.limits = {sequences, max_blocks, sequences * max_blocks};
  return cfg;
}

}  // namespace nosa_test
