#pragma once
/// \file
/// The window logits on tensor cores for bf16 storage and D = 64 or 128, and `launch_scoring`, which picks
/// them or the CUDA-core kernel.
///
/// The logits of one (sequence, KV head) are a product with the group as M: Q (G query heads, padded to 16)
/// times Kc^T (every window). On CUDA cores that product costs 4 FMA per byte of compressed keys (16 heads x
/// one 4-byte element), over half the chip's fp32 rate at HBM speed, so the kernel was bound by issue, not
/// by bytes. Here each warp multiplies Q by 32 windows with `mma.sync.m16n8k16` and fp32 accumulation.
///
/// Precision: the queries are bf16 and enter exactly. Each fp32 compressed-key element x is split into three
/// bf16 parts, hi = bf16(x), mid = bf16(x - hi), lo = bf16(x - hi - mid), whose sum is x to 2^-27 relative
/// (finer than fp32's own 2^-24); every product of bf16 parts is exact, and the three products are summed
/// in fp32 by the tensor core, smallest first. The logit is the fp32 dot product up to the order of its
/// fp32 sums, as on CUDA cores (where the order is the FMA chain's).

#include <nosa/backend/cuda/detail/attention_mma.cuh>
#include <nosa/backend/cuda/detail/kernels.cuh>

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nosa::detail {

/// True when `window_logits_mma_kernel` handles this element type and head dimension.
template <class E, int D>
inline constexpr bool uses_mma_scoring = std::is_same_v<E, bf16> && (D == 64 || D == 128);

/// Windows of one warp of `window_logits_mma_kernel`: four 8-window tiles (eight warps make a chunk).
inline constexpr int mma_score_windows_per_warp = score_chunk / (cuda_threads / 32);
static_assert(mma_score_windows_per_warp == 32, "a warp scores four tiles of eight windows");

/// Splits (x, y) into three bf16 pairs whose sums are x and y to 2^-27 relative; x in the low halves.
__device__ inline void split3_bf16(float x, float y, std::uint32_t& hi, std::uint32_t& mid, std::uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hf = __bfloat1622float2(h);
  const float rx = x - hf.x, ry = y - hf.y;
  const __nv_bfloat162 m = __floats2bfloat162_rn(rx, ry);
  const float2 mf = __bfloat1622float2(m);
  const __nv_bfloat162 l = __floats2bfloat162_rn(rx - mf.x, ry - mf.y);
  std::memcpy(&hi, &h, 4);
  std::memcpy(&mid, &m, 4);
  std::memcpy(&lo, &l, 4);
}

/// Step stage 1b on tensor cores, grid (batch rows x KV heads, window chunks), 8 warps: same contract as
/// `window_logits_kernel` (every head's logit of every window, and each chunk's softmax partials).
///
/// Warp `w` of the CTA scores windows first + 32w .. first + 32w + 31 as four tiles of eight. Fragment
/// layout (lane = 4 r + c): the A operand holds query heads r and r + 8, dimensions k0 + 2c, k0 + 2c + 1
/// and k0 + 8 + 2c, k0 + 9 + 2c; the B operand holds window r of the tile at the same dimensions, which in
/// the `[D/4][MW][4]` layout are two 8-byte loads (a quad reads 32 contiguous bytes of each of its
/// windows); the accumulator holds heads r and r + 8 of windows 2c and 2c + 1.
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    window_logits_mma_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, tensor_view<const E, 3> q) {
  static_assert(uses_mma_scoring<E, D>);
  if (length_offset > 0 && *s.status != 0) return;
  using scorer = typename P::query_aware;
  constexpr int k_steps = D / 16;
  constexpr int tiles = mma_score_windows_per_warp / 8;
  constexpr int warps = cuda_threads / 32;
  __shared__ float red[warps][cuda_max_group];
  __shared__ float chunk_max[cuda_max_group];
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + length_offset;
  const int n_windows = window_count(length, s.sel);
  const int first = static_cast<int>(blockIdx.y) * score_chunk;
  if (first >= n_windows) return;
  const int group = s.group;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int r = lane / 4, c = lane % 4;

  // The group's queries as A fragments, heads past the group zero.
  std::uint32_t a[k_steps][4];
  {
    const bool low = r < group, high = r + 8 < group;
    const E zero{};
#pragma unroll
    for (int ks = 0; ks < k_steps; ++ks) {
      const int d0 = ks * 16 + 2 * c, d1 = d0 + 8;
      const int hl = h * group + r, hh = h * group + r + 8;
      a[ks][0] = pack_elements<E>(low ? q(b, hl, d0) : zero, low ? q(b, hl, d0 + 1) : zero);
      a[ks][1] = pack_elements<E>(high ? q(b, hh, d0) : zero, high ? q(b, hh, d0 + 1) : zero);
      a[ks][2] = pack_elements<E>(low ? q(b, hl, d1) : zero, low ? q(b, hl, d1 + 1) : zero);
      a[ks][3] = pack_elements<E>(high ? q(b, hh, d1) : zero, high ? q(b, hh, d1 + 1) : zero);
    }
  }

  // Four tiles of eight windows; the loads of a tile are all in flight before its products.
  const float* kc = s.kc_of(seq, h);
  const std::size_t mw = static_cast<std::size_t>(s.max_windows);
  const int warp_first = first + warp * mma_score_windows_per_warp;
  float acc[tiles][4];
#pragma unroll
  for (int t = 0; t < tiles; ++t) {
    acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;
    const int w = warp_first + 8 * t + r;  // the window of this lane's B operand
    const bool valid = w < n_windows;
    float2 k[k_steps][2];
#pragma unroll
    for (int ks = 0; ks < k_steps; ++ks) {
      // Dimensions ks*16 + 2c (+1) are in float4 ks*4 + c/2, half c%2; ks*16 + 8 + 2c two float4 further.
      const std::size_t piece = (std::size_t(ks * 4 + c / 2) * mw + std::size_t(w)) * 4 + 2 * (c % 2);
      k[ks][0] = valid ? *reinterpret_cast<const float2*>(kc + piece) : make_float2(0.0f, 0.0f);
      k[ks][1] = valid ? *reinterpret_cast<const float2*>(kc + piece + 2 * mw * 4) : make_float2(0.0f, 0.0f);
    }
#pragma unroll
    for (int ks = 0; ks < k_steps; ++ks) {
      std::uint32_t hi0, mid0, lo0, hi1, mid1, lo1;
      split3_bf16(k[ks][0].x, k[ks][0].y, hi0, mid0, lo0);
      split3_bf16(k[ks][1].x, k[ks][1].y, hi1, mid1, lo1);
      mma_16816<E>(acc[t], a[ks], lo0, lo1);
      mma_16816<E>(acc[t], a[ks], mid0, mid1);
      mma_16816<E>(acc[t], a[ks], hi0, hi1);
    }
  }

  // Logits (heads r and r + 8, windows 2c and 2c + 1 of each tile), each head's maximum over the chunk.
  const float scale = softmax_scale(D);
  float* logits = s.logits_of(seq, h);
  const int heads[2] = {r, r + 8};
  float m_local[2] = {negative_infinity, negative_infinity};
#pragma unroll
  for (int t = 0; t < tiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int head = heads[i / 2];
      const int w = warp_first + 8 * t + 2 * c + (i % 2);
      const bool active = w < n_windows && head < group;
      acc[t][i] = active ? scorer::window_logit(acc[t][i], scale) : negative_infinity;
      if (active) logits[std::size_t(head) * mw + w] = acc[t][i];
      m_local[i / 2] = max_keep_left(m_local[i / 2], acc[t][i]);
    }
  }
  // The four lanes of a quad hold the same heads.
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    m_local[j] = max_keep_left(m_local[j], __shfl_xor_sync(0xffffffffu, m_local[j], 1));
    m_local[j] = max_keep_left(m_local[j], __shfl_xor_sync(0xffffffffu, m_local[j], 2));
  }
  if (c == 0) {
    red[warp][r] = m_local[0];
    red[warp][r + 8] = m_local[1];
  }
  __syncthreads();
  if (threadIdx.x < cuda_max_group) {
    float m = negative_infinity;
    for (int x = 0; x < warps; ++x) m = max_keep_left(m, red[x][threadIdx.x]);
    chunk_max[threadIdx.x] = m;
  }
  __syncthreads();
  float sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int t = 0; t < tiles; ++t) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float l = acc[t][i];
      sum[i / 2] += l == negative_infinity ? 0.0f : expf(l - chunk_max[heads[i / 2]]);
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    sum[j] += __shfl_xor_sync(0xffffffffu, sum[j], 1);
    sum[j] += __shfl_xor_sync(0xffffffffu, sum[j], 2);
  }
  if (c == 0) {
    red[warp][r] = sum[0];
    red[warp][r + 8] = sum[1];
  }
  __syncthreads();
  if (threadIdx.x < group) {
    float total = 0.0f;
    for (int x = 0; x < warps; ++x) total += red[x][threadIdx.x];
    float* part = s.score_partials_of(seq, h) + (std::size_t(blockIdx.y) * group + threadIdx.x) * 2;
    part[0] = chunk_max[threadIdx.x];
    part[1] = total;
  }
}

/// Enqueues the scoring of `rows` (batch row, KV head) pairs: the window logits and chunk partials when there
/// is a query (on tensor cores where `uses_mma_scoring`), then the pooling into block scores.
template <class P, class E, int D>
void launch_scoring(const cuda_state<E, D>& s, sequence_source seqs, int rows, int length_offset,
                    tensor_view<const E, 3> q, bool have_query, cudaStream_t stream) {
  if (have_query) {
    const dim3 grid(rows, s.score_chunks > 1 ? s.score_chunks : 1);
    if constexpr (uses_mma_scoring<E, D>) {
      window_logits_mma_kernel<P><<<grid, cuda_threads, 0, stream>>>(s, seqs, length_offset, q);
    } else {
      window_logits_kernel<P><<<grid, cuda_threads, 0, stream>>>(s, seqs, length_offset, q);
    }
  }
  const int block_groups = (s.max_blocks + pool_threads - 1) / pool_threads;
  pool_scores_kernel<P><<<dim3(rows, block_groups), pool_threads, 0, stream>>>(s, seqs, length_offset, have_query);
}

}  // namespace nosa::detail
