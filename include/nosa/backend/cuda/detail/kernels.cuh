#pragma once
/// \file
/// The kernels of the CUDA decode step and of the plan calls. Each kernel handles one (sequence, KV head)
/// per CTA (the gather and the attention add a second grid dimension), reads lengths, block tables and slot
/// maps from state, and returns at once when the step's state checks failed, so a step with bad input
/// changes nothing. Every grid is sized by the batch and the layer's capacities, never by state values.

#include <nosa/attention/sparse_attention.hpp>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/math.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>

#include <cuda_runtime.h>

#include <climits>
#include <type_traits>
#include <cstdint>

namespace nosa::detail {

/// Largest GQA group the CUDA kernels hold in registers and shared memory.
inline constexpr int cuda_max_group = 16;
/// Largest `k` the CUDA selection keeps in shared memory.
inline constexpr int cuda_max_top_k = 256;
/// Threads of the per-(sequence, KV head) kernels other than attention.
inline constexpr int cuda_threads = 256;

/// Where a kernel finds the sequence of batch row `b`: a device array of ids, or one fixed id (plan calls).
struct sequence_source {
  tensor_view<const std::int32_t, 1> ids;
  int fixed = -1;
  __device__ int operator()(int b) const { return fixed >= 0 ? fixed : ids(b); }
};

__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = max_keep_left(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---------------------------------------------------------------------------------------------------------
// Step begin: device-side checks of the batch against the state.
// ---------------------------------------------------------------------------------------------------------

/// Checks every batch row as the host backend does (unknown, duplicate, full, unreserved; the first row in
/// batch order with an error decides the status), publishes the status and, on success, opens the step's
/// counters. One CTA.
template <class E, int D>
__global__ void begin_step_kernel(cuda_state<E, D> s, sequence_source seqs, int batch) {
  __shared__ int first_error;
  if (threadIdx.x == 0) first_error = INT_MAX;
  __syncthreads();
  // Marks hold (batch - first row) of each sequence, so the largest value belongs to the first occurrence.
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    if (seq >= 0 && seq < s.sequences && s.live[seq] != 0) atomicMax(&s.batch_mark[seq], batch - b);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    status e = status::success;
    if (seq < 0 || seq >= s.sequences || s.live[seq] == 0) {
      e = status::unknown_sequence;
    } else if (s.batch_mark[seq] != batch - b) {
      e = status::duplicate_sequence;
    } else {
      const int t = s.lengths[seq];
      if (t < 0 || t + 1 > s.max_tokens) {
        e = status::sequence_full;
      } else if (s.table(seq)[t / s.sel.block_size] < 0) {
        e = status::not_reserved;
      }
    }
    if (e != status::success) atomicMin(&first_error, b * 64 + static_cast<int>(e));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    if (seq >= 0 && seq < s.sequences) s.batch_mark[seq] = 0;
  }
  if (threadIdx.x == 0) {
    const int code = first_error == INT_MAX ? 0 : first_error % 64;
    *s.status = code;
    if (code == 0) {
      *s.last_step = counters{1, 0, 0, 0, 0};
      s.totals->steps += 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Append, compression and scoring.
// ---------------------------------------------------------------------------------------------------------

/// Lowest free slot of (seq, h) now holds `block`. Called by one thread.
template <class E, int D>
__device__ void claim_free_slot(const cuda_state<E, D>& s, int seq, int h, int block) {
  std::int32_t* map = s.slot_map_of(seq, h);
  int slot = 0;
  while (slot < s.slots - 1 && map[slot] >= 0) ++slot;
  map[slot] = block;
  s.block_slot_of(seq, h)[block] = slot;
}

/// Compressed key and score of window `w`: the mean of its keys (`key_row(t)` gives token t's key) and of
/// its eviction scores, each summed in token order. Called by the whole CTA.
template <class E, int D, class KeyRow>
__device__ void compress_window(const cuda_state<E, D>& s, int seq, int h, int w, KeyRow key_row) {
  const selection_params& sel = s.sel;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.0f;
    for (int i = 0; i < sel.window; ++i) sum += to_float(key_row(w * sel.stride + i)[d]);
    s.kc_of(seq, h)[std::size_t(w) * D + d] = sum / static_cast<float>(sel.window);
  }
  if (threadIdx.x == 0) {
    const float* c = s.scores_of(seq, h);
    float csum = 0.0f;
    for (int i = 0; i < sel.window; ++i) csum += c[w * sel.stride + i];
    s.cc_of(seq, h)[w] = csum / static_cast<float>(sel.window);
  }
}

/// Step stage 1a, one CTA per (batch row, KV head): append the new token (tail slot or page, key ring, score
/// history) and compress the window it completes, if any.
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    append_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<const E, 3> k, tensor_view<const E, 3> v,
                  tensor_view<const float, 2> c) {
  if (*s.status != 0) return;
  constexpr bool offloads = P::store::offloads;
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);
  const int t = s.lengths[seq];
  const selection_params& sel = s.sel;
  const int block = t / sel.block_size;
  const std::size_t row = std::size_t(t % sel.block_size) * D;
  if constexpr (offloads) {
    if (threadIdx.x == 0 && t % sel.block_size == 0) claim_free_slot(s, seq, h, block);
    __syncthreads();
  }
  E* kdst;
  E* vdst;
  if constexpr (offloads) {
    const int slot = s.block_slot_of(seq, h)[block];
    kdst = s.slot_k(seq, h, slot) + row;
    vdst = s.slot_v(seq, h, slot) + row;
  } else {
    const int page = s.table(seq)[block];
    kdst = s.page_k(page, h) + row;
    vdst = s.page_v(page, h) + row;
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    kdst[d] = k(b, h, d);
    vdst[d] = v(b, h, d);
  }
  if (threadIdx.x == 0) s.scores_of(seq, h)[t] = c.empty() ? 0.0f : c(b, h);
  if constexpr (P::dense) {
    // Full attention keeps no compressed state; every block of the sequence is a resident hit.
    if (threadIdx.x == 0) {
      const unsigned long long hits = static_cast<unsigned long long>(block_count(t + 1, sel));
      atomicAdd(reinterpret_cast<unsigned long long*>(&s.last_step->hits), hits);
      atomicAdd(reinterpret_cast<unsigned long long*>(&s.totals->hits), hits);
    }
    return;
  }
  E* ring = s.ring_of(seq, h);
  for (int d = threadIdx.x; d < D; d += blockDim.x) ring[std::size_t(t % sel.window) * D + d] = k(b, h, d);
  __syncthreads();
  const int w = window_completed_at(t, sel);
  if (w >= 0) compress_window(s, seq, h, w, [&](int token) { return ring + std::size_t(token % sel.window) * D; });
}

/// Windows one CTA of `window_logits_kernel` scores: one per thread.
inline constexpr int score_chunk = score_chunk_windows;
static_assert(score_chunk == cuda_threads, "one window per thread");

/// Step stage 1b, grid (batch rows x KV heads, window chunks): the logit of every query head of the group
/// against every compressed key of its chunk (one window per thread, the group's queries broadcast from
/// shared memory), and the chunk's softmax partials (max, sum of exp) per query head. `q` row `b` holds the
/// queries of batch row `b` (plan calls pass one row with a zero batch stride).
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    window_logits_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, tensor_view<const E, 3> q) {
  if (length_offset > 0 && *s.status != 0) return;
  using scorer = typename P::query_aware;
  __shared__ __align__(16) float qs[cuda_max_group * D];
  __shared__ float red[cuda_threads / 32][cuda_max_group];
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + length_offset;
  const int n_windows = window_count(length, s.sel);
  const int first = blockIdx.y * score_chunk;
  if (first >= n_windows) return;
  const int group = s.group;
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) qs[i] = to_float(q(b, h * group + i / D, i % D));
  __syncthreads();
  const int w = first + threadIdx.x;
  const bool active = w < n_windows;
  float acc[cuda_max_group];
#pragma unroll
  for (int g = 0; g < cuda_max_group; ++g) acc[g] = 0.0f;
  if (active) {
    const float4* row = reinterpret_cast<const float4*>(s.kc_of(seq, h) + std::size_t(w) * D);
    for (int d4 = 0; d4 < D / 4; ++d4) {
      const float4 kv = row[d4];
#pragma unroll
      for (int g = 0; g < cuda_max_group; ++g) {
        if (g < group) {
          const float4 qv = reinterpret_cast<const float4*>(qs + g * D)[d4];
          acc[g] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
        }
      }
    }
  }
  const float scale = softmax_scale(D);
  float* logits = s.logits_of(seq, h);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int g = 0; g < cuda_max_group; ++g) {
    if (g < group) {
      acc[g] = active ? scorer::window_logit(acc[g], scale) : negative_infinity;
      if (active) logits[std::size_t(g) * s.max_windows + w] = acc[g];
      const float m = warp_max(acc[g]);
      if (lane == 0) red[warp][g] = m;
    }
  }
  __syncthreads();
  __shared__ float chunk_max[cuda_max_group];
  if (threadIdx.x < group) {
    float m = negative_infinity;
    for (int x = 0; x < cuda_threads / 32; ++x) m = max_keep_left(m, red[x][threadIdx.x]);
    chunk_max[threadIdx.x] = m;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < cuda_max_group; ++g) {
    if (g < group) {
      const float e = active ? expf(acc[g] - chunk_max[g]) : 0.0f;
      const float sum = warp_sum(e);
      if (lane == 0) red[warp][g] = sum;
    }
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float sum = 0.0f;
    for (int x = 0; x < cuda_threads / 32; ++x) sum += red[x][threadIdx.x];
    float* part = s.score_partials_of(seq, h) + (std::size_t(blockIdx.y) * group + threadIdx.x) * 2;
    part[0] = chunk_max[threadIdx.x];
    part[1] = sum;
  }
}

/// Step stage 1c, one CTA per (batch row, KV head): combines the chunks' softmax partials, sums each
/// window's probability over the group (`P[w]`), and pools windows into block scores: `Sq` (max of P over
/// the windows overlapping a block; the pooling identity without a query) and `Se` (max of the compressed
/// eviction scores).
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    pool_scores_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, bool have_query) {
  if (length_offset > 0 && *s.status != 0) return;
  using scorer = typename P::query_aware;
  using agnostic = typename P::query_agnostic;
  __shared__ float group_max[cuda_max_group];
  __shared__ float group_inv[cuda_max_group];
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + length_offset;
  const selection_params& sel = s.sel;
  const int n_windows = window_count(length, sel);
  const int n_blocks = block_count(length, sel);
  const int group = s.group;
  float* prob = s.prob_of(seq, h);
  if (have_query && n_windows > 0) {
    const int chunks = (n_windows + score_chunk - 1) / score_chunk;
    const float* parts = s.score_partials_of(seq, h);
    if (threadIdx.x < group) {
      const int g = threadIdx.x;
      float m = negative_infinity;
      for (int x = 0; x < chunks; ++x) m = max_keep_left(m, parts[(std::size_t(x) * group + g) * 2]);
      float sum = 0.0f;
      for (int x = 0; x < chunks; ++x) {
        const float* part = parts + (std::size_t(x) * group + g) * 2;
        sum += part[1] * expf(part[0] - m);
      }
      group_max[g] = m;
      group_inv[g] = 1.0f / sum;
    }
    __syncthreads();
    const float* logits = s.logits_of(seq, h);
    for (int w = threadIdx.x; w < n_windows; w += blockDim.x) {
      float p = 0.0f;
      for (int g = 0; g < group; ++g) p += expf(logits[std::size_t(g) * s.max_windows + w] - group_max[g]) * group_inv[g];
      prob[w] = p;
    }
    __syncthreads();
  }
  const float* cc = s.cc_of(seq, h);
  float* sq = s.sq_of(seq, h);
  float* se = s.se_of(seq, h);
  for (int m = threadIdx.x; m < n_blocks; m += blockDim.x) {
    const window_range r = windows_overlapping_block(m, n_windows, sel);
    float bq = scorer::pool_identity;
    float be = agnostic::pool_identity;
    for (int w = r.first; w < r.last; ++w) {
      if (have_query) bq = scorer::pool(bq, prob[w]);
      be = agnostic::pool(be, cc[w]);
    }
    sq[m] = bq;
    se[m] = be;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Selection, hard budget and set-difference.
// ---------------------------------------------------------------------------------------------------------

/// Shared memory of the selection kernel.
struct select_shared {
  std::uint64_t keys[cuda_max_top_k + 1];  // candidates of a top-k, or of the slots under a budget
  std::int32_t blocks[cuda_max_top_k + 1];
  std::int32_t out[cuda_max_top_k];
  std::int32_t flag[cuda_max_top_k + 1];
  std::int32_t map[cuda_max_top_k + 1];
  std::int32_t miss_blocks[cuda_max_top_k];
  int hist[256];
  int n, n_forced, chosen_bin, count, misses;
};

/// Appends to `sh.out` the best `count` blocks among the candidates (neither forced nor marked), ranked by
/// the selector's key of `score`, and marks them. A radix select on the 64-bit keys finds the threshold;
/// the keys above it are ranked by counting. Called by the whole CTA.
template <class Selector, class Candidate>
__device__ void take_best(select_shared& sh, const float* score, int count, int n_blocks, std::int32_t* mark,
                          Candidate candidate) {
  const int available = n_blocks - sh.n;  // every non-candidate block is forced or already selected
  const int need = count < available ? count : available;
  if (need <= 0) return;
  std::uint64_t prefix = 0, mask = 0;
  if (need < available) {
    int remaining = need;
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
      __syncthreads();
      for (int m = threadIdx.x; m < n_blocks; m += blockDim.x) {
        if (!candidate(m)) continue;
        const std::uint64_t key = Selector::sort_key(score[m], m);
        if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 0xffu], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int above = 0, bin = 255;
        for (; bin > 0; --bin) {
          if (above + sh.hist[bin] >= remaining) break;
          above += sh.hist[bin];
        }
        sh.chosen_bin = bin;
        sh.count = above;
      }
      __syncthreads();
      remaining -= sh.count;
      prefix |= std::uint64_t(sh.chosen_bin) << shift;
      mask |= std::uint64_t{0xffu} << shift;
      __syncthreads();
    }
  }
  // Every candidate whose key is at least the threshold (exactly `need` of them: keys never tie).
  if (threadIdx.x == 0) sh.count = 0;
  __syncthreads();
  for (int m = threadIdx.x; m < n_blocks; m += blockDim.x) {
    if (!candidate(m)) continue;
    const std::uint64_t key = Selector::sort_key(score[m], m);
    if (key >= prefix) {
      const int at = atomicAdd(&sh.count, 1);
      sh.keys[at] = key;
      sh.blocks[at] = m;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < need; i += blockDim.x) {
    int rank = 0;
    for (int j = 0; j < need; ++j) rank += sh.keys[j] > sh.keys[i];
    sh.out[sh.n + rank] = sh.blocks[i];
    mark[sh.blocks[i]] = 1;
  }
  __syncthreads();
  if (threadIdx.x == 0) sh.n += need;
  __syncthreads();
}

/// How a selection kernel launch counts its traffic.
enum class count_mode : int {
  step,    ///< a decode step: hits, misses, bytes both ways, into the step's and the total counters
  ingest,  ///< the initial load of a new sequence: bytes host-to-device into the totals only
};

/// One CTA per (batch row, KV head): forced blocks, query-aware top-k, query-agnostic top-k, the hard
/// budget (`with_budget`), then the set-difference against the slot map, which frees the slots of dropped
/// blocks (hits never move) and assigns the lowest free slots to the misses in rank order.
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    select_diff_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, bool have_query,
                       bool with_budget, count_mode mode) {
  // Plan calls (ingest) run whatever the last step's status; a step runs only when its checks passed.
  if (mode == count_mode::step && *s.status != 0) return;
  using selector = typename P::selector;
  constexpr bool offloads = P::store::offloads;
  constexpr bool agnostic = P::query_agnostic::enabled;
  __shared__ select_shared sh;
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + length_offset;
  const selection_params& sel = s.sel;
  const int n_blocks = block_count(length, sel);
  const int current = n_blocks - 1;
  std::int32_t* mark = s.mark_of(seq, h);
  const float* sq = s.sq_of(seq, h);
  const float* se = s.se_of(seq, h);

  if (threadIdx.x == 0) {
    // Forced blocks by ascending index: the sinks, then the local blocks and the current one.
    int n = 0;
    const int sinks = sel.n_init < n_blocks ? sel.n_init : n_blocks;
    for (int m = 0; m < sinks; ++m) sh.out[n++] = m;
    int local_first = current - sel.n_local;
    if (local_first < sinks) local_first = sinks;
    for (int m = local_first; m < n_blocks; ++m) sh.out[n++] = m;
    sh.n = n;
    sh.n_forced = n;
  }
  __syncthreads();
  const auto candidate = [&](int m) { return !is_forced_block(m, current, sel) && mark[m] == 0; };
  if constexpr (agnostic) {
    if (have_query) take_best<selector>(sh, sq, sel.top_k_query_aware - sh.n_forced, n_blocks, mark, candidate);
    take_best<selector>(sh, se, sel.top_k - sh.n, n_blocks, mark, candidate);
  } else {
    if (have_query) take_best<selector>(sh, sq, sel.top_k - sh.n, n_blocks, mark, candidate);
  }

  std::int32_t* map = s.slot_map_of(seq, h);
  std::int32_t* where = s.block_slot_of(seq, h);
  if constexpr (offloads) {
    for (int j = threadIdx.x; j < s.slots; j += blockDim.x) sh.map[j] = map[j];
    if (with_budget && sel.max_new_blocks != no_budget) {
      const int n = sh.n;
      for (int i = threadIdx.x; i < n; i += blockDim.x) sh.flag[i] = where[sh.out[i]] < 0;  // missing
      __syncthreads();
      if (threadIdx.x == 0) {
        int missing = 0;
        for (int i = 0; i < n; ++i) missing += sh.flag[i];
        int dropped = 0;
        const int excess = missing - sel.max_new_blocks;
        for (int i = n - 1; i >= sh.n_forced && dropped < excess; --i) {
          if (sh.flag[i]) {
            mark[sh.out[i]] = 0;
            sh.out[i] = -1;
            ++dropped;
          }
        }
        int kept = 0;
        for (int i = 0; i < n; ++i) {
          if (sh.out[i] >= 0) sh.out[kept++] = sh.out[i];
        }
        sh.n = kept;
        sh.count = dropped;
      }
      __syncthreads();
      if (sh.count > 0) {
        // Resident blocks outside the selection, best first, replace the dropped ones.
        const float* score = agnostic ? se : sq;
        for (int j = threadIdx.x; j < s.slots; j += blockDim.x) {
          const int blk = sh.map[j];
          const bool ok = blk >= 0 && blk < n_blocks && mark[blk] == 0 && !is_forced_block(blk, current, sel);
          sh.keys[j] = ok ? selector::sort_key(score[blk], blk) : 0;
          sh.blocks[j] = ok ? blk : -1;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          int found = 0;
          for (int j = 0; j < s.slots; ++j) {
            if (sh.blocks[j] < 0) continue;
            // Insertion sort by descending key into the front of the arrays (j >= found always).
            const std::uint64_t key = sh.keys[j];
            const std::int32_t blk = sh.blocks[j];
            int at = found;
            while (at > 0 && sh.keys[at - 1] < key) {
              sh.keys[at] = sh.keys[at - 1];
              sh.blocks[at] = sh.blocks[at - 1];
              --at;
            }
            sh.keys[at] = key;
            sh.blocks[at] = blk;
            ++found;
          }
          for (int i = 0; i < found && i < sh.count; ++i) sh.out[sh.n++] = sh.blocks[i];
        }
        __syncthreads();
      }
    }
  }
  __syncthreads();
  const int n = sh.n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    s.selection_of(seq, h)[i] = sh.out[i];
    mark[sh.out[i]] = 1;
  }
  if (threadIdx.x == 0) s.selection_count[s.sh(seq, h)] = n;
  __syncthreads();

  int misses = 0;
  if constexpr (offloads) {
    // Free the slots whose blocks left the selection.
    for (int j = threadIdx.x; j < s.slots; j += blockDim.x) {
      const int blk = sh.map[j];
      if (blk >= 0 && mark[blk] == 0) {
        where[blk] = -1;
        sh.map[j] = -1;
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) sh.flag[i] = where[sh.out[i]] < 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      int nm = 0;
      for (int i = 0; i < n; ++i) {
        if (sh.flag[i]) sh.miss_blocks[nm++] = sh.out[i];
      }
      int r = 0;
      for (int j = 0; j < s.slots && r < nm; ++j) {
        if (sh.map[j] < 0) sh.map[j] = sh.miss_blocks[r++] | (1 << 30);  // tagged: newly assigned
      }
      sh.misses = nm;
    }
    __syncthreads();
    misses = sh.misses;
    for (int j = threadIdx.x; j < s.slots; j += blockDim.x) {
      int blk = sh.map[j];
      if (blk >= 0 && (blk & (1 << 30)) != 0) {
        blk &= ~(1 << 30);
        where[blk] = j;
      }
      map[j] = blk;
    }
    for (int r = threadIdx.x; r < misses; r += blockDim.x) s.misses_of(seq, h)[r] = sh.miss_blocks[r];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) mark[sh.out[i]] = 0;
  if (threadIdx.x == 0) {
    s.step_misses[s.sh(seq, h)] = misses;
    const unsigned long long h2d = 2ull * misses * s.block_bytes();
    if (mode == count_mode::step) {
      const unsigned long long hits = static_cast<unsigned long long>(n - misses);
      const unsigned long long d2h = offloads && length % sel.block_size == 0 ? 2ull * s.block_bytes() : 0ull;
      counters* targets[2] = {s.last_step, s.totals};
      for (counters* c : targets) {
        atomicAdd(reinterpret_cast<unsigned long long*>(&c->hits), hits);
        atomicAdd(reinterpret_cast<unsigned long long*>(&c->misses), static_cast<unsigned long long>(misses));
        atomicAdd(reinterpret_cast<unsigned long long*>(&c->bytes_h2d), h2d);
        atomicAdd(reinterpret_cast<unsigned long long*>(&c->bytes_d2h), d2h);
      }
    } else {
      atomicAdd(reinterpret_cast<unsigned long long*>(&s.totals->bytes_h2d), h2d);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Gather and write-back.
// ---------------------------------------------------------------------------------------------------------

/// Copies `bytes` (a multiple of 16) from `src` to `dst` with the whole CTA, K and V together, several
/// 16-byte loads in flight per thread.
__device__ inline void copy_pair(const void* src_k, const void* src_v, void* dst_k, void* dst_v, std::size_t bytes) {
  constexpr int unroll = 4;
  const auto* sk = static_cast<const uint4*>(src_k);
  const auto* sv = static_cast<const uint4*>(src_v);
  auto* dk = static_cast<uint4*>(dst_k);
  auto* dv = static_cast<uint4*>(dst_v);
  const int n = static_cast<int>(bytes / sizeof(uint4));
  const int stride = blockDim.x * unroll;
  for (int base = threadIdx.x; base < n; base += stride) {
    uint4 k[unroll], v[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const int i = base + u * blockDim.x;
      if (i < n) {
        k[u] = sk[i];
        v[u] = sv[i];
      }
    }
#pragma unroll
    for (int u = 0; u < unroll; ++u) {
      const int i = base + u * blockDim.x;
      if (i < n) {
        dk[i] = k[u];
        dv[i] = v[u];
      }
    }
  }
}

/// Grid (batch rows x KV heads, k + 1). CTA (r, j < k) loads miss j of row r from its pool page (mapped host
/// memory) into its slot; CTA (r, k) writes back the tail block when this step completed it.
template <class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    gather_kernel(cuda_state<E, D> s, sequence_source seqs, bool write_back) {
  if (write_back && *s.status != 0) return;  // `write_back` is set by steps only; plan calls always run
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);
  const int j = blockIdx.y;
  if (j < s.top_k) {
    if (j >= s.step_misses[s.sh(seq, h)]) return;
    const int blk = s.misses_of(seq, h)[j];
    const int slot = s.block_slot_of(seq, h)[blk];
    const int page = s.table(seq)[blk];
    copy_pair(s.page_k(page, h), s.page_v(page, h), s.slot_k(seq, h, slot), s.slot_v(seq, h, slot), s.block_bytes());
  } else if (write_back) {
    const int t = s.lengths[seq];
    if ((t + 1) % s.sel.block_size != 0) return;
    const int blk = t / s.sel.block_size;
    const int slot = s.block_slot_of(seq, h)[blk];
    const int page = s.table(seq)[blk];
    copy_pair(s.slot_k(seq, h, slot), s.slot_v(seq, h, slot), s.page_k(page, h), s.page_v(page, h), s.block_bytes());
  }
}

// ---------------------------------------------------------------------------------------------------------
// Sparse attention: split over the selection, merged by log-sum-exp.
// ---------------------------------------------------------------------------------------------------------

/// Warps of an attention CTA.
inline constexpr int attention_warps = 4;

/// The attended blocks (positions `first .. last-1` of the selection, or block indices for full attention)
/// that split `split` of `splits` covers, cut into tiles of `tile_rows` rows (a block's last tile may be
/// partial).
struct split_share {
  int first, last, tiles_per_block, tiles;
};
template <class P, class E, int D>
__device__ inline split_share attention_share(const cuda_state<E, D>& s, int seq, int h, int length, int split,
                                              int splits, int tile_rows) {
  // Full attention reads every block in index order, sparse attention the selection in rank order.
  const int n = P::dense ? block_count(length, s.sel) : s.selection_count[s.sh(seq, h)];
  const int per = (n + splits - 1) / splits;
  split_share r;
  r.first = split * per;
  r.last = r.first + per < n ? r.first + per : n;
  r.tiles_per_block = (s.sel.block_size + tile_rows - 1) / tile_rows;
  r.tiles = r.last > r.first ? (r.last - r.first) * r.tiles_per_block : 0;
  return r;
}

/// Loads `N` consecutive elements of a row as fp32, with the widest aligned loads `N` allows (the caller
/// keeps `p` aligned to `N` elements, up to 16 bytes).
template <int N, class E>
__device__ inline void load_row_chunk(const E* p, float (&out)[N]) {
  if constexpr (std::is_same_v<E, float>) {
    if constexpr (N % 4 == 0) {
#pragma unroll
      for (int i = 0; i < N / 4; ++i) {
        const float4 v = reinterpret_cast<const float4*>(p)[i];
        out[4 * i] = v.x, out[4 * i + 1] = v.y, out[4 * i + 2] = v.z, out[4 * i + 3] = v.w;
      }
    } else if constexpr (N == 2) {
      const float2 v = *reinterpret_cast<const float2*>(p);
      out[0] = v.x, out[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) out[i] = p[i];
    }
  } else {
    static_assert(N % 8 == 0 || N == 4 || N == 2, "16-bit rows load in pairs");
    std::uint32_t words[N / 2];
    if constexpr (N % 8 == 0) {
#pragma unroll
      for (int i = 0; i < N / 8; ++i) {
        const uint4 v = reinterpret_cast<const uint4*>(p)[i];
        words[4 * i] = v.x, words[4 * i + 1] = v.y, words[4 * i + 2] = v.z, words[4 * i + 3] = v.w;
      }
    } else if constexpr (N == 4) {
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      words[0] = v.x, words[1] = v.y;
    } else {
      words[0] = *reinterpret_cast<const std::uint32_t*>(p);
    }
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      out[2 * i] = to_float(E::from_bits(static_cast<std::uint16_t>(words[i] & 0xffffu)));
      out[2 * i + 1] = to_float(E::from_bits(static_cast<std::uint16_t>(words[i] >> 16)));
    }
  }
}

/// Grid (batch rows x KV heads, splits), 4 warps. CTA (r, x) attends the G query heads of row r's KV head
/// over its contiguous share of the selected blocks. Each warp takes tiles of 32 rows in turn: lane j
/// computes the logits of row j for the whole group (its key row streamed in 16-byte pieces against the
/// queries in shared memory), the warp updates its running softmax per head, then every lane accumulates
/// its D/32 columns of the tile's values for the whole group. The warps' partials are combined in warp
/// order at the end, so the result does not depend on timing.
template <class P, class E, int D>
__global__ void __launch_bounds__(attention_warps * 32)
    attention_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<const E, 3> q) {
  if (*s.status != 0) return;
  using attention = typename P::attention;
  constexpr bool offloads = P::store::offloads;
  constexpr int chunk = static_cast<int>(16 / sizeof(E));  // key elements per 16-byte load
  constexpr int cols = D / 32;                             // value columns per lane
  constexpr int G = cuda_max_group;
  __shared__ __align__(16) float qs[G * D];  // the group's queries; reused to combine the warps' sums
  __shared__ float ps[attention_warps][G][32];
  __shared__ float warp_max_s[attention_warps][G], warp_sum_s[attention_warps][G];
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int split = blockIdx.y, splits = gridDim.y;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + 1;
  const int group = s.group;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float scale = softmax_scale(D);
  const selection_params& sel = s.sel;

  for (int i = threadIdx.x; i < group * D; i += blockDim.x) qs[i] = to_float(q(b, h * group + i / D, i % D));
  __syncthreads();

  float acc[G][cols];
  float run_max[G], run_sum[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    run_max[g] = negative_infinity;
    run_sum[g] = 0.0f;
#pragma unroll
    for (int c = 0; c < cols; ++c) acc[g][c] = 0.0f;
  }

  const split_share share = attention_share<P>(s, seq, h, length, split, splits, 32);
  const int first_i = share.first, tiles_per_block = share.tiles_per_block, n_tiles = share.tiles;
  const std::int32_t* chosen = s.selection_of(seq, h);
  const float* c_state = s.scores_of(seq, h);
  for (int tile = warp; tile < n_tiles; tile += attention_warps) {
    const int m = P::dense ? first_i + tile / tiles_per_block : chosen[first_i + tile / tiles_per_block];
    const int r0 = (tile % tiles_per_block) * 32;
    const int first = m * sel.block_size;
    const int rows = sel.block_size < length - first ? sel.block_size : length - first;
    if (r0 >= rows) continue;
    const int nr = rows - r0 < 32 ? rows - r0 : 32;
    const E* keys;
    const E* values;
    if constexpr (offloads) {
      const int slot = s.block_slot_of(seq, h)[m];
      keys = s.slot_k(seq, h, slot);
      values = s.slot_v(seq, h, slot);
    } else {
      const int page = s.table(seq)[m];
      keys = s.page_k(page, h);
      values = s.page_v(page, h);
    }
    keys += std::size_t(r0) * D;
    values += std::size_t(r0) * D;
    const bool valid = lane < nr;

    // Logits of row r0 + lane for every head of the group.
    float logit[G];
#pragma unroll
    for (int g = 0; g < G; ++g) logit[g] = 0.0f;
    if (valid) {
      const E* row = keys + std::size_t(lane) * D;
      for (int d0 = 0; d0 < D; d0 += chunk) {
        float k[chunk];
        load_row_chunk<chunk>(row + d0, k);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (g < group) {
            const float* qg = qs + g * D + d0;
            float dot = logit[g];
#pragma unroll
            for (int e = 0; e < chunk; ++e) dot += qg[e] * k[e];
            logit[g] = dot;
          }
        }
      }
    }
    const float bias = valid ? c_state[first + r0 + lane] : 0.0f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g < group) {
        const float l = valid ? attention::logit(logit[g], bias, scale) : negative_infinity;
        const float new_max = max_keep_left(run_max[g], warp_max(l));
        float p = 0.0f, rescale = 1.0f;
        if (new_max != negative_infinity) {
          p = valid ? expf(l - new_max) : 0.0f;
          rescale = run_max[g] == negative_infinity ? 0.0f : expf(run_max[g] - new_max);
        }
        run_sum[g] = run_sum[g] * rescale + warp_sum(p);
        run_max[g] = new_max;
        ps[warp][g][lane] = p;
#pragma unroll
        for (int c = 0; c < cols; ++c) acc[g][c] *= rescale;
      }
    }
    __syncwarp();
    // Values: lane holds columns [lane * cols, lane * cols + cols) of every head.
    for (int r = 0; r < nr; ++r) {
      float v[cols];
      load_row_chunk<cols>(values + std::size_t(r) * D + lane * cols, v);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g < group) {
          const float p = ps[warp][g][r];
#pragma unroll
          for (int c = 0; c < cols; ++c) acc[g][c] += p * v[c];
        }
      }
    }
    __syncwarp();
  }

  // Combine the warps' partials in warp order.
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g < group) {
        warp_max_s[warp][g] = run_max[g];
        warp_sum_s[warp][g] = run_sum[g];
      }
    }
  }
  __syncthreads();  // also: every warp is done reading qs
  float factor[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    factor[g] = 0.0f;
    if (g < group) {
      float m = negative_infinity;
      for (int w = 0; w < attention_warps; ++w) m = max_keep_left(m, warp_max_s[w][g]);
      if (m != negative_infinity && run_max[g] != negative_infinity) factor[g] = expf(run_max[g] - m);
    }
  }
  for (int w = 0; w < attention_warps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (g < group) {
#pragma unroll
          for (int c = 0; c < cols; ++c) {
            float& out = qs[g * D + lane * cols + c];
            out = (w == 0 ? 0.0f : out) + acc[g][c] * factor[g];
          }
        }
      }
    }
    __syncthreads();
  }
  float* out_acc = s.acc_of(seq, h, split);
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) out_acc[i] = qs[i];
  if (threadIdx.x < group) {
    const int g = threadIdx.x;
    float m = negative_infinity;
    for (int w = 0; w < attention_warps; ++w) m = max_keep_left(m, warp_max_s[w][g]);
    float sum = 0.0f;
    if (m != negative_infinity) {
      for (int w = 0; w < attention_warps; ++w) {
        if (warp_max_s[w][g] != negative_infinity) sum += warp_sum_s[w][g] * expf(warp_max_s[w][g] - m);
      }
    }
    s.stats_of(seq, h, split)[2 * g] = m;
    s.stats_of(seq, h, split)[2 * g + 1] = sum;
  }
}

/// Grid (batch rows x KV heads, group), D threads: merges one query head's splits by log-sum-exp into the
/// output; CTA (row of KV head 0, head 0) also advances the sequence by the token this step appended.
template <class E, int D, class Out>
__global__ void __launch_bounds__(D)
    merge_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<Out, 3> o, int splits) {
  if (*s.status != 0) return;
  __shared__ float weight[max_attention_splits];
  __shared__ float total;
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int g = blockIdx.y;
  const int seq = seqs(b);
  const int d = threadIdx.x;
  if (d < 32) {
    const bool in = d < splits;
    const float m = in ? s.stats_of(seq, h, d)[2 * g] : negative_infinity;
    const float l = in ? s.stats_of(seq, h, d)[2 * g + 1] : 0.0f;
    const float top = warp_max(m);
    const float w = top == negative_infinity || m == negative_infinity ? 0.0f : expf(m - top);
    const float sum = warp_sum(w * l);
    if (in) weight[d] = w;
    if (d == 0) total = sum;
  }
  __syncthreads();
  float acc = 0.0f;
  for (int x = 0; x < splits; ++x) {
    if (weight[x] != 0.0f) acc += s.acc_of(seq, h, x)[g * D + d] * weight[x];
  }
  o(b, h * s.group + g, d) = from_float<Out>(total > 0.0f ? acc / total : 0.0f);
  if (h == 0 && g == 0 && d == 0) s.lengths[seq] += 1;
}

// ---------------------------------------------------------------------------------------------------------
// Plan calls: admission, ingest, retirement.
// ---------------------------------------------------------------------------------------------------------

/// One CTA per KV head: clears the sequence's slot maps and claims slot 0 for a partial tail (offload
/// store); CTA 0 also installs the block table row (read from mapped host memory), the length and the live
/// flag, and counts the bytes that ingest writes to the host pool.
template <bool Offloads, class E, int D>
__global__ void admit_kernel(cuda_state<E, D> s, int seq, int length, const std::int32_t* table_row) {
  const int h = blockIdx.x;
  if constexpr (Offloads) {
    std::int32_t* map = s.slot_map_of(seq, h);
    std::int32_t* where = s.block_slot_of(seq, h);
    for (int j = threadIdx.x; j < s.slots; j += blockDim.x) map[j] = -1;
    for (int m = threadIdx.x; m < s.max_blocks; m += blockDim.x) where[m] = -1;
    __syncthreads();
    if (threadIdx.x == 0 && length % s.sel.block_size != 0) {
      const int tail = length / s.sel.block_size;
      map[0] = tail;
      where[tail] = 0;
    }
  }
  if (threadIdx.x == 0) {
    s.selection_count[s.sh(seq, h)] = 0;
    s.step_misses[s.sh(seq, h)] = 0;
  }
  if (h == 0) {
    for (int m = threadIdx.x; m < s.max_blocks; m += blockDim.x) s.table(seq)[m] = table_row[m];
    if (threadIdx.x == 0) {
      s.lengths[seq] = length;
      s.live[seq] = 1;
      if (Offloads) {
        const unsigned long long full = static_cast<unsigned long long>(length / s.sel.block_size);
        atomicAdd(reinterpret_cast<unsigned long long*>(&s.totals->bytes_d2h),
                  full * s.kv_heads * 2ull * s.block_bytes());
      }
    }
  }
}

/// Grid (KV heads, chunks): copies a prompt into the state: score history, key ring (`Scored`), blocks to
/// their pages (the offload store keeps a partial tail in slot 0).
template <bool Offloads, bool Scored, class E, int D>
__global__ void ingest_kernel(cuda_state<E, D> s, int seq, int length, tensor_view<const E, 3> k,
                              tensor_view<const E, 3> v, tensor_view<const float, 2> c) {
  const int h = blockIdx.x;
  const selection_params& sel = s.sel;
  const int full_blocks = Offloads ? length / sel.block_size : block_count(length, sel);
  const std::int32_t* table = s.table(seq);
  const std::int64_t items = std::int64_t(length) * D;
  for (std::int64_t idx = std::int64_t(blockIdx.y) * blockDim.x + threadIdx.x; idx < items;
       idx += std::int64_t(gridDim.y) * blockDim.x) {
    const int t = static_cast<int>(idx / D), d = static_cast<int>(idx % D);
    const int m = t / sel.block_size;
    const std::size_t row = std::size_t(t % sel.block_size) * D + d;
    const E kd = k(t, h, d);
    if (m < full_blocks) {
      s.page_k(table[m], h)[row] = kd;
      s.page_v(table[m], h)[row] = v(t, h, d);
    } else {
      s.slot_k(seq, h, 0)[row] = kd;
      s.slot_v(seq, h, 0)[row] = v(t, h, d);
    }
    if (Scored && t >= length - sel.window) s.ring_of(seq, h)[std::size_t(t % sel.window) * D + d] = kd;
    if (d == 0) s.scores_of(seq, h)[t] = c.empty() ? 0.0f : c(t, h);
  }
}

/// Grid (KV heads, chunks): compressed key and score of every complete window of the prompt. Runs after
/// `ingest_kernel` (it reads the score history).
template <class E, int D>
__global__ void compress_prompt_kernel(cuda_state<E, D> s, int seq, int length, tensor_view<const E, 3> k) {
  const int h = blockIdx.x;
  const int n_windows = window_count(length, s.sel);
  for (int w = blockIdx.y; w < n_windows; w += gridDim.y) {
    compress_window(s, seq, h, w, [&](int token) { return &k(token, h, 0); });
  }
}

/// After the initial load: a new sequence reports no misses of its own.
template <class E, int D>
__global__ void clear_step_misses_kernel(cuda_state<E, D> s, int seq) {
  for (int h = threadIdx.x; h < s.kv_heads; h += blockDim.x) s.step_misses[s.sh(seq, h)] = 0;
}

/// One CTA per KV head: returns the sequence's state to the free-slot state.
template <bool Offloads, class E, int D>
__global__ void retire_kernel(cuda_state<E, D> s, int seq) {
  const int h = blockIdx.x;
  if constexpr (Offloads) {
    for (int j = threadIdx.x; j < s.slots; j += blockDim.x) s.slot_map_of(seq, h)[j] = -1;
    for (int m = threadIdx.x; m < s.max_blocks; m += blockDim.x) s.block_slot_of(seq, h)[m] = -1;
  }
  if (threadIdx.x == 0) {
    s.selection_count[s.sh(seq, h)] = 0;
    s.step_misses[s.sh(seq, h)] = 0;
  }
  if (h == 0) {
    for (int m = threadIdx.x; m < s.max_blocks; m += blockDim.x) s.table(seq)[m] = -1;
    if (threadIdx.x == 0) {
      s.lengths[seq] = 0;
      s.live[seq] = 0;
    }
  }
}

}  // namespace nosa::detail
