#pragma once
/// \file
/// The small kernels of the CUDA engine; the GEMMs are cuBLAS and the attention is nosa. Activations of the
/// residual stream are fp32, everything that feeds a GEMM or the KV cache is bf16. Every kernel reads its
/// varying inputs (tokens, positions, the drift step) from device memory, so a captured decode step stays
/// valid while the sequences grow.

#include "../model.hpp"
#include "../run_config.hpp"

#include <nosa/backend/cuda/detail/gather.cuh>
#include <nosa/core/numeric.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace nosa_engine::kernels {

inline constexpr int threads = 256;

/// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ inline float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += partial[w];
  return total;
}

/// Maximum of `v` over the block; every thread gets the result.
__device__ inline float block_max(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < int(blockDim.x / 32); ++w) m = fmaxf(m, partial[w]);
  return m;
}

/// Fills `n` elements of a tensor with `initial_value` (the host's `random_weights`, element for element).
template <class T>
__global__ void init_tensor(T* out, std::uint64_t n, init_kind kind, float bound, std::uint64_t seed,
                            std::uint64_t id) {
  for (std::uint64_t i = blockIdx.x * std::uint64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::uint64_t(gridDim.x) * blockDim.x) {
    const float v = initial_value(kind, bound, seed, id, i);
    if constexpr (sizeof(T) == 2) {
      out[i] = nosa::bf16(v);
    } else {
      out[i] = v;
    }
  }
}

/// x[r][:] = embed[tokens[r]][:]. Grid: rows.
__global__ void embed(const nosa::bf16* table, const std::int32_t* tokens, int hidden, float* x) {
  const std::int64_t r = blockIdx.x;
  const nosa::bf16* row = table + std::int64_t(tokens[r]) * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) x[r * hidden + i] = nosa::to_float(row[i]);
}

/// y[r] = bf16(x[r] / rms(x[r]) * g). Grid: rows.
__global__ void rmsnorm(const float* x, const nosa::bf16* g, int width, float eps, nosa::bf16* y) {
  const std::int64_t r = blockIdx.x;
  const float* xr = x + r * width;
  float sum = 0.0f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) sum += xr[i] * xr[i];
  const float inv = rsqrtf(block_sum(sum) / float(width) + eps);
  for (int i = threadIdx.x; i < width; i += blockDim.x)
    y[r * width + i] = nosa::bf16(xr[i] * inv * nosa::to_float(g[i]));
}

/// Splits the fused projection row [q | k | v] (fp32) into bf16 q [H_q][D], k and v [H_kv][D], with RoPE
/// (rotate-half pairs i, i + D/2) on q and k at the row's position: `positions[r]` when given, else
/// `first_position + r`. q, k, v rows may be strided (`q_stride`, `kv_stride` elements between rows).
/// Grid: rows.
__global__ void rope_split(const float* qkv, const std::int32_t* positions, int first_position, int q_heads,
                           int kv_heads, int head_dim, float theta, nosa::bf16* q, nosa::bf16* k,
                           nosa::bf16* v) {
  const std::int64_t r = blockIdx.x;
  const int qw = q_heads * head_dim, kvw = kv_heads * head_dim, half = head_dim / 2;
  const float* row = qkv + r * (qw + 2 * kvw);
  const float pos = float(positions != nullptr ? positions[r] : first_position + int(r));
  for (int j = threadIdx.x; j < (q_heads + kv_heads) * half; j += blockDim.x) {
    const int head = j / half, i = j % half;
    const float inv_freq = powf(theta, -2.0f * float(i) / float(head_dim));
    float sn, cs;
    sincosf(pos * inv_freq, &sn, &cs);
    const bool is_q = head < q_heads;
    const float* src = is_q ? row + head * head_dim : row + qw + (head - q_heads) * head_dim;
    nosa::bf16* dst = is_q ? q + r * qw + head * head_dim : k + r * kvw + (head - q_heads) * head_dim;
    const float a = src[i], b = src[i + half];
    dst[i] = nosa::bf16(a * cs - b * sn);
    dst[i + half] = nosa::bf16(b * cs + a * sn);
  }
  for (int i = threadIdx.x; i < kvw; i += blockDim.x) v[r * kvw + i] = nosa::bf16(row[qw + kvw + i]);
}

/// a[r][i] = bf16(silu(gu[r][i]) * gu[r][mlp + i]). Grid: rows.
__global__ void silu_mul(const float* gu, int mlp, nosa::bf16* a) {
  const std::int64_t r = blockIdx.x;
  for (int i = threadIdx.x; i < mlp; i += blockDim.x) {
    const float g = gu[r * 2 * mlp + i], u = gu[r * 2 * mlp + mlp + i];
    a[r * mlp + i] = nosa::bf16(g / (1.0f + __expf(-g)) * u);
  }
}

/// tokens[r] = the first index of the largest logit of row r. Grid: rows; block: 1024.
__global__ void argmax(const float* logits, int vocab, std::int32_t* tokens) {
  const std::int64_t r = blockIdx.x;
  float best = -INFINITY;
  int index = vocab;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = logits[r * vocab + i];
    if (v > best) {
      best = v;
      index = i;
    }
  }
  __shared__ float values[1024];
  __shared__ int indices[1024];
  values[threadIdx.x] = best;
  indices[threadIdx.x] = index;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float ov = values[threadIdx.x + s];
      const int oi = indices[threadIdx.x + s];
      if (ov > values[threadIdx.x] || (ov == values[threadIdx.x] && oi < indices[threadIdx.x])) {
        values[threadIdx.x] = ov;
        indices[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) tokens[r] = indices[0] < vocab ? indices[0] : 0;
}

/// End of a decode step: positions advance; with drift, each row's input embedding takes one step of its
/// random walk (noise of step `*step`). Grid: rows.
__global__ void advance(std::int32_t* positions, float* drift_state, const int* step, float drift,
                        std::uint64_t seed, int hidden, int batch) {
  const int r = blockIdx.x;
  if (threadIdx.x == 0) positions[r] += 1;
  if (drift_state == nullptr) return;
  const float keep = sqrtf(1.0f - drift * drift);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float& e = drift_state[std::int64_t(r) * hidden + i];
    e = keep * e + drift * drift_noise(seed, *step, r, batch, i);
  }
}

/// The step counter of the drift noise, after `advance` has used it.
__global__ void count_step(int* step) { *step += 1; }

/// Probabilities of one prefill attention tile: row r of head g holds the logits (q . k_j) of query position
/// `first + r` against keys j < `keys`; writes softmax_j(logit * scale + bias c[j][h]) over the causal keys
/// j <= first + r as bf16, and zeros beyond. Grid: (rows, G).
__global__ void prefill_softmax(const float* scores, std::int64_t ld, int rows, int first, int keys,
                                float scale, const float* c, int kv_heads, int h, nosa::bf16* probs) {
  const int r = blockIdx.x, g = blockIdx.y;
  const float* s = scores + (std::int64_t(g) * rows + r) * ld;
  nosa::bf16* p = probs + (std::int64_t(g) * rows + r) * ld;
  const int valid = first + r + 1;
  const auto logit = [&](int j) {
    return s[j] * scale + (c != nullptr ? c[std::int64_t(j) * kv_heads + h] : 0.0f);
  };
  float m = -INFINITY;
  for (int j = threadIdx.x; j < valid; j += blockDim.x) m = fmaxf(m, logit(j));
  m = block_max(m);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < valid; j += blockDim.x) sum += __expf(logit(j) - m);
  const float inv = 1.0f / block_sum(sum);
  for (int j = threadIdx.x; j < keys; j += blockDim.x)
    p[j] = nosa::bf16(j < valid ? __expf(logit(j) - m) * inv : 0.0f);
}

/// Element-wise conversion of `n` bf16 values to fp32 (trace copies).
__global__ void widen(const nosa::bf16* in, std::int64_t n, float* out) {
  for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    out[i] = nosa::to_float(in[i]);
  }
}

/// The start-up measurement of the link as nosa's gather uses it: CTA i copies the K and V blocks of pairs
/// i, i + gridDim.x, ... from mapped pinned host memory (`pool`, blocks of `block_bytes`, the pair's two
/// block indices in `blocks` [2 * pairs]) into device memory, with the library's own copy loop.
__global__ void gather_pairs(const std::byte* pool, const std::int32_t* blocks, int pairs,
                             std::size_t block_bytes, std::byte* out) {
  for (int j = blockIdx.x; j < pairs; j += gridDim.x) {
    const std::size_t k = std::size_t(blocks[2 * j]) * block_bytes,
                      v = std::size_t(blocks[2 * j + 1]) * block_bytes;
    nosa::detail::copy_pair(pool + k, pool + v, out + 2 * std::size_t(j) * block_bytes,
                            out + (2 * std::size_t(j) + 1) * block_bytes, block_bytes);
  }
}

/// The start-up measurement of HBM read speed: reads `n` 16-byte words, several loads in flight per thread,
/// and leaves one word per CTA in `out` so that the reads cannot be dropped.
__global__ void read_words(const uint4* in, std::size_t n, unsigned* out) {
  constexpr int unroll = 4;
  unsigned acc = 0;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += unroll * stride) {
    uint4 w[unroll];
#pragma unroll
    for (int u = 0; u < unroll; ++u) w[u] = i + u * stride < n ? in[i + u * stride] : uint4{};
#pragma unroll
    for (int u = 0; u < unroll; ++u) acc ^= w[u].x ^ w[u].y ^ w[u].z ^ w[u].w;
  }
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

}  // namespace nosa_engine::kernels
