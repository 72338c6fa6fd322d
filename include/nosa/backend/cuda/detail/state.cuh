#pragma once
/// \file
/// Kernel-side view of a layer's state: typed pointers into the device arena (and the device address of the
/// mapped host pool), built once at creation from the shared `state_layout` and passed to kernels by value.

#include <nosa/core/numeric.hpp>
#include <nosa/core/params.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/store/layout.hpp>

#include <cstddef>
#include <cstdint>

namespace nosa::detail {

template <class E, int D>
struct cuda_state {
  selection_params sel;
  int sequences, kv_heads, group, max_blocks, max_tokens, max_windows, top_k, slots, max_splits, score_chunks;
  int cache_slots;  ///< slots beyond k + 1 that keep dropped blocks (offload store)
  bool dependent_launch;  ///< a step's kernels launch as programmatic dependent launches (sm_90 and later)

  std::int32_t* lengths;
  std::int32_t* live;
  std::int32_t* block_table;
  float* token_scores;
  E* compressed_keys;
  float* compressed_scores;
  E* key_ring;
  std::int32_t* selection;
  std::int32_t* selection_count;
  std::int32_t* step_misses;
  std::int32_t* slot_map;
  std::int32_t* block_slot;
  std::int32_t* slot_stamp;
  E* slot_keys;
  E* slot_values;
  float* query_scores;
  float* agnostic_scores;
  float* window_scores;
  float* window_logits;
  float* score_partials;
  std::int32_t* block_mark;
  std::int32_t* batch_mark;
  std::int32_t* miss_list;
  float* partial_acc;
  float* partial_stats;
  std::int32_t* attention_done;  ///< [rows] splits done per batch row, then [batch] KV heads merged, kept zero
  std::int32_t* status;
  counters* totals;
  counters* last_step;
  int prefill_rows;                   ///< R: rows one prefill call may carry
  std::int32_t* row_selection;        ///< [R][H][k] sparse prefill: each row's selection
  std::int32_t* row_selection_count;  ///< [R][H] entries in use
  std::int32_t* prefill_chunk;        ///< [S][2] (first position, tokens) of each sequence's chunk in a prefill
  E* pool;  ///< device address of the pool: mapped host memory (offload) or device memory (resident)

  // A quantized KV format (FP8, spec §6b) keeps complete blocks as codes plus a scale, and each current block
  // in the element type in a tail buffer. With it the element-type views above of the slot cache and the
  // pool are null (their memory holds codes); without it the views below are null.
  bool quantized;
  fp8_e4m3* slot_key_codes;    ///< [S][H][NS][b_s][D] slot cache, K
  fp8_e4m3* slot_value_codes;  ///< [S][H][NS][b_s][D] slot cache, V
  float* slot_key_scales;      ///< [S][H][NS] scale of each slot's K
  float* slot_value_scales;    ///< [S][H][NS] scale of each slot's V
  E* tail_keys;                ///< [S][H][b_s][D] K of the current block
  E* tail_values;              ///< [S][H][b_s][D] V of the current block
  fp8_e4m3* pool_codes;        ///< [P][2][H][b_s][D] pool, at the device address of its arena
  float* pool_scales;          ///< [P][2][H] scale of each block-head of the pool

  NOSA_HOST_DEVICE std::size_t sh(int seq, int h) const { return std::size_t(seq) * kv_heads + h; }
  NOSA_HOST_DEVICE std::size_t block_elements() const { return std::size_t(sel.block_size) * D; }
  NOSA_HOST_DEVICE std::size_t page_elements() const { return 2 * std::size_t(kv_heads) * block_elements(); }
  /// Bytes one stored block of one KV head, K or V, moves as (`state_layout::block_bytes()`): its elements,
  /// or its codes plus its scale.
  NOSA_HOST_DEVICE std::size_t block_bytes() const {
    return quantized ? block_elements() + sizeof(float) : block_elements() * sizeof(E);
  }

  NOSA_HOST_DEVICE std::int32_t* table(int seq) const { return block_table + std::size_t(seq) * max_blocks; }
  NOSA_HOST_DEVICE float* scores_of(int seq, int h) const { return token_scores + sh(seq, h) * max_tokens; }
  NOSA_HOST_DEVICE E* kc_of(int seq, int h) const { return compressed_keys + sh(seq, h) * max_windows * D; }
  NOSA_HOST_DEVICE std::int32_t* stamp_of(int seq, int h) const { return slot_stamp + sh(seq, h) * slots; }
  NOSA_HOST_DEVICE float* cc_of(int seq, int h) const { return compressed_scores + sh(seq, h) * max_windows; }
  NOSA_HOST_DEVICE E* ring_of(int seq, int h) const { return key_ring + sh(seq, h) * sel.window * D; }
  NOSA_HOST_DEVICE std::int32_t* selection_of(int seq, int h) const { return selection + sh(seq, h) * top_k; }
  NOSA_HOST_DEVICE std::int32_t* slot_map_of(int seq, int h) const { return slot_map + sh(seq, h) * slots; }
  NOSA_HOST_DEVICE std::int32_t* block_slot_of(int seq, int h) const { return block_slot + sh(seq, h) * max_blocks; }
  NOSA_HOST_DEVICE E* slot_k(int seq, int h, int slot) const {
    return slot_keys + (sh(seq, h) * slots + slot) * block_elements();
  }
  NOSA_HOST_DEVICE E* slot_v(int seq, int h, int slot) const {
    return slot_values + (sh(seq, h) * slots + slot) * block_elements();
  }
  NOSA_HOST_DEVICE E* page_k(int page, int h) const {
    return pool + std::size_t(page) * page_elements() + std::size_t(h) * block_elements();
  }
  NOSA_HOST_DEVICE E* page_v(int page, int h) const {
    return pool + std::size_t(page) * page_elements() + std::size_t(kv_heads + h) * block_elements();
  }
  NOSA_HOST_DEVICE fp8_e4m3* slot_k_codes(int seq, int h, int slot) const {
    return slot_key_codes + (sh(seq, h) * slots + slot) * block_elements();
  }
  NOSA_HOST_DEVICE fp8_e4m3* slot_v_codes(int seq, int h, int slot) const {
    return slot_value_codes + (sh(seq, h) * slots + slot) * block_elements();
  }
  NOSA_HOST_DEVICE float* slot_k_scale(int seq, int h, int slot) const {
    return slot_key_scales + sh(seq, h) * slots + slot;
  }
  NOSA_HOST_DEVICE float* slot_v_scale(int seq, int h, int slot) const {
    return slot_value_scales + sh(seq, h) * slots + slot;
  }
  NOSA_HOST_DEVICE E* tail_k(int seq, int h) const { return tail_keys + sh(seq, h) * block_elements(); }
  NOSA_HOST_DEVICE E* tail_v(int seq, int h) const { return tail_values + sh(seq, h) * block_elements(); }
  NOSA_HOST_DEVICE fp8_e4m3* page_k_codes(int page, int h) const {
    return pool_codes + std::size_t(page) * page_elements() + std::size_t(h) * block_elements();
  }
  NOSA_HOST_DEVICE fp8_e4m3* page_v_codes(int page, int h) const {
    return pool_codes + std::size_t(page) * page_elements() + std::size_t(kv_heads + h) * block_elements();
  }
  NOSA_HOST_DEVICE float* page_k_scale(int page, int h) const {
    return pool_scales + std::size_t(page) * 2 * kv_heads + h;
  }
  NOSA_HOST_DEVICE float* page_v_scale(int page, int h) const {
    return pool_scales + (std::size_t(page) * 2 + 1) * kv_heads + h;
  }
  NOSA_HOST_DEVICE float* sq_of(int seq, int h) const { return query_scores + sh(seq, h) * max_blocks; }
  NOSA_HOST_DEVICE float* se_of(int seq, int h) const { return agnostic_scores + sh(seq, h) * max_blocks; }
  NOSA_HOST_DEVICE float* prob_of(int seq, int h) const { return window_scores + sh(seq, h) * max_windows; }
  NOSA_HOST_DEVICE float* logits_of(int seq, int h) const {
    return window_logits + sh(seq, h) * group * max_windows;
  }
  NOSA_HOST_DEVICE float* score_partials_of(int seq, int h) const {
    return score_partials + sh(seq, h) * score_chunks * group * 2;
  }
  NOSA_HOST_DEVICE std::int32_t* mark_of(int seq, int h) const { return block_mark + sh(seq, h) * max_blocks; }
  NOSA_HOST_DEVICE std::int32_t* misses_of(int seq, int h) const { return miss_list + sh(seq, h) * top_k; }
  /// Partial `split` of `splits` of batch row `row` (b * H + h): partials are laid out by the step's rows,
  /// not by sequence, so the scratch is bounded by the parts of one step.
  NOSA_HOST_DEVICE float* acc_of(int row, int split, int splits) const {
    return partial_acc + ((std::size_t(row) * splits + split) * group) * D;
  }
  NOSA_HOST_DEVICE float* stats_of(int row, int split, int splits) const {
    return partial_stats + ((std::size_t(row) * splits + split) * group) * 2;
  }
  /// Prefill: true when the kernels that work on `seq` at `offset` tokens past the chunk's first position
  /// have nothing to do: its chunk in the running prefill is empty, or shorter than `offset` tokens.
  NOSA_HOST_DEVICE bool prefill_skips(int seq, int offset) const {
    const int tokens = prefill_chunk[2 * seq + 1];
    return tokens == 0 || offset > tokens;
  }
};

/// Builds the kernel view of a state from the arenas' base addresses (`pool_base` is the device address
/// of the arena that holds the pool).
template <class E, int D>
cuda_state<E, D> make_cuda_state(const layer_config& config, const state_layout& l, std::byte* device,
                                 std::byte* pool_base) noexcept {
  const auto at = [device](std::size_t offset) { return device + offset; };
  cuda_state<E, D> s{};
  s.sel = config.selection;
  s.sequences = l.sequences;
  s.kv_heads = l.kv_heads;
  s.group = l.group;
  s.max_blocks = l.max_blocks;
  s.max_tokens = l.max_tokens;
  s.max_windows = l.max_windows;
  s.top_k = l.top_k;
  s.slots = l.slots;
  s.max_splits = l.max_splits;
  s.score_chunks = l.score_chunks;
  s.cache_slots = l.cache_slots;
  s.lengths = reinterpret_cast<std::int32_t*>(at(l.seq_length));
  s.live = reinterpret_cast<std::int32_t*>(at(l.seq_live));
  s.block_table = reinterpret_cast<std::int32_t*>(at(l.block_table));
  s.token_scores = reinterpret_cast<float*>(at(l.token_scores));
  s.compressed_keys = reinterpret_cast<E*>(at(l.compressed_keys));
  s.compressed_scores = reinterpret_cast<float*>(at(l.compressed_scores));
  s.key_ring = reinterpret_cast<E*>(at(l.key_ring));
  s.selection = reinterpret_cast<std::int32_t*>(at(l.selection));
  s.selection_count = reinterpret_cast<std::int32_t*>(at(l.selection_count));
  s.step_misses = reinterpret_cast<std::int32_t*>(at(l.step_misses));
  s.slot_map = reinterpret_cast<std::int32_t*>(at(l.slot_map));
  s.block_slot = reinterpret_cast<std::int32_t*>(at(l.block_slot));
  s.slot_stamp = reinterpret_cast<std::int32_t*>(at(l.slot_stamp));
  s.slot_keys = reinterpret_cast<E*>(at(l.slot_keys));
  s.slot_values = reinterpret_cast<E*>(at(l.slot_values));
  s.query_scores = reinterpret_cast<float*>(at(l.query_scores));
  s.agnostic_scores = reinterpret_cast<float*>(at(l.agnostic_scores));
  s.window_scores = reinterpret_cast<float*>(at(l.window_scores));
  s.window_logits = reinterpret_cast<float*>(at(l.window_logits));
  s.score_partials = reinterpret_cast<float*>(at(l.score_partials));
  s.block_mark = reinterpret_cast<std::int32_t*>(at(l.block_mark));
  s.batch_mark = reinterpret_cast<std::int32_t*>(at(l.batch_mark));
  s.miss_list = reinterpret_cast<std::int32_t*>(at(l.miss_list));
  s.partial_acc = reinterpret_cast<float*>(at(l.partial_acc));
  s.partial_stats = reinterpret_cast<float*>(at(l.partial_stats));
  s.attention_done = reinterpret_cast<std::int32_t*>(at(l.attention_done));
  s.status = reinterpret_cast<std::int32_t*>(at(l.step_status));
  s.totals = reinterpret_cast<counters*>(at(l.totals));
  s.last_step = reinterpret_cast<counters*>(at(l.last_step));
  s.prefill_rows = l.prefill_rows;
  s.row_selection = l.row_selection != 0 ? reinterpret_cast<std::int32_t*>(at(l.row_selection)) : nullptr;
  s.row_selection_count =
      l.row_selection_count != 0 ? reinterpret_cast<std::int32_t*>(at(l.row_selection_count)) : nullptr;
  s.prefill_chunk = reinterpret_cast<std::int32_t*>(at(l.prefill_chunk));
  s.pool = reinterpret_cast<E*>(pool_base + (l.offloads ? l.host_pool : l.device_pool));
  s.quantized = l.quantized;
  if (l.quantized) {
    s.slot_key_codes = l.offloads ? reinterpret_cast<fp8_e4m3*>(at(l.slot_keys)) : nullptr;
    s.slot_value_codes = l.offloads ? reinterpret_cast<fp8_e4m3*>(at(l.slot_values)) : nullptr;
    s.slot_key_scales = l.offloads ? reinterpret_cast<float*>(at(l.slot_key_scales)) : nullptr;
    s.slot_value_scales = l.offloads ? reinterpret_cast<float*>(at(l.slot_value_scales)) : nullptr;
    s.tail_keys = reinterpret_cast<E*>(at(l.tail_keys));
    s.tail_values = reinterpret_cast<E*>(at(l.tail_values));
    s.pool_codes = reinterpret_cast<fp8_e4m3*>(s.pool);
    s.pool_scales =
        reinterpret_cast<float*>(pool_base + (l.offloads ? l.host_pool_scales : l.device_pool_scales));
    s.slot_keys = s.slot_values = s.pool = nullptr;
  }
  return s;
}

}  // namespace nosa::detail
