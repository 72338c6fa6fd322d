#pragma once
/// \file
/// CUDA executor of the eviction-head primitive (see `nosa/scorer/eviction_head.hpp`).

#include <nosa/backend/cuda/backend.cuh>
#include <nosa/core/status.hpp>
#include <nosa/scorer/eviction_head.hpp>

#include <cuda_runtime.h>

#include <cstdint>

namespace nosa {

namespace detail {
/// One CTA per token, one warp per KV head at a time: the projection is a warp-wide fp32 dot product.
template <class T, class W>
__global__ void eviction_head_kernel(eviction_head_args<T, W> args) {
  const std::int64_t t = blockIdx.x;
  const int heads = static_cast<int>(args.values.extents[1]);
  const int dim = static_cast<int>(args.values.extents[2]);
  const int lane = threadIdx.x % 32;
  for (int h = threadIdx.x / 32; h < heads; h += blockDim.x / 32) {
    float dot = 0.0f;
    for (int i = lane; i < heads * dim; i += 32) {
      dot += to_float(args.w_delta(h, i)) * to_float(args.values(t, i / dim, i % dim));
    }
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) {
      const float beta = args.beta.empty() ? 0.0f : args.beta(h);
      args.scores(t, h) = eviction_score(dot, beta, args.scale(h));
    }
  }
}
}  // namespace detail

/// Enqueues the eviction head for every token and KV head of `args` on `stream`. The views must be
/// readable (and `scores` writable) by the device.
template <storage_element T, storage_element W>
[[nodiscard]] status compute_eviction_scores(cuda_backend, const eviction_head_args<T, W>& args,
                                             cudaStream_t stream = nullptr) noexcept {
  const std::int64_t n = args.values.extents[0];
  const std::int64_t heads = args.values.extents[1];
  const std::int64_t dim = args.values.extents[2];
  NOSA_TRY(validate(args));
  if (n == 0) return status::success;
  if (n > 0x7fffffff) return status::invalid_argument;
  const int warps = heads < 8 ? static_cast<int>(heads) : 8;
  detail::eviction_head_kernel<<<static_cast<unsigned>(n), 32 * warps, 0, stream>>>(args);
  return detail::from_cuda(cudaGetLastError());
}

}  // namespace nosa
