#pragma once
/// \file
/// Step stage 1, append and compression: the new token's K, V and eviction score go to the tail (its slot, or
/// its page with the resident store; its tail buffer with a quantized KV format), the key ring and the score
/// history, and the compression window the token completes, if any, gets its compressed key (rounded once to
/// the element type) and compressed score.

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
/// its eviction scores, each summed in fp32 in token order; the key's mean is rounded once to the element
/// type (spec §3, "Storage"). Called by the whole CTA.
template <class E, int D, class KeyRow>
__device__ void compress_window(const cuda_state<E, D>& s, int seq, int h, int w, KeyRow key_row) {
  const selection_params& sel = s.sel;
  E* kc = s.kc_of(seq, h) + std::size_t(w) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.0f;
    for (int i = 0; i < sel.window; ++i) sum += to_float(key_row(w * sel.stride + i)[d]);
    kc[d] = from_float<E>(sum / static_cast<float>(sel.window));
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
  dependent_launch_wait();
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
  if constexpr (P::store::kv_format::quantized) {
    // The current block stays in the element type until it completes (spec §6b).
    kdst = s.tail_k(seq, h) + row;
    vdst = s.tail_v(seq, h) + row;
  } else if constexpr (offloads) {
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

}  // namespace nosa::detail
