#pragma once
/// \file
/// Step stage 7 with a quantized KV format (FP8 E4M3, spec §6b): attention that reads the codes of complete
/// blocks directly and the current block from its tail buffer in the element type, leaving per split the
/// same partial softmax as the element-type kernels, which `merge_kernel` combines.
///
/// `attention_fp8_kernel` runs on tensor cores (bf16, fp16; D 64, 128): the group padded to 16 is the M of
/// `mma.m16n8k16` (Q K^T, then P V, fp32 accumulation), as in the element-type kernel. A CTA streams 64-row
/// tiles of K and V codes and the eviction scores through a `cp.async` pipeline into shared memory (half the
/// bytes of an element-type tile, so twice the stages in the same space), and each warp converts its 16 rows'
/// codes in registers right before the `mma` (E4M3 is exact in bf16 and fp16): K codes to the element type,
/// V codes to fp16 (see "Precision").
/// Each block's fp32 scales are applied once per tile, in fp32, to the products of its codes: the K scale to
/// the dot products, the V scale to the tile's P V, which each 8-column output tile sums in a fragment of its
/// own before it is added to the accumulator. The softmax weights P themselves are never scaled. The current
/// block, in the element type, is read from global memory into the same fragments when its tile comes.
///
/// Operand layouts. There is no `ldmatrix` for 8-bit data on sm_90, so each thread reads its fragments' codes
/// from shared memory itself, and two permutations make those reads 16-byte words:
///  - Q K^T sums over the head dimension, so any permutation of it applied to Q and K alike leaves the dot
///    products unchanged. The k index `k` of k step `kt` (thread quad column `c = k % 8 / 2`, pair member
///    `j = k % 2 + 2 (k / 8)`) is column `64 (kt / 4) + 16 c + 4 (kt % 4) + j` of Q and K: one 16-byte word
///    of a key row holds a thread's codes for four k steps.
///  - P V's output column `n` of 8-column tile `j` is column `n (D / 8) + j` of V and of the output: a thread
///    reads `D / 8` consecutive codes of each of its four key rows.
/// The rows of both tiles are swizzled in 16-byte pieces so that those reads are free of bank conflicts.
///
/// Precision. The host backend, the reference, computes in fp32 with every value dequantised
/// (`code * scale`), so each of its products and sums is exact to 2^-24 relative; this kernel matches that:
///  - Q K^T: Q (element type) and the codes (exact in bf16 and fp16) multiply exactly, the products
///    accumulate in fp32, and the K scale multiplies the sum once: `(sum q code) * s_K` against the host's
///    `sum q (code * s_K)`, the same value within fp32 accumulation error.
///  - P V: the weights P = exp(logit - max) are fp32 in (0, 1] and the tensor cores take 16-bit operands,
///    so P is split into parts whose sum carries about 24 bits. The codes convert exactly to fp16 as well
///    as to bf16, so a complete block's P V runs in fp16 whatever the element type: P * 2^15 (at most 32768,
///    finite in fp16) is split into a high fp16 part and the rounded remainder, 11 + 11 significant bits, an
///    error of at most 2^-23 of P, where bf16 parts (8 + 8 bits) leave up to 2^-16. The factor 2^15 keeps
///    the remainder a normal fp16 number down to P of about 2^-18; below, both parts round to fp16's
///    smallest spacing 2^-24, which is 2^-39 of P: far below fp32's resolution at the tile's largest weight
///    (P = 1). The tile's P V is summed in its own fp32 fragment, then multiplied by 2^-15 (exact) and by
///    the V scale in one `fma` into the accumulator. The current block's V is bf16 or fp16: fp16 takes the
///    same path with scale 1; bf16 V cannot enter an fp16 product, so P is split into three bf16 parts
///    (8 + 8 + 8 bits, fp32's range: no scaling) and all three multiply V.
///    Scaling P by the V scale before splitting it into two parts of the element type would lose those
///    bits: in fp16 a scale s makes P s subnormal below 2^-14 (s = 0.008, a block whose largest value is
///    3.5, leaves the low part an absolute resolution of 2^-25 / s, about 4e-6 of P; a scale below 2^-14
///    leaves the high part only a few bits), and bf16 parts keep 16 bits whatever the scale, an error of up
///    to 2^-16 (1.5e-5) of every weight, which |V| multiplies: at |V| = 1 most of the 2e-5 absolute
///    tolerance of the comparison with the host backend, and far more where large values cancel.
///  - The sum of P stays fp32 and unscaled, and the running max, the sum and the accumulator are rescaled
///    together by the same factors as in the element-type kernel; the scales never touch them.
/// So the two backends agree within fp32 rounding of the logits and the sums. Where large V values cancel to
/// a small output, that rounding (2^-24 of |logit| moves P by as much) is amplified by |V| / |output| on
/// both backends alike.
///
/// A NaN code (only a NaN input makes one) reads as 480 instead of NaN.

#include <nosa/attention/sparse_attention.hpp>
#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/math.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace nosa::detail {

/// True when `attention_fp8_kernel` handles this element type and head dimension (the FP8 KV format runs on
/// the CUDA backend for these only).
template <class E, int D>
inline constexpr bool uses_fp8_attention = is_16bit_element<E> && (D == 64 || D == 128);

/// Key rows of one pipeline stage of `attention_fp8_kernel`.
inline constexpr int fp8_tile_rows = 64;
/// Warps of an FP8 attention CTA; warp w computes rows 16w .. 16w + 15 of every tile.
inline constexpr int fp8_attention_warps = 4;

/// Bytes of one pipeline stage: a tile of K codes, a tile of V codes and the tile's eviction scores.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t fp8_stage_bytes() {
  return std::size_t(2) * fp8_tile_rows * D + fp8_tile_rows * sizeof(float);
}
/// Stages of the pipeline: about 96 KiB (two CTAs an SM), 3 to 8 stages.
template <int D>
NOSA_HOST_DEVICE constexpr int fp8_stages() {
  const int n = static_cast<int>(99 * 1024 / fp8_stage_bytes<D>());
  return n < 3 ? 3 : (n > 8 ? 8 : n);
}
/// Row stride (floats) of the warps' partial sums when they are combined.
template <int D>
NOSA_HOST_DEVICE constexpr int fp8_combine_stride() {
  return D + 4;
}
/// Dynamic shared memory of `attention_fp8_kernel<P, E, D>`: the pipeline, reused to combine the warps.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t fp8_attention_smem_bytes() {
  const std::size_t pipeline = std::size_t(fp8_stages<D>()) * fp8_stage_bytes<D>();
  const std::size_t combine =
      (std::size_t(fp8_attention_warps) * 16 * fp8_combine_stride<D>() + 2 * fp8_attention_warps * 16) *
      sizeof(float);
  return pipeline > combine ? pipeline : combine;
}

/// Two E4M3 codes, in bytes 0 and 2 of `t` (bytes 1 and 3 are ignored), as two elements of type E in one
/// 32-bit operand register (byte 0's in the low half). Exact: the code's exponent and mantissa bits are
/// placed in E's fields, which gives the value times 2^-8 (fp16) or 2^-120 (bf16), subnormal codes included,
/// and one multiplication by that power of two, exact too, restores it.
template <class E>
__device__ inline std::uint32_t e4m3_pair_to(std::uint32_t t) {
  std::uint32_t r;
  if constexpr (std::is_same_v<E, bf16>) {
    const std::uint32_t bits = ((t << 8) & 0x80008000u) | ((t << 4) & 0x07f007f0u);
    const std::uint32_t two_120 = 0x7b807b80u;  // 2^120 in both halves
    asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(bits), "r"(two_120));
  } else {
    const std::uint32_t bits = ((t << 8) & 0x80008000u) | ((t << 7) & 0x3f803f80u);
    const std::uint32_t two_8 = 0x5c005c00u;  // 256 in both halves
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(bits), "r"(two_8));
  }
  return r;
}

/// Byte offset of 16-byte piece `ch` of row `r` in a tile of K codes (rows of D bytes): odd rows swap the
/// two halves of each 128-byte line, so the two rows of one quarter-warp read hit distinct banks.
template <int D>
__device__ inline std::uint32_t fp8_key_offset(int r, int ch) {
  constexpr int pieces = D / 16;
  const int swizzle = pieces >= 8 ? (r & 1) << 2 : 0;
  return std::uint32_t(r * D + (ch ^ swizzle) * 16);
}
/// The same for a tile of V codes: rows 2i, 2i + 2, 2i + 4, 2i + 6 (read together) move their pieces apart.
template <int D>
__device__ inline std::uint32_t fp8_value_offset(int r, int ch) {
  constexpr int pieces = D / 16;
  return std::uint32_t(r * D + (ch ^ (r & 6 & (pieces - 1))) * 16);
}

/// Column of Q and K that pair member `j` (0..3: k indices 2c, 2c + 1, 2c + 8, 2c + 9) of quad column `c` at
/// k step `kt` is (see the file comment).
struct fp8_qk_columns {
  __device__ int operator()(int kt, int c, int j) const { return 64 * (kt / 4) + 16 * c + 4 * (kt % 4) + j; }
};

/// The entries `first .. last-1` of a list of `n` attended blocks that split `split` of `splits` covers, cut
/// into tiles of `fp8_tile_rows` rows (a block's last tile may be partial).
struct fp8_share {
  int first, last, tiles_per_block, tiles;
};
__device__ inline fp8_share fp8_share_of(int n, int split, int splits, int block_size) {
  const int per = (n + splits - 1) / splits;
  fp8_share r;
  r.first = split * per;
  r.last = r.first + per < n ? r.first + per : n;
  r.tiles_per_block = (block_size + fp8_tile_rows - 1) / fp8_tile_rows;
  r.tiles = r.last > r.first ? (r.last - r.first) * r.tiles_per_block : 0;
  return r;
}

/// The factor the softmax weights P (at most 1) are multiplied by before they are split into fp16 parts: the
/// largest power of two that keeps P = 1 finite in fp16 (65504), so that the low part stays a normal fp16
/// number down to P of about 2^-18 (see "Precision" in the file comment).
inline constexpr float fp8_weight_prescale = 32768.0f;
/// Its inverse, applied (exactly) to each tile's P V.
inline constexpr float fp8_weight_unscale = 1.0f / 32768.0f;

/// The A fragments of P (`p[nt][e]`: 16 x 8 tile nt of the accumulator layout) times
/// `fp8_weight_prescale`, as a high fp16 part `hi` and the rounded remainder `lo`: together 22 significant
/// bits of each weight.
__device__ inline void fp8_split_weights(const float (&p)[2][4], std::uint32_t (&hi)[4], std::uint32_t (&lo)[4]) {
  constexpr float s = fp8_weight_prescale;
  hi[0] = pack_split<fp16>(p[0][0] * s, p[0][1] * s, lo[0]);
  hi[1] = pack_split<fp16>(p[0][2] * s, p[0][3] * s, lo[1]);
  hi[2] = pack_split<fp16>(p[1][0] * s, p[1][1] * s, lo[2]);
  hi[3] = pack_split<fp16>(p[1][2] * s, p[1][3] * s, lo[3]);
}

/// Two fp32 values as three bf16 pairs (x in the low halves): x = hi + mid + lo to 24 significant bits,
/// without scaling (bf16 has fp32's range).
__device__ inline void fp8_split3_pair(float x, float y, std::uint32_t& hi, std::uint32_t& mid, std::uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hb = __bfloat1622float2(h);
  const float rx = x - hb.x, ry = y - hb.y;  // exact
  const __nv_bfloat162 m = __floats2bfloat162_rn(rx, ry);
  const float2 mb = __bfloat1622float2(m);
  const __nv_bfloat162 l = __floats2bfloat162_rn(rx - mb.x, ry - mb.y);  // the differences are exact
  std::memcpy(&hi, &h, 4);
  std::memcpy(&mid, &m, 4);
  std::memcpy(&lo, &l, 4);
}
/// The A fragments of P in three bf16 parts, for the current block's bf16 V.
__device__ inline void fp8_split3_bf16(const float (&p)[2][4], std::uint32_t (&hi)[4], std::uint32_t (&mid)[4],
                                       std::uint32_t (&lo)[4]) {
  fp8_split3_pair(p[0][0], p[0][1], hi[0], mid[0], lo[0]);
  fp8_split3_pair(p[0][2], p[0][3], hi[1], mid[1], lo[1]);
  fp8_split3_pair(p[1][0], p[1][1], hi[2], mid[2], lo[2]);
  fp8_split3_pair(p[1][2], p[1][3], hi[3], mid[3], lo[3]);
}

/// Grid (batch rows x KV heads, splits), `fp8_attention_warps` warps, `fp8_attention_smem_bytes<D>()` bytes
/// of dynamic shared memory. CTA (r, x) leaves the partial softmax (max, sum, weighted V sums) of the group's
/// heads over its contiguous share of the attended blocks (the selection in rank order, or every block for
/// full attention) as split x of the grid's splits: complete blocks from their FP8 codes (slot or page) and
/// scales, the current block from its tail buffer.
///
/// Fragment layout (lane = 4 g + c): the accumulator of a 16 x 8 tile holds rows g and g + 8 (query heads),
/// columns 2c and 2c + 1; so each thread keeps the running max and sum of heads g and g + 8.
template <class P, class E, int D>
__global__ void __launch_bounds__(fp8_attention_warps * 32)
    attention_fp8_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<const E, 3> q) {
  static_assert(uses_fp8_attention<E, D>);
  if (*s.status != 0) return;
  using attention = typename P::attention;
  constexpr bool offloads = P::store::offloads;
  constexpr bool biased = attention::bias != bias_mode::none;
  constexpr int R = fp8_tile_rows;
  constexpr int threads = fp8_attention_warps * 32;
  constexpr int pieces = D / 16;  // 16-byte pieces of a row of codes
  constexpr int k_steps = D / 16;
  constexpr int n_tiles = D / 8;  // 8-column tiles of the output
  constexpr int cols = D / 8;     // codes of one key row a thread reads for P V
  constexpr int stages = fp8_stages<D>();
  constexpr std::size_t stage_bytes = fp8_stage_bytes<D>();
  constexpr int ring = 128;  // entries of the place ring, filled 64 at a time
  static_assert((R * pieces) % threads == 0, "whole pieces per thread");
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ std::int32_t ring_block[ring];  // block of list entry i, at i % ring
  // Its slot (offload store) or page (resident store); -1 for the current block.
  __shared__ std::int32_t ring_place[ring];
  __shared__ float ring_key_scale[ring];
  __shared__ float ring_value_scale[ring];

  const int b = blockIdx.x / s.kv_heads, h = blockIdx.x % s.kv_heads;
  const int split = blockIdx.y, splits = gridDim.y;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + 1;
  const int group = s.group;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4;
  const float scale = softmax_scale(D);
  const selection_params& sel = s.sel;
  const int current = (length - 1) / sel.block_size;  // in the element type, in the tail buffer

  const std::int32_t* chosen = s.selection_of(seq, h);
  const int n = P::dense ? block_count(length, sel) : s.selection_count[s.sh(seq, h)];
  const fp8_share share = fp8_share_of(n, split, splits, sel.block_size);
  const int tiles_per_block = share.tiles_per_block, cta_tiles = share.tiles;
  const int entries = share.last - share.first;
  // Entries [base, base + 64) of the share into the ring: block, place and scales, resolved long before use.
  const auto fill_ring = [&](int base) {
    const int i = base + static_cast<int>(threadIdx.x);
    if (threadIdx.x < ring / 2 && i < entries) {
      const int m = P::dense ? share.first + i : chosen[share.first + i];
      int place = -1;
      float ks = 1.0f, vs = 1.0f;
      if (m != current) {
        if constexpr (offloads) {
          place = s.block_slot_of(seq, h)[m];
          ks = *s.slot_k_scale(seq, h, place);
          vs = *s.slot_v_scale(seq, h, place);
        } else {
          place = s.table(seq)[m];
          ks = *s.page_k_scale(place, h);
          vs = *s.page_v_scale(place, h);
        }
      }
      ring_block[i % ring] = m;
      ring_place[i % ring] = place;
      ring_key_scale[i % ring] = ks;
      ring_value_scale[i % ring] = vs;
    }
  };
  fill_ring(0);
  fill_ring(ring / 2);
  __syncthreads();

  const float* c_state = s.scores_of(seq, h);
  // Where tile t's rows are, how many hold tokens of the sequence (the current block is partial), and its
  // block's scales.
  struct tile_source {
    const fp8_e4m3* keys;  // codes, or null for the current block
    const fp8_e4m3* values;
    const E* exact_keys;  // the current block's rows in the element type
    const E* exact_values;
    int token;  // position of the tile's first row
    int rows;   // valid rows, 0..R
    float key_scale, value_scale;
  };
  const auto locate = [&](int t) {
    const int i = t / tiles_per_block;
    const int m = ring_block[i % ring];
    const int place = ring_place[i % ring];
    const int r0 = (t % tiles_per_block) * R;
    const int first = m * sel.block_size;
    const int in_block = sel.block_size < length - first ? sel.block_size : length - first;
    tile_source src{};
    if (place < 0) {
      src.exact_keys = s.tail_k(seq, h) + std::size_t(r0) * D;
      src.exact_values = s.tail_v(seq, h) + std::size_t(r0) * D;
    } else if constexpr (offloads) {
      src.keys = s.slot_k_codes(seq, h, place) + std::size_t(r0) * D;
      src.values = s.slot_v_codes(seq, h, place) + std::size_t(r0) * D;
    } else {
      src.keys = s.page_k_codes(place, h) + std::size_t(r0) * D;
      src.values = s.page_v_codes(place, h) + std::size_t(r0) * D;
    }
    src.token = first + r0;
    const int rows = in_block - r0;
    src.rows = rows < 0 ? 0 : (rows > R ? R : rows);
    src.key_scale = ring_key_scale[i % ring];
    src.value_scale = ring_value_scale[i % ring];
    return src;
  };
  // A stage: the tile of K codes, the tile of V codes (rows swizzled), then the R eviction scores. The
  // current block's tile copies only its scores; its rows are read from global memory when it is computed.
  const auto stage_of = [&](int t) { return smem + (t % stages) * stage_bytes; };
  const auto issue = [&](int t) {
    const tile_source src = locate(t);
    unsigned char* dst = stage_of(t);
    if (src.keys != nullptr) {
#pragma unroll
      for (int j = 0; j < R * pieces / threads; ++j) {
        const int idx = static_cast<int>(threadIdx.x) + j * threads;
        const int r = idx / pieces, ch = idx % pieces;
        const bool valid = r < src.rows;
        const std::size_t at = std::size_t(r) * D + ch * 16;
        cp_async_16(shared_address(dst + fp8_key_offset<D>(r, ch)), valid ? src.keys + at : src.keys, valid);
        cp_async_16(shared_address(dst + R * D + fp8_value_offset<D>(r, ch)),
                    valid ? src.values + at : src.values, valid);
      }
    }
    if (biased && threadIdx.x < R / 4) {
      // Four scores a copy; a partly valid piece reads scores past the sequence (within its capacity), which
      // the logits mask.
      const bool valid = static_cast<int>(threadIdx.x) * 4 < src.rows;
      cp_async_16(shared_address(dst + 2 * R * D + threadIdx.x * 16),
                  valid ? c_state + src.token + threadIdx.x * 4 : c_state, valid);
    }
  };

  float o[n_tiles][4];
#pragma unroll
  for (int j = 0; j < n_tiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float run_max[2] = {negative_infinity, negative_infinity};
  float run_sum[2] = {0.0f, 0.0f};

#pragma unroll
  for (int t = 0; t < stages - 1; ++t) {
    if (t < cta_tiles) issue(t);
    cp_async_commit();
  }
  // The group's queries as A fragments (head dimension permuted), loaded while the first tiles arrive.
  std::uint32_t qa[k_steps][4];
  load_query_fragments<E, D>(q, b, h, group, qa, fp8_qk_columns{});

  for (int it = 0; it < cta_tiles; ++it) {
    cp_async_wait<stages - 2>();
    __syncthreads();  // tile `it` has landed for every thread; every warp is done with tile it - 1
    const int entry = it / tiles_per_block;
    if (it % tiles_per_block == 0 && entry % (ring / 2) == 0 && entry > 0) fill_ring(entry + ring / 2);
    if (it + stages - 1 < cta_tiles) issue(it + stages - 1);
    cp_async_commit();
    const tile_source src = locate(it);
    const int rows = src.rows - warp * 16;  // this warp's valid rows of the tile
    if (rows <= 0) continue;
    const bool exact = src.keys == nullptr;
    const unsigned char* st = stage_of(it);
    const unsigned char* key_codes = st;
    const unsigned char* value_codes = st + R * D;
    const float* scores = reinterpret_cast<const float*>(st + 2 * R * D) + warp * 16;

    // S = Q K^T for this warp's 16 key rows: two 16 x 8 tiles, the even and odd k steps in separate
    // accumulators, added at the end. Thread (g, c) reads key row 8 nt + g: one 16-byte word of codes (or of
    // 16 elements, two words) per four k steps.
    float sc[2][4], half[2][2][4] = {};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int row = warp * 16 + nt * 8 + g;
#pragma unroll
      for (int quad = 0; quad < D / 64; ++quad) {
        std::uint32_t kb[4][2];  // k step 4 quad + i: the B registers
        if (exact) {
          uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
          if (row < src.rows) {
            const uint4* p =
                reinterpret_cast<const uint4*>(src.exact_keys + std::size_t(row) * D + 64 * quad + 16 * c);
            lo = p[0];
            hi = p[1];
          }
          const std::uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) kb[i][0] = w[2 * i], kb[i][1] = w[2 * i + 1];
        } else {
          const uint4 v = *reinterpret_cast<const uint4*>(key_codes + fp8_key_offset<D>(row, 4 * quad + c));
          const std::uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            kb[i][0] = e4m3_pair_to<E>(__byte_perm(w[i], 0u, 0x0100u));  // codes 0, 1
            kb[i][1] = e4m3_pair_to<E>(__byte_perm(w[i], 0u, 0x0302u));  // codes 2, 3
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int kt = 4 * quad + i;
          mma_16816<E>(half[kt & 1][nt], qa[kt], kb[i][0], kb[i][1]);
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[nt][e] = (half[0][nt][e] + half[1][nt][e]) * src.key_scale;
    }

    // Logits and the running softmax of heads g (i = 0) and g + 8 (i = 1).
    float tile_max[2] = {negative_infinity, negative_infinity};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + 2 * c + (e & 1);
        float l = negative_infinity;
        if (key < rows) l = attention::logit(sc[nt][e], biased ? scores[key] : 0.0f, scale);
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
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float m = run_max[e >> 1];
        const float p = m == negative_infinity ? 0.0f : expf(sc[nt][e] - m);
        tile_sum[e >> 1] += p;
        sc[nt][e] = p;  // unscaled: the block's V scale multiplies the tile's P V (below)
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) run_sum[i] = run_sum[i] * rescale[i] + tile_sum[i];
    if (rescale[0] != 1.0f || rescale[1] != 1.0f) {
#pragma unroll
      for (int j = 0; j < n_tiles; ++j) {
        o[j][0] *= rescale[0];
        o[j][1] *= rescale[0];
        o[j][2] *= rescale[1];
        o[j][3] *= rescale[1];
      }
    }

    // O += P V (see "Precision" in the file comment). Thread (g, c) reads key rows 2c, 2c + 1, 2c + 8 and
    // 2c + 9 of the warp's 16, columns g D/8 .. g D/8 + D/8 - 1 (output columns g of every tile).
    const int key_rows[4] = {2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9};
    if (exact) {
      // The current block in the element type (its scale is 1): cols elements of each row, D/8 * 2 bytes,
      // one or two 16-byte words.
      constexpr int words = cols / 2;
      std::uint32_t vw[4][words];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int row = warp * 16 + key_rows[k];
#pragma unroll
        for (int w = 0; w < words; ++w) vw[k][w] = 0u;
        if (row < src.rows) {
          const uint4* p = reinterpret_cast<const uint4*>(src.exact_values + std::size_t(row) * D + g * cols);
#pragma unroll
          for (int w = 0; w < words / 4; ++w) {
            const uint4 x = p[w];
            vw[k][4 * w] = x.x, vw[k][4 * w + 1] = x.y, vw[k][4 * w + 2] = x.z, vw[k][4 * w + 3] = x.w;
          }
        }
      }
      if constexpr (std::is_same_v<E, bf16>) {
        // bf16 V: P in three bf16 parts, straight into the accumulator.
        std::uint32_t pa[4], pm[4], pr[4];
        fp8_split3_bf16(sc, pa, pm, pr);
#pragma unroll
        for (int j = 0; j < n_tiles; ++j) {
          // Element j of each row: the low (j even) or high half of word j / 2.
          const std::uint32_t sel_pair = j % 2 == 0 ? 0x5410u : 0x7632u;
          const std::uint32_t b0 = __byte_perm(vw[0][j / 2], vw[1][j / 2], sel_pair);
          const std::uint32_t b1 = __byte_perm(vw[2][j / 2], vw[3][j / 2], sel_pair);
          mma_16816<bf16>(o[j], pa, b0, b1);
          mma_16816<bf16>(o[j], pm, b0, b1);
          mma_16816<bf16>(o[j], pr, b0, b1);
        }
      } else {
        // fp16 V: as the codes below, with scale 1.
        std::uint32_t pa[4], pr[4];
        fp8_split_weights(sc, pa, pr);
#pragma unroll
        for (int j = 0; j < n_tiles; ++j) {
          const std::uint32_t sel_pair = j % 2 == 0 ? 0x5410u : 0x7632u;
          const std::uint32_t b0 = __byte_perm(vw[0][j / 2], vw[1][j / 2], sel_pair);
          const std::uint32_t b1 = __byte_perm(vw[2][j / 2], vw[3][j / 2], sel_pair);
          float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          mma_16816<fp16>(t, pa, b0, b1);
          mma_16816<fp16>(t, pr, b0, b1);
#pragma unroll
          for (int e = 0; e < 4; ++e) o[j][e] += t[e] * fp8_weight_unscale;
        }
      }
    } else {
      // Codes: cols of each row, 16 bytes (D 128) or 8 bytes (D 64) of a swizzled piece, converted to fp16
      // whatever E is (exact either way), with P scaled by 2^15 and split into two fp16 parts; each 8-column
      // tile's P V is summed on its own and added to the accumulator times 2^-15 (exact) times the block's V
      // scale, in fp32.
      std::uint32_t pa[4], pr[4];
      fp8_split_weights(sc, pa, pr);
      constexpr int words = cols / 4;
      std::uint32_t vw[4][words];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int row = warp * 16 + key_rows[k];
        const unsigned char* p = value_codes + fp8_value_offset<D>(row, (g * cols) / 16) + (g * cols) % 16;
        if constexpr (words == 4) {
          const uint4 x = *reinterpret_cast<const uint4*>(p);
          vw[k][0] = x.x, vw[k][1] = x.y, vw[k][2] = x.z, vw[k][3] = x.w;
        } else {
          const uint2 x = *reinterpret_cast<const uint2*>(p);
          vw[k][0] = x.x, vw[k][1] = x.y;
        }
      }
      const float value_scale = src.value_scale;
#pragma unroll
      for (int j = 0; j < n_tiles; ++j) {
        // Code j of each row: byte j % 4 of word j / 4, from rows (2c, 2c + 1) and (2c + 8, 2c + 9).
        const std::uint32_t sel_pair = std::uint32_t(j % 4) | (std::uint32_t(4 + j % 4) << 8);
        const std::uint32_t b0 = e4m3_pair_to<fp16>(__byte_perm(vw[0][j / 4], vw[1][j / 4], sel_pair));
        const std::uint32_t b1 = e4m3_pair_to<fp16>(__byte_perm(vw[2][j / 4], vw[3][j / 4], sel_pair));
        float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_16816<fp16>(t, pa, b0, b1);
        mma_16816<fp16>(t, pr, b0, b1);
#pragma unroll
        for (int e = 0; e < 4; ++e) o[j][e] = fmaf(t[e] * fp8_weight_unscale, value_scale, o[j][e]);
      }
    }
  }
  cp_async_wait<0>();

  // Each quad's partial sums make the row sums.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 1);
    run_sum[i] += __shfl_xor_sync(0xffffffffu, run_sum[i], 2);
  }

  // Combine the warps in warp order (the result does not depend on timing). Output column n of tile j is
  // column n D/8 + j.
  __syncthreads();  // every warp is done with the pipeline
  constexpr int stride = fp8_combine_stride<D>();
  float* w_acc = reinterpret_cast<float*>(smem);             // [warps][16][stride]
  float* w_max = w_acc + fp8_attention_warps * 16 * stride;  // [warps][16], then the warps' factors
  float* w_sum = w_max + fp8_attention_warps * 16;           // [warps][16]
#pragma unroll
  for (int j = 0; j < n_tiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, col = (2 * c + (e & 1)) * cols + j;
      w_acc[(warp * 16 + row) * stride + col] = o[j][e];
    }
  }
  if (c == 0) {
    w_max[warp * 16 + g] = run_max[0];
    w_max[warp * 16 + g + 8] = run_max[1];
    w_sum[warp * 16 + g] = run_sum[0];
    w_sum[warp * 16 + g + 8] = run_sum[1];
  }
  __syncthreads();
  // Per head: the split's max, its sum, and each warp's factor (in place of the warp's max).
  if (threadIdx.x < group) {
    const int row = threadIdx.x;
    float m = negative_infinity;
    for (int w = 0; w < fp8_attention_warps; ++w) m = max_keep_left(m, w_max[w * 16 + row]);
    float sum = 0.0f;
    for (int w = 0; w < fp8_attention_warps; ++w) {
      const float wm = w_max[w * 16 + row];
      const float factor = wm == negative_infinity ? 0.0f : expf(wm - m);
      w_max[w * 16 + row] = factor;
      sum += w_sum[w * 16 + row] * factor;
    }
    s.stats_of(blockIdx.x, split, splits)[2 * row] = m;
    s.stats_of(blockIdx.x, split, splits)[2 * row + 1] = sum;
  }
  __syncthreads();
  float* out_acc = s.acc_of(blockIdx.x, split, splits);
  for (int i = threadIdx.x; i < group * D; i += blockDim.x) {
    const int row = i / D;
    float acc = 0.0f;
    for (int w = 0; w < fp8_attention_warps; ++w)
      acc += w_acc[(w * 16 + row) * stride + i % D] * w_max[w * 16 + row];
    out_acc[i] = acc;
  }
}

}  // namespace nosa::detail
