#pragma once
/// \file
/// Step stages 4 and 5, selection and set-difference: forced blocks, the query-aware and query-agnostic
/// top-k by radix select (ties to the lower block index), the hard transfer budget, and the offload store's
/// set-difference of the new selection against the slot map (hits never move; misses take freed slots).

#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace nosa::detail {

/// Threads of the selection and diff kernels: whole warps, at least one per slot (`k + 1 <= 257`).
inline constexpr int select_threads = 288;
inline constexpr int select_warps = select_threads / 32;
static_assert(select_threads % 32 == 0 && select_threads >= cuda_max_top_k + 1 && select_threads >= 256,
              "one thread per slot and per histogram bin");

/// Most dynamic shared memory the selection kernel stages scores in (Sq and Se of the blocks that are not
/// forced, 8 bytes a block, so up to 4608 blocks): with `select_shared` it stays within the 48 KiB a CTA may
/// use without an opt-in. Longer sequences read their scores from global memory instead.
inline constexpr int select_staging_bytes = 36 * 1024;

/// Blocks the selection kernel can stage for a layer of `max_blocks` blocks a sequence (0: none).
inline int select_staged_blocks(int max_blocks) {
  return max_blocks <= select_staging_bytes / static_cast<int>(2 * sizeof(float)) ? max_blocks : 0;
}

/// Lanes of the calling thread's warp below it.
__device__ inline unsigned lanes_below() { return (1u << (threadIdx.x % 32)) - 1u; }

/// Exclusive prefix sum of `v` over the CTA in thread order; `total` gets the CTA's sum. One barrier.
/// `partial` (one int a warp, shared) must not be reused before the next barrier after the call.
__device__ inline int block_exclusive_sum(int v, int* partial, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int x = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += x;
  }
  if (lane == 31) partial[warp] = incl;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
    const int p = partial[w];
    if (w < warp) before += p;
    sum += p;
  }
  total = sum;
  return before + incl - v;
}

/// Shared memory of the set-difference (`set_difference`).
struct diff_shared {
  std::int32_t kept[select_threads];  // the slot holds a block of the new selection
  std::int32_t stamp[select_threads]; // with a cache: the slot's stamp, or -1 when its block cannot leave
  std::int32_t miss_blocks[cuda_max_top_k];
  int scan[select_warps];
};

/// Shared memory of the selection kernel (the staged scores are dynamic shared memory). The radix scratch
/// and the budget's candidates are done with once the selection is final; the set-difference reuses them.
struct select_shared {
  struct radix_shared {
    alignas(16) int hist[3][256];        // radix histograms, in rotation (see `radix_threshold`)
    std::uint64_t keys[select_threads];  // the picks of a top-k, or the budget's candidates by slot
  };
  union {
    radix_shared radix;
    diff_shared diff;
  };
  std::int32_t blocks[select_threads];         // their blocks
  std::int32_t out[cuda_max_top_k];            // the selection in rank order
  std::int32_t slot_selected[select_threads];  // budget: the slot holds a block of the selection
  int scan[2][select_warps];
  int picks;
};

/// The bin of one radix digit the threshold falls in, found by every warp on its own from the histogram
/// `hist` (no barrier): the highest bin whose count, with the counts of the bins above it, reaches
/// `remaining`. `above` gets the count of the bins above it, `in_bin` its own count.
__device__ inline void choose_bin(const int* hist, int remaining, int& bin, int& above, int& in_bin) {
  const unsigned all = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  // Lane l sums bins 255 - 8l down to 248 - 8l; the scan runs from the top bin down.
  const int4 lo = reinterpret_cast<const int4*>(hist + 248 - 8 * lane)[0];
  const int4 hi = reinterpret_cast<const int4*>(hist + 248 - 8 * lane)[1];
  const int sum = lo.x + lo.y + lo.z + lo.w + hi.x + hi.y + hi.z + hi.w;
  int incl = sum;
  for (int o = 1; o < 32; o <<= 1) {
    const int x = __shfl_up_sync(all, incl, o);
    if (lane >= o) incl += x;
  }
  const int group = __ffs(__ballot_sync(all, incl >= remaining && incl - sum < remaining)) - 1;
  const int group_above = __shfl_sync(all, incl - sum, group);
  // Lanes 0..7 take the group's bins from its top.
  const int my_bin = 255 - 8 * group - (lane & 7);
  const int count = lane < 8 ? hist[my_bin] : 0;
  int incl_bin = count;
  for (int o = 1; o < 8; o <<= 1) {
    const int x = __shfl_up_sync(all, incl_bin, o);
    if (lane >= o) incl_bin += x;
  }
  const int before = group_above + incl_bin - count;
  const int at = __ffs(__ballot_sync(all, lane < 8 && before < remaining && before + count >= remaining)) - 1;
  bin = 255 - 8 * group - at;
  above = __shfl_sync(all, before, at);
  in_bin = __shfl_sync(all, count, at);
}

/// The smallest key that exactly `need` candidates reach, for 0 < need < candidates (`key(i)` for
/// i < n_keys; 0 for a block that is not a candidate, which no real key equals): a radix select, 8 bits a
/// digit from the top, that stops at the first digit whose chosen bin holds exactly the keys still needed
/// (keys never tie, so the last digit always does). Histograms rotate over three buffers so that a digit
/// costs one barrier: the buffer a digit counts into was cleared during the digit before, and the one it
/// clears was last read two digits before. `round` carries the rotation from call to call. Whole CTA.
template <class Key>
__device__ std::uint64_t radix_threshold(select_shared& sh, int n_keys, int need, int& round, Key key) {
  const int lane = threadIdx.x % 32;
  std::uint64_t prefix = 0, mask = 0;
  int remaining = need;
  for (int shift = 56; shift >= 0; shift -= 8) {
    int* hist = sh.radix.hist[round % 3];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.radix.hist[(round + 1) % 3][i] = 0;
    for (int base = threadIdx.x - lane; base < n_keys; base += blockDim.x) {
      const int i = base + lane;
      const std::uint64_t k = i < n_keys ? key(i) : 0;
      const bool in = k != 0 && (k & mask) == prefix;
      const unsigned digit = static_cast<unsigned>(k >> shift) & 0xffu;
      const unsigned active = __ballot_sync(0xffffffffu, in);
      if (in) {
        // One atomic per distinct digit of the warp: early digits are shared by most keys.
        const unsigned peers = __match_any_sync(active, digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
      }
    }
    __syncthreads();
    ++round;
    int bin, above, in_bin;
    choose_bin(hist, remaining, bin, above, in_bin);
    remaining -= above;
    prefix |= std::uint64_t(bin) << shift;
    mask |= std::uint64_t{0xffu} << shift;
    if (in_bin == remaining) break;
  }
  return prefix;
}

/// Appends to `sh.out[n..]` the best `count` candidates in key order and advances `n`. Candidate `i` is
/// block `first + i` with key `key(i)` (0: not a candidate); `available` candidates exist. Returns the
/// threshold: a candidate is taken iff its key reaches it (all ones when none is taken). Whole CTA.
template <class Key>
__device__ std::uint64_t take_best(select_shared& sh, int& n, int count, int available, int first, int n_keys,
                                   int& round, Key key) {
  const int need = count < available ? count : available;
  if (need <= 0) return ~std::uint64_t{0};
  const std::uint64_t threshold = need < available ? radix_threshold(sh, n_keys, need, round, key) : 1;
  // Compact the picks (exactly `need` of them), one atomic a warp, then rank them by counting.
  const int lane = threadIdx.x % 32;
  for (int base = threadIdx.x - lane; base < n_keys; base += blockDim.x) {
    const int i = base + lane;
    const std::uint64_t k = i < n_keys ? key(i) : 0;
    const bool pick = k != 0 && k >= threshold;
    const unsigned picks = __ballot_sync(0xffffffffu, pick);
    if (picks == 0) continue;
    const int leader = __ffs(picks) - 1;
    int at = 0;
    if (lane == leader) at = atomicAdd(&sh.picks, __popc(picks));
    at = __shfl_sync(0xffffffffu, at, leader) + __popc(picks & lanes_below());
    if (pick) {
      sh.radix.keys[at] = k;
      sh.blocks[at] = first + i;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < need; i += blockDim.x) {
    const std::uint64_t k = sh.radix.keys[i];
    int rank = 0;
    for (int j = 0; j < need; ++j) rank += sh.radix.keys[j] > k;
    sh.out[n + rank] = sh.blocks[i];
  }
  if (threadIdx.x == 0) sh.picks = 0;
  __syncthreads();
  n += need;
  return threshold;
}

/// How a selection kernel launch counts its traffic.
enum class count_mode : int {
  step,    ///< a decode step: hits, misses, bytes both ways, into the step's and the total counters
  ingest,  ///< the initial load of a new sequence: bytes host-to-device into the totals only
  prefill, ///< a prefill's selections: only when its checks passed and for sequences whose chunk reaches the
           ///< length offset (`cuda_state::prefill_skips`); bytes host-to-device into the totals only
};

/// True when a selection-stage kernel of `mode` has nothing to do for `seq`: a step or a prefill whose checks
/// failed, or a prefill whose chunk for `seq` does not reach `length_offset`. Plan calls always run.
template <class E, int D>
__device__ inline bool selection_skips(const cuda_state<E, D>& s, count_mode mode, int seq, int length_offset) {
  if (mode == count_mode::ingest) return false;
  if (*s.status != 0) return true;
  return mode == count_mode::prefill && s.prefill_skips(seq, length_offset);
}

/// Adds `v` to a counter; zeros are skipped, since every CTA of a launch adds to the same few addresses.
__device__ inline void add_count(unsigned long long& counter, unsigned long long v) {
  if (v != 0) atomicAdd(&counter, v);
}

/// The counters of one (sequence, KV head) after its set-difference: `n` selected blocks of which
/// `misses` load. Called by one thread.
template <bool Offloads, class E, int D>
__device__ void count_traffic(const cuda_state<E, D>& s, int seq, int h, int length, int n, int misses,
                              count_mode mode) {
  s.step_misses[s.sh(seq, h)] = misses;
  const unsigned long long h2d = 2ull * misses * s.block_bytes();
  if (mode == count_mode::step) {
    const unsigned long long hits = static_cast<unsigned long long>(n - misses);
    const unsigned long long d2h = Offloads && length % s.sel.block_size == 0 ? 2ull * s.block_bytes() : 0ull;
    counters* targets[2] = {s.last_step, s.totals};
    for (counters* c : targets) {
      add_count(reinterpret_cast<unsigned long long&>(c->hits), hits);
      add_count(reinterpret_cast<unsigned long long&>(c->misses), static_cast<unsigned long long>(misses));
      add_count(reinterpret_cast<unsigned long long&>(c->bytes_h2d), h2d);
      add_count(reinterpret_cast<unsigned long long&>(c->bytes_d2h), d2h);
    }
  } else {
    add_count(reinterpret_cast<unsigned long long&>(s.totals->bytes_h2d), h2d);
  }
}

/// The set-difference of the offload store for (`seq`, `h`) against its new selection `selection[0, n)`
/// (shared memory, final), one thread per selected block and per slot of the whole CTA: frees the slots whose
/// blocks left the selection (hits never move), gives the misses, in rank order, the lowest free slots,
/// writes the miss list and `step_misses`, and counts the traffic.
template <class E, int D>
__device__ void set_difference(const cuda_state<E, D>& s, int seq, int h, int length_offset, count_mode mode,
                               const std::int32_t* selection, int n, diff_shared& sh) {
  const int t = threadIdx.x;
  std::int32_t* map = s.slot_map_of(seq, h);
  std::int32_t* where = s.block_slot_of(seq, h);
  const bool slot = t < s.slots;
  const int held = slot ? map[t] : -1;
  const bool selected = t < n;
  const int blk = selected ? selection[t] : -1;
  sh.kept[t] = 0;
  const int at = selected ? where[blk] : -1;  // the slot a selected block is resident in
  __syncthreads();
  if (at >= 0) sh.kept[at] = 1;
  __syncthreads();
  // Without a cache a dropped block leaves at once; with one it stays, evictable, until a miss needs a slot.
  const bool cache = s.cache_slots > 0;
  const bool dropped = slot && held >= 0 && sh.kept[t] == 0;
  const bool freed = dropped && !cache;
  if (freed) where[held] = -1;
  const bool is_free = slot && (held < 0 || freed);
  const bool miss = selected && at < 0;
  std::int32_t* stamps = s.stamp_of(seq, h);
  if (cache) sh.stamp[t] = dropped ? stamps[t] : -1;
  // Rank of each miss among the misses (low half) and of each free slot among the free slots (high half).
  int totals = 0;
  const int ranks = block_exclusive_sum(int(miss) | (int(is_free) << 16), sh.scan, totals);
  const int misses = totals & 0xffff, free_slots = totals >> 16;
  if (miss) {
    sh.miss_blocks[ranks & 0xffff] = blk;
    s.misses_of(seq, h)[ranks & 0xffff] = blk;
  }
  __syncthreads();
  if (slot) {
    int now = freed ? -1 : held;
    int taker = -1;  // the miss this slot receives
    if (is_free && (ranks >> 16) < misses) {
      taker = ranks >> 16;
    } else if (cache && dropped && free_slots < misses) {
      // Misses beyond the free slots take the dropped blocks' slots, least recently selected first.
      int order = 0;
      const int mine = sh.stamp[t];
      for (int j = 0; j < s.slots; ++j) {
        const int other = sh.stamp[j];
        order += other >= 0 && (other < mine || (other == mine && j < t));
      }
      if (free_slots + order < misses) {
        taker = free_slots + order;
        where[held] = -1;
      }
    }
    if (taker >= 0) {
      now = sh.miss_blocks[taker];
      where[now] = t;
    }
    map[t] = now;
    if (cache && (taker >= 0 || (held >= 0 && sh.kept[t] != 0))) stamps[t] = s.lengths[seq];
  }
  if (t == 0) count_traffic<true>(s, seq, h, s.lengths[seq] + length_offset, n, misses, mode);
}

/// One CTA per (batch row, KV head): forced blocks, query-aware top-k, query-agnostic top-k and the hard
/// budget (`with_budget`, offload store); writes the selection in rank order and its count, then, with
/// `with_diff` (offload store), runs its set-difference (`set_difference`, which counts the traffic). The
/// resident store has no diff, so this kernel counts its step (every block a hit). The scores of the blocks that
/// are not forced (one contiguous range) are staged in dynamic shared memory when `staged_capacity` holds
/// them, and read from global memory otherwise.
template <class P, class E, int D>
__global__ void __launch_bounds__(select_threads)
    select_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, bool have_query, bool with_budget,
                  bool with_diff, count_mode mode, int staged_capacity) {
  dependent_launch_wait();
  using selector = typename P::selector;
  constexpr bool offloads = P::store::offloads;
  constexpr bool agnostic = P::query_agnostic::enabled;
  __shared__ select_shared sh;
  extern __shared__ float staged[];  // [staged_capacity] Sq, then [staged_capacity] Se
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);  // read with the status: a batch row is always readable, its state may not be
  // Plan calls (ingest) run whatever the last step's status; a step runs only when its checks passed.
  if (selection_skips(s, mode, seq, length_offset)) return;
  const int length = s.lengths[seq] + length_offset;
  const selection_params& sel = s.sel;
  const int n_blocks = block_count(length, sel);
  const int current = n_blocks - 1;
  // Forced blocks by ascending index: the sinks, then the local blocks and the current one. The blocks
  // between them, [sinks, local_first), are the candidates.
  const int sinks = sel.n_init < n_blocks ? sel.n_init : n_blocks;
  const int local_first = current - sel.n_local > sinks ? current - sel.n_local : sinks;
  const int n_forced = sinks + (n_blocks - local_first);
  const int n_free = local_first - sinks;
  const float* sq = s.sq_of(seq, h) + sinks;
  const float* se = s.se_of(seq, h) + sinks;
  if (n_free <= staged_capacity) {
    for (int i = threadIdx.x; i < n_free; i += blockDim.x) {
      staged[i] = sq[i];
      if constexpr (agnostic) staged[staged_capacity + i] = se[i];
    }
    sq = staged;
    se = staged + staged_capacity;
  }
  for (int i = threadIdx.x; i < n_forced; i += blockDim.x) sh.out[i] = i < sinks ? i : local_first + (i - sinks);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.radix.hist[0][i] = 0;
  if (threadIdx.x == 0) sh.picks = 0;
  __syncthreads();

  int n = n_forced, round = 0;
  const auto sq_key = [&](int i) { return selector::sort_key(sq[i], sinks + i); };
  if constexpr (agnostic) {
    // The query-aware picks are the candidates whose Sq key reaches `qa`; the rest compete on Se.
    std::uint64_t qa = ~std::uint64_t{0};
    if (have_query) qa = take_best(sh, n, sel.top_k_query_aware - n_forced, n_free, sinks, n_free, round, sq_key);
    const bool any_qa = n > n_forced;
    const auto se_key = [&](int i) {
      return any_qa && sq_key(i) >= qa ? std::uint64_t{0} : selector::sort_key(se[i], sinks + i);
    };
    take_best(sh, n, sel.top_k - n, n_free - (n - n_forced), sinks, n_free, round, se_key);
  } else {
    if (have_query) take_best(sh, n, sel.top_k - n, n_free, sinks, n_free, round, sq_key);
  }

  if constexpr (offloads) {
    if (with_budget && sel.max_new_blocks != no_budget) {
      // Drop the lowest-ranked missing blocks that are not forced beyond the budget, then fill their places
      // with the best resident blocks outside the selection.
      const std::int32_t* map = s.slot_map_of(seq, h);
      const std::int32_t* where = s.block_slot_of(seq, h);
      const int i = threadIdx.x;
      const int blk = i < n ? sh.out[i] : -1;
      const bool missing = i < n && where[blk] < 0;
      int total_missing = 0;
      const int missing_before = block_exclusive_sum(missing, sh.scan[0], total_missing);
      const int excess = total_missing - sel.max_new_blocks;
      if (excess > 0) {
        // Walking up from the end of the ranking, the first `excess` missing blocks below the forced ones.
        const bool drop = missing && i >= n_forced && total_missing - missing_before - 1 < excess;
        const bool keep = i < n && !drop;
        int kept = 0;
        const int at = block_exclusive_sum(keep, sh.scan[1], kept);
        const int dropped = n - kept;
        if (i < s.slots) sh.slot_selected[i] = 0;
        __syncthreads();
        if (keep) {
          sh.out[at] = blk;
          if (where[blk] >= 0) sh.slot_selected[where[blk]] = 1;
        }
        __syncthreads();
        if (dropped > 0) {
          const float* score = agnostic ? s.se_of(seq, h) : s.sq_of(seq, h);
          const int j = threadIdx.x;
          const int cand = j < s.slots ? map[j] : -1;
          const bool ok = cand >= 0 && cand < n_blocks && sh.slot_selected[j] == 0 &&
                          !is_forced_block(cand, current, sel);
          const std::uint64_t key = ok ? selector::sort_key(score[cand], cand) : 0;
          if (j < s.slots) sh.radix.keys[j] = key;
          const int found = __syncthreads_count(ok);
          if (ok) {
            int rank = 0;
            for (int x = 0; x < s.slots; ++x) rank += sh.radix.keys[x] > key;
            if (rank < dropped) sh.out[kept + rank] = cand;
          }
          n = kept + (found < dropped ? found : dropped);
        } else {
          n = kept;
        }
        __syncthreads();
      }
    }
  }

  std::int32_t* chosen = s.selection_of(seq, h);
  for (int i = threadIdx.x; i < n; i += blockDim.x) chosen[i] = sh.out[i];
  if (threadIdx.x == 0) {
    s.selection_count[s.sh(seq, h)] = n;
    if constexpr (!offloads) count_traffic<false>(s, seq, h, length, n, 0, mode);
  }
  if constexpr (offloads) {
    if (with_diff) set_difference(s, seq, h, length_offset, mode, sh.out, n, sh.diff);
  }
}

/// Enqueues `select_kernel` for `rows` (batch row, KV head) pairs, staging scores when they fit; with
/// `with_diff` (offload store), each CTA runs the set-difference of its new selection.
template <class P, class E, int D>
cudaError_t launch_select(const cuda_state<E, D>& s, sequence_source seqs, int rows, int length_offset,
                          bool have_query, bool with_budget, bool with_diff, count_mode mode, cudaStream_t stream) {
  const int staged = select_staged_blocks(s.max_blocks);
  return launch_kernel(select_kernel<P, E, D>, dim3(rows), dim3(select_threads), std::size_t(staged) * 2 * sizeof(float),
                       stream, s.dependent_launch, 1, s, seqs, length_offset, have_query, with_budget, with_diff, mode,
                       staged);
}

}  // namespace nosa::detail
