#pragma once
/// \file
/// Step stage 7 on Hopper (sm_90): the tensor-core attention of `attention.cuh` with its copies moved off
/// the computing warps. One producer warp resolves the places of the CTA's blocks (32 at a time, one lane
/// each) and hands each tile of K and V to the Tensor Memory Accelerator (`cp.async.bulk.tensor`, boxes of
/// 64 columns by up to 64 rows, 128-byte swizzle) and the tile's eviction scores to a bulk copy; four
/// consumer warps wait on the stage's barrier, compute 16 rows each exactly as `attention_mma_kernel` does
/// (`mma_attend_rows`), and release the stage. Full and empty `mbarrier`s per stage replace the CTA-wide
/// barrier of the `cp.async` pipeline, so no warp waits for another's compute and every stage is in flight
/// while it is not being read.
///
/// The K and V of every slot (offload store) or page (resident store) are rows of a 2-D tensor [rows, D];
/// `tma_maps` describes them once, at creation. A box always moves whole rows of the block that holds the
/// tile; rows past the sequence's end are masked in the logits, and the consumer that owns them zeroes their
/// values in shared memory first, so whatever the pool held there cannot reach the output.

#include <nosa/backend/cuda/detail/attention.cuh>
#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace nosa::detail {

/// Computing warps of a TMA attention CTA; one more warp produces.
inline constexpr int tma_consumer_warps = 4;
inline constexpr int tma_threads = (tma_consumer_warps + 1) * 32;
/// Key rows of one stage.
inline constexpr int tma_tile_rows = 64;
/// Most splits of a row that the attention's last CTA merges itself (more go to `merge_kernel`).
inline constexpr int tma_merge_max_splits = 4;
/// Most splits of a row launched as one thread-block cluster that merges the row itself (the portable limit).
inline constexpr int tma_cluster_max_splits = 8;

/// Where the TMA attention's partials are merged.
enum class tma_merge : int {
  kernel,   ///< by `merge_kernel`, launched after the attention
  last_cta, ///< by the CTA that finishes the row's last split (`finish_split`)
  cluster,  ///< by all the row's splits, one cluster of CTAs (`merge_in_cluster`); grid (rows x splits) in x
};

/// Bytes of one K (or V) tile in shared memory: `D / 64` swizzled boxes of 64 rows of 128 bytes.
template <int D>
NOSA_HOST_DEVICE constexpr std::uint32_t tma_tile_bytes() {
  return std::uint32_t(tma_tile_rows) * D * 2;
}
/// Stages of the pipeline: about 96 KiB of tiles, so that two CTAs fit on an SM.
template <int D>
NOSA_HOST_DEVICE constexpr int tma_stages() {
  return static_cast<int>(96 * 1024 / (2 * tma_tile_bytes<D>()));
}
/// Dynamic shared memory of `attention_tma_kernel<P, E, D>`: 1 KiB of alignment slack (the swizzled boxes
/// start on 1 KiB boundaries), the tiles, then the stages' eviction scores; the warps combine in the tiles.
template <int D>
NOSA_HOST_DEVICE constexpr std::size_t tma_attention_smem_bytes() {
  const std::size_t pipeline = std::size_t(tma_stages<D>()) * (2 * tma_tile_bytes<D>() + tma_tile_rows * sizeof(float));
  const std::size_t combine = mma_combine_bytes<D>(tma_consumer_warps);
  const std::size_t merge = std::size_t(merge_row_scratch_floats) * sizeof(float);
  const std::size_t reused = combine > merge ? combine : merge;  // the pipeline's memory, once it is done
  return 1024 + (pipeline > reused ? pipeline : reused);
}
/// Byte offset of 16-byte piece `ch` of row `r` in a tile the TMA wrote with the 128-byte swizzle: the row's
/// 64-column box, then the row, then the piece permuted by `r % 8` (what `ldmatrix` needs to read eight
/// rows without bank conflicts).
__device__ inline std::uint32_t tma_offset(int r, int ch) {
  return std::uint32_t((ch >> 3) * (tma_tile_rows * 128) + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

// ---------------------------------------------------------------------------------------------------------
// mbarrier and bulk copies (sm_90).
// ---------------------------------------------------------------------------------------------------------

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ inline void mbarrier_init(std::uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
}
/// Makes initialised barriers visible to the other threads and to the asynchronous proxy.
__device__ inline void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ inline void mbarrier_arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
}
/// Arrives and adds `bytes` to the transactions the current phase waits for.
__device__ inline void mbarrier_arrive_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)),
               "r"(bytes)
               : "memory");
}
/// Waits until the phase of parity `parity` has completed.
__device__ inline void mbarrier_wait(std::uint64_t* bar, unsigned parity) {
  const std::uint32_t address = shared_address(bar);
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  } while (done == 0);
}
/// Orders this thread's prior shared-memory writes before later writes of the asynchronous proxy (TMA).
__device__ inline void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
/// A box of a 2-D tensor map at (column `x`, row `y`) into shared memory, completing on `bar`.
__device__ inline void tma_load_2d(std::uint32_t dst, const CUtensorMap* map, int x, int y, std::uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(x), "r"(y), "r"(shared_address(bar))
      : "memory");
}
/// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global into shared memory, completing on `bar`.
__device__ inline void bulk_load(std::uint32_t dst, const void* src, std::uint32_t bytes, std::uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(shared_address(bar))
               : "memory");
}
#endif

// ---------------------------------------------------------------------------------------------------------
// The tensor maps (host).
// ---------------------------------------------------------------------------------------------------------

/// The tensor maps of a layer's attended K and V: the slot caches (offload store) or the device pool (resident
/// store, both maps over the pool), boxes of 64 columns by `box_rows` rows. `valid` is false where the driver
/// or the shapes do not allow them; the layer then attends with `attention_mma_kernel`.
struct tma_maps {
  CUtensorMap keys;
  CUtensorMap values;
  int box_rows = 0;
  bool valid = false;
};

/// The driver's `cuTensorMapEncodeTiled`, found once through the runtime (no link against the driver library).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() noexcept {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return PFN_cuTensorMapEncodeTiled_v12000{nullptr};
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

/// Rows of a box for blocks of `block_size` tokens: the block up to 64 rows; 0 when a block is not a whole
/// number of boxes of a multiple of 16 rows (every box must stay inside its block).
inline int tma_box_rows(int block_size) noexcept {
  const int rows = block_size < tma_tile_rows ? block_size : tma_tile_rows;
  return rows % 16 == 0 && block_size % rows == 0 ? rows : 0;
}

/// Encodes a 2-D tensor map over `rows` rows of D elements of type E at `base`.
template <class E, int D>
bool encode_rows_map(CUtensorMap& map, void* base, std::size_t rows, int box_rows) noexcept {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr || rows == 0 || rows > std::size_t(std::numeric_limits<std::int32_t>::max())) return false;
  const cuuint64_t dims[2] = {cuuint64_t(D), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(D) * sizeof(E)};
  const cuuint32_t box[2] = {64, cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      std::is_same_v<E, bf16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(&map, type, 2, base, dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/// The tensor maps of a layer's state (`pool_pages` pages in the device pool of a resident store).
template <bool Offloads, class E, int D>
tma_maps make_tma_maps(const cuda_state<E, D>& s, int pool_pages) noexcept {
  tma_maps maps{};
  if constexpr (is_16bit_element<E> && D % 64 == 0) {
    maps.box_rows = tma_box_rows(s.sel.block_size);
    if (maps.box_rows == 0) return maps;
    const std::size_t bs = std::size_t(s.sel.block_size);
    if constexpr (Offloads) {
      const std::size_t rows = std::size_t(s.sequences) * s.kv_heads * s.slots * bs;
      maps.valid = encode_rows_map<E, D>(maps.keys, s.slot_keys, rows, maps.box_rows) &&
                   encode_rows_map<E, D>(maps.values, s.slot_values, rows, maps.box_rows);
    } else {
      const std::size_t rows = std::size_t(pool_pages) * 2 * s.kv_heads * bs;
      maps.valid = encode_rows_map<E, D>(maps.keys, s.pool, rows, maps.box_rows);
      maps.values = maps.keys;
    }
  }
  return maps;
}

// ---------------------------------------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------------------------------------

/// Grid (batch rows x KV heads, splits), `tma_threads` threads, `tma_attention_smem_bytes<D>()` bytes of
/// dynamic shared memory; same contract as `attention_mma_kernel` (the partial softmax of split
/// `split_base + x` of `total_splits`, 0: the grid's). `keys` and `values` are `tma_maps`' maps. `merge` says
/// who merges the row (`tma_merge`); with `tma_merge::cluster` the grid is (batch rows x KV heads x splits) in
/// x, in clusters of `splits` CTAs, and the cluster rank is the split.
template <class P, class E, int D, class Out>
__global__ void __launch_bounds__(tma_threads)
    attention_tma_kernel(cuda_state<E, D> s, sequence_source seqs, tensor_view<const E, 3> q, tensor_view<Out, 3> o,
                         const __grid_constant__ CUtensorMap keys, const __grid_constant__ CUtensorMap values,
                         int box_rows, attend_part part, int split_base, int total_splits, tma_merge merge) {
  dependent_launch_wait();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static_assert(uses_mma_attention<E, D>);
  if (*s.status != 0) return;
  using attention = typename P::attention;
  constexpr bool offloads = P::store::offloads;
  constexpr bool biased = attention::bias != bias_mode::none;
  constexpr int R = tma_tile_rows;
  constexpr int W = tma_consumer_warps;
  constexpr int k_steps = D / 16, n_tiles = D / 8;
  constexpr int boxes = D / 64;  // 64-column boxes of a row
  constexpr int stages = tma_stages<D>();
  constexpr std::uint32_t tile_bytes = tma_tile_bytes<D>();
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - shared_address(smem_raw) % 1024) % 1024);
  float* stage_scores = reinterpret_cast<float*>(smem + stages * 2 * tile_bytes);  // [stages][R]
  __shared__ __align__(8) std::uint64_t full[stages];
  __shared__ __align__(8) std::uint64_t empty[stages];
  __shared__ int stage_rows[stages];
  __shared__ attend_list_storage shared_list;
  __shared__ __align__(16) unsigned char query_rows[query_rows_bytes<D>()];

  const bool clustered = merge == tma_merge::cluster;
  const int splits = clustered ? static_cast<int>(cluster_ctas()) : static_cast<int>(gridDim.y);
  const int row = clustered ? static_cast<int>(blockIdx.x) / splits : static_cast<int>(blockIdx.x);
  const int split = clustered ? static_cast<int>(cluster_rank()) : static_cast<int>(blockIdx.y);
  const int b = row / s.kv_heads, h = row % s.kv_heads;
  const int seq = seqs(b);
  const int length = s.lengths[seq] + 1;
  const int group = s.group;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const selection_params& sel = s.sel;

  stage_query_rows<E, D>(q, b, h, group, query_rows);  // read by the consumers after the barrier below
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      mbarrier_init(&full[i], 1);
      mbarrier_init(&empty[i], W);
    }
    mbarrier_init_fence();
  }
  const attend_list list = build_attend_list<P>(s, seq, h, length, part, shared_list);
  __syncthreads();  // the barriers are initialised
  const split_share share = share_of(list.n, split, splits, sel.block_size, R);
  const int tiles_per_block = share.tiles_per_block, cta_tiles = share.tiles;
  const int entries = share.last - share.first;

  float acc[n_tiles][4];
#pragma unroll
  for (int j = 0; j < n_tiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  float run_max[2] = {negative_infinity, negative_infinity};
  float run_sum[2] = {0.0f, 0.0f};

  if (warp == W) {
    // Producer: lane i of each round resolves entry base + i (block, then place); lane 0 issues the tiles.
    const float* c_state = s.scores_of(seq, h);
    const std::uint32_t kv_tx = 2u * boxes * std::uint32_t(box_rows) * 128u;
    const std::uint32_t tx = kv_tx + (biased ? std::uint32_t(box_rows) * 4u : 0u);
    int t = 0;
    for (int base = 0; base < entries; base += 32) {
      const int i = base + lane;
      int m = 0, place = 0;
      if (i < entries) {
        m = list.indexed ? share.first + i : list.chosen[share.first + i];
        if constexpr (offloads) {
          place = s.block_slot_of(seq, h)[m];
        } else {
          place = s.table(seq)[m];
        }
      }
      const int count = entries - base < 32 ? entries - base : 32;
      for (int j = 0; j < count; ++j) {
        const int mj = __shfl_sync(0xffffffffu, m, j), pj = __shfl_sync(0xffffffffu, place, j);
        if (lane == 0) {
          const int first = mj * sel.block_size;
          const int in_block = sel.block_size < length - first ? sel.block_size : length - first;
          int key_row, value_row;  // rows of the block's first token in the maps
          if constexpr (offloads) {
            key_row = static_cast<int>((s.sh(seq, h) * s.slots + pj) * sel.block_size);
            value_row = key_row;
          } else {
            key_row = (pj * 2 * s.kv_heads + h) * sel.block_size;
            value_row = key_row + s.kv_heads * sel.block_size;
          }
          for (int sub = 0; sub < tiles_per_block; ++sub, ++t) {
            const int stage = t % stages;
            mbarrier_wait(&empty[stage], ((t / stages) & 1) ^ 1);
            const int r0 = sub * R;
            const int rows = in_block - r0 < 0 ? 0 : (in_block - r0 > R ? R : in_block - r0);
            stage_rows[stage] = rows;
            if (rows > 0) {
              mbarrier_arrive_expect_tx(&full[stage], tx);
              const std::uint32_t k_dst = shared_address(smem + stage * 2 * tile_bytes);
#pragma unroll
              for (int x = 0; x < boxes; ++x) {
                tma_load_2d(k_dst + x * (R * 128), &keys, x * 64, key_row + r0, &full[stage]);
                tma_load_2d(k_dst + tile_bytes + x * (R * 128), &values, x * 64, value_row + r0, &full[stage]);
              }
              if constexpr (biased) {
                bulk_load(shared_address(stage_scores + stage * R), c_state + first + r0, std::uint32_t(box_rows) * 4u,
                          &full[stage]);
              }
            } else {
              mbarrier_arrive(&full[stage]);
            }
          }
        }
        __syncwarp();
      }
    }
  } else {
    // Consumers: warp w computes rows 16w .. 16w + 15 of every tile.
    std::uint32_t qa[k_steps][4];
    load_query_fragments_shared<E, D>(query_rows, qa);
    for (int it = 0; it < cta_tiles; ++it) {
      const int stage = it % stages;
      mbarrier_wait(&full[stage], (it / stages) & 1);
      const int rows = stage_rows[stage] - warp * 16;  // this warp's valid rows of the tile
      if (rows > 0) {
        unsigned char* tile = smem + stage * 2 * tile_bytes;
        if (rows < 16) {
          // Values past the sequence's end are zeroed: their weights are 0, and so must their products be.
          constexpr int pieces = D / 8;
          for (int idx = lane; idx < (16 - rows) * pieces; idx += 32) {
            const int r = warp * 16 + rows + idx / pieces, ch = idx % pieces;
            *reinterpret_cast<uint4*>(tile + tile_bytes + tma_offset(r, ch)) = make_uint4(0, 0, 0, 0);
          }
          __syncwarp();
        }
        const std::uint32_t ks = shared_address(tile);
        mma_attend_rows<P, E, D>(qa, ks, ks + tile_bytes, stage_scores + stage * R + warp * 16, rows,
                                 [](int r, int ch) { return tma_offset(r, ch); }, acc, run_max, run_sum);
        if (rows < 16) fence_proxy_async_shared();
      }
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[stage]);
    }
  }
  __syncthreads();  // every warp is done with the pipeline
  const int all_splits = total_splits > 0 ? total_splits : splits;
  mma_combine_warps<D>(smem, W, group, acc, run_max, run_sum, s.acc_of(row, split_base + split, all_splits),
                       s.stats_of(row, split_base + split, all_splits));
  if (merge == tma_merge::last_cta) finish_split<E, D, Out>(s, row, all_splits, seq, o, reinterpret_cast<float*>(smem));
  if (clustered) merge_in_cluster<E, D, Out>(s, row, splits, seq, o, reinterpret_cast<float*>(smem));
#else
  (void)s, (void)seqs, (void)q, (void)o, (void)keys, (void)values, (void)box_rows, (void)part, (void)split_base,
      (void)total_splits, (void)merge;
#endif
}

}  // namespace nosa::detail
