#pragma once
/// \file
/// Layout of a layer's state inside the two caller-owned arenas. Both backends place the same arrays at the
/// same offsets, so the state is one design executed two ways. Every array is sized by a capacity.
///
/// Notation: S = max_sequences, H = num_kv_heads, MB = max_blocks_per_sequence, MT = MB * b_s (tokens),
/// MW = window_count(MT), R = max_prefill_rows, NS = top_k + spare_slots + cache_slots (slots per (sequence,
/// KV head)), P = pool_pages, D = head_dim, E = sizeof(element), V = the stored value of a complete block: E,
/// or the 1-byte code of a quantized KV format (FP8, spec §6b).
///
/// A quantized format adds three kinds of arrays, and only then: the fp32 scales of the stored blocks (one
/// per block of one KV head, K or V, in the pool and in each slot), and the tail buffers, which hold the
/// current block of each (sequence, KV head) in the element type until it completes and is quantised.
/// Complete blocks then move as `b_s * D` codes plus a 4-byte scale (`block_bytes()`).

#include <nosa/core/params.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>

#include <cstddef>
#include <cstdint>

namespace nosa {

/// Most parts one (sequence, KV head)'s attention is split into; each part's partial softmax is merged by
/// log-sum-exp (CUDA backend).
inline constexpr int max_attention_splits = 64;
/// Split-attention partials the scratch holds beyond one per (sequence, KV head): a step of `rows` batch rows
/// splits into at most `max(rows, max_attention_parts) / rows` parts, so small batches spread over the GPU
/// while the scratch stays independent of the split count (CUDA backend).
inline constexpr int max_attention_parts = 1024;

/// Compression windows one scoring task covers; each chunk leaves its softmax partials (CUDA backend).
inline constexpr int score_chunk_windows = 256;

/// Byte offsets of every state array within its arena, plus the derived extents.
struct state_layout {
  // Extents.
  int sequences = 0, kv_heads = 0, head_dim = 0, block_size = 0, window = 0;
  int max_blocks = 0, max_tokens = 0, max_windows = 0, top_k = 0, slots = 0, pages = 0;
  int group = 0;       // G = H_q / H_kv
  int cache_slots = 0; // slots beyond k + spare that keep dropped blocks (offload store)
  int max_splits = 0;  // parts a (sequence, KV head)'s attention may be split into (CUDA backend)
  int partials = 0;    // X: split-attention partials the scratch holds, max(S * H, max_attention_parts)
  int score_chunks = 0;  // MC: chunks of score_chunk_windows windows covering MW
  int prefill_rows = 0;  // R: rows one prefill call may carry
  std::size_t element_size = 0;
  std::size_t value_size = 0;  // V: bytes of one value of a stored (complete) block
  bool quantized = false;      // complete blocks are stored as codes plus a scale (FP8)
  bool offloads = false;
  bool dense = false;  // full attention: no compressed state, scoring or selection arrays

  // Device arena.
  std::size_t seq_length = 0;       // int32 [S]                     tokens of each sequence
  std::size_t seq_live = 0;         // int32 [S]                     1 when the slot holds a live sequence
  std::size_t block_table = 0;      // int32 [S][MB]                 pool page of each block, -1 if none
  std::size_t token_scores = 0;     // f32   [S][H][MT]              eviction score c of every token
  std::size_t compressed_keys = 0;  // E     [S][H][MW][D]           Kc, mean of K over each window, rounded to E
  std::size_t compressed_scores = 0;// f32   [S][H][MW]              cc, mean of c over each window
  std::size_t key_ring = 0;         // E     [S][H][l_c][D]          K of the last l_c tokens, ring by t % l_c
  std::size_t selection = 0;        // int32 [S][H][k]               selected blocks in rank order
  std::size_t selection_count = 0;  // int32 [S][H]                  entries of `selection` in use
  std::size_t step_misses = 0;      // int32 [S][H]                  blocks loaded by the last step
  std::size_t row_selection = 0;    // int32 [R][H][k]               sparse prefill: each row's selection
  std::size_t row_selection_count = 0;  // int32 [R][H]              entries in use (0: dense prefill)
  std::size_t prefill_chunk = 0;    // int32 [S][2]                  scratch: (first position, tokens) of each
                                    //                               sequence's chunk in a prefill (CUDA backend)
  std::size_t slot_map = 0;         // int32 [S][H][NS]              block held by each slot, -1 if free
  std::size_t block_slot = 0;       // int32 [S][H][MB]              slot holding each block, -1 if none
  std::size_t slot_stamp = 0;       // int32 [S][H][NS]              length at which each slot's block was last selected
  std::size_t slot_keys = 0;        // V     [S][H][NS][b_s][D]      slot cache, K
  std::size_t slot_values = 0;      // V     [S][H][NS][b_s][D]      slot cache, V
  std::size_t slot_key_scales = 0;  // f32   [S][H][NS]              quantized: scale of each slot's K
  std::size_t slot_value_scales = 0;// f32   [S][H][NS]              quantized: scale of each slot's V
  std::size_t tail_keys = 0;        // E     [S][H][b_s][D]          quantized: K of the current block
  std::size_t tail_values = 0;      // E     [S][H][b_s][D]          quantized: V of the current block
  std::size_t query_scores = 0;     // f32   [S][H][MB]              scratch: Sq per block
  std::size_t agnostic_scores = 0;  // f32   [S][H][MB]              scratch: Se per block
  std::size_t window_scores = 0;    // f32   [S][H][MW]              scratch: P per window, summed over the group
  std::size_t window_logits = 0;    // f32   [S][H][G][MW]           scratch: each query head's logits per window
  std::size_t score_partials = 0;   // f32   [S][H][MC][G][2]        scratch: softmax (max, sum) per window chunk
  std::size_t logit_scratch = 0;    // f32   [b_s]                   scratch: logits of one block (host backend)
  std::size_t block_order = 0;      // int32 [S][H][MB]              scratch: ranking of blocks
  std::size_t block_mark = 0;       // int32 [S][H][MB]              scratch: membership marks, kept zero
  std::size_t batch_mark = 0;       // int32 [S]                     scratch: duplicate detection, kept zero
  std::size_t miss_list = 0;        // int32 [S][H][k]               scratch: blocks the last diff found missing
  std::size_t partial_acc = 0;      // f32   [X][G][D]               scratch: split attention, weighted V sums
  std::size_t partial_stats = 0;    // f32   [X][G][2]               scratch: split attention, (max, sum)
  std::size_t attention_done = 0;   // int32 [S][H] + [S]            scratch: attention splits done per batch row, then
                                    //                               KV heads merged per batch, kept zero
  std::size_t step_status = 0;      // int32 [1]                     status of the last step's state checks
  std::size_t totals = 0;           // counters                      accumulated over all steps
  std::size_t last_step = 0;        // counters                      the last step only
  std::size_t device_pool = 0;      // V     [P][2][H][b_s][D]       pool (resident store only)
  std::size_t device_pool_scales = 0;// f32   [P][2][H]               quantized: scale of each block-head (resident)
  std::size_t device_bytes = 0;

  // Host arena.
  std::size_t host_pool = 0;        // V     [P][2][H][b_s][D]       pool (offload store only)
  std::size_t host_pool_scales = 0; // f32   [P][2][H]               quantized: scale of each block-head (offload)
  std::size_t page_refs = 0;        // int32 [P]                     references to each page, 0 = free
  std::size_t free_pages = 0;       // int32 [P]                     stack of free page ids
  std::size_t free_count = 0;       // int32 [1]                     entries on the stack
  std::size_t staging = 0;          // int32 [S*(MB+2)]              plan calls: state copied to the host
  std::size_t inspect_selection = 0;// int32 [k]                     inspection: one selection
  std::size_t inspect_slots = 0;    // int32 [NS]                    inspection: one slot map
  std::size_t host_bytes = 0;

  /// Elements of one page: K and V of one block of every KV head.
  constexpr std::size_t page_elements() const noexcept {
    return std::size_t{2} * kv_heads * block_size * head_dim;
  }
  /// Elements of one block of one KV head, K or V: the unit of transfer.
  constexpr std::size_t block_elements() const noexcept { return std::size_t(block_size) * head_dim; }
  /// Bytes of one stored block of one KV head, K or V, as it moves between the pool and the slot cache: its
  /// values, plus its fp32 scale when the format is quantized (`b_s * D + 4` for FP8).
  constexpr std::size_t block_bytes() const noexcept {
    return block_elements() * value_size + (quantized ? sizeof(float) : 0);
  }
};

namespace detail {
constexpr std::size_t align_up(std::size_t n, std::size_t a) noexcept { return (n + a - 1) / a * a; }

struct arena_cursor {
  std::size_t bytes = 0;
  constexpr std::size_t take(std::size_t n) noexcept {
    const std::size_t at = bytes;
    bytes = align_up(bytes + n, arena_alignment);
    return at;
  }
};
}  // namespace detail

/// Computes the layout of a layer's state. `config` must already be valid.
template <pipeline_policy P>
constexpr state_layout make_state_layout(const layer_config& config) noexcept {
  state_layout s;
  const selection_params& sel = config.selection;
  s.sequences = config.limits.max_sequences;
  s.kv_heads = config.num_kv_heads;
  s.head_dim = P::head_dim;
  s.block_size = sel.block_size;
  s.window = sel.window;
  s.max_blocks = config.limits.max_blocks_per_sequence;
  s.max_tokens = s.max_blocks * sel.block_size;
  s.max_windows = window_count(s.max_tokens, sel);
  s.top_k = sel.top_k;
  s.cache_slots = P::store::offloads ? config.limits.cache_slots : 0;
  s.slots = sel.top_k + P::store::spare_slots + s.cache_slots;
  s.pages = config.limits.pool_pages;
  s.group = config.group_size();
  s.prefill_rows = config.limits.max_prefill_rows;
  // Full attention splits over every block of a sequence, sparse attention over the k selected.
  const int attended = P::dense ? s.max_blocks : sel.top_k;
  s.max_splits = attended < max_attention_splits ? attended : max_attention_splits;
  using format = typename P::store::kv_format;
  s.element_size = sizeof(typename P::element_type);
  s.value_size = sizeof(typename format::template value_type<typename P::element_type>);
  s.quantized = format::quantized;
  s.offloads = P::store::offloads;
  s.dense = P::dense;

  const std::size_t S = s.sequences, SH = S * s.kv_heads, D = s.head_dim, E = s.element_size;
  const std::size_t i32 = sizeof(std::int32_t), f32 = sizeof(float);
  detail::arena_cursor dev;
  s.seq_length = dev.take(S * i32);
  s.seq_live = dev.take(S * i32);
  s.block_table = dev.take(S * s.max_blocks * i32);
  s.token_scores = dev.take(SH * s.max_tokens * f32);
  // Full attention keeps no compressed state and no scoring scratch: those offsets stay 0 and are never used.
  const bool scored = !P::dense;
  if (scored) {
    s.compressed_keys = dev.take(SH * s.max_windows * D * E);
    s.compressed_scores = dev.take(SH * s.max_windows * f32);
    s.key_ring = dev.take(SH * sel.window * D * E);
  }
  s.selection = dev.take(SH * s.top_k * i32);
  s.selection_count = dev.take(SH * i32);
  s.step_misses = dev.take(SH * i32);
  if (scored && s.prefill_rows > 0) {
    const std::size_t RH = std::size_t(s.prefill_rows) * s.kv_heads;
    s.row_selection = dev.take(RH * s.top_k * i32);
    s.row_selection_count = dev.take(RH * i32);
  }
  s.prefill_chunk = dev.take(S * 2 * i32);
  if (s.offloads) {
    s.slot_map = dev.take(SH * s.slots * i32);
    s.block_slot = dev.take(SH * s.max_blocks * i32);
    s.slot_stamp = dev.take(SH * s.slots * i32);
    s.slot_keys = dev.take(SH * s.slots * s.block_elements() * s.value_size);
    s.slot_values = dev.take(SH * s.slots * s.block_elements() * s.value_size);
    if (s.quantized) {
      s.slot_key_scales = dev.take(SH * s.slots * f32);
      s.slot_value_scales = dev.take(SH * s.slots * f32);
    }
  }
  if (s.quantized) {
    s.tail_keys = dev.take(SH * s.block_elements() * E);
    s.tail_values = dev.take(SH * s.block_elements() * E);
  }
  if (scored) {
    s.query_scores = dev.take(SH * s.max_blocks * f32);
    s.agnostic_scores = dev.take(SH * s.max_blocks * f32);
    s.window_scores = dev.take(SH * s.max_windows * f32);
    s.window_logits = dev.take(SH * s.group * s.max_windows * f32);
    s.score_chunks = (s.max_windows + score_chunk_windows - 1) / score_chunk_windows;
    s.score_partials = dev.take(SH * s.score_chunks * s.group * 2 * f32);
  }
  s.logit_scratch = dev.take(std::size_t(sel.block_size) * f32);
  if (scored) {
    s.block_order = dev.take(SH * s.max_blocks * i32);
    s.block_mark = dev.take(SH * s.max_blocks * i32);
  }
  s.batch_mark = dev.take(S * i32);
  s.miss_list = dev.take(SH * s.top_k * i32);
  s.partials = static_cast<int>(SH > std::size_t(max_attention_parts) ? SH : std::size_t(max_attention_parts));
  s.partial_acc = dev.take(std::size_t(s.partials) * s.group * D * f32);
  s.partial_stats = dev.take(std::size_t(s.partials) * s.group * 2 * f32);
  s.attention_done = dev.take((SH + S) * i32);
  s.step_status = dev.take(i32);
  s.totals = dev.take(sizeof(counters));
  s.last_step = dev.take(sizeof(counters));
  const std::size_t pool_bytes = std::size_t(s.pages) * s.page_elements() * s.value_size;
  const std::size_t pool_scale_bytes = std::size_t(s.pages) * 2 * s.kv_heads * f32;
  if (!s.offloads) {
    s.device_pool = dev.take(pool_bytes);
    if (s.quantized) s.device_pool_scales = dev.take(pool_scale_bytes);
  }
  s.device_bytes = dev.bytes;

  detail::arena_cursor host;
  if (s.offloads) {
    s.host_pool = host.take(pool_bytes);
    if (s.quantized) s.host_pool_scales = host.take(pool_scale_bytes);
  }
  s.page_refs = host.take(std::size_t(s.pages) * i32);
  s.free_pages = host.take(std::size_t(s.pages) * i32);
  s.free_count = host.take(i32);
  s.staging = host.take(S * (s.max_blocks + 2) * i32);
  s.inspect_selection = host.take(std::size_t(s.top_k) * i32);
  s.inspect_slots = host.take(std::size_t(s.slots) * i32);
  s.host_bytes = host.bytes;
  return s;
}

}  // namespace nosa
