#pragma once
/// \file
/// The kernels of a prefill (`decode_layer::prefill`, spec §6 "Prefill"), in launch order:
///
///  1. `begin_prefill_kernel`: the chunk offsets and the state checks of every chunk, in the host backend's
///     order; the status; each sequence's chunk `(first position, tokens)` into `prefill_chunk`.
///  2. `prefill_append_kernel`: the chunk's eviction scores into the score history, the compressed keys and
///     scores of the windows the chunk completes (rounded once, as append does), then the key ring.
///  3. Sparse prefill only, per chunk row i (rows at the same offset of every chunk at once): the query of
///     row i staged, the step's scoring and selection kernels at `length_offset` i + 1 without the budget,
///     and the selection recorded in `row_selection` (`record_row_selection_kernel`).
///  4. Attention: `dense_prefill_kernel` (FlashAttention-2 tiling on tensor cores: 64 rows of (token, query
///     head) of one sequence and KV head per CTA, K and V tiles of 64 positions streamed by `cp.async`,
///     online softmax in fp32, P split into high and low 16-bit parts as in decode), or
///     `sparse_prefill_kernel` (one chunk row per CTA, the group as the M of the tensor-core product, the
///     row's selected blocks streamed as decode streams its selection, `mma_attend_rows`).
///  5. `prefill_store_kernel`: the chunk's K and V to the pages of the blocks complete after the chunk and,
///     offload store, the partial tail to slot 0 (where admission puts it).
///  6. `prefill_restart_kernel`: the length, and the slot cache started over as admission leaves it.
///  7. The final selection from each chunk's last query: the step's scoring, selection, set-difference and
///     gather kernels in their prefill mode (`count_mode::prefill`), then `prefill_clear_misses_kernel`.
///
/// Attention reads each key where it is while the call runs: the chunk's own rows from the packed `k` and
/// `v` views (the same bits that go to the store), earlier rows from their pages, or, offload store, from the
/// slot of the partial block the chunk continues. Every kernel returns at once when the checks failed, so a
/// bad call changes nothing; every grid is sized by the batch and the call's row count `N`.

#include <nosa/attention/sparse_attention.hpp>
#include <nosa/backend/cuda/detail/append.cuh>
#include <nosa/backend/cuda/detail/attention.cuh>
#include <nosa/backend/cuda/detail/begin.cuh>
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

/// Checks the chunk offsets (non-decreasing, from >= 0 to <= `rows`: `invalid_argument`), then every chunk
/// against the state as the host backend does (unknown, duplicate, full, unreserved; the first row in batch
/// order decides), publishes the status and, on success, records each sequence's chunk and clears the
/// per-row selection counts. One CTA.
template <class E, int D>
__global__ void begin_prefill_kernel(cuda_state<E, D> s, sequence_source seqs,
                                     tensor_view<const std::int32_t, 1> row_offsets, int batch, int rows) {
  __shared__ int offsets_bad;
  if (threadIdx.x == 0) offsets_bad = 0;
  __syncthreads();
  for (int b = threadIdx.x; b <= batch; b += blockDim.x) {
    const int at = row_offsets(b);
    if (at < (b == 0 ? 0 : row_offsets(b - 1)) || at > rows) atomicExch(&offsets_bad, 1);
  }
  __syncthreads();
  const bool offsets_ok = offsets_bad == 0;
  const auto tokens = [&](int b) { return row_offsets(b + 1) - row_offsets(b); };
  const int checked = offsets_ok ? check_batch_rows(s, seqs, batch, tokens) : 0;
  const int code = !offsets_ok ? static_cast<int>(status::invalid_argument) : checked;
  if (threadIdx.x == 0) *s.status = code;
  if (code != 0) return;
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    s.prefill_chunk[2 * seq] = s.lengths[seq];
    s.prefill_chunk[2 * seq + 1] = tokens(b);
  }
  if (s.row_selection_count != nullptr) {
    for (int i = threadIdx.x; i < s.prefill_rows * s.kv_heads; i += blockDim.x) s.row_selection_count[i] = 0;
  }
}

/// One chunk of one (sequence, KV head) as the kernels after the checks see it.
struct prefill_chunk_info {
  int seq, start, tokens, row0;  // sequence, position of the first token, tokens, first packed row
};
/// The chunk of batch row `b`, or `tokens == 0` when the checks failed or the chunk is empty (then `seq` may
/// be anything and nothing else may be read).
template <class E, int D>
__device__ inline prefill_chunk_info chunk_of(const cuda_state<E, D>& s, sequence_source seqs,
                                              tensor_view<const std::int32_t, 1> row_offsets, int b) {
  prefill_chunk_info c{0, 0, 0, 0};
  if (*s.status != 0) return c;
  c.seq = seqs(b);
  c.start = s.prefill_chunk[2 * c.seq];
  c.tokens = s.prefill_chunk[2 * c.seq + 1];
  c.row0 = row_offsets(b);
  return c;
}

/// Grid (batch rows x KV heads), `cuda_threads`: the chunk's eviction scores into the score history; offload
/// store, the rows a partial block already held, copied from its slot to its page when the chunk completes
/// it; the compressed keys and scores of the windows the chunk completes (their earlier tokens' keys from
/// the key ring); then the ring's last `l_c` keys.
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    prefill_append_kernel(cuda_state<E, D> s, sequence_source seqs,
                          tensor_view<const std::int32_t, 1> row_offsets, tensor_view<const E, 3> k,
                          tensor_view<const float, 2> c) {
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, b);
  if (ch.tokens == 0) return;
  const selection_params& sel = s.sel;
  const int end = ch.start + ch.tokens;
  float* history = s.scores_of(ch.seq, h);
  for (int i = threadIdx.x; i < ch.tokens; i += blockDim.x)
    history[ch.start + i] = c.empty() ? 0.0f : c(ch.row0 + i, h);
  if constexpr (P::store::offloads) {
    const int old = ch.start / sel.block_size, held = ch.start % sel.block_size;
    if (held != 0 && end >= (old + 1) * sel.block_size) {
      const int slot = s.block_slot_of(ch.seq, h)[old];
      const int page = s.table(ch.seq)[old];
      for (int i = threadIdx.x; i < held * D; i += blockDim.x) {
        s.page_k(page, h)[i] = s.slot_k(ch.seq, h, slot)[i];
        s.page_v(page, h)[i] = s.slot_v(ch.seq, h, slot)[i];
      }
    }
  }
  if constexpr (!P::dense) {
    __syncthreads();  // the scores of the windows' tokens are in the history
    E* ring = s.ring_of(ch.seq, h);
    const auto key_row = [&](int token) -> const E* {
      return token >= ch.start ? &k(ch.row0 + token - ch.start, h, 0)
                               : ring + std::size_t(token % sel.window) * D;
    };
    // Window w completes at token w * s_c + l_c - 1: the first that completes at or after the chunk's start.
    const int reach = ch.start - sel.window + 1;
    const int first = reach <= 0 ? 0 : (reach + sel.stride - 1) / sel.stride;
    for (int w = first; w < window_count(end, sel); ++w) compress_window(s, ch.seq, h, w, key_row);
    __syncthreads();  // done reading the ring
    const int from = end - sel.window > ch.start ? end - sel.window : ch.start;
    for (int i = threadIdx.x; i < (end - from) * D; i += blockDim.x) {
      const int t = from + i / D, d = i % D;
      ring[std::size_t(t % sel.window) * D + d] = k(ch.row0 + t - ch.start, h, d);
    }
  }
}

/// Where attention finds the key and value rows of one (sequence, KV head) during a prefill: the chunk's own
/// rows in the packed views; earlier rows in their pages, except, offload store, the rows of the partial
/// block the chunk continues, which are in that block's slot.
template <bool Offloads, class E, int D>
struct prefill_rows_source {
  const cuda_state<E, D>* s;
  tensor_view<const E, 3> k, v;
  int seq, h, start, row0;
  int tail_slot;  // offload store: the slot of block start / b_s when the chunk continues it, else -1

  __device__ std::size_t stored(int j, const E*& base, bool keys) const {
    const int m = j / s->sel.block_size;
    if (Offloads && tail_slot >= 0 && m == start / s->sel.block_size) {
      base = keys ? s->slot_k(seq, h, tail_slot) : s->slot_v(seq, h, tail_slot);
    } else {
      const int page = s->table(seq)[m];
      base = keys ? s->page_k(page, h) : s->page_v(page, h);
    }
    return std::size_t(j % s->sel.block_size) * D;
  }
  /// The key row of position j.
  __device__ const E* key(int j) const {
    if (j >= start) return &k(row0 + j - start, h, 0);
    const E* base;
    const std::size_t at = stored(j, base, true);
    return base + at;
  }
  /// The value row of position j.
  __device__ const E* value(int j) const {
    if (j >= start) return &v(row0 + j - start, h, 0);
    const E* base;
    const std::size_t at = stored(j, base, false);
    return base + at;
  }
};

template <bool Offloads, class E, int D>
__device__ inline prefill_rows_source<Offloads, E, D>
rows_source(const cuda_state<E, D>& s, const prefill_chunk_info& ch, int h, tensor_view<const E, 3> k,
            tensor_view<const E, 3> v) {
  int tail_slot = -1;
  if (Offloads && ch.start % s.sel.block_size != 0)
    tail_slot = s.block_slot_of(ch.seq, h)[ch.start / s.sel.block_size];
  return {&s, k, v, ch.seq, h, ch.start, ch.row0, tail_slot};
}

/// Key rows (positions) of one tile of the prefill attention kernels.
inline constexpr int prefill_tile_rows = 64;
/// Warps of the prefill attention kernels; warp w computes rows 16w .. 16w + 15 (queries for the dense
/// kernel, keys for the sparse one).
inline constexpr int prefill_warps = 4;

/// Bytes of one pipeline stage of the prefill attention kernels: a K tile, a V tile, the tile's scores.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t prefill_stage_bytes() {
  return std::size_t(2) * prefill_tile_rows * D * 2 + prefill_tile_rows * sizeof(float);
}
/// Dynamic shared memory of `dense_prefill_kernel`: the query tile and two stages.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t dense_prefill_smem_bytes() {
  return std::size_t(prefill_tile_rows) * D * 2 + 2 * prefill_stage_bytes<D>();
}
/// Dynamic shared memory of `sparse_prefill_kernel`: two stages (reused to combine the warps), then the
/// combined partial (the group's weighted V sums and their (max, sum)).
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t sparse_prefill_smem_bytes() {
  const std::size_t pipeline = 2 * prefill_stage_bytes<D>();
  const std::size_t combine = mma_combine_bytes<D>(prefill_warps);
  return (pipeline > combine ? pipeline : combine) + (std::size_t(cuda_max_group) * (D + 2)) * sizeof(float);
}

/// Issues the copies of key tile `tile` (positions `tile * 64 ..`, those past `last` zero) into a stage at
/// `dst`: K and V rows swizzled, then the eviction scores when `Biased`. Whole CTA.
template <bool Biased, class Source, int D>
__device__ inline void issue_position_tile(const Source& src, const float* history, int first, int rows,
                                           unsigned char* dst) {
  constexpr int R = prefill_tile_rows, pieces = D / 8, threads = prefill_warps * 32;
#pragma unroll
  for (int j = 0; j < R * pieces / threads; ++j) {
    const int idx = static_cast<int>(threadIdx.x) + j * threads;
    const int r = idx / pieces, ch = idx % pieces;
    const bool valid = r < rows;
    const std::uint32_t at = swizzled_offset<D * 2>(r, ch);
    const auto* key = valid ? src.key(first + r) + ch * 8 : nullptr;
    const auto* value = valid ? src.value(first + r) + ch * 8 : nullptr;
    cp_async_16(shared_address(dst + at), valid ? static_cast<const void*>(key) : history, valid);
    cp_async_16(shared_address(dst + R * D * 2 + at), valid ? static_cast<const void*>(value) : history,
                valid);
  }
  if (Biased && threadIdx.x < R / 4) {
    // Four scores a copy; a partly valid piece reads scores past the rows (within the capacity), which the
    // logits mask.
    const bool valid = static_cast<int>(threadIdx.x) * 4 < rows;
    cp_async_16(shared_address(dst + 2 * R * D * 2 + threadIdx.x * 16),
                valid ? history + first + threadIdx.x * 4 : history, valid);
  }
}

/// Grid (tiles of a chunk's tokens, batch rows x KV heads), `prefill_warps` warps,
/// `dense_prefill_smem_bytes<D>()` bytes. CTA (x, (b, h)) takes tokens `[x T, (x + 1) T)` of chunk b (T = 64
/// / G, the last CTAs first, since they attend the most) with all G query heads of KV head h: the 64 rows of
/// its query tile are (token i / G, head i % G). It streams every position up to its last token in tiles of
/// 64 (K, V and the eviction scores), computes S = Q K^T on tensor cores, masks positions after each row's
/// own token, keeps each row's running softmax in fp32 and accumulates O += P V with P split into a high and
/// a low 16-bit part.
///
/// Fragment layout (lane = 4 r + c): a thread holds query rows r and r + 8 of its warp's 16; the S
/// accumulator of 8-key tile nt holds keys 8 nt + 2c and the one after.
template <class P, class E, int D, class Out>
__global__ void __launch_bounds__(prefill_warps * 32)
    dense_prefill_kernel(cuda_state<E, D> s, sequence_source seqs,
                         tensor_view<const std::int32_t, 1> row_offsets, tensor_view<const E, 3> q,
                         tensor_view<const E, 3> k, tensor_view<const E, 3> v, tensor_view<Out, 3> o) {
  using attention = typename P::attention;
  constexpr bool offloads = P::store::offloads;
  constexpr bool biased = attention::bias != bias_mode::none;
  constexpr int R = prefill_tile_rows, k_steps = D / 16, n_tiles = D / 8, pieces = D / 8;
  constexpr int threads = prefill_warps * 32;
  constexpr std::size_t stage_bytes = prefill_stage_bytes<D>();
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* q_tile = smem;
  unsigned char* stages = smem + R * D * 2;

  const int b = blockIdx.y / s.kv_heads, h = blockIdx.y % s.kv_heads;
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, b);
  const int group = s.group, per_cta = R / group;
  const int x = static_cast<int>(gridDim.x - 1 - blockIdx.x);
  const int first_token = x * per_cta;
  if (first_token >= ch.tokens) return;
  const int cta_tokens = min(per_cta, ch.tokens - first_token);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, r = lane / 4, c = lane % 4;

  // The query tile: row i is (token first_token + i / G, head h G + i % G), rows past the tokens zero.
  for (int i = threadIdx.x; i < R * pieces; i += threads) {
    const int row = i / pieces, piece = i % pieces;
    const int token = row / group, g = row % group;
    std::uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (token < cta_tokens) {
      const int packed = ch.row0 + first_token + token;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        w[e] = pack_elements(q(packed, h * group + g, piece * 8 + 2 * e),
                             q(packed, h * group + g, piece * 8 + 2 * e + 1));
      }
    }
    *reinterpret_cast<uint4*>(q_tile + swizzled_offset<D * 2>(row, piece)) =
        make_uint4(w[0], w[1], w[2], w[3]);
  }

  const prefill_rows_source<offloads, E, D> src = rows_source<offloads>(s, ch, h, k, v);
  const float* history = s.scores_of(ch.seq, h);
  const int last = ch.start + first_token + cta_tokens - 1;  // the CTA's last position
  const int tiles = last / R + 1;
  const auto issue = [&](int t) {
    const int first = t * R;
    const int rows = last + 1 - first < R ? last + 1 - first : R;
    issue_position_tile<biased, prefill_rows_source<offloads, E, D>, D>(src, history, first, rows,
                                                                        stages + (t % 2) * stage_bytes);
  };
  issue(0);
  cp_async_commit();
  __syncthreads();  // the query tile is written

  std::uint32_t qa[k_steps][4];
  {
    const std::uint32_t base = shared_address(q_tile);
#pragma unroll
    for (int kt = 0; kt < k_steps; ++kt) {
      ldmatrix_x4(base + swizzled_offset<D * 2>(warp * 16 + lane % 16, 2 * kt + lane / 16), qa[kt]);
    }
  }
  // Positions of this thread's two rows (-1: a padding row, which every key masks).
  int position[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int token = (warp * 16 + r + 8 * i) / group;
    position[i] =
        (warp * 16 + r + 8 * i) < per_cta * group && token < cta_tokens ? ch.start + first_token + token : -1;
  }
  const bool warp_active = (warp * 16) / group < cta_tokens && warp * 16 < per_cta * group;

  float acc[n_tiles][4];
#pragma unroll
  for (int j = 0; j < n_tiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float run_max[2] = {negative_infinity, negative_infinity};
  float run_sum[2] = {0.0f, 0.0f};
  const float scale = softmax_scale(D);

  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) issue(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // tile t has landed for every thread
    const unsigned char* st = stages + (t % 2) * stage_bytes;
    if (warp_active) {
      const std::uint32_t ks = shared_address(st), vs = shared_address(st + R * D * 2);
      const float* scores = reinterpret_cast<const float*>(st + 2 * R * D * 2);
      float sc[R / 8][4];
#pragma unroll
      for (int nt = 0; nt < R / 8; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
      for (int kt = 0; kt < k_steps; ++kt) {
#pragma unroll
        for (int np = 0; np < R / 16; ++np) {
          const int mat = lane / 8, row = np * 16 + (mat >> 1) * 8 + lane % 8, piece = 2 * kt + (mat & 1);
          std::uint32_t kb[4];
          ldmatrix_x4(ks + swizzled_offset<D * 2>(row, piece), kb);
          mma_16816<E>(sc[2 * np], qa[kt], kb[0], kb[1]);
          mma_16816<E>(sc[2 * np + 1], qa[kt], kb[2], kb[3]);
        }
      }
      float tile_max[2] = {negative_infinity, negative_infinity};
#pragma unroll
      for (int nt = 0; nt < R / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = nt * 8 + 2 * c + (e & 1);
          const int pos = t * R + key;
          float l = negative_infinity;
          if (pos <= position[e >> 1]) l = attention::logit(sc[nt][e], biased ? scores[key] : 0.0f, scale);
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
        if (new_max != negative_infinity)
          rescale[i] = run_max[i] == negative_infinity ? 0.0f : expf(run_max[i] - new_max);
        run_max[i] = new_max;
      }
      float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int nt = 0; nt < R / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float m = run_max[e >> 1];
          const float p = m == negative_infinity ? 0.0f : expf(sc[nt][e] - m);
          sc[nt][e] = p;
          tile_sum[e >> 1] += p;
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) run_sum[i] = run_sum[i] * rescale[i] + tile_sum[i];
#pragma unroll
      for (int j = 0; j < n_tiles; ++j) {
        acc[j][0] *= rescale[0];
        acc[j][1] *= rescale[0];
        acc[j][2] *= rescale[1];
        acc[j][3] *= rescale[1];
      }
      // O += P V over the tile's 64 keys, 16 at a time, P as a high and a low 16-bit part.
#pragma unroll
      for (int kk = 0; kk < R / 16; ++kk) {
        std::uint32_t pa[4], pr[4];
        pa[0] = pack_split<E>(sc[2 * kk][0], sc[2 * kk][1], pr[0]);
        pa[1] = pack_split<E>(sc[2 * kk][2], sc[2 * kk][3], pr[1]);
        pa[2] = pack_split<E>(sc[2 * kk + 1][0], sc[2 * kk + 1][1], pr[2]);
        pa[3] = pack_split<E>(sc[2 * kk + 1][2], sc[2 * kk + 1][3], pr[3]);
#pragma unroll
        for (int np = 0; np < n_tiles / 2; ++np) {
          const int mat = lane / 8, row = kk * 16 + (mat & 1) * 8 + lane % 8, piece = 2 * np + (mat >> 1);
          std::uint32_t vb[4];
          ldmatrix_x4_trans(vs + swizzled_offset<D * 2>(row, piece), vb);
          mma_16816<E>(acc[2 * np], pa, vb[0], vb[1]);
          mma_16816<E>(acc[2 * np], pr, vb[0], vb[1]);
          mma_16816<E>(acc[2 * np + 1], pa, vb[2], vb[3]);
          mma_16816<E>(acc[2 * np + 1], pr, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with stage t % 2 before tile t + 2 overwrites it
  }
  cp_async_wait<0>();

  // Each quad's partial sums make the row sums; rows with a position write their output.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 1);
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (position[i] < 0) continue;
    const int row = warp * 16 + r + 8 * i;
    const int packed = ch.row0 + first_token + row / group, head = h * group + row % group;
    const float inv = run_sum[i] > 0.0f ? 1.0f / run_sum[i] : 0.0f;
#pragma unroll
    for (int j = 0; j < n_tiles; ++j) {
      o(packed, head, j * 8 + 2 * c) = from_float<Out>(acc[j][2 * i] * inv);
      o(packed, head, j * 8 + 2 * c + 1) = from_float<Out>(acc[j][2 * i + 1] * inv);
    }
  }
}

/// Grid (batch rows x KV heads), `cuda_threads`: stages the query of chunk row `which`
/// (or, `which` < 0, of the chunk's last row) of every chunk into `staged` (`[batch][H_q][D]`, the layout the
/// scoring reads as a batch), for the chunks that have that row. CTA (b, h) copies the group of KV head h.
template <class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    stage_prefill_query_kernel(cuda_state<E, D> s, sequence_source seqs,
                               tensor_view<const std::int32_t, 1> row_offsets, tensor_view<const E, 3> q,
                               int which, E* staged) {
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, b);
  const int i = which >= 0 ? which : ch.tokens - 1;
  if (ch.tokens == 0 || i >= ch.tokens) return;
  const int hq = s.kv_heads * s.group;
  E* dst = staged + (std::size_t(b) * hq + std::size_t(h) * s.group) * D;
  for (int j = threadIdx.x; j < s.group * D; j += blockDim.x)
    dst[j] = q(ch.row0 + i, h * s.group + j / D, j % D);
}

/// Grid (batch rows x KV heads), 32 threads: copies the selection the scoring and selection kernels just made
/// for chunk row `which` into `row_selection` at its packed row.
template <class E, int D>
__global__ void record_row_selection_kernel(cuda_state<E, D> s, sequence_source seqs,
                                            tensor_view<const std::int32_t, 1> row_offsets, int which) {
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, b);
  if (which >= ch.tokens) return;
  const std::size_t at = std::size_t(ch.row0 + which) * s.kv_heads + h;
  const int n = s.selection_count[s.sh(ch.seq, h)];
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    s.row_selection[at * s.top_k + i] = s.selection_of(ch.seq, h)[i];
  if (threadIdx.x == 0) s.row_selection_count[at] = n;
}

/// Grid (N x KV heads), `prefill_warps` warps, `sparse_prefill_smem_bytes<D>()` bytes: CTA (row, h) attends
/// the G query heads of packed row `row` over the blocks of its selection (`row_selection`, in rank order),
/// as decode's tensor-core attention attends a selection: 64-key tiles, each warp 16 keys of a tile with its
/// own running softmax (`mma_attend_rows`), the warps combined in warp order. Rows outside every chunk are
/// left as they are.
template <class P, class E, int D, class Out>
__global__ void __launch_bounds__(prefill_warps * 32)
    sparse_prefill_kernel(cuda_state<E, D> s, sequence_source seqs,
                          tensor_view<const std::int32_t, 1> row_offsets, int batch,
                          tensor_view<const E, 3> q, tensor_view<const E, 3> k, tensor_view<const E, 3> v,
                          tensor_view<Out, 3> o) {
  using attention = typename P::attention;
  constexpr bool offloads = P::store::offloads;
  constexpr bool biased = attention::bias != bias_mode::none;
  constexpr int R = prefill_tile_rows;
  constexpr std::size_t stage_bytes = prefill_stage_bytes<D>();
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ std::int32_t blocks[cuda_max_top_k];
  if (*s.status != 0) return;
  const int row = blockIdx.x, h = blockIdx.y;
  if (row < row_offsets(0) || row >= row_offsets(batch)) return;
  // The chunk holding the row: the last b with row_offsets(b) <= row (empty chunks before it skipped).
  int lo = 0, hi = batch;  // row_offsets(lo) <= row < row_offsets(hi)
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (row_offsets(mid) <= row) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, lo);
  const int length = ch.start + (row - ch.row0) + 1;
  const std::size_t at = std::size_t(row) * s.kv_heads + h;
  const int n = s.row_selection_count[at];
  for (int i = threadIdx.x; i < n; i += blockDim.x) blocks[i] = s.row_selection[at * s.top_k + i];
  __syncthreads();

  const selection_params& sel = s.sel;
  const int tiles_per_block = (sel.block_size + R - 1) / R, tiles = n * tiles_per_block;
  const prefill_rows_source<offloads, E, D> src = rows_source<offloads>(s, ch, h, k, v);
  const float* history = s.scores_of(ch.seq, h);
  const auto tile_at = [&](int t, int& first) {
    const int m = blocks[t / tiles_per_block], r0 = (t % tiles_per_block) * R;
    first = m * sel.block_size + r0;
    const int in_block = min(sel.block_size, length - m * sel.block_size) - r0;
    return in_block < 0 ? 0 : (in_block > R ? R : in_block);
  };
  const auto issue = [&](int t) {
    int first = 0;
    const int rows = tile_at(t, first);
    issue_position_tile<biased, prefill_rows_source<offloads, E, D>, D>(src, history, first, rows,
                                                                        smem + (t % 2) * stage_bytes);
  };
  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float run_max[2] = {negative_infinity, negative_infinity};
  float run_sum[2] = {0.0f, 0.0f};
  if (tiles > 0) issue(0);
  cp_async_commit();
  std::uint32_t qa[D / 16][4];
  load_query_fragments<E, D>(q, row, h, s.group, qa);
  const int warp = threadIdx.x / 32;
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) issue(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    int first = 0;
    const int rows = tile_at(t, first) - warp * 16;
    if (rows > 0) {
      const unsigned char* st = smem + (t % 2) * stage_bytes;
      const float* scores = reinterpret_cast<const float*>(st + 2 * R * D * 2) + warp * 16;
      mma_attend_rows<P, E, D>(
          qa, shared_address(st), shared_address(st + R * D * 2), scores, rows,
          [](int r, int c) { return swizzled_offset<D * 2>(r, c); }, acc, run_max, run_sum);
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  const std::size_t pipeline = 2 * stage_bytes > mma_combine_bytes<D>(prefill_warps)
                                   ? 2 * stage_bytes
                                   : mma_combine_bytes<D>(prefill_warps);
  float* out_acc = reinterpret_cast<float*>(smem + pipeline);  // [G][D]
  float* out_stats = out_acc + cuda_max_group * D;             // [G][2]
  mma_combine_warps<D>(smem, prefill_warps, s.group, acc, run_max, run_sum, out_acc, out_stats);
  __syncthreads();
  for (int i = threadIdx.x; i < s.group * D; i += blockDim.x) {
    const int g = i / D;
    const float sum = out_stats[2 * g + 1];
    o(row, h * s.group + g, i % D) = from_float<Out>(sum > 0.0f ? out_acc[i] / sum : 0.0f);
  }
}

/// Grid (batch rows x KV heads, Y), `cuda_threads`: the chunk's K and V rows to the store: the pages of the
/// blocks complete after the chunk (every block, resident store) and, offload store, the rows of a partial
/// tail to slot 0, which `prefill_restart_kernel` gives the tail. CTA (r, 0) counts the blocks the chunk
/// completed as written back (offload store).
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    prefill_store_kernel(cuda_state<E, D> s, sequence_source seqs,
                         tensor_view<const std::int32_t, 1> row_offsets, tensor_view<const E, 3> k,
                         tensor_view<const E, 3> v) {
  constexpr bool offloads = P::store::offloads;
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, b);
  if (ch.tokens == 0) return;
  const int bs = s.sel.block_size, end = ch.start + ch.tokens;
  const std::int64_t items = std::int64_t(ch.tokens) * D;
  for (std::int64_t idx = std::int64_t(blockIdx.y) * blockDim.x + threadIdx.x; idx < items;
       idx += std::int64_t(gridDim.y) * blockDim.x) {
    const int i = static_cast<int>(idx / D), d = static_cast<int>(idx % D);
    const int t = ch.start + i, m = t / bs;
    const std::size_t at = std::size_t(t % bs) * D + d;
    E* kd;
    E* vd;
    if (offloads && m >= end / bs) {
      kd = s.slot_k(ch.seq, h, 0);
      vd = s.slot_v(ch.seq, h, 0);
    } else {
      kd = s.page_k(s.table(ch.seq)[m], h);
      vd = s.page_v(s.table(ch.seq)[m], h);
    }
    kd[at] = k(ch.row0 + i, h, d);
    vd[at] = v(ch.row0 + i, h, d);
  }
  if (offloads && blockIdx.y == 0 && threadIdx.x == 0) {
    const unsigned long long completed = static_cast<unsigned long long>(end / bs - ch.start / bs);
    if (completed > 0)
      atomicAdd(reinterpret_cast<unsigned long long*>(&s.totals->bytes_d2h),
                completed * 2ull * s.block_bytes());
  }
}

/// Grid (batch rows x KV heads), `cuda_threads`: each sequence of a non-empty chunk as admission leaves it
/// before its selection: the new length (CTA of KV head 0), no selection, no misses and, offload store, an
/// empty slot cache but for a partial tail in slot 0 (with the rows it held before the chunk moved there from
/// its old slot).
template <class P, class E, int D>
__global__ void __launch_bounds__(cuda_threads)
    prefill_restart_kernel(cuda_state<E, D> s, sequence_source seqs,
                           tensor_view<const std::int32_t, 1> row_offsets) {
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, b);
  if (ch.tokens == 0) return;
  const int bs = s.sel.block_size, length = ch.start + ch.tokens;
  if (h == 0 && threadIdx.x == 0) s.lengths[ch.seq] = length;
  if (threadIdx.x == 0) {
    s.selection_count[s.sh(ch.seq, h)] = 0;
    s.step_misses[s.sh(ch.seq, h)] = 0;
  }
  if constexpr (P::store::offloads) {
    const int tail = length / bs, held = ch.start % bs;
    const bool partial = length % bs != 0;
    std::int32_t* map = s.slot_map_of(ch.seq, h);
    std::int32_t* where = s.block_slot_of(ch.seq, h);
    const int old = partial && held != 0 && tail == ch.start / bs ? where[tail] : -1;
    if (old > 0) {
      for (int i = threadIdx.x; i < held * D; i += blockDim.x) {
        s.slot_k(ch.seq, h, 0)[i] = s.slot_k(ch.seq, h, old)[i];
        s.slot_v(ch.seq, h, 0)[i] = s.slot_v(ch.seq, h, old)[i];
      }
    }
    __syncthreads();  // every thread has read `where[tail]`
    for (int j = threadIdx.x; j < s.slots; j += blockDim.x) map[j] = -1;
    for (int m = threadIdx.x; m < s.max_blocks; m += blockDim.x) where[m] = -1;
    __syncthreads();
    if (threadIdx.x == 0 && partial) {
      map[0] = tail;
      where[tail] = 0;
      if (s.cache_slots > 0) s.stamp_of(ch.seq, h)[0] = length;
    }
  }
}

/// Grid (batch rows x KV heads), 32 threads: after the final selection's load, a sequence of a non-empty
/// chunk reports no misses of its own (as after admission).
template <class E, int D>
__global__ void prefill_clear_misses_kernel(cuda_state<E, D> s, sequence_source seqs,
                                            tensor_view<const std::int32_t, 1> row_offsets) {
  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const prefill_chunk_info ch = chunk_of(s, seqs, row_offsets, b);
  if (ch.tokens == 0 || threadIdx.x != 0) return;
  s.step_misses[s.sh(ch.seq, h)] = 0;
}

}  // namespace nosa::detail
