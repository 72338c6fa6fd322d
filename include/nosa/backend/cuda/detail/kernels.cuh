#pragma once
/// \file
/// The kernels of the CUDA decode step and of the plan calls. Each kernel handles one (sequence, KV head)
/// per CTA (the scoring, the gather and the attention add a second grid dimension), reads lengths, block
/// tables and slot maps from state, and returns at once when the step's state checks failed, so a step with
/// bad input changes nothing. Every grid is sized by the batch and the layer's capacities, never by state values.

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

/// A slot of (seq, h) now holds `block` (a new tail). Without a cache, the lowest free slot (the spare slot
/// guarantees one). With a cache, the lowest free slot, else the slot of the least recently selected block
/// outside the current selection (the lower slot on a tie), which leaves; the slot is stamped with the
/// sequence's length. Called by the whole CTA.
template <class E, int D>
__device__ void claim_free_slot(const cuda_state<E, D>& s, int seq, int h, int block) {
  std::int32_t* map = s.slot_map_of(seq, h);
  if (s.cache_slots == 0) {
    if (threadIdx.x == 0) {
      int slot = 0;
      while (slot < s.slots - 1 && map[slot] >= 0) ++slot;
      map[slot] = block;
      s.block_slot_of(seq, h)[block] = slot;
    }
    __syncthreads();
    return;
  }
  __shared__ unsigned long long best;
  std::int32_t* mark = s.mark_of(seq, h);
  const std::int32_t* chosen = s.selection_of(seq, h);
  const int n = s.selection_count[s.sh(seq, h)];
  if (threadIdx.x == 0) best = ~0ull;
  for (int i = threadIdx.x; i < n; i += blockDim.x) mark[chosen[i]] = 1;
  __syncthreads();
  // Free slots rank first by slot, then cached blocks by (stamp, slot).
  unsigned long long mine = ~0ull;
  for (int j = threadIdx.x; j < s.slots; j += blockDim.x) {
    const int held = map[j];
    unsigned long long key = ~0ull;
    if (held < 0) {
      key = static_cast<unsigned long long>(j);
    } else if (mark[held] == 0) {
      key = (1ull << 60) | (static_cast<unsigned long long>(s.stamp_of(seq, h)[j]) << 20) | static_cast<unsigned>(j);
    }
    mine = key < mine ? key : mine;
  }
  atomicMin(&best, mine);
  __syncthreads();
  if (threadIdx.x == 0) {
    const int slot = static_cast<int>(best & 0xfffffu);
    if (map[slot] >= 0) s.block_slot_of(seq, h)[map[slot]] = -1;
    map[slot] = block;
    s.block_slot_of(seq, h)[block] = slot;
    s.stamp_of(seq, h)[slot] = s.lengths[seq];
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) mark[chosen[i]] = 0;
  __syncthreads();
}

/// Compressed key and score of window `w`: the mean of its keys (`key_row(t)` gives token t's key) and of
/// its eviction scores, each summed in token order. Called by the whole CTA.
template <class E, int D, class KeyRow>
__device__ void compress_window(const cuda_state<E, D>& s, int seq, int h, int w, KeyRow key_row) {
  const selection_params& sel = s.sel;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.0f;
    for (int i = 0; i < sel.window; ++i) sum += to_float(key_row(w * sel.stride + i)[d]);
    s.kc_of(seq, h)[compressed_key_index(w, d, s.max_windows)] = sum / static_cast<float>(sel.window);
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
    if (t % sel.block_size == 0) claim_free_slot(s, seq, h, block);
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

/// Windows of one softmax chunk (one CTA of `window_logits_kernel`, a window per thread): the logit kernels
/// leave (max, sum of exp) per chunk and query head.
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
  // The group's queries, every load in flight at once (at most 16 D elements over 256 threads).
#pragma unroll
  for (int r = 0; r < (cuda_max_group * D + cuda_threads - 1) / cuda_threads; ++r) {
    const int i = threadIdx.x + r * cuda_threads;
    if (i < group * D) qs[i] = to_float(q(b, h * group + i / D, i % D));
  }
  __syncthreads();
  const int w = first + threadIdx.x;
  const bool active = w < n_windows;
  float acc[cuda_max_group];
#pragma unroll
  for (int g = 0; g < cuda_max_group; ++g) acc[g] = 0.0f;
  if (active) {
    // Eight 16-byte loads in flight per thread, then their products, in ascending d.
    constexpr int batch = 8;
    static_assert((D / 4) % batch == 0);
    // Window w's dimensions 4j..4j+3 are float4 number j * MW + w (compressed_key_index): a warp reads 512
    // consecutive bytes per load.
    const float4* pieces = reinterpret_cast<const float4*>(s.kc_of(seq, h)) + w;
    for (int d0 = 0; d0 < D / 4; d0 += batch) {
      float4 kv[batch];
#pragma unroll
      for (int j = 0; j < batch; ++j) kv[j] = pieces[std::size_t(d0 + j) * s.max_windows];
#pragma unroll
      for (int j = 0; j < batch; ++j) {
#pragma unroll
        for (int g = 0; g < cuda_max_group; ++g) {
          if (g < group) {
            const float4 qv = reinterpret_cast<const float4*>(qs + g * D)[d0 + j];
            acc[g] += qv.x * kv[j].x + qv.y * kv[j].y + qv.z * kv[j].z + qv.w * kv[j].w;
          }
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

/// Threads of `pool_scores_kernel`, one block each.
inline constexpr int pool_threads = 128;

/// Step stage 1c, grid (batch rows x KV heads, block groups of `pool_threads`), one thread per block:
/// combines the chunks' softmax partials, and pools windows into block scores: `Sq` (max over the windows
/// overlapping the block of P[w], each window's probability summed over the group; the pooling identity
/// without a query) and `Se` (max of the compressed eviction scores). A window that overlaps two blocks has
/// its probability computed by both, with the same bits.
template <class P, class E, int D>
__global__ void __launch_bounds__(pool_threads)
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
  const int first_block = static_cast<int>(blockIdx.y) * pool_threads;
  if (first_block >= n_blocks) return;
  const int group = s.group;
  const bool query = have_query && n_windows > 0;
  if (query) {
    const int chunks = (n_windows + score_chunk - 1) / score_chunk;
    const float* parts = s.score_partials_of(seq, h);
    // One warp per head: the lanes read the chunks' partials side by side, then reduce them.
    const int lane = threadIdx.x % 32;
    for (int g = threadIdx.x / 32; g < group; g += blockDim.x / 32) {
      float m = negative_infinity;
      for (int x = lane; x < chunks; x += 32) m = max_keep_left(m, parts[(std::size_t(x) * group + g) * 2]);
      m = warp_max(m);
      float sum = 0.0f;
      for (int x = lane; x < chunks; x += 32) {
        const float* part = parts + (std::size_t(x) * group + g) * 2;
        sum += part[1] * expf(part[0] - m);
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        group_max[g] = m;
        group_inv[g] = 1.0f / sum;
      }
    }
    __syncthreads();
  }
  const int m = first_block + static_cast<int>(threadIdx.x);
  if (m >= n_blocks) return;
  const window_range r = windows_overlapping_block(m, n_windows, sel);
  const float* cc = s.cc_of(seq, h);
  const float* logits = s.logits_of(seq, h);
  float bq = scorer::pool_identity;
  float be = agnostic::pool_identity;
  for (int w = r.first; w < r.last; ++w) {
    if (query) {
      // Every head's logit loaded before the first is used; summed in head order.
      float l[cuda_max_group];
#pragma unroll
      for (int g = 0; g < cuda_max_group; ++g) l[g] = g < group ? logits[std::size_t(g) * s.max_windows + w] : 0.0f;
      float p = 0.0f;
#pragma unroll
      for (int g = 0; g < cuda_max_group; ++g) {
        if (g < group) p += expf(l[g] - group_max[g]) * group_inv[g];
      }
      bq = scorer::pool(bq, p);
    }
    be = agnostic::pool(be, cc[w]);
  }
  s.sq_of(seq, h)[m] = bq;
  s.se_of(seq, h)[m] = be;
}

// ---------------------------------------------------------------------------------------------------------
// Selection, hard budget and set-difference.
// ---------------------------------------------------------------------------------------------------------

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

/// Shared memory of the selection kernel (the staged scores are dynamic shared memory).
struct select_shared {
  alignas(16) int hist[3][256];                // radix histograms, in rotation (see `radix_threshold`)
  std::uint64_t keys[select_threads];          // the picks of a top-k, or the budget's candidates by slot
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
    int* hist = sh.hist[round % 3];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[(round + 1) % 3][i] = 0;
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
      sh.keys[at] = k;
      sh.blocks[at] = first + i;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < need; i += blockDim.x) {
    const std::uint64_t k = sh.keys[i];
    int rank = 0;
    for (int j = 0; j < need; ++j) rank += sh.keys[j] > k;
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
};

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

/// One CTA per (batch row, KV head): forced blocks, query-aware top-k, query-agnostic top-k and the hard
/// budget (`with_budget`, offload store); writes the selection in rank order and its count. The resident
/// store has no diff, so this kernel also counts its step (every block a hit). The scores of the blocks that
/// are not forced (one contiguous range) are staged in dynamic shared memory when `staged_capacity` holds
/// them, and read from global memory otherwise.
template <class P, class E, int D>
__global__ void __launch_bounds__(select_threads)
    select_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, bool have_query, bool with_budget,
                  count_mode mode, int staged_capacity) {
  using selector = typename P::selector;
  constexpr bool offloads = P::store::offloads;
  constexpr bool agnostic = P::query_agnostic::enabled;
  __shared__ select_shared sh;
  extern __shared__ float staged[];  // [staged_capacity] Sq, then [staged_capacity] Se
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);  // read with the status: a batch row is always readable, its state may not be
  // Plan calls (ingest) run whatever the last step's status; a step runs only when its checks passed.
  if (mode == count_mode::step && *s.status != 0) return;
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
  for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[0][i] = 0;
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
          if (j < s.slots) sh.keys[j] = key;
          const int found = __syncthreads_count(ok);
          if (ok) {
            int rank = 0;
            for (int x = 0; x < s.slots; ++x) rank += sh.keys[x] > key;
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
}

/// Shared memory of the diff kernel.
struct diff_shared {
  std::int32_t kept[select_threads];  // the slot holds a block of the new selection
  std::int32_t stamp[select_threads]; // with a cache: the slot's stamp, or -1 when its block cannot leave
  std::int32_t miss_blocks[cuda_max_top_k];
  int scan[select_warps];
};

/// The set-difference of the offload store, one CTA per (batch row, KV head), one thread per selected block
/// and per slot: frees the slots whose blocks left the selection (hits never move), gives the misses, in
/// rank order, the lowest free slots, writes the miss list and `step_misses`, and counts the traffic.
template <class E, int D>
__global__ void __launch_bounds__(select_threads)
    diff_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, count_mode mode) {
  __shared__ diff_shared sh;
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);  // read with the status: a batch row is always readable, its state may not be
  if (mode == count_mode::step && *s.status != 0) return;
  const int t = threadIdx.x;
  std::int32_t* map = s.slot_map_of(seq, h);
  std::int32_t* where = s.block_slot_of(seq, h);
  // The count, the selection's entries and the slot map in one round trip (entries past the count are
  // read but not used).
  const int n = s.selection_count[s.sh(seq, h)];
  const int entry = t < s.top_k ? s.selection_of(seq, h)[t] : -1;
  const bool slot = t < s.slots;
  const int held = slot ? map[t] : -1;
  const bool selected = t < n;
  const int blk = selected ? entry : -1;
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

/// Enqueues `select_kernel` for `rows` (batch row, KV head) pairs, staging scores when they fit.
template <class P, class E, int D>
void launch_select(const cuda_state<E, D>& s, sequence_source seqs, int rows, int length_offset, bool have_query,
                   bool with_budget, count_mode mode, cudaStream_t stream) {
  const int staged = select_staged_blocks(s.max_blocks);
  select_kernel<P><<<rows, select_threads, std::size_t(staged) * 2 * sizeof(float), stream>>>(
      s, seqs, length_offset, have_query, with_budget, mode, staged);
}

/// Enqueues `diff_kernel` for `rows` (batch row, KV head) pairs (offload store only).
template <class E, int D>
void launch_diff(const cuda_state<E, D>& s, sequence_source seqs, int rows, int length_offset, count_mode mode,
                 cudaStream_t stream) {
  diff_kernel<<<rows, select_threads, 0, stream>>>(s, seqs, length_offset, mode);
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

/// Grid (batch rows x KV heads, Y). CTA (r, y) loads misses y, y + Y, ... of row r from their pool pages
/// (mapped host memory) into their slots; with `write_back`, CTA (r, k mod Y) then writes back the tail
/// block when this step completed it. With Y = k + 1 every CTA has one item at most.
template <class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    gather_kernel(cuda_state<E, D> s, sequence_source seqs, bool write_back) {
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);  // read with the status: a batch row is always readable, its state may not be
  if (write_back && *s.status != 0) return;  // `write_back` is set by steps only; plan calls always run
  const int misses = s.step_misses[s.sh(seq, h)];
  for (int j = blockIdx.y; j < misses && j < s.top_k; j += gridDim.y) {
    const int blk = s.misses_of(seq, h)[j];
    const int slot = s.block_slot_of(seq, h)[blk];
    const int page = s.table(seq)[blk];
    copy_pair(s.page_k(page, h), s.page_v(page, h), s.slot_k(seq, h, slot), s.slot_v(seq, h, slot), s.block_bytes());
  }
  if (write_back && static_cast<int>(blockIdx.y) == s.top_k % static_cast<int>(gridDim.y)) {
    const int t = s.lengths[seq];
    if ((t + 1) % s.sel.block_size != 0) return;
    const int blk = t / s.sel.block_size;
    const int slot = s.block_slot_of(seq, h)[blk];
    const int page = s.table(seq)[blk];
    copy_pair(s.slot_k(seq, h, slot), s.slot_v(seq, h, slot), s.page_k(page, h), s.page_v(page, h), s.block_bytes());
  }
}

/// CTAs of a gather in all, about: a CTA with nothing to copy still costs its launch (~1 us per 1000 on the
/// H200), while ~33 CTAs with a block each in flight already saturate the PCIe link.
inline constexpr int gather_target_ctas = 512;
/// The same for a gather that runs beside attention (an overlapped step): enough CTAs to keep the link busy
/// (about 33 saturate it), few enough to be resident on SMs that attention's CTAs share.
inline constexpr int overlapped_gather_target_ctas = 64;

/// CTAs per (batch row, KV head) of a gather over `items` items (the misses, and the write-back).
inline int gather_ctas_per_row(int rows, int items, int target = gather_target_ctas) {
  const int want = rows > 0 ? (target + rows - 1) / rows : items;
  return want < items ? want : items;
}

/// Enqueues `gather_kernel` for `rows` (batch row, KV head) pairs: up to `k` misses each, and the write-back
/// of a completed tail block with `write_back` (steps); about `target` CTAs in all.
template <class E, int D>
void launch_gather(const cuda_state<E, D>& s, sequence_source seqs, int rows, bool write_back, cudaStream_t stream,
                   int target = gather_target_ctas) {
  const int per_row = gather_ctas_per_row(rows, s.top_k + (write_back ? 1 : 0), target);
  gather_kernel<<<dim3(rows, per_row), cuda_threads, 0, stream>>>(s, seqs, write_back);
}

// ---------------------------------------------------------------------------------------------------------
// Sparse attention: split over the selection, merged by log-sum-exp.
// ---------------------------------------------------------------------------------------------------------

/// Warps of an attention CTA.
inline constexpr int attention_warps = 4;

/// Blocks a step attends for (seq, h): every block for full attention (in index order), else the selection
/// (in rank order).
template <class P, class E, int D>
__device__ inline int attended_blocks(const cuda_state<E, D>& s, int seq, int h, int length) {
  return P::dense ? block_count(length, s.sel) : s.selection_count[s.sh(seq, h)];
}

/// The entries `first .. last-1` of a list of `n` attended blocks that split `split` of `splits` covers, cut
/// into tiles of `tile_rows` rows (a block's last tile may be partial).
struct split_share {
  int first, last, tiles_per_block, tiles;
};
__device__ inline split_share share_of(int n, int split, int splits, int block_size, int tile_rows) {
  const int per = (n + splits - 1) / splits;
  split_share r;
  r.first = split * per;
  r.last = r.first + per < n ? r.first + per : n;
  r.tiles_per_block = (block_size + tile_rows - 1) / tile_rows;
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

  const split_share share = share_of(attended_blocks<P>(s, seq, h, length), split, splits, sel.block_size, 32);
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
  // The splits in ascending order, eight loads in flight at a time.
  float acc = 0.0f;
  constexpr int batch = 8;
  for (int x0 = 0; x0 < splits; x0 += batch) {
    float part[batch];
#pragma unroll
    for (int j = 0; j < batch; ++j) {
      const int x = x0 + j;
      part[j] = x < splits && weight[x] != 0.0f ? s.acc_of(seq, h, x)[g * D + d] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < batch; ++j) {
      if (x0 + j < splits && weight[x0 + j] != 0.0f) acc += part[j] * weight[x0 + j];
    }
  }
  o(b, h * s.group + g, d) = from_float<Out>(total > 0.0f ? acc / total : 0.0f);
  if (h == 0 && g == 0 && d == 0) s.lengths[seq] += 1;
}

// ---------------------------------------------------------------------------------------------------------
// Plan calls: admission, ingest, retirement.
// ---------------------------------------------------------------------------------------------------------

/// One CTA per KV head: clears the sequence's slot maps and claims slot 0 for a partial tail (offload
/// store); CTA 0 also installs the block table row (read from mapped host memory), the length and the live
/// flag, and counts the bytes that ingest writes to the host pool (none for the `shared` first blocks).
template <bool Offloads, class E, int D>
__global__ void admit_kernel(cuda_state<E, D> s, int seq, int length, const std::int32_t* table_row, int shared) {
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
      if (s.cache_slots > 0) s.stamp_of(seq, h)[0] = length;
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
        const unsigned long long full = static_cast<unsigned long long>(length / s.sel.block_size - shared);
        atomicAdd(reinterpret_cast<unsigned long long*>(&s.totals->bytes_d2h),
                  full * s.kv_heads * 2ull * s.block_bytes());
      }
    }
  }
}

/// Grid (KV heads, chunks): copies a prompt into the state: score history, key ring (`Scored`), blocks to
/// their pages except the `shared` first ones, whose pages already hold them (the offload store keeps a
/// partial tail in slot 0).
template <bool Offloads, bool Scored, class E, int D>
__global__ void ingest_kernel(cuda_state<E, D> s, int seq, int length, tensor_view<const E, 3> k,
                              tensor_view<const E, 3> v, tensor_view<const float, 2> c, int shared) {
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
    if (m < shared) {
      // already in its page
    } else if (m < full_blocks) {
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
