#pragma once
/// \file
/// Run-time parameters of a layer: the selection hyper-parameters (spec §2) and the fixed capacities chosen
/// at creation (every per-step loop is bounded by a capacity, never by a value learnt during a step).

#include <nosa/core/config.hpp>
#include <nosa/core/status.hpp>

#include <cstdint>

namespace nosa {

/// Value of `selection_params::max_new_blocks` meaning "no hard transfer budget".
inline constexpr int no_budget = -1;

/// Selection hyper-parameters of NOSA (defaults are the paper's 8B model).
struct selection_params {
  int block_size = 64;            ///< b_s: tokens per block, the unit of selection, residency and transfer
  int window = 32;                ///< l_c: compression window length in tokens
  int stride = 16;                ///< s_c: compression window stride in tokens
  int top_k = 64;                 ///< k: blocks selected per (sequence, KV head)
  int top_k_query_aware = 33;     ///< k_qa: size of the query-aware top-k, forced blocks included
  int n_init = 1;                 ///< sink blocks 0 .. n_init-1, always selected
  int n_local = 16;               ///< local blocks before the current one, always selected
  int max_new_blocks = no_budget; ///< hard cap on blocks loaded per step per (sequence, KV head)

  /// Forced blocks once the sequence is long enough: sinks, locals and the current block.
  NOSA_INLINE constexpr int forced_blocks() const noexcept { return n_init + n_local + 1; }
};

/// Fixed capacities of one layer's state, chosen at creation.
struct capacity {
  int max_sequences = 1;           ///< sequence slots (ids 0 .. max_sequences-1)
  int max_blocks_per_sequence = 1; ///< longest sequence is max_blocks_per_sequence * block_size tokens
  int pool_pages = 1;              ///< pages in the paged KV pool; one page holds one block of every KV head
  /// Offload store: slots per (sequence, KV head) beyond the `k + 1` a step needs. Blocks that leave the
  /// selection then stay in their slots until a slot is needed (the least recently selected goes first), so
  /// a block selected again soon is a hit instead of a transfer. 0 frees a dropped block's slot at once.
  int cache_slots = 0;
  /// Rows (prompt tokens, all chunks together) one `prefill` call may carry: sizes the per-row state a
  /// prefill keeps (each row's selection under sparse prefill). 0 when the layer is never prefilled.
  int max_prefill_rows = 0;
};

/// Everything a layer needs besides its compile-time policies.
struct layer_config {
  selection_params selection{};
  int num_q_heads = 32;  ///< H_q; query head h*G+g reads KV head h
  int num_kv_heads = 2;  ///< H_kv; G = H_q / H_kv may be any integer >= 1 up to the backend's `max_group`
  capacity limits{};

  NOSA_INLINE constexpr int group_size() const noexcept { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }
  NOSA_INLINE constexpr int max_tokens() const noexcept { return limits.max_blocks_per_sequence * selection.block_size; }
};

/// Checks the selection parameters alone: positive sizes, `k_qa <= k`, `k >=` forced blocks, a budget of
/// `no_budget` or >= 0.
constexpr status validate(const selection_params& p) noexcept {
  if (p.block_size <= 0 || p.window <= 0 || p.stride <= 0) return status::invalid_config;
  if (p.n_init < 0 || p.n_local < 0 || p.top_k <= 0 || p.top_k_query_aware < 0) return status::invalid_config;
  if (p.top_k_query_aware > p.top_k) return status::invalid_config;
  if (p.top_k < p.forced_blocks()) return status::invalid_config;
  if (p.max_new_blocks < no_budget) return status::invalid_config;
  return status::success;
}

/// Checks a whole layer configuration: heads divide evenly, capacities positive (prefill rows non-negative)
/// and small enough that every token index fits in 32 bits.
constexpr status validate(const layer_config& c) noexcept {
  NOSA_TRY(validate(c.selection));
  if (c.num_q_heads <= 0 || c.num_kv_heads <= 0 || c.num_q_heads % c.num_kv_heads != 0) {
    return status::invalid_argument;
  }
  if (c.limits.max_sequences <= 0 || c.limits.max_blocks_per_sequence <= 0 || c.limits.pool_pages <= 0) {
    return status::invalid_argument;
  }
  if (c.limits.cache_slots < 0 || c.limits.cache_slots > (1 << 20)) return status::invalid_argument;
  if (c.limits.max_prefill_rows < 0 || c.limits.max_prefill_rows > (1 << 30)) return status::invalid_argument;
  const std::int64_t tokens = static_cast<std::int64_t>(c.limits.max_blocks_per_sequence) * c.selection.block_size;
  if (tokens > (std::int64_t{1} << 30)) return status::invalid_argument;
  if (static_cast<std::int64_t>(c.limits.pool_pages) > (std::int64_t{1} << 30)) return status::invalid_argument;
  return status::success;
}

/// One rank's share of a layer under tensor parallelism: the KV heads split into equal contiguous shards,
/// each with its query heads (query head `h * G + g` reads KV head `h`, so a shard of KV heads owns a
/// contiguous range of query heads). The rank's layer has the same group size, selection and capacities;
/// a page of its pool holds one block of its own KV heads only.
struct head_shard {
  int first_kv_head = 0;  ///< the rank's first KV head in the whole layer
  int first_q_head = 0;   ///< the rank's first query head in the whole layer
  layer_config config{};  ///< the rank's layer: `H_q / ranks` query heads over `H_kv / ranks` KV heads
};

/// The shard of rank `rank` of `ranks` of the layer `config`: `validate(config)`'s status when it is
/// invalid, `invalid_argument` unless `0 <= rank < ranks` and `ranks` divides `H_kv`.
constexpr status shard_heads(const layer_config& config, int ranks, int rank, head_shard& out) noexcept {
  NOSA_TRY(validate(config));
  if (ranks < 1 || rank < 0 || rank >= ranks || config.num_kv_heads % ranks != 0) return status::invalid_argument;
  const int kv_heads = config.num_kv_heads / ranks, q_heads = config.num_q_heads / ranks;
  out.first_kv_head = rank * kv_heads;
  out.first_q_head = rank * q_heads;
  out.config = config;
  out.config.num_kv_heads = kv_heads;
  out.config.num_q_heads = q_heads;
  return status::success;
}

}  // namespace nosa
