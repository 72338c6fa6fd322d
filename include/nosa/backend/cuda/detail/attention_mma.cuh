#pragma once
/// \file
/// Split attention on tensor cores for 16-bit storage (bf16, fp16) and D = 64 or 128 (sm_80 and later).
///
/// A decode step has G query heads per KV head, so the group is the M of the products: Q (G rows padded to
/// 16) times K^T, then P times V, with `mma.sync.m16n8k16` and fp32 accumulation. Each warp streams 16-row
/// tiles of K and V through its own `cp.async` pipeline in shared memory (swizzled so that `ldmatrix` is
/// free of bank conflicts) and keeps a running softmax per head in registers.
///
/// Precision: Q, K and V enter the products exactly (they are stored in the element type); products are
/// accumulated in fp32. The softmax weights P are fp32; they are split into a 16-bit high part and a 16-bit
/// remainder and both are multiplied, so P carries about 16 (bf16) or 22 (fp16) significant bits instead of
/// 8 or 11: the result agrees with the fp32 CUDA-core kernel within fp32 accumulation error.

#include <nosa/backend/cuda/detail/kernels.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nosa::detail {

/// Key rows of one tile: the k of the P.V product.
inline constexpr int mma_tile_rows = 16;
/// Warps of an attention CTA; each has its own pipeline.
inline constexpr int mma_warps = 4;
/// Tiles in flight per warp.
inline constexpr int mma_stages = 3;

/// True when `attention_mma_kernel` handles this element type and head dimension.
template <class E, int D>
inline constexpr bool uses_mma_attention = (std::is_same_v<E, bf16> || std::is_same_v<E, fp16>) && (D == 64 || D == 128);

/// Bytes of one pipeline stage: a K tile, a V tile and the tile's eviction scores.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t mma_stage_bytes() {
  return std::size_t(2) * mma_tile_rows * D * 2 + mma_tile_rows * sizeof(float);
}

/// Dynamic shared memory of `attention_mma_kernel<P, E, D>`: the pipelines, reused to combine the warps.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t mma_attention_smem_bytes() {
  const std::size_t pipelines = std::size_t(mma_stages) * mma_warps * mma_stage_bytes<D>();
  const std::size_t combine = std::size_t(mma_warps) * 16 * (D + 2) * sizeof(float);
  return pipelines > combine ? pipelines : combine;
}

__device__ inline std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

/// 16-byte asynchronous copy to shared memory; `valid == false` writes zeros and reads nothing.
__device__ inline void cp_async_16(std::uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
/// 4-byte asynchronous copy to shared memory; `valid == false` writes zeros and reads nothing.
__device__ inline void cp_async_4(std::uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

__device__ inline void ldmatrix_x4(std::uint32_t address, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ inline void ldmatrix_x4_trans(std::uint32_t address, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

/// c += a * b for one m16n8k16 tile, fp32 accumulation.
template <class E>
__device__ inline void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<E, bf16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// Two stored elements as one 32-bit operand register (`lo` in the low half).
template <class E>
__device__ inline std::uint32_t pack_elements(E lo, E hi) {
  return std::uint32_t(lo.bits) | (std::uint32_t(hi.bits) << 16);
}

/// Rounds (x, y) to a 16-bit pair (x in the low half) and returns it; `rest` receives the rounding
/// remainders, also rounded to 16 bits, so that high + rest carries about twice the precision.
template <class E>
__device__ inline std::uint32_t pack_split(float x, float y, std::uint32_t& rest) {
  std::uint32_t high, low;
  if constexpr (std::is_same_v<E, bf16>) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    const float2 back = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(x - back.x, y - back.y);
    std::memcpy(&high, &h, 4);
    std::memcpy(&low, &l, 4);
  } else {
    const __half2 h = __floats2half2_rn(x, y);
    const float2 back = __half22float2(h);
    const __half2 l = __floats2half2_rn(x - back.x, y - back.y);
    std::memcpy(&high, &h, 4);
    std::memcpy(&low, &l, 4);
  }
  rest = low;
  return high;
}

/// Which of a step's attended blocks one attention launch covers. A step that overlaps its transfers attends
/// the blocks that were resident before the step while the gather runs, then the blocks it loaded.
enum class attend_part : int {
  all,       ///< every attended block
  resident,  ///< the selection minus this step's misses (offload store)
  loaded,    ///< this step's misses, once the gather has loaded them (offload store)
};

/// Grid (batch rows x KV heads, splits), `mma_warps` warps, `mma_attention_smem_bytes<D>()` bytes of
/// dynamic shared memory. Same contract as `attention_kernel`: CTA (r, x) leaves the partial softmax (max,
/// sum, weighted V sums) of the group's heads over its contiguous share of the blocks of `part`, as split
/// `split_base + x`.
///
/// Fragment layout (lane = 4 g + c): the accumulator of a 16 x 8 tile holds rows g and g + 8 (query heads),
/// columns 2c and 2c + 1; so each thread keeps the running max and sum of heads g and g + 8, and the four
/// threads of a quad reduce them together.
template <class P, class E, int D>
__global__ void __launch_bounds__(mma_warps * 32)
    attention_mma_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<const E, 3> q,
                         attend_part part = attend_part::all, int split_base = 0) {
  static_assert(uses_mma_attention<E, D>);
  if (*s.status != 0) return;
  using attention = typename P::attention;
  constexpr bool offloads = P::store::offloads;
  constexpr bool biased = attention::bias != bias_mode::none;
  constexpr int R = mma_tile_rows;
  constexpr int chunks = D / 8;          // 16-byte pieces of a row
  constexpr int k_steps = D / 16;        // k steps of Q.K^T
  constexpr int n_tiles = D / 8;         // 8-column tiles of the output
  constexpr std::size_t stage_bytes = mma_stage_bytes<D>();  // K tile, V tile, scores
  extern __shared__ __align__(16) unsigned char smem[];
  // Where each block of this CTA's share lives (slot or page) and which block it is, resolved once so that
  // the copies of a tile need no dependent global load.
  __shared__ std::int32_t share_block[cuda_max_top_k];
  __shared__ std::int32_t share_place[cuda_max_top_k];
  __shared__ std::int32_t part_list[cuda_max_top_k];  // the resident part of the selection
  __shared__ std::int32_t part_missed[cuda_max_top_k];  // this step's misses, to filter it
  __shared__ int part_count;

  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int split = blockIdx.y, splits = gridDim.y;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + 1;
  const int group = s.group;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4;
  const float scale = softmax_scale(D);
  const selection_params& sel = s.sel;

  // The list of blocks this launch attends: the selection (or every block), this step's misses, or the
  // selection without them, compacted in rank order by warp 0.
  const std::int32_t* chosen = s.selection_of(seq, h);
  int n = 0;
  if (part == attend_part::all) {
    n = attended_blocks<P>(s, seq, h, length);
  } else if (part == attend_part::loaded) {
    n = s.step_misses[s.sh(seq, h)];
    chosen = s.misses_of(seq, h);
  } else {
    const int nm = s.step_misses[s.sh(seq, h)];
    for (int j = threadIdx.x; j < nm; j += blockDim.x) part_missed[j] = s.misses_of(seq, h)[j];
    __syncthreads();
    if (warp == 0) {
      const int count = s.selection_count[s.sh(seq, h)];
      const std::int32_t* missed = part_missed;
      int kept = 0;
      for (int i0 = 0; i0 < count; i0 += 32) {
        const int i = i0 + lane;
        const int m = i < count ? chosen[i] : -1;
        bool keep = i < count;
        for (int j = 0; j < nm && keep; ++j) keep = missed[j] != m;
        const unsigned mask = __ballot_sync(0xffffffffu, keep);
        if (keep) part_list[kept + __popc(mask & ((1u << lane) - 1u))] = m;
        kept += __popc(mask);
      }
      if (lane == 0) part_count = kept;
    }
    __syncthreads();
    n = part_count;
    chosen = part_list;
  }
  const bool indexed = P::dense && part == attend_part::all;  // entry i is block i

  // This CTA's share of the list, as tiles of R rows (a block's last tile may be partial).
  const split_share share = share_of(n, split, splits, sel.block_size, R);
  const int first_i = share.first, tiles_per_block = share.tiles_per_block, cta_tiles = share.tiles;
  const int my_tiles = cta_tiles > warp ? (cta_tiles - warp + mma_warps - 1) / mma_warps : 0;
  const float* c_state = s.scores_of(seq, h);
  const int share_blocks = share.last - share.first;
  const bool cached = share_blocks <= cuda_max_top_k;  // always for sparse attention (k <= 256)
  const auto place_of = [&](int m) {
    if constexpr (offloads) {
      return s.block_slot_of(seq, h)[m];
    } else {
      return s.table(seq)[m];
    }
  };
  if (cached) {
    for (int i = threadIdx.x; i < share_blocks; i += blockDim.x) {
      const int m = indexed ? share.first + i : chosen[share.first + i];
      share_block[i] = m;
      share_place[i] = place_of(m);
    }
  }
  __syncthreads();

  struct tile_source {
    const E* keys;
    const E* values;
    int token;  // position of the tile's first row
    int rows;   // valid rows, 0..R
  };
  const auto locate = [&](int tile) {
    const int i = tile / tiles_per_block;
    const int m = cached ? share_block[i] : (indexed ? first_i + i : chosen[first_i + i]);
    const int place = cached ? share_place[i] : place_of(m);
    const int r0 = (tile % tiles_per_block) * R;
    const int first = m * sel.block_size;
    const int in_block = sel.block_size < length - first ? sel.block_size : length - first;
    tile_source t;
    if constexpr (offloads) {
      t.keys = s.slot_k(seq, h, place);
      t.values = s.slot_v(seq, h, place);
    } else {
      t.keys = s.page_k(place, h);
      t.values = s.page_v(place, h);
    }
    t.keys += std::size_t(r0) * D;
    t.values += std::size_t(r0) * D;
    t.token = first + r0;
    const int rows = in_block - r0;
    t.rows = rows < 0 ? 0 : (rows > R ? R : rows);
    return t;
  };

  // Shared memory: row `row`'s 16-byte piece `ch` lives at piece `ch ^ (row % 8)`; a stage is the K tile,
  // the V tile, then the R eviction scores of the tile's tokens (when the bias uses them).
  unsigned char* stages = smem + std::size_t(warp) * mma_stages * stage_bytes;
  const auto stage_keys = [&](int it) { return reinterpret_cast<E*>(stages + (it % mma_stages) * stage_bytes); };
  const auto stage_scores = [&](int it) { return reinterpret_cast<float*>(stage_keys(it) + 2 * R * D); };
  const auto piece = [](const E* base, int row, int ch) { return base + row * D + ((ch ^ (row % 8)) * 8); };
  const auto issue = [&](int it) {
    const tile_source t = locate(warp + it * mma_warps);
    E* dst = stage_keys(it);
#pragma unroll
    for (int i = lane; i < 2 * R * chunks; i += 32) {
      const int is_v = i / (R * chunks), row = (i / chunks) % R, ch = i % chunks;
      const bool valid = row < t.rows;
      const E* src = (is_v ? t.values : t.keys) + row * D + ch * 8;
      cp_async_16(shared_address(piece(dst + is_v * R * D, row, ch)), valid ? src : t.keys, valid);
    }
    if (biased && lane < R) {
      const bool valid = lane < t.rows;
      cp_async_4(shared_address(stage_scores(it) + lane), valid ? c_state + t.token + lane : c_state, valid);
    }
  };

  float o[n_tiles][4];
#pragma unroll
  for (int j = 0; j < n_tiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float run_max[2] = {negative_infinity, negative_infinity};
  float run_sum[2] = {0.0f, 0.0f};

#pragma unroll
  for (int it = 0; it < mma_stages - 1; ++it) {
    if (it < my_tiles) issue(it);
    cp_async_commit();
  }

  // The group's queries as A fragments (rows past the group are zero), loaded while the first tiles arrive.
  std::uint32_t qa[k_steps][4];
#pragma unroll
  for (int kt = 0; kt < k_steps; ++kt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i & 1) * 8, col = kt * 16 + 2 * c + (i >> 1) * 8;
      const E x = row < group ? q(b, h * group + row, col) : E{};
      const E y = row < group ? q(b, h * group + row, col + 1) : E{};
      qa[kt][i] = pack_elements(x, y);
    }
  }

  for (int it = 0; it < my_tiles; ++it) {
    if (it + mma_stages - 1 < my_tiles) issue(it + mma_stages - 1);
    cp_async_commit();
    cp_async_wait<mma_stages - 1>();
    __syncwarp();
    const int tile = warp + it * mma_warps;
    const int tile_rows = locate(tile).rows;
    const E* ks = stage_keys(it);
    const E* vs = ks + R * D;
    const float* scores = stage_scores(it);

    // S = Q K^T for the tile's 16 key rows: two 16 x 8 tiles.
    float sc[2][4] = {};
#pragma unroll
    for (int kt = 0; kt < k_steps; ++kt) {
      const int mat = lane / 8, row = (mat >> 1) * 8 + lane % 8, ch = 2 * kt + (mat & 1);
      std::uint32_t kb[4];
      ldmatrix_x4(shared_address(piece(ks, row, ch)), kb);
      mma_16816<E>(sc[0], qa[kt], kb[0], kb[1]);
      mma_16816<E>(sc[1], qa[kt], kb[2], kb[3]);
    }

    // Logits and the running softmax of heads g (i = 0) and g + 8 (i = 1).
    float tile_max[2] = {negative_infinity, negative_infinity};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + 2 * c + (e & 1);
        float l = negative_infinity;
        if (key < tile_rows) l = attention::logit(sc[nt][e], biased ? scores[key] : 0.0f, scale);
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
      if (new_max != negative_infinity) rescale[i] = run_max[i] == negative_infinity ? 0.0f : expf(run_max[i] - new_max);
      run_max[i] = new_max;
    }
    float tile_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
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
      o[j][0] *= rescale[0];
      o[j][1] *= rescale[0];
      o[j][2] *= rescale[1];
      o[j][3] *= rescale[1];
    }

    // O += P V, with P split into a high and a low 16-bit part.
    std::uint32_t pa[4], pr[4];
    pa[0] = pack_split<E>(sc[0][0], sc[0][1], pr[0]);
    pa[1] = pack_split<E>(sc[0][2], sc[0][3], pr[1]);
    pa[2] = pack_split<E>(sc[1][0], sc[1][1], pr[2]);
    pa[3] = pack_split<E>(sc[1][2], sc[1][3], pr[3]);
#pragma unroll
    for (int np = 0; np < n_tiles / 2; ++np) {
      const int mat = lane / 8, row = (mat & 1) * 8 + lane % 8, ch = 2 * np + (mat >> 1);
      std::uint32_t vb[4];
      ldmatrix_x4_trans(shared_address(piece(vs, row, ch)), vb);
      mma_16816<E>(o[2 * np], pa, vb[0], vb[1]);
      mma_16816<E>(o[2 * np], pr, vb[0], vb[1]);
      mma_16816<E>(o[2 * np + 1], pa, vb[2], vb[3]);
      mma_16816<E>(o[2 * np + 1], pr, vb[2], vb[3]);
    }
    __syncwarp();  // the stage is refilled by the next iteration's copies
  }
  cp_async_wait<0>();

  // Each quad's partial sums make the row sums.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 1);
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 2);
  }

  // Combine the warps in warp order (the result does not depend on timing).
  __syncthreads();  // every warp is done with its pipeline
  float* w_acc = reinterpret_cast<float*>(smem);  // [warps][16][D]
  float* w_max = w_acc + mma_warps * 16 * D;       // [warps][16]
  float* w_sum = w_max + mma_warps * 16;           // [warps][16]
#pragma unroll
  for (int j = 0; j < n_tiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, col = j * 8 + 2 * c + (e & 1);
      w_acc[(warp * 16 + row) * D + col] = o[j][e];
    }
  }
  if (c == 0) {
    w_max[warp * 16 + g] = run_max[0];
    w_max[warp * 16 + g + 8] = run_max[1];
    w_sum[warp * 16 + g] = run_sum[0];
    w_sum[warp * 16 + g + 8] = run_sum[1];
  }
  __syncthreads();
  float* out_acc = s.acc_of(seq, h, split_base + split);
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    const int row = i / D;
    float m = negative_infinity;
    for (int w = 0; w < mma_warps; ++w) m = max_keep_left(m, w_max[w * 16 + row]);
    float acc = 0.0f;
    for (int w = 0; w < mma_warps; ++w) {
      const float wm = w_max[w * 16 + row];
      if (wm != negative_infinity) acc += w_acc[(w * 16 + row) * D + i % D] * expf(wm - m);
    }
    out_acc[i] = acc;
  }
  if (threadIdx.x < group) {
    const int row = threadIdx.x;
    float m = negative_infinity;
    for (int w = 0; w < mma_warps; ++w) m = max_keep_left(m, w_max[w * 16 + row]);
    float sum = 0.0f;
    for (int w = 0; w < mma_warps; ++w) {
      const float wm = w_max[w * 16 + row];
      if (wm != negative_infinity) sum += w_sum[w * 16 + row] * expf(wm - m);
    }
    s.stats_of(seq, h, split_base + split)[2 * row] = m;
    s.stats_of(seq, h, split_base + split)[2 * row + 1] = sum;
  }
}

}  // namespace nosa::detail
