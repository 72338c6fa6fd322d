#pragma once
/// \file
/// Step stage 7, attention: the group's query heads over the attended blocks (the selection, or every block
/// for full attention), split over CTAs, each split leaving a partial softmax that `merge_kernel` combines by
/// log-sum-exp into the output.
///
/// 16-bit storage with D = 64 or 128 runs on tensor cores (`attention_mma_kernel`): the group padded to 16
/// is the M of `mma.m16n8k16` (Q K^T, then P V, fp32 accumulation). A CTA streams 64-row tiles of K, V and
/// the eviction scores through a `cp.async` pipeline a few stages deep, all four warps loading each tile
/// together into swizzled shared memory (`ldmatrix` without bank conflicts), and each warp computing 16 of
/// its rows with its own running softmax; the places (slot or page) of the CTA's blocks are resolved ahead
/// into a small ring in shared memory, so that no copy waits on a dependent load. About 96 KiB of tiles per
/// CTA and two CTAs per SM keep enough bytes in flight for HBM.
///
/// Precision: Q, K and V enter the products exactly (they are stored in the element type); products are
/// accumulated in fp32. The softmax weights P are fp32; they are split into a 16-bit high part and a 16-bit
/// remainder and both are multiplied, so P carries about 16 (bf16) or 22 (fp16) significant bits instead of
/// 8 or 11: the result agrees with the fp32 CUDA-core kernel within fp32 accumulation error.
///
/// Other shapes (fp32 storage, D = 256) run `attention_kernel` on CUDA cores.

#include <nosa/attention/sparse_attention.hpp>
#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace nosa::detail {

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
  dependent_launch_wait();
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
  float* out_acc = s.acc_of(blockIdx.x, split, splits);
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
    s.stats_of(blockIdx.x, split, splits)[2 * g] = m;
    s.stats_of(blockIdx.x, split, splits)[2 * g + 1] = sum;
  }
}

/// Threads of `merge_kernel`.
inline constexpr int merge_threads = 128;

/// Grid (batch rows x KV heads, group), `merge_threads` threads: merges one query head's `splits` partials by
/// log-sum-exp into the output; CTA (row of KV head 0, head 0) also advances the sequence by the token this
/// step appended. Thread t sums the float4 column t % (D / 4) of the splits congruent to t / (D / 4), eight
/// loads in flight; the groups are then added in a fixed order, so the result does not depend on timing.
template <class E, int D, class Out>
__global__ void __launch_bounds__(merge_threads)
    merge_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<Out, 3> o, int splits) {
  dependent_launch_wait();
  if (*s.status != 0) return;
  constexpr int columns = D / 4;
  static_assert(D % 4 == 0 && merge_threads % columns == 0, "whole float4 columns over the threads");
  constexpr int groups = merge_threads / columns;
  constexpr int batch = 8;
  __shared__ float weight[max_attention_splits];
  __shared__ float4 part[merge_threads];
  __shared__ float total;
  const int row = blockIdx.x, b = row / s.kv_heads, h = row % s.kv_heads;
  const int g = blockIdx.y;
  const int seq = seqs(b);
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float m = negative_infinity;
    for (int x = lane; x < splits; x += 32) m = max_keep_left(m, s.stats_of(row, x, splits)[2 * g]);
    m = warp_max(m);
    float l = 0.0f;
    for (int x = lane; x < splits; x += 32) {
      const float mx = s.stats_of(row, x, splits)[2 * g];
      const float w = m == negative_infinity || mx == negative_infinity ? 0.0f : expf(mx - m);
      weight[x] = w;
      l += w * s.stats_of(row, x, splits)[2 * g + 1];
    }
    l = warp_sum(l);
    if (lane == 0) total = l;
  }
  __syncthreads();
  const int col = threadIdx.x % columns, first = threadIdx.x / columns;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int x0 = first; x0 < splits; x0 += groups * batch) {
    float4 v[batch];
#pragma unroll
    for (int u = 0; u < batch; ++u) {
      const int x = x0 + u * groups;
      v[u] = x < splits && weight[x] != 0.0f ? reinterpret_cast<const float4*>(s.acc_of(row, x, splits) + g * D)[col]
                                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < batch; ++u) {
      const int x = x0 + u * groups;
      const float w = x < splits ? weight[x] : 0.0f;
      if (w != 0.0f) {
        acc.x += v[u].x * w;
        acc.y += v[u].y * w;
        acc.z += v[u].z * w;
        acc.w += v[u].w * w;
      }
    }
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  if (first == 0) {
    for (int k = 1; k < groups; ++k) {
      const float4 p = part[k * columns + col];
      acc.x += p.x;
      acc.y += p.y;
      acc.z += p.z;
      acc.w += p.w;
    }
    const float sum = total;
    const float values[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) o(b, h * s.group + g, col * 4 + i) = from_float<Out>(sum > 0.0f ? values[i] / sum : 0.0f);
  }
  if (h == 0 && g == 0 && threadIdx.x == 0) s.lengths[seq] += 1;
}

/// Shared memory (floats) `merge_row` needs.
inline constexpr int merge_row_scratch_floats = cuda_max_group * (2 * max_attention_splits + 1);

/// `merge_kernel`'s work for one batch row `row` (b, h) with a whole CTA, in the attention kernel that finished
/// the row's last split: the `splits` partials merged by log-sum-exp into the output (`scratch`: at least
/// `merge_row_scratch_floats` floats of shared memory). The CTA that merges the last KV head of batch row b
/// advances its sequence by the token this step appended. Partials written by other CTAs are read through L2
/// (the caller fenced after seeing their arrivals), every load of a pass issued before any is used.
///
/// With `first_column` and `column_count` (in groups of four columns), only those columns are merged: the
/// CTAs of a cluster share a row's merge that way (`merge_in_cluster`), and only the one with `count_row`
/// does the row's bookkeeping.
template <class E, int D, class Out>
__device__ inline void merge_row(const cuda_state<E, D>& s, int row, int splits, int seq, tensor_view<Out, 3> o,
                                 float* scratch, int first_column = 0, int column_count = D / 4,
                                 bool count_row = true) {
  const int columns = column_count;
  const int b = row / s.kv_heads, h = row % s.kv_heads, group = s.group;
  float* weight = scratch;                                    // [G][splits]: each split's max, then its weight
  float* sums = scratch + cuda_max_group * max_attention_splits;  // [G][splits]: each split's sum of exp
  float* total = sums + cuda_max_group * max_attention_splits;    // [G]
  for (int i = static_cast<int>(threadIdx.x); i < group * splits; i += blockDim.x) {
    const int g = i / splits, x = i % splits;
    const float2 stats = __ldcg(reinterpret_cast<const float2*>(s.stats_of(row, x, splits) + 2 * g));
    weight[i] = stats.x;
    sums[i] = stats.y;
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < group) {
    const int g = threadIdx.x;
    float* w = weight + g * splits;
    float m = negative_infinity;
    for (int x = 0; x < splits; ++x) m = max_keep_left(m, w[x]);
    float l = 0.0f;
    for (int x = 0; x < splits; ++x) {
      const float mx = w[x];
      w[x] = m == negative_infinity || mx == negative_infinity ? 0.0f : expf(mx - m);
      l += w[x] * sums[g * splits + x];
    }
    total[g] = l;
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < group * columns; i += blockDim.x) {
    const int g = i / columns, col = first_column + i % columns;
    const float* w = weight + g * splits;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    constexpr int batch = 4;
    for (int x0 = 0; x0 < splits; x0 += batch) {
      float4 v[batch];
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        const int x = x0 + u;
        v[u] = x < splits && w[x] != 0.0f ? __ldcg(reinterpret_cast<const float4*>(s.acc_of(row, x, splits) + g * D) + col)
                                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int u = 0; u < batch; ++u) {
        const int x = x0 + u;
        const float wx = x < splits ? w[x] : 0.0f;
        if (wx != 0.0f) {
          acc.x += v[u].x * wx;
          acc.y += v[u].y * wx;
          acc.z += v[u].z * wx;
          acc.w += v[u].w * wx;
        }
      }
    }
    const float sum = total[g];
    const float values[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) o(b, h * group + g, col * 4 + e) = from_float<Out>(sum > 0.0f ? values[e] / sum : 0.0f);
  }
  if (count_row && threadIdx.x == 0) {
    s.attention_done[row] = 0;  // every split of the row has arrived: ready for the next step
    std::int32_t* heads = s.attention_done + std::size_t(s.sequences) * s.kv_heads + b;
    if (atomicAdd(heads, 1) == s.kv_heads - 1) {
      *heads = 0;
      s.lengths[seq] += 1;
    }
  }
}

/// Counts this CTA's split of batch row `row` as done (after its partial is written) and, when it was the
/// last of `splits`, merges the row (`merge_row`). Called by every thread of the CTA.
template <class E, int D, class Out>
__device__ inline void finish_split(const cuda_state<E, D>& s, int row, int splits, int seq, tensor_view<Out, 3> o,
                                    float* scratch) {
  __shared__ int last;
  __threadfence();  // this CTA's partial is visible before its arrival is
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(s.attention_done + row, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  merge_row<E, D, Out>(s, row, splits, seq, o, scratch);
}

/// The merge of batch row `row` when its `splits` splits are the CTAs of one thread-block cluster (sm_90):
/// after a cluster barrier (every partial written), CTA `r` merges columns `[r, r + 1) * D / splits` of the
/// row, and CTA 0 does the row's bookkeeping. No atomics, no merge kernel, and the merge itself is spread
/// over the splits. `D / 4` must be a multiple of `splits`. Called by every thread of every CTA of the cluster.
template <class E, int D, class Out>
__device__ inline void merge_in_cluster(const cuda_state<E, D>& s, int row, int splits, int seq, tensor_view<Out, 3> o,
                                        float* scratch) {
  __threadfence();
  cluster_arrive();
  cluster_wait();
  const int rank = static_cast<int>(cluster_rank()), share = D / 4 / splits;
  merge_row<E, D, Out>(s, row, splits, seq, o, scratch, rank * share, share, rank == 0);
}

// ---------------------------------------------------------------------------------------------------------
// Tensor cores (bf16, fp16; D 64, 128).
// ---------------------------------------------------------------------------------------------------------

/// Key rows of one pipeline stage of `attention_mma_kernel`: one block of 64 tokens, or part of a larger one.
inline constexpr int mma_tile_rows = 64;
/// Warps of a tensor-core attention CTA; warp w computes rows 16w .. 16w + 15 of every tile.
inline constexpr int mma_warps = 4;

/// True when `attention_mma_kernel` handles this element type and head dimension.
template <class E, int D>
inline constexpr bool uses_mma_attention = is_16bit_element<E> && (D == 64 || D == 128);

/// Bytes of one pipeline stage: a K tile, a V tile and the tile's eviction scores.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t mma_stage_bytes() {
  return std::size_t(2) * mma_tile_rows * D * 2 + mma_tile_rows * sizeof(float);
}
/// Stages of the pipeline: about 96 KiB, so that two CTAs fit on an SM.
template <int D>
NOSA_HOST_DEVICE constexpr int mma_stages() {
  const int n = static_cast<int>(99 * 1024 / mma_stage_bytes<D>());
  return n < 3 ? 3 : n;
}
/// Row stride (floats) of the warps' partial sums when they are combined: 8 mod 32, so that the quads'
/// 8-byte stores of one fragment row hit distinct banks.
template <int D>
NOSA_HOST_DEVICE constexpr int mma_combine_stride() {
  return D + 8;
}
/// Shared memory `mma_combine_warps` needs to combine `warps` warps.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t mma_combine_bytes(int warps) {
  return (std::size_t(warps) * 16 * (D + 8) + 2 * std::size_t(warps) * 16) * sizeof(float);
}
/// Dynamic shared memory of `attention_mma_kernel<P, E, D>`: the pipeline, reused to combine the warps.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t mma_attention_smem_bytes() {
  const std::size_t pipeline = std::size_t(mma_stages<D>()) * mma_stage_bytes<D>();
  const std::size_t combine = mma_combine_bytes<D>(mma_warps);
  return pipeline > combine ? pipeline : combine;
}

/// Which of a step's attended blocks one attention launch covers. A step that overlaps its transfers attends
/// the blocks that were resident before the step while the gather runs, then the blocks it loaded.
enum class attend_part : int {
  all,       ///< every attended block
  resident,  ///< the selection minus this step's misses (offload store)
  loaded,    ///< this step's misses, once the gather has loaded them (offload store)
};

/// The blocks one attention launch attends for (seq, h), in rank order: entry i is block `chosen[i]`, or
/// block i when `indexed` (full attention over every block).
struct attend_list {
  const std::int32_t* chosen;
  int n;
  bool indexed;
};
/// Shared memory of `build_attend_list`.
struct attend_list_storage {
  std::int32_t kept[cuda_max_top_k];    // the resident part of the selection
  std::int32_t missed[cuda_max_top_k];  // this step's misses, to filter it
  int count;
};
/// The list of blocks `part` covers: the selection (or every block), this step's misses, or the selection
/// without them, compacted in rank order by warp 0. Called by every thread of the CTA (it synchronises).
template <class P, class E, int D>
__device__ inline attend_list build_attend_list(const cuda_state<E, D>& s, int seq, int h, int length, attend_part part,
                                                attend_list_storage& storage) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  attend_list list{s.selection_of(seq, h), 0, P::dense && part == attend_part::all};
  if (part == attend_part::all) {
    list.n = attended_blocks<P>(s, seq, h, length);
  } else if (part == attend_part::loaded) {
    list.n = s.step_misses[s.sh(seq, h)];
    list.chosen = s.misses_of(seq, h);
  } else {
    const int nm = s.step_misses[s.sh(seq, h)];
    for (int j = threadIdx.x; j < nm; j += blockDim.x) storage.missed[j] = s.misses_of(seq, h)[j];
    __syncthreads();
    if (warp == 0) {
      const int count = s.selection_count[s.sh(seq, h)];
      int kept = 0;
      for (int i0 = 0; i0 < count; i0 += 32) {
        const int i = i0 + lane;
        const int m = i < count ? list.chosen[i] : -1;
        bool keep = i < count;
        for (int j = 0; j < nm && keep; ++j) keep = storage.missed[j] != m;
        const unsigned mask = __ballot_sync(0xffffffffu, keep);
        if (keep) storage.kept[kept + __popc(mask & ((1u << lane) - 1u))] = m;
        kept += __popc(mask);
      }
      if (lane == 0) storage.count = kept;
    }
    __syncthreads();
    list.n = storage.count;
    list.chosen = storage.kept;
  }
  return list;
}

/// One warp's share of one tile on tensor cores: S = Q K^T for its 16 key rows (rows `16 w ..` of the tile
/// in shared memory at `ks`, values at `vs`, byte offsets of 16-byte piece `ch` of row `r` given by
/// `offset(r, ch)`), the running softmax of the group's heads, and O += P V. `rows` of the warp's 16 are valid;
/// `scores` are the eviction scores of the warp's rows.
template <class P, class E, int D, class Offset>
__device__ inline void mma_attend_rows(const std::uint32_t (&qa)[D / 16][4], std::uint32_t ks, std::uint32_t vs,
                                       const float* scores, int rows, Offset offset, float (&o)[D / 8][4],
                                       float (&run_max)[2], float (&run_sum)[2]) {
  using attention = typename P::attention;
  constexpr bool biased = attention::bias != bias_mode::none;
  constexpr int k_steps = D / 16, n_tiles = D / 8;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, c = lane % 4;
  const float scale = softmax_scale(D);
  constexpr float log2e = 1.4426950408889634f;  // e^x as 2^(x log2 e): one multiply and the hardware exp2
  // S = Q K^T for this warp's 16 key rows: two 16 x 8 tiles, the even and odd k steps in separate
  // accumulators (two chains of half the length), added at the end.
  float sc[2][4], half[2][2][4] = {};
#pragma unroll
  for (int kt = 0; kt < k_steps; ++kt) {
    const int mat = lane / 8, row = warp * 16 + (mat >> 1) * 8 + lane % 8, ch = 2 * kt + (mat & 1);
    std::uint32_t kb[4];
    ldmatrix_x4(ks + offset(row, ch), kb);
    mma_16816<E>(half[kt & 1][0], qa[kt], kb[0], kb[1]);
    mma_16816<E>(half[kt & 1][1], qa[kt], kb[2], kb[3]);
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) sc[nt][e] = half[0][nt][e] + half[1][nt][e];
  }

  // Logits and the running softmax of heads g (i = 0) and g + 8 (i = 1).
  float tile_max[2] = {negative_infinity, negative_infinity};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = nt * 8 + 2 * c + (e & 1);
      float l = negative_infinity;
      if (key < rows) l = attention::logit(sc[nt][e], biased ? scores[key] : 0.0f, scale);
      sc[nt][e] = l;
      tile_max[e >> 1] = max_keep_left(tile_max[e >> 1], l);
    }
  }
  float rescale[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    tile_max[i] = max_keep_left(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 1));
    tile_max[i] = max_keep_left(tile_max[i], __shfl_xor_sync(0xffffffffu, tile_max[i], 2));
    const float new_max = max_keep_left(run_max[i], tile_max[i]);
    rescale[i] = 1.0f;
    if (new_max != negative_infinity) {
      rescale[i] = run_max[i] == negative_infinity ? 0.0f : exp2f((run_max[i] - new_max) * log2e);
    }
    run_max[i] = new_max;
  }
  float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float m = run_max[e >> 1];
      const float p = m == negative_infinity ? 0.0f : exp2f((sc[nt][e] - m) * log2e);
      sc[nt][e] = p;
      tile_sum[e >> 1] += p;
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) run_sum[i] = run_sum[i] * rescale[i] + tile_sum[i];
  if (rescale[0] != 1.0f || rescale[1] != 1.0f) {
#pragma unroll
    for (int j = 0; j < n_tiles; ++j) {
      o[j][0] *= rescale[0];
      o[j][1] *= rescale[0];
      o[j][2] *= rescale[1];
      o[j][3] *= rescale[1];
    }
  }

  // O += P V, with P split into a high and a low 16-bit part.
  std::uint32_t pa[4], pr[4];
  pa[0] = pack_split<E>(sc[0][0], sc[0][1], pr[0]);
  pa[1] = pack_split<E>(sc[0][2], sc[0][3], pr[1]);
  pa[2] = pack_split<E>(sc[1][0], sc[1][1], pr[2]);
  pa[3] = pack_split<E>(sc[1][2], sc[1][3], pr[3]);
#pragma unroll
  for (int np = 0; np < n_tiles / 2; ++np) {
    const int mat = lane / 8, row = warp * 16 + (mat & 1) * 8 + lane % 8, ch = 2 * np + (mat >> 1);
    std::uint32_t vb[4];
    ldmatrix_x4_trans(vs + offset(row, ch), vb);
    mma_16816<E>(o[2 * np], pa, vb[0], vb[1]);
    mma_16816<E>(o[2 * np], pr, vb[0], vb[1]);
    mma_16816<E>(o[2 * np + 1], pa, vb[2], vb[3]);
    mma_16816<E>(o[2 * np + 1], pr, vb[2], vb[3]);
  }
}

/// Combines the partial softmax of a CTA's `warps` tensor-core warps in warp order (so the result does not
/// depend on timing) into the partial `out_acc` (the group's weighted V sums) and `out_stats` (max, sum per
/// head), through `smem` (at least `mma_combine_bytes<D>(warps)`). Called by every thread of the CTA after
/// the pipeline is done with `smem`; threads of warps at or past `warps` take part in the writes.
template <int D>
__device__ inline void mma_combine_warps(unsigned char* smem, int warps, int group, const float (&o)[D / 8][4],
                                         const float (&run_max)[2], float (&run_sum)[2], float* out_acc,
                                         float* out_stats) {
  constexpr int n_tiles = D / 8;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
  // Each quad's partial sums make the row sums.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 1);
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 2);
  }
  constexpr int stride = mma_combine_stride<D>();
  float* w_acc = reinterpret_cast<float*>(smem);  // [warps][16][stride]
  float* w_max = w_acc + warps * 16 * stride;      // [warps][16]
  float* w_sum = w_max + warps * 16;               // [warps][16]
  if (warp < warps) {
#pragma unroll
    for (int j = 0; j < n_tiles; ++j) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = g + half * 8, col = j * 8 + 2 * c;
        *reinterpret_cast<float2*>(w_acc + (warp * 16 + row) * stride + col) = make_float2(o[j][2 * half], o[j][2 * half + 1]);
      }
    }
    if (c == 0) {
      w_max[warp * 16 + g] = run_max[0];
      w_max[warp * 16 + g + 8] = run_max[1];
      w_sum[warp * 16 + g] = run_sum[0];
      w_sum[warp * 16 + g + 8] = run_sum[1];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    const int row = i / D;
    float m = negative_infinity;
    for (int w = 0; w < warps; ++w) m = max_keep_left(m, w_max[w * 16 + row]);
    float acc = 0.0f;
    for (int w = 0; w < warps; ++w) {
      const float wm = w_max[w * 16 + row];
      if (wm != negative_infinity) acc += w_acc[(w * 16 + row) * stride + i % D] * expf(wm - m);
    }
    out_acc[i] = acc;
  }
  if (static_cast<int>(threadIdx.x) < group) {
    const int row = threadIdx.x;
    float m = negative_infinity;
    for (int w = 0; w < warps; ++w) m = max_keep_left(m, w_max[w * 16 + row]);
    float sum = 0.0f;
    for (int w = 0; w < warps; ++w) {
      const float wm = w_max[w * 16 + row];
      if (wm != negative_infinity) sum += w_sum[w * 16 + row] * expf(wm - m);
    }
    out_stats[2 * row] = m;
    out_stats[2 * row + 1] = sum;
  }
}

/// Grid (batch rows x KV heads, splits), `mma_warps` warps, `mma_attention_smem_bytes<D>()` bytes of
/// dynamic shared memory. Same contract as `attention_kernel`: CTA (r, x) leaves the partial softmax (max,
/// sum, weighted V sums) of the group's heads over its contiguous share of the blocks of `part`, as split
/// `split_base + x` of `total_splits` (0: the grid's splits).
///
/// Fragment layout (lane = 4 g + c): the accumulator of a 16 x 8 tile holds rows g and g + 8 (query heads),
/// columns 2c and 2c + 1; so each thread keeps the running max and sum of heads g and g + 8, and the four
/// threads of a quad reduce them together.
template <class P, class E, int D>
__global__ void __launch_bounds__(mma_warps * 32)
    attention_mma_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<const E, 3> q,
                         attend_part part = attend_part::all, int split_base = 0, int total_splits = 0) {
  dependent_launch_wait();
  static_assert(uses_mma_attention<E, D>);
  if (*s.status != 0) return;
  using attention = typename P::attention;
  constexpr bool offloads = P::store::offloads;
  constexpr bool biased = attention::bias != bias_mode::none;
  constexpr int R = mma_tile_rows;
  constexpr int threads = mma_warps * 32;
  constexpr int pieces = D / 8;          // 16-byte pieces of a row
  constexpr int k_steps = D / 16;        // k steps of Q.K^T
  constexpr int n_tiles = D / 8;         // 8-column tiles of the output
  constexpr int stages = mma_stages<D>();
  constexpr std::size_t stage_bytes = mma_stage_bytes<D>();
  constexpr int ring = 128;              // entries of the place ring, filled 64 at a time
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ std::int32_t ring_block[ring];  // block of list entry i, at i % ring
  __shared__ std::int32_t ring_place[ring];  // its slot (offload store) or page (resident store)
  __shared__ attend_list_storage shared_list;

  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int split = blockIdx.y, splits = gridDim.y;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + 1;
  const int group = s.group;
  const int warp = threadIdx.x / 32;
  const selection_params& sel = s.sel;

  const attend_list list = build_attend_list<P>(s, seq, h, length, part, shared_list);
  const std::int32_t* chosen = list.chosen;
  const int n = list.n;
  const bool indexed = list.indexed;

  // This CTA's share of the list, as tiles of R rows (a block larger than R has several).
  const split_share share = share_of(n, split, splits, sel.block_size, R);
  const int tiles_per_block = share.tiles_per_block, cta_tiles = share.tiles;
  const int entries = share.last - share.first;
  // Entries [base, base + 64) of the share into the ring: block, then its place, resolved long before use.
  const auto fill_ring = [&](int base) {
    const int i = base + static_cast<int>(threadIdx.x);
    if (threadIdx.x < ring / 2 && i < entries) {
      const int m = indexed ? share.first + i : chosen[share.first + i];
      ring_block[i % ring] = m;
      if constexpr (offloads) {
        ring_place[i % ring] = s.block_slot_of(seq, h)[m];
      } else {
        ring_place[i % ring] = s.table(seq)[m];
      }
    }
  };
  fill_ring(0);
  fill_ring(ring / 2);
  __syncthreads();

  const float* c_state = s.scores_of(seq, h);
  // Rows of tile t that hold tokens of the sequence (the current block is partial), and where they are.
  struct tile_source {
    const E* keys;
    const E* values;
    int token;  // position of the tile's first row
    int rows;   // valid rows, 0..R
  };
  const auto locate = [&](int t) {
    const int i = t / tiles_per_block;
    const int m = ring_block[i % ring];
    const int place = ring_place[i % ring];
    const int r0 = (t % tiles_per_block) * R;
    const int first = m * sel.block_size;
    const int in_block = sel.block_size < length - first ? sel.block_size : length - first;
    tile_source src;
    if constexpr (offloads) {
      src.keys = s.slot_k(seq, h, place);
      src.values = s.slot_v(seq, h, place);
    } else {
      src.keys = s.page_k(place, h);
      src.values = s.page_v(place, h);
    }
    src.keys += std::size_t(r0) * D;
    src.values += std::size_t(r0) * D;
    src.token = first + r0;
    const int rows = in_block - r0;
    src.rows = rows < 0 ? 0 : (rows > R ? R : rows);
    return src;
  };
  // A stage: the K tile, the V tile (rows swizzled), then the R eviction scores of the tile's tokens.
  const auto stage_keys = [&](int t) { return smem + (t % stages) * stage_bytes; };
  const auto issue = [&](int t) {
    const tile_source src = locate(t);
    unsigned char* dst = stage_keys(t);
#pragma unroll
    for (int j = 0; j < R * pieces / threads; ++j) {
      const int idx = static_cast<int>(threadIdx.x) + j * threads;
      const int r = idx / pieces, ch = idx % pieces;
      const bool valid = r < src.rows;
      const std::uint32_t at = swizzled_offset<D * 2>(r, ch);
      cp_async_16(shared_address(dst + at), valid ? src.keys + r * D + ch * 8 : src.keys, valid);
      cp_async_16(shared_address(dst + R * D * 2 + at), valid ? src.values + r * D + ch * 8 : src.values, valid);
    }
    if (biased && threadIdx.x < R / 4) {
      // Four scores a copy; a partly valid piece reads scores past the sequence (within its capacity), which
      // the logits mask.
      const bool valid = static_cast<int>(threadIdx.x) * 4 < src.rows;
      cp_async_16(shared_address(dst + 2 * R * D * 2 + threadIdx.x * 16),
                  valid ? c_state + src.token + threadIdx.x * 4 : c_state, valid);
    }
  };

  float o[n_tiles][4];
#pragma unroll
  for (int j = 0; j < n_tiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float run_max[2] = {negative_infinity, negative_infinity};
  float run_sum[2] = {0.0f, 0.0f};

#pragma unroll
  for (int t = 0; t < stages - 1; ++t) {
    if (t < cta_tiles) issue(t);
    cp_async_commit();
  }
  // The group's queries as A fragments, loaded while the first tiles arrive.
  std::uint32_t qa[k_steps][4];
  load_query_fragments<E, D>(q, b, h, group, qa);

  for (int it = 0; it < cta_tiles; ++it) {
    cp_async_wait<stages - 2>();
    __syncthreads();  // tile `it` has landed for every thread; every warp is done with tile it - 1
    const int entry = it / tiles_per_block;
    if (it % tiles_per_block == 0 && entry % (ring / 2) == 0 && entry > 0) fill_ring(entry + ring / 2);
    if (it + stages - 1 < cta_tiles) issue(it + stages - 1);
    cp_async_commit();
    const int rows = locate(it).rows - warp * 16;  // this warp's valid rows of the tile
    if (rows <= 0) continue;
    const unsigned char* st = stage_keys(it);
    const std::uint32_t ks = shared_address(st), vs = shared_address(st + R * D * 2);
    const float* scores = reinterpret_cast<const float*>(st + 2 * R * D * 2) + warp * 16;

    mma_attend_rows<P, E, D>(qa, ks, vs, scores, rows,
                             [](int r, int ch) { return swizzled_offset<D * 2>(r, ch); }, o, run_max, run_sum);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline
  const int all_splits = total_splits > 0 ? total_splits : splits;
  mma_combine_warps<D>(smem, mma_warps, group, o, run_max, run_sum, s.acc_of(blockIdx.x, split_base + split, all_splits),
                       s.stats_of(blockIdx.x, split_base + split, all_splits));
}

}  // namespace nosa::detail
