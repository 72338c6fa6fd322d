#pragma once
/// \file
/// What every stage's kernels share: the CUDA backend's shape limits, where a kernel finds a batch row's
/// sequence, warp reductions, and the device primitives the streaming kernels are built from (asynchronous
/// copies, `ldmatrix`, `mma.sync` on 16-bit operands, thread-block-cluster barriers and distributed shared
/// memory). One header per stage of a step sits beside this one (`begin`, `append`, `scoring`, `select`,
/// `gather`, `attention`), plus `plan` for the kernels of the plan calls.
///
/// Each kernel handles one (sequence, KV head) per CTA or per cluster (the scoring, the gather and the
/// attention add a second grid dimension), reads lengths, block tables and slot maps from state, and returns
/// at once when the step's state checks failed, so a step with bad input changes nothing. Every grid is sized
/// by the batch and the layer's capacities, never by state values.

#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/math.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/tensor_view.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace nosa::detail {

/// Largest GQA group the CUDA kernels hold in registers and shared memory.
inline constexpr int cuda_max_group = 16;
/// Largest `k` the CUDA selection keeps in shared memory.
inline constexpr int cuda_max_top_k = 256;
/// Threads of the per-(sequence, KV head) kernels other than attention and scoring.
inline constexpr int cuda_threads = 256;

/// Where a kernel finds the sequence of batch row `b`: a device array of ids, or one fixed id (plan calls).
struct sequence_source {
  tensor_view<const std::int32_t, 1> ids;
  int fixed = -1;
  __device__ int operator()(int b) const { return fixed >= 0 ? fixed : ids(b); }
};

__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = max_keep_left(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// True when the element type is one the tensor cores take as an operand (bf16, fp16).
template <class E>
inline constexpr bool is_16bit_element = std::is_same_v<E, bf16> || std::is_same_v<E, fp16>;

// ---------------------------------------------------------------------------------------------------------
// Programmatic dependent launch (sm_90): a step's kernels are launched so that each may start while the one
// before it finishes; each waits for its predecessor's completion (and memory) before it reads anything, then
// lets its successor start. Older devices launch them one after the other, and the wait is a no-op.
// ---------------------------------------------------------------------------------------------------------

/// Waits for the kernels this one depends on, then allows the next kernel on the stream to launch. The first
/// statement of every kernel launched by `launch_kernel` with `dependent` set.
__device__ inline void dependent_launch_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/// Launches `kernel` on `stream`; with `dependent`, as a programmatic dependent launch (see above), with
/// `cluster` > 1 in clusters of that many CTAs along x.
template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                          bool dependent, int cluster, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  unsigned n = 0;
  if (dependent) {
    attributes[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster > 1) {
    attributes[n].id = cudaLaunchAttributeClusterDimension;
    attributes[n].val.clusterDim.x = static_cast<unsigned>(cluster);
    attributes[n].val.clusterDim.y = 1;
    attributes[n].val.clusterDim.z = 1;
    ++n;
  }
  config.attrs = attributes;
  config.numAttrs = n;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

/// Clusters of `cluster` CTAs of `kernel` (`threads` threads, `smem` bytes of dynamic shared memory each) the
/// device holds at once; 0 when it cannot run them (the error is cleared).
template <class... Params>
int max_active_clusters(void (*kernel)(Params...), int cluster, int threads, std::size_t smem) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(cluster));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
    cudaGetLastError();
    clusters = 0;
  }
  return clusters;
}

// ---------------------------------------------------------------------------------------------------------
// Asynchronous copies, ldmatrix and mma.sync.
// ---------------------------------------------------------------------------------------------------------

__device__ inline std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

/// 16-byte asynchronous copy to shared memory; `valid == false` writes zeros and reads nothing.
__device__ inline void cp_async_16(std::uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
/// 4-byte asynchronous copy to shared memory.
__device__ inline void cp_async_4(std::uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
/// 16-byte asynchronous copy to shared memory that always copies.
__device__ inline void cp_async_16(std::uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

/// Stores two floats at shared-memory address `a` (8-byte aligned).
__device__ inline void store_shared(std::uint32_t a, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(a), "f"(x), "f"(y) : "memory");
}

/// 2^x with results below the normal range flushed to zero (one `MUFU.EX2`): `exp2f` up to those results,
/// for sums that always hold a term of at least 1 (a softmax sum against its running maximum), to which a
/// term below 2^-126 adds nothing.
__device__ inline float exp2_flush(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// `cp_async_wait<pending>()` for a pending count known only at run time (0 to 6).
__device__ inline void cp_async_wait_dynamic(int pending) {
  switch (pending) {
    case 0: cp_async_wait<0>(); break;
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    default: cp_async_wait<6>(); break;
  }
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

/// Column of the head dimension that k index `2c + (j & 1) + 8 (j >> 1)` of k step `kt` is, where `j` (0..3)
/// is the pair member: the natural order.
struct natural_columns {
  __device__ int operator()(int kt, int c, int j) const { return kt * 16 + 2 * c + (j & 1) + (j >> 1) * 8; }
};

/// The A fragments of `mma_16816` for the group's queries: rows are the query heads `h * group + r` of batch
/// row `b` (rows at or past the group are zero), `D / 16` k steps. Fragment layout (lane = 4 r + c): register
/// i holds row r + 8 (i & 1), k indices 2c + 8 (i >> 1) and the one after, which are the columns
/// `column(kt, c, 2 (i >> 1))` and the one after (a permutation of the head dimension, applied to the keys
/// too, leaves Q K^T unchanged).
template <class E, int D, class Columns = natural_columns>
__device__ inline void load_query_fragments(tensor_view<const E, 3> q, int b, int h, int group,
                                            std::uint32_t (&a)[D / 16][4], Columns column = {}) {
  const int lane = threadIdx.x % 32, r = lane / 4, c = lane % 4;
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = r + (i & 1) * 8, col = column(kt, c, 2 * (i >> 1));
      const E x = row < group ? q(b, h * group + row, col) : E{};
      const E y = row < group ? q(b, h * group + row, col + 1) : E{};
      a[kt][i] = pack_elements(x, y);
    }
  }
}

/// Bytes of the group's queries staged in shared memory by `stage_query_rows`: 16 rows of D elements, each
/// row padded by 16 bytes so that `ldmatrix` reads eight rows without bank conflicts.
template <int D>
NOSA_HOST_DEVICE constexpr int query_rows_bytes() {
  return 16 * (D * 2 + 16);
}
/// Piece `i` (16 bytes) of the rows `stage_query_rows` stages: row `i / (D / 8)`, piece `i % (D / 8)` of the
/// group's queries of batch row `b`, KV head `h`; zeros at or past the group.
template <class E, int D>
__device__ inline uint4 query_row_piece(tensor_view<const E, 3> q, int b, int h, int group, int i) {
  constexpr int pieces = D / 8;
  const int r = i / pieces, ch = i % pieces;
  if (r >= group) return make_uint4(0, 0, 0, 0);
  const E* row = &q(b, h * group + r, 0);
  if (q.strides[2] == 1 && reinterpret_cast<std::uintptr_t>(row) % 16 == 0) {
    return *reinterpret_cast<const uint4*>(row + ch * 8);
  }
  std::uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) w[e] = pack_elements(q(b, h * group + r, ch * 8 + 2 * e), q(b, h * group + r, ch * 8 + 2 * e + 1));
  return make_uint4(w[0], w[1], w[2], w[3]);
}
/// Where piece `i` of `query_row_piece` goes in the staged rows.
template <int D>
__device__ inline int query_row_piece_offset(int i) {
  return (i / (D / 8)) * (D * 2 + 16) + (i % (D / 8)) * 16;
}
/// Copies the group's queries of batch row `b`, KV head `h` into `rows` (`query_rows_bytes<D>()` bytes), rows
/// at or past the group zero, with 16-byte loads by the whole CTA; a barrier must follow before they are read.
template <class E, int D>
__device__ inline void stage_query_rows(tensor_view<const E, 3> q, int b, int h, int group, unsigned char* rows) {
  for (int i = static_cast<int>(threadIdx.x); i < 16 * (D / 8); i += blockDim.x) {
    *reinterpret_cast<uint4*>(rows + query_row_piece_offset<D>(i)) = query_row_piece<E, D>(q, b, h, group, i);
  }
}
/// `load_query_fragments` from the rows `stage_query_rows` staged: one `ldmatrix.x4` a k step.
template <class E, int D>
__device__ inline void load_query_fragments_shared(const unsigned char* rows, std::uint32_t (&a)[D / 16][4]) {
  const int lane = threadIdx.x % 32;
  // Lanes 0-15 address rows 0-15 at the k step's first 8 columns, lanes 16-31 the same rows 8 columns on:
  // matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  const std::uint32_t base = shared_address(rows + (lane % 16) * (D * 2 + 16) + (lane / 16) * 16);
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) ldmatrix_x4(base + kt * 32, a[kt]);
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

/// Byte offset of 16-byte piece `ch` of row `r` in a shared-memory tile of rows of `RowBytes` bytes (a
/// multiple of 128), with the pieces of each group of eight permuted by `r % 8` (XOR on the piece index), so
/// that eight consecutive rows read at one piece index hit distinct bank groups: `ldmatrix` without conflicts.
template <int RowBytes>
__device__ inline std::uint32_t swizzled_offset(int r, int ch) {
  static_assert(RowBytes % 128 == 0, "rows of whole 128-byte lines");
  return std::uint32_t(r * RowBytes + ((ch & ~7) | ((ch & 7) ^ (r & 7))) * 16);
}

// ---------------------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90). A launch without a cluster is a cluster of one CTA: the same code runs.
// ---------------------------------------------------------------------------------------------------------

/// CTAs in this CTA's cluster, and this CTA's rank in it.
__device__ inline unsigned cluster_ctas() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  return r;
#else
  return 1;
#endif
}
__device__ inline unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#else
  return 0;
#endif
}
/// Arrival at the cluster barrier, releasing this thread's prior writes (shared and global) to the cluster.
__device__ inline void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#else
  __syncthreads();
#endif
}
/// Arrival at the cluster barrier that releases nothing (no memory fence): for a CTA that only signals it
/// is done reading the others' shared memory, whose loads have completed (their values were used).
__device__ inline void cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#else
  __syncthreads();
#endif
}
/// Wait at the cluster barrier, acquiring what the other CTAs released before arriving.
__device__ inline void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}
/// Reads a float at `local` (this CTA's shared memory) from the same place in CTA `rank` of the cluster.
__device__ inline float load_cluster_shared(const float* local, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  std::uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(shared_address(local)), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
  return v;
#else
  (void)rank;
  return *local;
#endif
}

}  // namespace nosa::detail
