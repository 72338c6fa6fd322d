#pragma once
/// \file
/// The FP8 KV cache of spec §6b on the device (`fp8_e4m3_kv`): a complete block of one KV head, K or V, is
/// quantised by one CTA, bit for bit as the host backend's `quantize_block` does it (the same `amax`, the
/// same scalar functions of the format, fp32 arithmetic with IEEE division and no contraction); the gather
/// moves codes and scales from the pinned pool to the slot cache; the write-back of the block a step
/// completed quantises it from its tail buffer, once; admission quantises a prompt's complete blocks into
/// their pages.

#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/gather.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/math.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/tensor_view.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/store/kv_format.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace nosa::detail {

/// Quantises one complete block of one KV head, K or V (`rows x D` values, `value(r, d)` in the element
/// type), into `codes` and, when `mirror` is not null, into `mirror` too (`[rows][D]` codes each, 16-byte
/// aligned), and returns the block's scale to every thread. The block's largest magnitude is a maximum, so
/// its order of evaluation does not matter; every code is `fp8_e4m3_kv::encode` of the same fp32 product as
/// on the host. Called by the whole CTA (a multiple of 32 threads); `rows * D` is a multiple of 16.
template <int D, class Value>
__device__ float quantize_block(int rows, Value value, fp8_e4m3* codes, fp8_e4m3* mirror) {
  using format = fp8_e4m3_kv;
  __shared__ float warp_amax[32];
  const int n = rows * D;
  float amax = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    amax = max_keep_left(amax, fabsf(to_float(value(i / D, i % D))));
  amax = warp_max(amax);
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.0f;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) amax = max_keep_left(amax, warp_amax[w]);
  const float multiplier = format::multiplier(amax);
  // Sixteen codes a thread, stored as one 16-byte word (the pool may be mapped host memory).
  for (int i = threadIdx.x; i < n / 16; i += blockDim.x) {
    const int r = (i * 16) / D, d0 = (i * 16) % D;
    std::uint32_t word[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      const std::uint32_t code = format::encode(to_float(value(r, d0 + e)), multiplier).bits;
      word[e / 4] |= code << (8 * (e % 4));
    }
    const uint4 packed = make_uint4(word[0], word[1], word[2], word[3]);
    reinterpret_cast<uint4*>(codes)[i] = packed;
    if (mirror != nullptr) reinterpret_cast<uint4*>(mirror)[i] = packed;
  }
  __syncthreads();  // `warp_amax` is free for the next block
  return format::scale(amax);
}

/// Quantises the current block of (seq, h), complete after this step's token, from its tail buffer: into
/// its slot and its reserved page (offload store; the block stays resident), or into its page (resident
/// store). Called by the whole CTA.
template <bool Offloads, class E, int D>
__device__ void write_back_fp8_block(const cuda_state<E, D>& s, int seq, int h, int block) {
  const int page = s.table(seq)[block];
  const int slot = Offloads ? s.block_slot_of(seq, h)[block] : -1;
  const E* tk = s.tail_k(seq, h);
  const E* tv = s.tail_v(seq, h);
  const auto key = [&](int r, int d) { return tk[std::size_t(r) * D + d]; };
  const auto value = [&](int r, int d) { return tv[std::size_t(r) * D + d]; };
  const int rows = s.sel.block_size;
  const float ks =
      quantize_block<D>(rows, key, Offloads ? s.slot_k_codes(seq, h, slot) : s.page_k_codes(page, h),
                        Offloads ? s.page_k_codes(page, h) : nullptr);
  const float vs =
      quantize_block<D>(rows, value, Offloads ? s.slot_v_codes(seq, h, slot) : s.page_v_codes(page, h),
                        Offloads ? s.page_v_codes(page, h) : nullptr);
  if (threadIdx.x == 0) {
    *s.page_k_scale(page, h) = ks;
    *s.page_v_scale(page, h) = vs;
    if (Offloads) {
      *s.slot_k_scale(seq, h, slot) = ks;
      *s.slot_v_scale(seq, h, slot) = vs;
    }
  }
}

/// Grid (batch rows x KV heads, Y), `cuda_threads`: `gather_kernel` for FP8 blocks. CTA (r, y) copies the
/// codes and scales of misses y, y + Y, ... of row r from their pages (mapped host memory) to their slots
/// (offload store; the resident store has no misses); with `write_back`, CTA (r, k mod Y) then quantises the
/// block this step completed, if any (`write_back_fp8_block`).
template <bool Offloads, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    fp8_gather_kernel(cuda_state<E, D> s, sequence_source seqs, bool write_back) {
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int seq = seqs(b);  // read with the status: a batch row is always readable, its state may not be
  if (write_back && *s.status != 0) return;  // `write_back` is set by steps only; plan calls always run
  if constexpr (Offloads) {
    const int misses = s.step_misses[s.sh(seq, h)];
    for (int j = blockIdx.y; j < misses && j < s.top_k; j += gridDim.y) {
      const int blk = s.misses_of(seq, h)[j];
      const int slot = s.block_slot_of(seq, h)[blk];
      const int page = s.table(seq)[blk];
      copy_pair(s.page_k_codes(page, h), s.page_v_codes(page, h), s.slot_k_codes(seq, h, slot),
                s.slot_v_codes(seq, h, slot), s.block_elements());
      if (threadIdx.x == 0) {
        *s.slot_k_scale(seq, h, slot) = *s.page_k_scale(page, h);
        *s.slot_v_scale(seq, h, slot) = *s.page_v_scale(page, h);
      }
    }
  }
  if (write_back && static_cast<int>(blockIdx.y) == s.top_k % static_cast<int>(gridDim.y)) {
    const int t = s.lengths[seq];
    if ((t + 1) % s.sel.block_size != 0) return;
    write_back_fp8_block<Offloads>(s, seq, h, t / s.sel.block_size);
  }
}

/// Enqueues `fp8_gather_kernel` for `rows` (batch row, KV head) pairs: up to `k` misses each (offload store)
/// and, with `write_back` (steps), the quantisation of a block the step completed; about `target` CTAs in
/// all.
template <bool Offloads, class E, int D>
void launch_fp8_gather(const cuda_state<E, D>& s, sequence_source seqs, int rows, bool write_back,
                       cudaStream_t stream, int target = gather_target_ctas) {
  const int items = (Offloads ? s.top_k : 0) + (write_back ? 1 : 0);
  const int per_row = gather_ctas_per_row(rows, items > 0 ? items : 1, target);
  fp8_gather_kernel<Offloads><<<dim3(rows, per_row), cuda_threads, 0, stream>>>(s, seqs, write_back);
}

/// Grid (KV heads, chunks), `cuda_threads`: quantises the complete blocks of an admitted prompt into their
/// pages, from the prompt as given, except the `shared` first ones, whose pages already hold them. Runs after
/// `admit_kernel` (it reads the block table).
template <class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    quantize_prompt_kernel(cuda_state<E, D> s, int seq, int length, tensor_view<const E, 3> k,
                           tensor_view<const E, 3> v, int shared) {
  const int h = blockIdx.x;
  const int bs = s.sel.block_size;
  for (int m = shared + static_cast<int>(blockIdx.y); m < length / bs; m += gridDim.y) {
    const int page = s.table(seq)[m];
    const float ks = quantize_block<D>(
        bs, [&](int r, int d) { return k(m * bs + r, h, d); }, s.page_k_codes(page, h), nullptr);
    const float vs = quantize_block<D>(
        bs, [&](int r, int d) { return v(m * bs + r, h, d); }, s.page_v_codes(page, h), nullptr);
    if (threadIdx.x == 0) {
      *s.page_k_scale(page, h) = ks;
      *s.page_v_scale(page, h) = vs;
    }
  }
}

}  // namespace nosa::detail
