#pragma once
/// \file
/// Sizing a layer for throughput (host planning code). An engine that chooses its batch and its slot-cache
/// size weighs three things, and this header gives each for a `layer_config`:
///  - memory: the bytes one sequence adds to a layer's arenas, by part (`sequence_bytes`), the bytes the
///    layer holds whatever its sequences (`fixed_bytes`), and what one more cache slot costs (`slot_bytes`);
///  - traffic: the bytes one miss moves over the interconnect (`miss_bytes`) and the state a step reads from
///    HBM for one sequence (`step_hbm_bytes`);
///  - misses: the blocks each slot-cache size would load per step, measured from the selections of a short
///    calibration run (`miss_calibration`, built on `slot_cache_model`).
/// `roofline_seconds` then bounds a layer's step by what the link and HBM allow.
///
/// Every size follows the arrays of `make_state_layout` (store/layout.hpp), which remains the exact
/// figure: `fixed + S * sequence` equals a layout of S sequences up to the alignment of each array to
/// `arena_alignment` bytes (and, below `max_attention_parts / H` sequences, the split-attention scratch that
/// the layout keeps for small batches; `fixed_bytes` counts it in full).

#include <nosa/core/params.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/store/layout.hpp>
#include <nosa/store/slot_cache_model.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace nosa {

/// Bytes one sequence adds to one layer's arenas, by part, for the capacities of a `layer_config`.
struct sequence_bytes {
  // Device arena.
  std::size_t slot_cache = 0;       ///< offload store: K and V of its `k + 1 + cache_slots` slots per KV head
                                    ///< (values and scales), slot map, stamps and block-to-slot table
  std::size_t compressed_keys = 0;  ///< Kc of every window and the key ring, in the element type
  std::size_t scores = 0;           ///< c of every token and cc of every window (f32)
  std::size_t tables = 0;           ///< length, live flag, block table, selection, miss list, attention counts (int32)
  std::size_t scoring_scratch = 0;  ///< Sq, Se, window scores and logits, softmax partials, block ranking
  std::size_t partial_scratch = 0;  ///< split-attention partials of its KV heads ([H][G][D + 2] f32)
  std::size_t tails = 0;            ///< quantized KV formats: the current block in the element type
  std::size_t device_pages = 0;     ///< resident store: its pool pages
  // Host arena.
  std::size_t host_pages = 0;   ///< offload store: its pool pages (pinned)
  std::size_t host_tables = 0;  ///< page references and free stack of its pages, plan-call staging

  constexpr std::size_t device() const noexcept {
    return slot_cache + compressed_keys + scores + tables + scoring_scratch + partial_scratch + tails +
           device_pages;
  }
  constexpr std::size_t host() const noexcept { return host_pages + host_tables; }
};

/// Bytes of one pool page (K and V of one block of every KV head, with their scales when quantized).
template <pipeline_policy P>
constexpr std::size_t page_bytes(const layer_config& config) noexcept {
  const state_layout s = make_state_layout<P>(config);
  return std::size_t{2} * s.kv_heads * s.block_bytes();
}

/// Bytes one miss moves from the pool to a slot: K and V of one block of one KV head (a step's
/// `counters::bytes_h2d` is its misses times this).
template <pipeline_policy P>
constexpr std::size_t miss_bytes(const layer_config& config) noexcept {
  return std::size_t{2} * make_state_layout<P>(config).block_bytes();
}

/// Bytes one sequence adds to a layer of `config` that stores `pages` pool pages for it: its
/// `max_blocks_per_sequence` by default, fewer when it shares a prompt's pages (`shared_prefix`).
template <pipeline_policy P>
constexpr sequence_bytes bytes_per_sequence(const layer_config& config, int pages = -1) noexcept {
  const state_layout s = make_state_layout<P>(config);
  const std::size_t H = s.kv_heads, D = s.head_dim, E = s.element_size, G = s.group;
  const std::size_t MB = s.max_blocks, MT = s.max_tokens, MW = s.max_windows, K = s.top_k, NS = s.slots;
  const std::size_t i32 = sizeof(std::int32_t), f32 = sizeof(float);
  const std::size_t P_seq = pages < 0 ? MB : std::size_t(pages);
  const bool scored = !s.dense;
  sequence_bytes b;
  b.tables = (4 + MB) * i32 + H * (2 * K + 3) * i32;
  b.scores = H * MT * f32 + (scored ? H * MW * f32 : 0);
  if (scored) {
    b.compressed_keys = H * (MW + std::size_t(s.window)) * D * E;
    const std::size_t chunks = std::size_t(s.score_chunks);
    b.scoring_scratch = H * (4 * MB * i32 + MW * f32 + G * MW * f32 + chunks * G * 2 * f32);
  }
  if (s.offloads) {
    b.slot_cache = H * (2 * NS + MB) * i32 + H * NS * 2 * s.block_bytes();
  }
  if (s.quantized) b.tails = 2 * H * s.block_elements() * E;
  b.partial_scratch = H * G * (D + 2) * f32;
  const std::size_t pool = P_seq * 2 * H * s.block_bytes();
  (s.offloads ? b.host_pages : b.device_pages) = pool;
  b.host_tables = 2 * P_seq * i32 + (MB + 2) * i32;
  return b;
}

/// Bytes a layer of `config` holds whatever its sequences: counters, status, inspection buffers, and the
/// split-attention scratch of `max_attention_parts` partials that small batches use.
template <pipeline_policy P>
constexpr arena_sizes fixed_bytes(const layer_config& config) noexcept {
  const state_layout s = make_state_layout<P>(config);
  const std::size_t f32 = sizeof(float), i32 = sizeof(std::int32_t);
  arena_sizes a;
  a.device = std::size_t(s.block_size) * f32 + i32 + 2 * sizeof(counters) +
             std::size_t(max_attention_parts) * s.group * (std::size_t(s.head_dim) + 2) * f32;
  a.host = i32 + (std::size_t(s.top_k) + std::size_t(s.slots)) * i32;
  return a;
}

/// Device bytes one more cache slot (`capacity::cache_slots`) costs per sequence: a slot of K and V for
/// each KV head and its slot-map and stamp entries (offload store; 0 for a resident store).
template <pipeline_policy P>
constexpr std::size_t slot_bytes(const layer_config& config) noexcept {
  const state_layout s = make_state_layout<P>(config);
  if (!s.offloads) return 0;
  return std::size_t(s.kv_heads) * (2 * s.block_bytes() + 2 * sizeof(std::int32_t));
}

/// Bytes of state one decode step of a layer reads from HBM for one sequence of `length` tokens (the new
/// token included), over all its KV heads: the compressed keys of every window (query-aware scoring) and
/// their scores cc (query-agnostic scoring), then the K and V of the blocks attention reads and, with a
/// bias, their tokens' scores c. This is the traffic the method needs, not what a given kernel moves: scratch
/// written and read back between stages, the queries and the output are left out.
template <pipeline_policy P>
constexpr std::size_t step_hbm_bytes(const layer_config& config, int length) noexcept {
  const state_layout s = make_state_layout<P>(config);
  const selection_params& sel = config.selection;
  const std::size_t H = s.kv_heads, D = s.head_dim, E = s.element_size, f32 = sizeof(float);
  std::size_t per_head = 0;
  if (!s.dense) {
    const std::size_t windows = std::size_t(window_count(length, sel));
    per_head += windows * D * E;
    if (P::query_agnostic::enabled) per_head += windows * f32;
  }
  // Attended tokens: every token, or the k selected blocks of which the current one is partial.
  const int blocks = block_count(length, sel);
  const int complete_attended = s.dense || blocks <= sel.top_k ? blocks - 1 : sel.top_k - 1;
  const std::size_t tail_tokens = std::size_t(length - (blocks - 1) * sel.block_size);
  const std::size_t attended_tokens =
      std::size_t(complete_attended) * std::size_t(sel.block_size) + tail_tokens;
  per_head += std::size_t(complete_attended) * 2 * s.block_bytes() + tail_tokens * 2 * D * E;
  if (P::attention::bias != bias_mode::none) per_head += attended_tokens * f32;
  return H * per_head;
}

/// The time the hardware allows one layer's step: the gather of `gather_bytes` over the link and the HBM
/// reads of `hbm_bytes` plus the GEMMs run side by side, so the longer of the two bounds the step. Speeds in
/// bytes per second; a speed of 0 leaves its term out.
constexpr double roofline_seconds(double gather_bytes, double link_bytes_per_s, double hbm_bytes,
                                  double hbm_bytes_per_s, double gemm_seconds) noexcept {
  const double link = link_bytes_per_s > 0 ? gather_bytes / link_bytes_per_s : 0.0;
  const double compute = (hbm_bytes_per_s > 0 ? hbm_bytes / hbm_bytes_per_s : 0.0) + gemm_seconds;
  return link > compute ? link : compute;
}

/// Slot-cache sizes worth comparing for selections of `top_k` blocks: none, then k/8, k/4, k/2, k, 2k and
/// 4k extra slots (duplicates of small k dropped), in increasing order.
inline std::vector<int> cache_slot_candidates(int top_k) {
  std::vector<int> out{0};
  for (const int n : {top_k / 8, top_k / 4, top_k / 2, top_k, 2 * top_k, 4 * top_k}) {
    if (n > out.back()) out.push_back(n);
  }
  return out;
}

/// Misses per step of several slot-cache sizes, measured from the selections of a calibration run. Each
/// (sequence, KV head) of the run is one stream; the calibration replays its selections through a
/// `slot_cache_model` per candidate size, so one run at any cache size measures them all (selections do
/// not depend on the cache unless a hard transfer budget is set; spec §4). Host-only planning code.
class miss_calibration {
 public:
  /// Candidates `cache_slots` (slots beyond `k + 1`), each for `streams` (sequence, KV head) pairs.
  miss_calibration(const selection_params& sel, std::span<const int> cache_slots, int streams)
      : candidates_(cache_slots.begin(), cache_slots.end()), misses_(candidates_.size(), 0) {
    models_.reserve(candidates_.size() * std::size_t(streams));
    for (const int n : candidates_) {
      for (int i = 0; i < streams; ++i) models_.emplace_back(sel, n);
    }
    streams_ = streams;
  }

  /// Stream `stream` admits a prompt of `length` tokens with initial selection `selection` (rank order).
  void admit(int stream, int length, std::span<const std::int32_t> selection) {
    for (std::size_t c = 0; c < candidates_.size(); ++c) model(c, stream).admit(length, selection);
  }
  /// Stream `stream` steps at position `t` (it held `t` tokens before) with `selection`. Steps with
  /// `counted` false (warm-up) update the caches without adding to the figures.
  void step(int stream, int t, std::span<const std::int32_t> selection, bool counted = true) {
    for (std::size_t c = 0; c < candidates_.size(); ++c) {
      const int loaded = model(c, stream).step(t, selection);
      if (counted) misses_[c] += loaded;
    }
    if (counted) ++counted_;
  }

  /// The candidate sizes, as given.
  std::span<const int> candidates() const noexcept { return candidates_; }
  /// Blocks loaded per (stream, step) by the caches of candidate `i`, over the counted steps.
  double misses_per_step(std::size_t i) const noexcept {
    return counted_ > 0 ? double(misses_[i]) / double(counted_) : 0.0;
  }
  /// The same for any size: linear between the measured candidates, the last one's beyond them (a larger
  /// cache never loads more).
  double misses_per_step_at(int cache_slots) const noexcept {
    std::size_t i = 0;
    while (i + 1 < candidates_.size() && candidates_[i + 1] <= cache_slots) ++i;
    if (candidates_.empty()) return 0.0;
    if (i + 1 >= candidates_.size() || cache_slots <= candidates_[i]) return misses_per_step(i);
    const double f = double(cache_slots - candidates_[i]) / double(candidates_[i + 1] - candidates_[i]);
    return (1.0 - f) * misses_per_step(i) + f * misses_per_step(i + 1);
  }
  /// Counted (stream, step) pairs.
  long long counted_steps() const noexcept { return counted_; }

 private:
  std::vector<int> candidates_;
  std::vector<slot_cache_model> models_;  // [candidate][stream]
  std::vector<long long> misses_;         // [candidate] over the counted steps
  long long counted_ = 0;
  int streams_ = 0;

  slot_cache_model& model(std::size_t c, int stream) {
    return models_[c * std::size_t(streams_) + std::size_t(stream)];
  }
};

}  // namespace nosa
