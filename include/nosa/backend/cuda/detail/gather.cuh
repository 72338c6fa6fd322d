#pragma once
/// \file
/// Step stages 6 and 8 of the offload store, gather and write-back: the misses' K and V from their pages in
/// mapped, pinned host memory to their slots, and a tail block the step completed back to its reserved page,
/// both by SM-driven 16-byte copies over the interconnect.

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
/// block when this step completed it. With Y = k + 1 every CTA has one item at most. With `prefill` (the final
/// selection of a prefill), only when the prefill's checks passed and the row's chunk is not empty.
template <class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    gather_kernel(cuda_state<E, D> s, sequence_source seqs, bool write_back, bool prefill) {
  dependent_launch_wait();
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);  // read with the status: a batch row is always readable, its state may not be
  if ((write_back || prefill) && *s.status != 0) return;  // set by steps and prefills; plan calls always run
  if (prefill && s.prefill_skips(seq, 0)) return;
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
/// of a completed tail block with `write_back` (steps); about `target` CTAs in all; `prefill`: see
/// `gather_kernel`.
template <class E, int D>
cudaError_t launch_gather(const cuda_state<E, D>& s, sequence_source seqs, int rows, bool write_back,
                          cudaStream_t stream, int target = gather_target_ctas, bool prefill = false) {
  const int per_row = gather_ctas_per_row(rows, s.top_k + (write_back ? 1 : 0), target);
  return launch_kernel(gather_kernel<E, D>, dim3(rows, per_row), dim3(cuda_threads), 0, stream, s.dependent_launch, 1,
                       s, seqs, write_back, prefill);
}

}  // namespace nosa::detail
