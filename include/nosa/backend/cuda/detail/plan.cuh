#pragma once
/// \file
/// The kernels of the plan calls: admission (block table row, length, slot maps), ingest of a prompt into the
/// store and the compressed state, and retirement. The scoring, selection and gather of an admission are the
/// step's own kernels, run with a fixed sequence id.

#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/backend/cuda/detail/append.cuh>

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace nosa::detail {

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
/// partial tail in slot 0). `Quantized` (FP8): the complete blocks are left to `quantize_prompt_kernel` and a
/// partial tail goes to the tail buffer.
template <bool Offloads, bool Scored, bool Quantized, class E, int D>
__global__ void ingest_kernel(cuda_state<E, D> s, int seq, int length, tensor_view<const E, 3> k,
                              tensor_view<const E, 3> v, tensor_view<const float, 2> c, int shared) {
  const int h = blockIdx.x;
  const selection_params& sel = s.sel;
  const int full_blocks = Offloads || Quantized ? length / sel.block_size : block_count(length, sel);
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
      if constexpr (!Quantized) {
        s.page_k(table[m], h)[row] = kd;
        s.page_v(table[m], h)[row] = v(t, h, d);
      }
    } else if constexpr (Quantized) {
      s.tail_k(seq, h)[row] = kd;
      s.tail_v(seq, h)[row] = v(t, h, d);
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
