#pragma once
/// \file
/// Step stage 3, scoring: the query-aware score of every block (`Sq`, spec §4 steps 1-2) and the
/// query-agnostic one (`Se`), in one pass over the compressed keys.
///
/// The logits of one (sequence, KV head) are a small matrix product, the group's queries (padded to 16 rows)
/// times every compressed key, the shape of decode attention's Q K^T, and are computed the same way: the
/// compressed keys stream through a multi-stage `cp.async` pipeline into swizzled shared memory, and each
/// warp multiplies 8 of a tile's 64 by the queries (held as A fragments in registers) with `mma.m16n8k16` in
/// fp32 (bf16 and fp16; fp32 storage takes CUDA cores, 16 a warp). Each key is read from memory once.
///
/// The per-head softmax runs over all windows of the sequence, but what must outlive the pass is the logits
/// (G floats a window), not the keys. So one (sequence, KV head) is a thread-block cluster of C CTAs, each
/// owning a contiguous range of blocks: a CTA keeps the logits of the windows overlapping its blocks in
/// shared memory, the CTAs exchange each head's (max, sum of exp) over the windows they own through
/// distributed shared memory, and each CTA then forms `P[w]` (each head's probability summed over the group)
/// and pools its blocks' `Sq` and `Se`, writing only block scores. A window shared by two CTAs' blocks is
/// scored by both (the same bits) and owned, for the softmax, by one. When the logits of a layer's capacity
/// do not fit in the shared memory of a cluster, they go to a global scratch array instead (same kernel).
/// Devices before sm_90 run clusters of one CTA.

#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace nosa::detail {

/// Compressed keys of one pipeline stage.
inline constexpr int score_tile_windows = 64;
/// Largest cluster the scoring launches where the device allows more than the portable limit (8).
inline constexpr int score_max_cluster = 16;
inline constexpr int score_portable_cluster = 8;

/// Shared-memory geometry of the scoring kernel for an element type and head dimension.
template <class E, int D>
struct score_traits {
  static constexpr bool tensor_cores = is_16bit_element<E>;
  /// Threads of a CTA: eight warps of 8 windows a tile (tensor cores; short dependent chains a warp, two
  /// CTAs an SM: sixteen warps to hide them), four warps of 16 windows (CUDA cores).
  static constexpr int threads = tensor_cores ? 256 : 128;
  static constexpr int warp_windows = score_tile_windows / (threads / 32);
  /// Bytes of one compressed key in shared memory: 16-bit rows are swizzled; fp32 rows are padded by 16
  /// bytes, so that eight lanes reading eight rows at one column hit distinct banks.
  static constexpr int row_bytes = tensor_cores ? D * 2 : D * 4 + 16;
  static constexpr int stage_bytes = score_tile_windows * row_bytes;
  /// About 64 KiB of keys in flight or landed (four stages of 64 bf16 keys of 128 elements, three in flight
  /// while one is read): two CTAs an SM keep well over what an SM needs in flight at the memory's latency
  /// under load, and fit beside the logits of a quarter of a 32K context (group 16), so a batch of 64 runs
  /// clusters of 4 CTAs with 8 tiles each, not clusters of 8 with 4 (a CTA's fixed costs, its first tiles'
  /// latency and the cluster's softmax, amortised over more).
  static constexpr int stages = std::max(2, std::min(8, 65536 / stage_bytes));
  /// The fewer stages a launch may take instead (about three quarters of the bytes: three for D 128) when
  /// that lets a smaller cluster's logits fit beside them two CTAs an SM on a grid that still fills the
  /// SMs twice over: longer CTAs beat the fourth stage there (group 4, B 64, 32K: 92 against 104 us).
  static constexpr int fewer_stages = std::max(2, stages * 3 / 4);
  /// The group's queries, kept apart from the pipeline: fp32 rows read by every tile (CUDA cores). The
  /// tensor cores' 16-bit rows are read once, into registers, before the last stage is first filled, and
  /// are staged in that stage.
  static constexpr int query_bytes = tensor_cores ? 0 : cuda_max_group * D * 4;
  static_assert(!tensor_cores || query_rows_bytes<D>() <= stage_bytes, "the queries fit in one stage");
};

/// Upper bound of the windows overlapping `blocks` consecutive blocks.
inline int score_windows_for_blocks(int blocks, const selection_params& sel) {
  return (blocks * sel.block_size + sel.window) / sel.stride + 2;
}

/// How one scoring launch is shaped: the cluster size, and the logit columns each CTA keeps in shared
/// memory (0: the logits go to the global scratch `window_logits`).
struct score_shape {
  int cluster = 1;
  int columns = 0;
  std::size_t smem = 0;
  int stages = 2;  ///< pipeline stages, `score_traits::stages` or `fewer_stages`
};

/// What the device offers the scoring, read once when a layer is created.
struct score_device {
  int sms = 1;
  int smem_limit = 48 * 1024;  ///< dynamic shared memory a CTA may opt into
  bool clusters = false;       ///< sm_90 or later
  int max_cluster = score_portable_cluster;  ///< the largest cluster `prepare_scoring` found schedulable
};

/// The launch shape for `rows` (sequence, KV head) pairs: clusters large enough for the capacity's logits
/// to fit in shared memory, and for the launch to spread over the SMs; the global scratch when even the
/// largest cluster cannot hold them.
template <class E, int D>
score_shape plan_scoring(const selection_params& sel, int max_blocks, int group, int rows, const score_device& dev) {
  using traits = score_traits<E, D>;
  const auto smem_for = [&](int cluster, int stages, int& columns) {
    const int blocks = (max_blocks + cluster - 1) / cluster;
    const int windows = score_windows_for_blocks(blocks, sel);
    columns = (windows + score_tile_windows - 1) / score_tile_windows * score_tile_windows + 8;  // 8 mod 32
    return std::size_t(stages * traits::stage_bytes + traits::query_bytes) + std::size_t(group + 2) * columns * 4;
  };
  const int most = dev.clusters ? dev.max_cluster : 1;
  int spread = 1;
  while (spread < most && rows * spread * 2 <= dev.sms) spread *= 2;
  // The smallest cluster that spreads the launch and lets two CTAs share an SM (with fewer stages when the
  // grid still holds two CTAs for each SM); else the smallest that fits.
  score_shape shape;
  bool found = false;
  const std::size_t half = std::size_t(dev.smem_limit) / 2 > 1024 ? std::size_t(dev.smem_limit) / 2 - 1024 : 0;
  for (int cluster = spread; cluster <= most; cluster *= 2) {
    int columns = 0;
    const std::size_t smem = smem_for(cluster, traits::stages, columns);
    if (smem <= half) return {cluster, columns, smem, traits::stages};
    if (traits::fewer_stages < traits::stages && 10LL * rows * cluster >= 18LL * dev.sms) {
      int fewer_columns = 0;
      const std::size_t fewer = smem_for(cluster, traits::fewer_stages, fewer_columns);
      if (fewer <= half) return {cluster, fewer_columns, fewer, traits::fewer_stages};
    }
    if (!found && smem <= std::size_t(dev.smem_limit)) {
      shape = {cluster, columns, smem, traits::stages};
      found = true;
    }
  }
  if (found) return shape;
  shape.cluster = std::max(spread, most);
  shape.columns = 0;
  shape.stages = traits::stages;
  shape.smem = std::size_t(traits::stages * traits::stage_bytes + traits::query_bytes);
  return shape;
}

/// Folds the softmax statistics (max `om`, sum of exp2 against it `os`) of other logits into (`m`, `sum`).
__device__ inline void combine_exp2_stats(float& m, float& sum, float om, float os) {
  const float top = max_keep_left(m, om);
  float total = 0.0f;
  if (m != negative_infinity) total += sum * exp2f(m - top);
  if (om != negative_infinity) total += os * exp2f(om - top);
  m = top;
  sum = total;
}

/// Step stage 3, grid (C x batch rows x KV heads) in clusters of C CTAs of `score_traits::threads` threads:
/// CTA `r` of row `(b, h)`'s cluster owns blocks `[r * per, (r + 1) * per)` of the sequence (`per` = its blocks / C),
/// scores the windows that overlap them, joins the cluster's per-head softmax, and writes those blocks' `Sq`
/// (the pooling identity without a query) and `Se`. `columns` is the logit row length in shared memory, or
/// 0 for the global scratch. Plan calls pass one row with `length_offset` 0; steps run only when the step's
/// checks passed (every CTA of a cluster sees the same status, so they return together); with `prefill`, only
/// when the prefill's checks passed and the row's chunk reaches `length_offset` (`prefill_skips`).
template <class P, class E, int D>
__global__ void __launch_bounds__(score_traits<E, D>::threads)
    score_kernel(cuda_state<E, D> s, sequence_source seqs, int length_offset, tensor_view<const E, 3> q,
                 bool have_query, int columns, int stages, bool prefill) {
  dependent_launch_wait();
  using traits = score_traits<E, D>;
  using scorer = typename P::query_aware;
  using agnostic = typename P::query_agnostic;
  constexpr int G = cuda_max_group;
  constexpr int T = score_tile_windows;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float cta_stats[G][2];  // (max, sum of exp2) per head over the windows this CTA owns
  __shared__ float warp_stats[traits::threads / 32][G][2];  // the same per warp (tensor cores)
  __shared__ float head_max[G], head_inv[G];
  if ((length_offset > 0 || prefill) && *s.status != 0) return;

  const unsigned C = cluster_ctas(), rank = cluster_rank();
  const int row = static_cast<int>(blockIdx.x / C);
  const int b = row / s.kv_heads, h = row % s.kv_heads;
  const int seq = seqs(b);
  if (prefill && s.prefill_skips(seq, length_offset)) return;  // the same for every CTA of the cluster
  const int length = s.lengths[seq] + length_offset;
  const selection_params& sel = s.sel;
  const int group = s.group;
  const int nw = window_count(length, sel), nb = block_count(length, sel);
  const int per = (nb + static_cast<int>(C) - 1) / static_cast<int>(C);
  const int m0 = min(nb, static_cast<int>(rank) * per), m1 = min(nb, m0 + per);
  // Windows scored, [wa, wb), and owned for the softmax, [wa, own_end): consecutive CTAs' owned ranges
  // meet at the first window of the next CTA's first block, so every window is owned exactly once.
  int wa = 0, wb = 0, own_end = 0;
  if (m0 < m1) {
    wa = min(windows_overlapping_block(m0, nw, sel).first, nw);
    own_end = m1 >= nb ? nw : min(windows_overlapping_block(m1, nw, sel).first, nw);
    wb = max(windows_overlapping_block(m1 - 1, nw, sel).last, own_end);
  }
  const int count = wb - wa;
  const bool in_shared = columns > 0;
  const int pipeline_bytes = stages * traits::stage_bytes;
  float* logits = in_shared ? reinterpret_cast<float*>(smem + pipeline_bytes + traits::query_bytes)
                            : s.logits_of(seq, h) + wa;  // [G][stride], window wa first
  const int stride = in_shared ? columns : s.max_windows;
  // The same logits as `logits` when `in_shared`, through a pointer the compiler knows is shared memory:
  // accesses through it are shared-memory instructions with 32-bit addresses, not generic ones.
  float* const shared_logits = reinterpret_cast<float*>(smem + pipeline_bytes + traits::query_bytes);
  float* prob = in_shared ? logits + std::size_t(group) * stride : s.prob_of(seq, h) + wa;  // [count]
  // The compressed scores of the windows scored, staged in shared memory (pooling would otherwise wait on a
  // dependent global load per window): with a query, copied asynchronously with the first tile of keys;
  // read in place with the global scratch.
  const float* cc = s.cc_of(seq, h) + wa;  // [count]
  const auto stage_cc = [&](bool async) {
    if (in_shared) {
      float* staged = prob + stride;
      for (int i = static_cast<int>(threadIdx.x); i < count; i += traits::threads) {
        if (async) {
          cp_async_4(shared_address(staged + i), cc + i);
        } else {
          staged[i] = cc[i];
        }
      }
      cc = staged;
    }
  };
  // Logits are kept in base 2 (the window logit times log2 e), so that every exponential below is one
  // `exp2f`: the same softmax, with the scale folded into one multiply.
  const float scale = softmax_scale(D);
  constexpr float log2e = 1.4426950408889634f;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int owned = own_end - wa;  // windows [0, owned) of the logits enter this CTA's softmax statistics

  if (have_query) {
    const E* kc = s.kc_of(seq, h) + std::size_t(wa) * D;
    const int tiles = (count + T - 1) / T;
    // This thread's 16-byte pieces of a tile: rows r0 + j * rpp at piece ch0. Their offsets are computed
    // once; the swizzle repeats every eight rows, so a pass `rpp` rows on moves by whole groups of rows.
    constexpr int pieces = traits::tensor_cores ? D / 8 : D / 4;
    constexpr int rpp = traits::threads / pieces, passes = T / rpp;
    constexpr int period = traits::tensor_cores && rpp < 8 ? 8 / rpp : 1;
    static_assert(traits::threads % pieces == 0 && T % rpp == 0, "tile copy shape");
    const int r0 = static_cast<int>(threadIdx.x) / pieces, ch0 = static_cast<int>(threadIdx.x) % pieces;
    std::uint32_t piece_at[period];
#pragma unroll
    for (int p = 0; p < period; ++p) {
      if constexpr (traits::tensor_cores) {
        piece_at[p] = swizzled_offset<traits::row_bytes>(r0 + p * rpp, ch0);
      } else {
        piece_at[p] = std::uint32_t((r0 + p * rpp) * traits::row_bytes + ch0 * 16);
      }
    }
    const E* thread_src = kc + std::size_t(r0) * D + ch0 * (16 / sizeof(E));
    const std::uint32_t pipeline = shared_address(smem);
    // Tile t into stage `into` (t % stages).
    const auto issue = [&](int t, int into) {
      const std::uint32_t stage = pipeline + std::uint32_t(into * traits::stage_bytes);
      const E* src = thread_src + std::size_t(t) * T * D;
      const auto at = [&](int j) {
        return stage + piece_at[j % period] + std::uint32_t((j / period) * period * rpp * traits::row_bytes);
      };
      if ((t + 1) * T <= count) {  // a whole tile (the same for the whole CTA): no row checks
#pragma unroll
        for (int j = 0; j < passes; ++j) cp_async_16(at(j), src + std::size_t(j) * rpp * D);
      } else {
        const int rest = count - t * T - r0;  // rows of the tile from this thread's first one that exist
#pragma unroll
        for (int j = 0; j < passes; ++j) {
          const bool valid = j * rpp < rest;
          cp_async_16(at(j), valid ? src + std::size_t(j) * rpp * D : kc, valid);
        }
      }
    };
    // The queries are loaded first (16-byte loads into registers), so that they do not queue behind the
    // keys; they are stored to shared memory once the first tiles are issued.
    constexpr int query_pieces = 16 * (D / 8);
    constexpr int query_per_thread =
        traits::tensor_cores ? (query_pieces + traits::threads - 1) / traits::threads : 1;
    uint4 query_piece[query_per_thread];
    if constexpr (traits::tensor_cores) {
#pragma unroll
      for (int j = 0; j < query_per_thread; ++j) {
        const int i = static_cast<int>(threadIdx.x) + j * traits::threads;
        if (i < query_pieces) query_piece[j] = query_row_piece<E, D>(q, b, h, group, i);
      }
    }
    stage_cc(true);  // in the first tile's group
    for (int t = 0; t < stages - 1; ++t) {
      if (t < tiles) issue(t, t);
      cp_async_commit();
    }

    if constexpr (traits::tensor_cores) {
      // The queries read back as A fragments.
      unsigned char* query_rows = smem + (stages - 1) * traits::stage_bytes;  // first filled after a barrier
#pragma unroll
      for (int j = 0; j < query_per_thread; ++j) {
        const int i = static_cast<int>(threadIdx.x) + j * traits::threads;
        if (i < query_pieces) *reinterpret_cast<uint4*>(query_rows + query_row_piece_offset<D>(i)) = query_piece[j];
      }
      __syncthreads();
      std::uint32_t qa[D / 16][4];
      load_query_fragments_shared<E, D>(query_rows, qa);
      const int r = lane / 4, c = lane % 4;
      // Running (max, sum of exp2) of heads r and r + 8 over this lane's owned windows, updated tile by tile
      // while the keys stream: no second pass over the logits.
      float run_max[2] = {negative_infinity, negative_infinity}, run_sum[2] = {0.0f, 0.0f};
      constexpr int W = traits::warp_windows;
      static_assert(W == 8 && D % 32 == 0, "a warp multiplies one 8-window column tile, two k steps a load");
      // This lane's logits of head r at its first window of the tile, in shared memory (head r + 8: 8 rows
      // on).
      std::uint32_t lane_logits =
          shared_address(shared_logits) + std::uint32_t((r * stride + warp * W + 2 * c) * 4);
      const std::uint32_t head_8_rows = std::uint32_t(8 * stride * 4);
      // This lane's `ldmatrix` row address in stage 0 (the swizzle of row kr, piece 4p + lane / 8, is the
      // piece XOR kr % 8 = lane % 8: the same offsets in every stage).
      const int kr = warp * W + lane % 8;
      std::uint32_t key_at[D / 32];
#pragma unroll
      for (int kp = 0; kp < D / 32; ++kp) {
        key_at[kp] = pipeline + swizzled_offset<traits::row_bytes>(kr, 4 * kp + lane / 8);
      }
      int read = 0;  // the stage of tile t
      for (int t = 0; t < tiles; ++t) {
        cp_async_wait_dynamic(stages - 2);
        __syncthreads();
        // Tile t + stages - 1 goes where tile t - 1 was read.
        if (t + stages - 1 < tiles) issue(t + stages - 1, read == 0 ? stages - 1 : read - 1);
        cp_async_commit();
        const std::uint32_t keys = std::uint32_t(read * traits::stage_bytes);
        read = read + 1 == stages ? 0 : read + 1;
        // One `ldmatrix.x4` gives two k steps of this warp's 8 windows: matrices (k step 2p, first and second
        // 8 columns), (k step 2p + 1, likewise). Even and odd k steps accumulate apart (two chains of half the
        // length), added at the end.
        float half[2][4] = {};
#pragma unroll
        for (int kp = 0; kp < D / 32; ++kp) {
          std::uint32_t kb[4];
          ldmatrix_x4(key_at[kp] + keys, kb);
          mma_16816<E>(half[0], qa[2 * kp], kb[0], kb[1]);
          mma_16816<E>(half[1], qa[2 * kp + 1], kb[2], kb[3]);
        }
        // Accumulator (lane = 4 r + c): heads r and r + 8, windows 2c and 2c + 1 of this warp's 8.
        const int i0 = t * T + warp * W + 2 * c;  // windows i0, i0 + 1
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int head = r + 8 * j;
          float l[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            l[e] = scorer::window_logit(half[0][2 * j + e] + half[1][2 * j + e], scale) * log2e;
          }
          if (head < group) {
            if (in_shared) {
              // The row is padded to whole tiles: windows past `count` land in the padding.
              store_shared(lane_logits + (j == 0 ? 0u : head_8_rows), l[0], l[1]);
            } else {  // windows past `count` are not stored (they would cross into the next head's row)
              float* out = logits + std::size_t(head) * stride + i0;
              if (i0 < count) out[0] = l[0];
              if (i0 + 1 < count) out[1] = l[1];
            }
          }
          if (i0 >= owned) l[0] = negative_infinity;
          if (i0 + 1 >= owned) l[1] = negative_infinity;
          // The running pair against the new maximum, without branches; `exp2_flush` is exact here, as the
          // sum always holds the maximum's own term, 1.
          const float top = max_keep_left(run_max[j], max_keep_left(l[0], l[1]));
          const float base = top == negative_infinity ? 0.0f : top;
          run_sum[j] = __fmul_rn(run_sum[j], exp2_flush(run_max[j] - base)) +
                       (exp2_flush(l[0] - base) + exp2_flush(l[1] - base));
          run_max[j] = top;
        }
        lane_logits += T * 4;
      }
      // The four lanes of a head row, then the warps, in a fixed order.
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
          const float om = __shfl_xor_sync(0xffffffffu, run_max[j], o);
          const float os = __shfl_xor_sync(0xffffffffu, run_sum[j], o);
          combine_exp2_stats(run_max[j], run_sum[j], om, os);
        }
        if (c == 0) {
          warp_stats[warp][r + 8 * j][0] = run_max[j];
          warp_stats[warp][r + 8 * j][1] = run_sum[j];
        }
      }
      cp_async_wait<0>();
      __syncthreads();
      if (static_cast<int>(threadIdx.x) < group) {
        float m = warp_stats[0][threadIdx.x][0], sum = warp_stats[0][threadIdx.x][1];
#pragma unroll
        for (int x = 1; x < traits::threads / 32; ++x) {
          combine_exp2_stats(m, sum, warp_stats[x][threadIdx.x][0], warp_stats[x][threadIdx.x][1]);
        }
        cta_stats[threadIdx.x][0] = m;
        cta_stats[threadIdx.x][1] = sum;
      }
    } else {
      // CUDA cores (fp32 storage): lane l takes window l % 16 of its warp's 16 and heads l / 16, l / 16 + 2,
      // ..., each a dot product over the key row in shared memory against the queries in shared memory.
      float* qs = reinterpret_cast<float*>(smem + pipeline_bytes);
      for (int i = static_cast<int>(threadIdx.x); i < group * D; i += traits::threads) {
        qs[i] = to_float(q(b, h * group + i / D, i % D));
      }
      const int wl = warp * 16 + lane % 16, first_head = lane / 16;
      for (int t = 0; t < tiles; ++t) {
        cp_async_wait_dynamic(stages - 2);
        __syncthreads();
        if (t + stages - 1 < tiles) issue(t + stages - 1, (t + stages - 1) % stages);
        cp_async_commit();
        const float4* key = reinterpret_cast<const float4*>(smem + (t % stages) * traits::stage_bytes +
                                                            wl * traits::row_bytes);
        float acc[G / 2];
#pragma unroll
        for (int j = 0; j < G / 2; ++j) acc[j] = 0.0f;
        for (int d4 = 0; d4 < D / 4; ++d4) {
          const float4 k4 = key[d4];
#pragma unroll
          for (int j = 0; j < G / 2; ++j) {
            const int head = first_head + 2 * j;
            if (head < group) {
              const float4 q4 = reinterpret_cast<const float4*>(qs + head * D)[d4];
              acc[j] += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
            }
          }
        }
        const int i = t * T + wl;
#pragma unroll
        for (int j = 0; j < G / 2; ++j) {
          const int head = first_head + 2 * j;
          if (head < group && i < count) {
            logits[std::size_t(head) * stride + i] = scorer::window_logit(acc[j], scale) * log2e;
          }
        }
      }
      cp_async_wait<0>();
      __syncthreads();
      // Each head's (max, sum of exp2) over the owned windows: eight threads a head, in a fixed order.
      const int head = static_cast<int>(threadIdx.x) / 8, sub = static_cast<int>(threadIdx.x) % 8;
      const float* l = logits + std::size_t(head) * stride;
      float m = negative_infinity;
      if (head < group) {
        for (int i = sub; i < owned; i += 8) m = max_keep_left(m, l[i]);
      }
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) m = max_keep_left(m, __shfl_xor_sync(0xffffffffu, m, o));
      float sum = 0.0f;
      if (head < group && m != negative_infinity) {
        for (int i = sub; i < owned; i += 8) sum += exp2f(l[i] - m);
      }
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (sub == 0) {
        cta_stats[head][0] = m;
        cta_stats[head][1] = sum;
      }
    }
    // The cluster's softmax per head, from every CTA's statistics in rank order.
    cluster_arrive();
    cluster_wait();
    if (static_cast<int>(threadIdx.x) < group) {
      // Every CTA's statistics loaded first (independent remote loads in flight together), then combined.
      const int head = static_cast<int>(threadIdx.x);
      float ms[score_max_cluster], ss[score_max_cluster];
#pragma unroll
      for (int x = 0; x < score_max_cluster; ++x) {
        if (x < static_cast<int>(C)) {
          ms[x] = load_cluster_shared(&cta_stats[head][0], static_cast<unsigned>(x));
          ss[x] = load_cluster_shared(&cta_stats[head][1], static_cast<unsigned>(x));
        }
      }
      float m = negative_infinity;
#pragma unroll
      for (int x = 0; x < score_max_cluster; ++x) {
        if (x < static_cast<int>(C)) m = max_keep_left(m, ms[x]);
      }
      float sum = 0.0f;
#pragma unroll
      for (int x = 0; x < score_max_cluster; ++x) {
        if (x < static_cast<int>(C) && ms[x] != negative_infinity) sum += ss[x] * exp2f(ms[x] - m);
      }
      head_max[head] = m;
      head_inv[head] = 1.0f / sum;
    }
    cluster_arrive_relaxed();  // this CTA is done reading the others' statistics; waited for before it exits
    __syncthreads();
    // P[w]: each head's probability, summed over the group in head order.
    float hm[G], hi[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      hm[g] = g < group ? head_max[g] : 0.0f;
      hi[g] = g < group ? head_inv[g] : 0.0f;
    }
    if (in_shared && traits::tensor_cores) {
      // Four windows a thread, with 16-byte loads and stores: the rows are padded to whole tiles and 16-byte
      // aligned, and the tensor-core loop stored every window of its last tile (past `count`, the finite
      // logits of zero-filled keys).
      const float* from = shared_logits;
      float* to = shared_logits + std::size_t(group) * stride;
      for (int i = 4 * static_cast<int>(threadIdx.x); i < count; i += 4 * traits::threads) {
        float4 p = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (g < group) {
            const float4 l = *reinterpret_cast<const float4*>(from + g * stride + i);
            p.x += exp2f(l.x - hm[g]) * hi[g];
            p.y += exp2f(l.y - hm[g]) * hi[g];
            p.z += exp2f(l.z - hm[g]) * hi[g];
            p.w += exp2f(l.w - hm[g]) * hi[g];
          }
        }
        *reinterpret_cast<float4*>(to + i) = p;
      }
    } else {
      for (int i = static_cast<int>(threadIdx.x); i < count; i += traits::threads) {
        float p = 0.0f;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          if (g < group) p += exp2f(logits[std::size_t(g) * stride + i] - hm[g]) * hi[g];
        }
        prob[i] = p;
      }
    }
    __syncthreads();
  }

  // Pooling: one thread per block.
  const bool query = have_query && nw > 0;
  if (!have_query) {
    stage_cc(false);
    __syncthreads();
  }
  const auto pool_blocks = [&](const float* probs, const float* scores) {
    for (int m = m0 + static_cast<int>(threadIdx.x); m < m1; m += traits::threads) {
      const window_range r = windows_overlapping_block(m, nw, sel);
      float bq = scorer::pool_identity;
      float be = agnostic::pool_identity;
      for (int w = r.first; w < r.last; ++w) {
        if (query) bq = scorer::pool(bq, probs[w - wa]);
        be = agnostic::pool(be, scores[w - wa]);
      }
      s.sq_of(seq, h)[m] = bq;
      s.se_of(seq, h)[m] = be;
    }
  };
  if (in_shared) {  // probabilities and compressed scores both staged
    const float* staged = shared_logits + std::size_t(group + 1) * stride;
    pool_blocks(staged - stride, staged);
  } else {
    pool_blocks(prob, cc);
  }
  if (have_query) cluster_wait();
}

/// Enqueues the scoring of `rows` (batch row, KV head) pairs in the shape `plan_scoring` gives (`prefill`: see
/// `score_kernel`).
template <class P, class E, int D>
cudaError_t launch_scoring(const cuda_state<E, D>& s, sequence_source seqs, int rows, int length_offset,
                           tensor_view<const E, 3> q, bool have_query, const score_device& dev, cudaStream_t stream,
                           bool prefill = false) {
  if (rows <= 0) return cudaSuccess;
  const score_shape shape = plan_scoring<E, D>(s.sel, s.max_blocks, s.group, rows, dev);
  return launch_kernel(score_kernel<P, E, D>, dim3(static_cast<unsigned>(rows) * shape.cluster),
                       dim3(score_traits<E, D>::threads),
                       shape.smem, stream, s.dependent_launch, shape.cluster, s, seqs, length_offset, q, have_query,
                       shape.columns, shape.stages, prefill);
}

/// Opts the scoring kernel into the shared memory it may use and, where the device schedules them, into
/// clusters of `score_max_cluster` CTAs (beyond the portable 8: long contexts keep two CTAs an SM, and small
/// batches spread further). Once per layer, with the layer's capacity (`max_blocks`) and group size.
template <class P, class E, int D>
cudaError_t prepare_scoring(score_device& dev, const selection_params& sel, int max_blocks, int group) {
  const auto kernel = score_kernel<P, E, D>;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.smem_limit);
  if (e != cudaSuccess || !dev.clusters) return e;
  dev.max_cluster = score_portable_cluster;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    cudaGetLastError();
    return cudaSuccess;
  }
  // The largest shape the wider clusters would launch: `score_max_cluster` CTAs of the smallest cluster's
  // share of the capacity.
  score_device wide = dev;
  wide.max_cluster = score_max_cluster;
  const score_shape shape = plan_scoring<E, D>(sel, max_blocks, group, 1, wide);
  if (max_active_clusters(kernel, score_max_cluster, score_traits<E, D>::threads, shape.smem) > 0) {
    dev.max_cluster = score_max_cluster;
  }
  return cudaSuccess;
}

}  // namespace nosa::detail
