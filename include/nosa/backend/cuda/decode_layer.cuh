#pragma once
/// \file
/// The CUDA executor of a decode layer: the same state layout as the host backend, every stage of a step
/// as kernels on the caller's stream. `decode_layer<P, cuda_backend>` and `decode_layer<P, host_backend>`
/// have the same members; only the memory the arenas live in and the stream arguments differ.
///
/// Memory: the device arena is device memory (`cudaMalloc`); the host arena is pinned host memory mapped
/// into the device address space (`cudaHostAlloc(..., cudaHostAllocMapped)`, or `cudaHostRegister` with
/// `cudaHostRegisterMapped`). `owning_layer` with `<nosa/backend/cuda/arena.cuh>` allocates both.
///
/// Steps only enqueue kernels: no allocation, no synchronisation, no host read of device memory, so a step
/// can be captured once in a CUDA graph and replayed while sequences grow. Checks that need the state
/// (unknown, duplicate, full or unreserved sequences) run on the device; a failing step changes nothing and
/// leaves its status for `step_status()`. Plan calls and inspection synchronise the stream they are given
/// (pass the stream the steps run on, or a stream ordered after it).

#include <nosa/backend/cuda/backend.cuh>
#include <nosa/backend/cuda/detail/kernels.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/store/layout.hpp>
#include <nosa/store/page_pool.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

namespace nosa {

/// What a step needs to overlap its host-to-device transfers with attention: a second stream for the
/// gather and two events, created once by the caller (events preferably with `cudaEventDisableTiming`).
/// The step records `fork` on its stream after the set-difference, runs the gather on `transfer`, records
/// `join` there, attends the blocks that were already resident meanwhile, then waits for `join` and attends
/// the loaded blocks; the two parts merge by log-sum-exp. Inside a stream capture the fork and the join
/// become two branches of the graph.
struct cuda_overlap {
  cudaStream_t transfer = nullptr;
  cudaEvent_t fork = nullptr;
  cudaEvent_t join = nullptr;
};

/// One layer's decode state and its CUDA executor. Cheap to copy; copies share the state.
template <pipeline_policy P>
class decode_layer<P, cuda_backend> {
 public:
  using pipeline_type = P;
  using element_type = typename P::element_type;
  using backend_type = cuda_backend;
  static constexpr int head_dim = P::head_dim;
  /// Largest GQA group (H_q / H_kv) the kernels support.
  static constexpr int max_group = detail::cuda_max_group;
  /// Largest `k` the kernels support.
  static constexpr int max_top_k = detail::cuda_max_top_k;

  static_assert(head_dim == 64 || head_dim == 128 || head_dim == 256, "the CUDA backend supports D = 64, 128, 256");

  decode_layer() = default;

  /// Sizes of the two arenas. Groups above 16, `k` above 256 and block sizes that are not a multiple of 8
  /// give `not_supported`; so do quantized KV formats (`fp8_offload_store`, `fp8_resident_store`) with other
  /// than bf16 or fp16 storage and D 64 or 128.
  [[nodiscard]] static status required_bytes(const layer_config& config, arena_sizes& out) noexcept {
    NOSA_TRY(check_config(config));
    const state_layout s = make_state_layout<P>(config);
    out = {s.device_bytes, s.host_bytes};
    return status::success;
  }

  /// Builds a layer over caller-owned arenas (device memory; pinned, mapped host memory) and initialises
  /// its state on `stream`, which it synchronises.
  [[nodiscard]] static status create(const layer_config& config, std::span<std::byte> device_arena,
                                     std::span<std::byte> host_arena, decode_layer& out,
                                     cudaStream_t stream = nullptr) noexcept {
    NOSA_TRY(check_config(config));
    const state_layout s = make_state_layout<P>(config);
    if (device_arena.size() < s.device_bytes || host_arena.size() < s.host_bytes) return status::insufficient_memory;
    if (device_arena.data() == nullptr || host_arena.data() == nullptr) return status::null_pointer;
    if (reinterpret_cast<std::uintptr_t>(device_arena.data()) % arena_alignment != 0 ||
        reinterpret_cast<std::uintptr_t>(host_arena.data()) % arena_alignment != 0) {
      return status::misaligned_pointer;
    }
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, device_arena.data()) != cudaSuccess ||
        (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)) {
      cudaGetLastError();
      return status::invalid_argument;
    }
    void* mapped = nullptr;
    if (cudaHostGetDevicePointer(&mapped, host_arena.data(), 0) != cudaSuccess || mapped == nullptr) {
      cudaGetLastError();
      return status::invalid_argument;
    }
    int device = 0;
    NOSA_CUDA_TRY(cudaGetDevice(&device));
    int sms = 0;
    NOSA_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    // Attention CTAs the device holds at once: the splits are chosen to fill exactly one wave of them.
    int resident_ctas = 0;
    int major = 0;
    NOSA_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    detail::cuda_state<element_type, head_dim> state =
        detail::make_cuda_state<element_type, head_dim>(config, s, device_arena.data(),
                                                        offloads ? static_cast<std::byte*>(mapped) : device_arena.data());
    state.dependent_launch = major >= 9;
    detail::tma_maps tma{};
    int tma_clusters[3] = {0, 0, 0};  // clusters of 2, 4, 8 attention CTAs held at once
    if constexpr (fp8_attention) {
      const auto kernel = detail::attention_fp8_kernel<P, element_type, head_dim>;
      const int smem = static_cast<int>(detail::fp8_attention_smem_bytes<head_dim>());
      NOSA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      NOSA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident_ctas, kernel,
                                                                  detail::fp8_attention_warps * 32, smem));
    } else if constexpr (quantized) {
      // Not supported (check_config): nothing to size.
    } else if constexpr (mma_attention) {
      // Hopper attends through the tensor memory accelerator when the maps can describe the tiles.
      cudaFuncAttributes tma_attributes{};
      NOSA_CUDA_TRY(
          cudaFuncGetAttributes(&tma_attributes, detail::attention_tma_kernel<P, element_type, head_dim, float>));
      if (major >= 9 && tma_attributes.binaryVersion >= 90) tma = detail::make_tma_maps<offloads>(state, s.pages);
      if (tma.valid) {
        const auto kernel = detail::attention_tma_kernel<P, element_type, head_dim, float>;
        const int smem = static_cast<int>(detail::tma_attention_smem_bytes<head_dim>());
        NOSA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        NOSA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident_ctas, kernel, detail::tma_threads, smem));
        // How many clusters of 2, 4 and 8 CTAs the device holds at once (clusters are placed within a GPC,
        // so fewer CTAs than `resident_ctas` a SM may run as clusters).
        for (int i = 0; i < 3; ++i) {
          tma_clusters[i] = detail::max_active_clusters(kernel, 2 << i, detail::tma_threads, std::size_t(smem));
        }
      } else {
        const auto kernel = detail::attention_mma_kernel<P, element_type, head_dim>;
        const int smem = static_cast<int>(detail::mma_attention_smem_bytes<head_dim>());
        NOSA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        NOSA_CUDA_TRY(
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident_ctas, kernel, detail::mma_warps * 32, smem));
      }
    } else {
      NOSA_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &resident_ctas, detail::attention_kernel<P, element_type, head_dim>, detail::attention_warps * 32, 0));
    }

    detail::score_device scoring{};
    if constexpr (!P::dense) {
      scoring.sms = sms;
      int optin = 0;
      NOSA_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      cudaFuncAttributes attributes{};
      NOSA_CUDA_TRY(cudaFuncGetAttributes(&attributes, detail::score_kernel<P, element_type, head_dim>));
      // The kernel's static shared memory and the driver's reserve come out of the opt-in limit.
      scoring.smem_limit = optin - static_cast<int>(attributes.sharedSizeBytes) - 1024;
      scoring.clusters = major >= 9 && attributes.binaryVersion >= 90;
      NOSA_CUDA_TRY((detail::prepare_scoring<P, element_type, head_dim>(scoring, config.selection, s.max_blocks,
                                                                        config.group_size())));
    }

    decode_layer layer;
    layer.config_ = config;
    layer.scoring_ = scoring;
    layer.layout_ = s;
    layer.device_ = device_arena.data();
    layer.host_ = host_arena.data();
    layer.host_mapped_ = static_cast<std::byte*>(mapped);
    layer.attention_slots_ = std::max(1, sms * std::max(1, resident_ctas));
    layer.state_ = state;
    layer.tma_ = tma;
    for (int i = 0; i < 3; ++i) layer.tma_clusters_[i] = tma_clusters[i];
    NOSA_TRY(layer.initialise(stream));
    out = layer;
    return status::success;
  }

  const layer_config& config() const noexcept { return config_; }

  // ---------------------------------------------------------------------------------------------------
  // Plan calls. Each synchronises `stream`.
  // ---------------------------------------------------------------------------------------------------

  /// Admits a sequence (see the host backend). The prompt views must be readable by the device (device,
  /// managed or mapped pinned memory).
  [[nodiscard]] status add_sequence(int seq, const prompt_args<element_type>& prompt,
                                    cudaStream_t stream = nullptr) noexcept {
    return add_sequence(seq, prompt, shared_prefix{}, stream);
  }

  /// `add_sequence` whose first `share.blocks` blocks reference the pages of the live sequence
  /// `share.source` (see `shared_prefix`): those blocks take no new page and are not written to the pool.
  [[nodiscard]] status add_sequence(int seq, const prompt_args<element_type>& prompt, const shared_prefix& share,
                                    cudaStream_t stream = nullptr) noexcept {
    if (seq < 0 || seq >= layout_.sequences) return status::unknown_sequence;
    if (is_live(seq, stream)) return status::sequence_exists;
    const int hkv = config_.num_kv_heads;
    const std::int64_t len = prompt.k.extents[0];
    if (len < 0) return status::shape_mismatch;
    NOSA_TRY(check_view(prompt.k, {len, hkv, head_dim}));
    NOSA_TRY(check_view(prompt.v, {len, hkv, head_dim}));
    if (P::uses_eviction_scores || !prompt.c.empty()) NOSA_TRY(check_view(prompt.c, {len, hkv}));
    if (!prompt.last_query.empty()) NOSA_TRY(check_view(prompt.last_query, {config_.num_q_heads, head_dim}));
    if (len > layout_.max_tokens) return status::sequence_full;
    const int length = static_cast<int>(len);
    std::int32_t* row = staging();
    if (share.blocks != 0) {
      // The source's liveness, length and block table, read into the staging row.
      const bool in_range = share.source >= 0 && share.source < layout_.sequences;
      std::int32_t source_length = 0;
      const bool source_live = in_range && is_live(share.source, stream);
      if (source_live) {
        NOSA_TRY(read_device(&source_length, layout_.seq_length + sizeof(std::int32_t) * share.source, 1, stream));
        NOSA_TRY(read_device(row, layout_.block_table + sizeof(std::int32_t) * share.source * layout_.max_blocks,
                             layout_.max_blocks, stream));
      }
      NOSA_TRY(page_pool::check_shared(share, seq, length, source_live, source_length, config_.selection));
    }
    const int blocks_needed = block_count(std::min(length + 1, layout_.max_tokens), config_.selection);
    if (blocks_needed - share.blocks > free_page_count()) return status::host_pool_full;

    // Validated: the pages are taken on the host, everything else runs on the device.
    for (int m = 0; m < layout_.max_blocks; ++m) {
      if (m < share.blocks) {
        pages().add_ref(row[m]);
      } else {
        row[m] = m < blocks_needed ? pages().pop() : -1;
      }
    }
    const std::int32_t* row_dev = reinterpret_cast<const std::int32_t*>(host_mapped_ + layout_.staging);
    const int chunks = static_cast<int>(std::clamp<std::int64_t>((len * head_dim + 255) / 256, 1, 64));
    detail::admit_kernel<offloads>
        <<<hkv, detail::cuda_threads, 0, stream>>>(state_, seq, length, row_dev, share.blocks);
    if (length > 0) {
      detail::ingest_kernel<offloads, !P::dense, quantized>
          <<<dim3(hkv, chunks), detail::cuda_threads, 0, stream>>>(state_, seq, length, prompt.k, prompt.v,
                                                                   prompt.c, share.blocks);
      if constexpr (quantized) {
        // The prompt's complete blocks, quantised into their pages (spec §6b).
        const int quantized_blocks = length / config_.selection.block_size - share.blocks;
        if (quantized_blocks > 0) {
          detail::quantize_prompt_kernel<<<dim3(hkv, std::min(quantized_blocks, 64)), detail::cuda_threads, 0,
                                           stream>>>(state_, seq, length, prompt.k, prompt.v, share.blocks);
        }
      }
      const int windows = P::dense ? 0 : window_count(length, config_.selection);
      if (windows > 0) {
        detail::compress_prompt_kernel<<<dim3(hkv, std::min(windows, 64)), head_dim, 0, stream>>>(state_, seq, length,
                                                                                                   prompt.k);
      }
    }
    if constexpr (P::dense) return finish_plan(stream);  // no scoring, no selection
    const detail::sequence_source one{{}, seq};
    const bool have_query = !prompt.last_query.empty();
    if (have_query) {
      // The last query as a batch of one row.
      tensor_view<const element_type, 3> q;
      q.data = prompt.last_query.data;
      q.extents[0] = 1;
      q.extents[1] = prompt.last_query.extents[0];
      q.extents[2] = prompt.last_query.extents[1];
      q.strides[0] = 0;
      q.strides[1] = prompt.last_query.strides[0];
      q.strides[2] = prompt.last_query.strides[1];
      NOSA_CUDA_TRY(detail::launch_scoring<P>(state_, one, hkv, 0, q, true, scoring_, stream));
    } else {
      NOSA_CUDA_TRY(detail::launch_scoring<P>(state_, one, hkv, 0, tensor_view<const element_type, 3>{}, false,
                                              scoring_, stream));
    }
    NOSA_CUDA_TRY(detail::launch_select<P>(state_, one, hkv, 0, have_query, false, offloads, detail::count_mode::ingest,
                                           stream));
    if constexpr (offloads) {
      if constexpr (quantized) {
        detail::launch_fp8_gather<offloads>(state_, one, hkv, false, stream);
      } else {
        NOSA_CUDA_TRY(detail::launch_gather(state_, one, hkv, false, stream));
      }
    }
    detail::clear_step_misses_kernel<<<1, 32, 0, stream>>>(state_, seq);
    return finish_plan(stream);
  }

  /// Retires the sequence in slot `seq`, returning its pages to the pool.
  [[nodiscard]] status remove_sequence(int seq, cudaStream_t stream = nullptr) noexcept {
    if (seq < 0 || seq >= layout_.sequences) return status::unknown_sequence;
    NOSA_CUDA_TRY(cudaStreamSynchronize(stream));
    std::int32_t live = 0;
    NOSA_TRY(read_device(&live, layout_.seq_live + sizeof(std::int32_t) * seq, 1, stream));
    if (live == 0) return status::unknown_sequence;
    std::int32_t* row = staging();
    NOSA_TRY(read_device(row, layout_.block_table + sizeof(std::int32_t) * seq * layout_.max_blocks,
                         layout_.max_blocks, stream));
    for (int m = 0; m < layout_.max_blocks; ++m) {
      if (row[m] >= 0) pages().release(row[m]);
    }
    detail::retire_kernel<offloads><<<config_.num_kv_heads, detail::cuda_threads, 0, stream>>>(state_, seq);
    return finish_plan(stream);
  }

  /// Reserves pages so that every live sequence can run `tokens_ahead` more steps. All or nothing.
  [[nodiscard]] status reserve(int tokens_ahead, cudaStream_t stream = nullptr) noexcept {
    if (tokens_ahead < 0) return status::invalid_argument;
    NOSA_TRY(load_plan_state(stream));
    NOSA_TRY(pages().reserve(staged_rows(), 0, layout_.sequences, tokens_ahead, layout_.max_tokens,
                             config_.selection));
    return store_block_table(stream);
  }

  /// Reserves pages so that sequence `seq` can run `tokens_ahead` more steps. All or nothing.
  [[nodiscard]] status reserve(int seq, int tokens_ahead, cudaStream_t stream = nullptr) noexcept {
    if (seq < 0 || seq >= layout_.sequences) return status::unknown_sequence;
    NOSA_TRY(load_plan_state(stream));
    if (!staged_live()[seq]) return status::unknown_sequence;
    NOSA_TRY(pages().reserve(staged_rows(), seq, seq + 1, tokens_ahead, layout_.max_tokens, config_.selection));
    return store_block_table(stream);
  }

  // ---------------------------------------------------------------------------------------------------
  // The step.
  // ---------------------------------------------------------------------------------------------------

  /// Enqueues one decode step of this layer on `stream`. Returns a status for bad views at once; errors
  /// that depend on the state are found on the device and read with `step_status()`.
  template <storage_element Out>
  [[nodiscard]] status step(const step_args<element_type, Out>& args, cudaStream_t stream = nullptr) noexcept {
    return enqueue_step(args, stream, [](step_stage) {});
  }

  /// `step` with the gather overlapped with attention over the resident blocks (see `cuda_overlap`). Takes
  /// effect for the offload store with 16-bit storage and D 64 or 128; otherwise it is `step`.
  template <storage_element Out>
  [[nodiscard]] status step(const step_args<element_type, Out>& args, cudaStream_t stream,
                            const cuda_overlap& overlap) noexcept {
    return enqueue_step(args, stream, [](step_stage) {}, step_stage::begin, step_stage::merge, &overlap);
  }

  /// The stages of a step, in launch order. `select` launches nothing for full attention; with the offload
  /// store its kernel also runs the set-difference, so `diff` launches nothing (it stays a stage for tools
  /// that number them); `gather` launches nothing with the resident store, except that with a quantized KV
  /// format it also quantises the blocks the step completes (both stores).
  enum class step_stage : int { begin, append_score, select, diff, gather, attention, merge };

  /// `step`, with `after(stage)` called on the host right after each stage's kernels are enqueued (to
  /// record events around them), restricted to the stages `first` to `last`. Running part of a step is for
  /// benchmarks and tools: the stages left out must have run before, as `step` runs them.
  template <storage_element Out, class After>
  [[nodiscard]] status enqueue_step(const step_args<element_type, Out>& args, cudaStream_t stream, After&& after,
                                    step_stage first = step_stage::begin,
                                    step_stage last = step_stage::merge,
                                    const cuda_overlap* overlap = nullptr) noexcept {
    const std::int64_t batch = args.sequences.extents[0];
    if (batch < 0) return status::shape_mismatch;
    const int hq = config_.num_q_heads, hkv = config_.num_kv_heads;
    NOSA_TRY(check_view(args.sequences, {batch}));
    NOSA_TRY(check_view(args.q, {batch, hq, head_dim}));
    NOSA_TRY(check_view(args.k, {batch, hkv, head_dim}));
    NOSA_TRY(check_view(args.v, {batch, hkv, head_dim}));
    if (P::uses_eviction_scores || !args.c.empty()) NOSA_TRY(check_view(args.c, {batch, hkv}));
    NOSA_TRY(check_view(args.o, {batch, hq, head_dim}));
    if (batch > std::int64_t(1) << 20) return status::invalid_argument;
    const int rows = static_cast<int>(batch) * hkv;
    const detail::sequence_source seqs{args.sequences, -1};
    const auto runs = [&](step_stage stage) { return first <= stage && stage <= last && (rows > 0 || stage == step_stage::begin); };
    constexpr int threads = detail::cuda_threads;
    if (runs(step_stage::begin)) {
      NOSA_CUDA_TRY(detail::launch_kernel(detail::begin_step_kernel<element_type, head_dim>, dim3(1), dim3(threads), 0,
                                          stream, state_.dependent_launch, 1, state_, seqs, static_cast<int>(batch)));
      after(step_stage::begin);
    }
    if (runs(step_stage::append_score)) {
      NOSA_CUDA_TRY(detail::launch_kernel(detail::append_kernel<P, element_type, head_dim>, dim3(rows), dim3(threads), 0,
                                          stream, state_.dependent_launch, 1, state_, seqs, args.k, args.v, args.c));
      if constexpr (!P::dense) {
        NOSA_CUDA_TRY(detail::launch_scoring<P>(state_, seqs, rows, 1, args.q, true, scoring_, stream));
      }
      after(step_stage::append_score);
    }
    if (runs(step_stage::select)) {
      if constexpr (!P::dense) {
        NOSA_CUDA_TRY(detail::launch_select<P>(state_, seqs, rows, 1, true, true, offloads, detail::count_mode::step,
                                               stream));
      }
      after(step_stage::select);
    }
    if (runs(step_stage::diff)) after(step_stage::diff);  // the selection kernel ran the set-difference
    // Overlap needs a transfer stream, both events, and a split of the attention into two parts (element
    // type only), with room for two partials a row in the split scratch: a batch of more rows than half the
    // scratch's partials attends in one part (two parts wrote past the scratch, over the step's status).
    const bool overlapped = offloads && mma_attention && !quantized && overlap != nullptr &&
                            overlap->transfer != nullptr && overlap->fork != nullptr &&
                            overlap->join != nullptr && layout_.max_splits >= 2 &&
                            std::int64_t(rows) * 2 <= std::int64_t(layout_.partials);
    if (runs(step_stage::gather)) {
      if constexpr (quantized) {
        // Codes and scales of the misses; the block this step completed, quantised from its tail buffer.
        detail::launch_fp8_gather<offloads>(state_, seqs, rows, true, stream);
      } else if constexpr (offloads) {
        cudaStream_t gather_stream = stream;
        if (overlapped) {
          NOSA_CUDA_TRY(cudaEventRecord(overlap->fork, stream));
          NOSA_CUDA_TRY(cudaStreamWaitEvent(overlap->transfer, overlap->fork, 0));
          gather_stream = overlap->transfer;
        }
        NOSA_CUDA_TRY(detail::launch_gather(state_, seqs, rows, true, gather_stream,
                              overlapped ? detail::overlapped_gather_target_ctas : detail::gather_target_ctas));
        if (overlapped) NOSA_CUDA_TRY(cudaEventRecord(overlap->join, overlap->transfer));
      }
      after(step_stage::gather);
    }
    // Splits of the attention: with overlap, about a quarter for the loaded blocks (a step loads few) and
    // the rest for the resident ones; the merge combines them all.
    int splits = rows > 0 ? attention_splits(rows) : 1;
    int loaded_splits = 0;
    if (overlapped) {
      loaded_splits = std::max(1, splits / 4);
      splits = std::max(1, std::min(splits - loaded_splits, layout_.max_splits - loaded_splits));
    }
    // The Hopper attention merges rows itself: in one launch, the splits of a row are a cluster of CTAs that
    // merge it together (at most `tma_cluster_max_splits` of them, a divisor of the head dimension's column
    // groups); across the two launches of the overlap, the CTA that finishes a row's last split merges it when
    // the row has few splits (one CTA's merge of many would take longer than the merge kernel).
    // A cluster launch is taken only when every row's cluster is resident at once (a second wave of clusters
    // costs more than the merge kernel), and, where it caps the splits below those wanted, only when a row's
    // tiles are few enough that latency, not bandwidth, bounds each CTA (a long dense row of a small batch
    // keeps its many splits and the merge kernel).
    detail::tma_merge merge_mode = detail::tma_merge::kernel;
    if (tma_.valid) {
      int capped = std::min(splits, detail::tma_cluster_max_splits);
      while (capped > 1 && ((head_dim / 4) % capped != 0 || (capped & (capped - 1)) != 0)) --capped;
      const int block_tiles = (config_.selection.block_size + detail::tma_tile_rows - 1) / detail::tma_tile_rows;
      const std::int64_t row_tiles = std::int64_t(P::dense ? layout_.max_blocks : config_.selection.top_k) * block_tiles;
      const int held = capped >= 2 ? tma_clusters_[capped == 2 ? 0 : capped == 4 ? 1 : 2] : 0;
      const bool resident = rows <= held;
      const bool worth = capped == splits || row_tiles <= 16 * std::int64_t(capped);
      if (!overlapped && capped >= 2 && resident && worth) {
        splits = capped;
        merge_mode = detail::tma_merge::cluster;
      } else if (splits + loaded_splits <= detail::tma_merge_max_splits) {
        merge_mode = detail::tma_merge::last_cta;
      }
    }
    const bool merged_in_attention = merge_mode != detail::tma_merge::kernel;
    if (runs(step_stage::attention)) {
      if constexpr (quantized) {
        if constexpr (fp8_attention) {
          detail::attention_fp8_kernel<P>
              <<<dim3(rows, splits), detail::fp8_attention_warps * 32,
                 detail::fp8_attention_smem_bytes<head_dim>(), stream>>>(state_, seqs, args.q);
        }
      } else if constexpr (mma_attention) {
        // One launch over `part`'s blocks as splits [base, base + count) of all of them.
        const auto attend = [&](detail::attend_part part, int base, int count) {
          const bool dependent = state_.dependent_launch;
          if (tma_.valid) {
            // The kernel's shared memory is above the default limit: opted into per output type (a host call
            // that enqueues nothing; `create` sizes the splits with the fp32-output instance).
            const auto kernel = detail::attention_tma_kernel<P, element_type, head_dim, Out>;
            const cudaError_t opted = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                           static_cast<int>(detail::tma_attention_smem_bytes<head_dim>()));
            if (opted != cudaSuccess) return opted;
            const bool clustered = merge_mode == detail::tma_merge::cluster;
            return detail::launch_kernel(kernel, clustered ? dim3(rows * count) : dim3(rows, count),
                                         dim3(detail::tma_threads), detail::tma_attention_smem_bytes<head_dim>(), stream,
                                         dependent, clustered ? count : 1, state_, seqs, args.q, args.o, tma_.keys,
                                         tma_.values, tma_.box_rows, part, base, splits + loaded_splits, merge_mode);
          }
          return detail::launch_kernel(detail::attention_mma_kernel<P, element_type, head_dim>, dim3(rows, count),
                                       dim3(detail::mma_warps * 32), detail::mma_attention_smem_bytes<head_dim>(), stream,
                                       dependent, 1, state_, seqs, args.q, part, base, splits + loaded_splits);
        };
        if (overlapped) {
          NOSA_CUDA_TRY(attend(detail::attend_part::resident, 0, splits));
          NOSA_CUDA_TRY(cudaStreamWaitEvent(stream, overlap->join, 0));
          NOSA_CUDA_TRY(attend(detail::attend_part::loaded, splits, loaded_splits));
        } else {
          NOSA_CUDA_TRY(attend(detail::attend_part::all, 0, splits));
        }
      } else {
        NOSA_CUDA_TRY(detail::launch_kernel(detail::attention_kernel<P, element_type, head_dim>, dim3(rows, splits),
                                            dim3(detail::attention_warps * 32), 0, stream, state_.dependent_launch, 1,
                                            state_, seqs, args.q));
      }
      after(step_stage::attention);
    }
    if (runs(step_stage::merge)) {
      if (!merged_in_attention) NOSA_CUDA_TRY(detail::launch_kernel(detail::merge_kernel<element_type, head_dim, Out>,
                                          dim3(rows, config_.group_size()), dim3(detail::merge_threads), 0, stream,
                                          state_.dependent_launch, 1, state_, seqs, args.o, splits + loaded_splits));
      after(step_stage::merge);
    }
    return detail::from_cuda(cudaGetLastError());
  }

  /// Prefill of a ragged batch of prompt chunks (see the host backend's `prefill` and `prefill_args`),
  /// enqueued on `stream`: no allocation, no synchronisation, `row_offsets` read on the device, so one call
  /// per chunk shape can be captured in a CUDA graph. Views are checked at once (and `rows` against
  /// `max_prefill_rows`); the offsets and the state (unknown, duplicate, full, unreserved) by the first kernel,
  /// whose status `step_status()` reads; a call that fails changes nothing.
  ///
  /// Runs on tensor cores: bf16 or fp16 storage, D 64 or 128, the element format (other pipelines give
  /// `not_supported`). The packed `k` and `v` rows must be 16-byte aligned (`misaligned_pointer`).
  /// \tparam Prefill `dense_prefill` or `sparse_prefill`; full attention has `dense_prefill` only
  template <prefill_policy Prefill = dense_prefill, storage_element Out>
  [[nodiscard]] status prefill(const prefill_args<element_type, Out>& args, cudaStream_t stream = nullptr) noexcept {
    static_assert(
        !Prefill::selects_per_token || !P::dense,
        "sparse_prefill attends each query's selection; full attention selects nothing: use dense_prefill");
    if constexpr (!prefill_on_tensor_cores) {
      return status::not_supported;
    } else {
      const std::int64_t batch = args.sequences.extents[0], rows = args.q.extents[0];
      if (batch < 0 || rows < 0) return status::shape_mismatch;
      const int hq = config_.num_q_heads, hkv = config_.num_kv_heads;
      NOSA_TRY(check_view(args.sequences, {batch}));
      NOSA_TRY(check_view(args.row_offsets, {batch + 1}));
      NOSA_TRY(check_view(args.q, {rows, hq, head_dim}));
      NOSA_TRY(check_view(args.k, {rows, hkv, head_dim}));
      NOSA_TRY(check_view(args.v, {rows, hkv, head_dim}));
      if (P::uses_eviction_scores || !args.c.empty()) NOSA_TRY(check_view(args.c, {rows, hkv}));
      NOSA_TRY(check_view(args.o, {rows, hq, head_dim}));
      if (rows > layout_.prefill_rows) return status::shape_mismatch;
      if (!rows_aligned(args.k) || !rows_aligned(args.v)) return status::misaligned_pointer;
      if (batch > std::int64_t(1) << 20) return status::invalid_argument;
      const int n = static_cast<int>(rows), bh = static_cast<int>(batch) * hkv;
      const detail::sequence_source seqs{args.sequences, -1};
      constexpr int threads = detail::cuda_threads;
      detail::begin_prefill_kernel<<<1, threads, 0, stream>>>(state_, seqs, args.row_offsets, static_cast<int>(batch),
                                                              n);
      if (bh == 0 || n == 0) return detail::from_cuda(cudaGetLastError());
      detail::prefill_append_kernel<P><<<bh, threads, 0, stream>>>(state_, seqs, args.row_offsets, args.k, args.c);
      // Scratch for a query of every chunk as a batch (`[B][H_q][D]`): the split-attention partials, which a
      // prefill does not use otherwise and which hold at least S * H_kv * G * D floats.
      element_type* staged = reinterpret_cast<element_type*>(device_ + layout_.partial_acc);
      tensor_view<const element_type, 3> staged_q;
      staged_q.data = staged;
      staged_q.extents[0] = batch;
      staged_q.extents[1] = hq;
      staged_q.extents[2] = head_dim;
      staged_q.strides[0] = std::int64_t(hq) * head_dim;
      staged_q.strides[1] = head_dim;
      staged_q.strides[2] = 1;
      if constexpr (Prefill::selects_per_token) {
        // Each row's selection, for the rows at offset i of every chunk at once (row i of a chunk that
        // starts at position t0 is the query at t0 + i, whose sequence has t0 + i + 1 tokens).
        for (int i = 0; i < n; ++i) {
          detail::stage_prefill_query_kernel<<<bh, threads, 0, stream>>>(state_, seqs, args.row_offsets, args.q, i,
                                                                         staged);
          NOSA_CUDA_TRY(detail::launch_scoring<P>(state_, seqs, bh, i + 1, staged_q, true, scoring_, stream, true));
          NOSA_CUDA_TRY(detail::launch_select<P>(state_, seqs, bh, i + 1, true, false, false,
                                                 detail::count_mode::prefill, stream));
          detail::record_row_selection_kernel<<<bh, 32, 0, stream>>>(state_, seqs, args.row_offsets, i);
        }
        const auto kernel = detail::sparse_prefill_kernel<P, element_type, head_dim, Out>;
        const int smem = static_cast<int>(detail::sparse_prefill_smem_bytes<head_dim>());
        NOSA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        kernel<<<dim3(n, hkv), detail::prefill_warps * 32, smem, stream>>>(
            state_, seqs, args.row_offsets, static_cast<int>(batch), args.q, args.k, args.v, args.o);
      } else {
        const auto kernel = detail::dense_prefill_kernel<P, element_type, head_dim, Out>;
        const int smem = static_cast<int>(detail::dense_prefill_smem_bytes<head_dim>());
        NOSA_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        const int per_cta = detail::prefill_tile_rows / config_.group_size();
        kernel<<<dim3((n + per_cta - 1) / per_cta, bh), detail::prefill_warps * 32, smem, stream>>>(
            state_, seqs, args.row_offsets, args.q, args.k, args.v, args.o);
      }
      const int per_row = std::clamp((n * head_dim + threads - 1) / threads, 1, 64);
      detail::prefill_store_kernel<P>
          <<<dim3(bh, per_row), threads, 0, stream>>>(state_, seqs, args.row_offsets, args.k, args.v);
      detail::prefill_restart_kernel<P><<<bh, threads, 0, stream>>>(state_, seqs, args.row_offsets);
      if constexpr (!P::dense) {
        // The selection of each chunk's last query, loaded as admission loads it.
        detail::stage_prefill_query_kernel<<<bh, threads, 0, stream>>>(state_, seqs, args.row_offsets, args.q, -1,
                                                                       staged);
        NOSA_CUDA_TRY(detail::launch_scoring<P>(state_, seqs, bh, 0, staged_q, true, scoring_, stream, true));
        NOSA_CUDA_TRY(detail::launch_select<P>(state_, seqs, bh, 0, true, false, offloads, detail::count_mode::prefill,
                                               stream));
        if constexpr (offloads) {
          NOSA_CUDA_TRY(
              detail::launch_gather(state_, seqs, bh, false, stream, detail::gather_target_ctas, /*prefill=*/true));
          detail::prefill_clear_misses_kernel<<<bh, 32, 0, stream>>>(state_, seqs, args.row_offsets);
        }
      }
      return detail::from_cuda(cudaGetLastError());
    }
  }

  // ---------------------------------------------------------------------------------------------------
  // Inspection: each call synchronises `stream` and reads state memory. Spans point into the host arena
  // and stay valid until the next call of the same function.
  // ---------------------------------------------------------------------------------------------------

  /// Status of the most recent step's state checks (`success` before the first step).
  status step_status(cudaStream_t stream = nullptr) const noexcept {
    std::int32_t code = 0;
    const status r = read_device(&code, layout_.step_status, 1, stream);
    return ok(r) ? static_cast<status>(code) : r;
  }
  counters total_counters(cudaStream_t stream = nullptr) const noexcept { return read_counters(layout_.totals, stream); }
  counters last_step_counters(cudaStream_t stream = nullptr) const noexcept {
    return read_counters(layout_.last_step, stream);
  }
  bool is_live(int seq, cudaStream_t stream = nullptr) const noexcept {
    if (seq < 0 || seq >= layout_.sequences) return false;
    std::int32_t live = 0;
    return ok(read_device(&live, layout_.seq_live + sizeof(std::int32_t) * seq, 1, stream)) && live != 0;
  }
  int length(int seq, cudaStream_t stream = nullptr) const noexcept {
    if (seq < 0 || seq >= layout_.sequences) return 0;
    std::int32_t live = 0, len = 0;
    const bool read = ok(copy_from_device(&live, layout_.seq_live + sizeof(std::int32_t) * seq, 1, stream)) &&
                      ok(copy_from_device(&len, layout_.seq_length + sizeof(std::int32_t) * seq, 1, stream)) &&
                      cudaStreamSynchronize(stream) == cudaSuccess;
    return read && live != 0 ? len : 0;
  }
  /// Pages not referenced by any sequence (host bookkeeping; does not synchronise).
  int free_page_count() const noexcept { return pages().free_count(); }
  std::span<const std::int32_t> selection(int seq, int head, cudaStream_t stream = nullptr) const noexcept {
    if (P::dense) return {};  // full attention reads every block
    if (seq < 0 || seq >= layout_.sequences || head < 0 || head >= config_.num_kv_heads) return {};
    const std::size_t i = std::size_t(seq) * config_.num_kv_heads + head;
    std::int32_t live = 0, count = 0;
    std::int32_t* out = hst<std::int32_t>(layout_.inspect_selection);
    const bool read =
        ok(copy_from_device(&live, layout_.seq_live + sizeof(std::int32_t) * seq, 1, stream)) &&
        ok(copy_from_device(&count, layout_.selection_count + sizeof(std::int32_t) * i, 1, stream)) &&
        ok(copy_from_device(out, layout_.selection + sizeof(std::int32_t) * i * layout_.top_k, layout_.top_k, stream)) &&
        cudaStreamSynchronize(stream) == cudaSuccess;
    if (!read || live == 0) return {};
    return {out, static_cast<std::size_t>(std::clamp(count, 0, layout_.top_k))};
  }
  int step_misses(int seq, int head, cudaStream_t stream = nullptr) const noexcept {
    if (seq < 0 || seq >= layout_.sequences || head < 0 || head >= config_.num_kv_heads) return 0;
    const std::size_t i = std::size_t(seq) * config_.num_kv_heads + head;
    std::int32_t live = 0, n = 0;
    const bool read = ok(copy_from_device(&live, layout_.seq_live + sizeof(std::int32_t) * seq, 1, stream)) &&
                      ok(copy_from_device(&n, layout_.step_misses + sizeof(std::int32_t) * i, 1, stream)) &&
                      cudaStreamSynchronize(stream) == cudaSuccess;
    return read && live != 0 ? n : 0;
  }
  /// The blocks packed row `row` of the most recent prefill attended for KV head `head` (see the host
  /// backend): its selection in rank order under `sparse_prefill`, else empty.
  std::span<const std::int32_t> prefill_selection(int row, int head, cudaStream_t stream = nullptr) const noexcept {
    if (P::dense || row < 0 || row >= layout_.prefill_rows || head < 0 || head >= config_.num_kv_heads) return {};
    const std::size_t i = std::size_t(row) * config_.num_kv_heads + head;
    std::int32_t count = 0;
    std::int32_t* out = hst<std::int32_t>(layout_.inspect_selection);
    const bool read =
        ok(copy_from_device(&count, layout_.row_selection_count + sizeof(std::int32_t) * i, 1, stream)) &&
        ok(copy_from_device(out, layout_.row_selection + sizeof(std::int32_t) * i * layout_.top_k, layout_.top_k,
                            stream)) &&
        cudaStreamSynchronize(stream) == cudaSuccess;
    if (!read) return {};
    return {out, static_cast<std::size_t>(std::clamp(count, 0, layout_.top_k))};
  }
  std::span<const std::int32_t> slots(int seq, int head, cudaStream_t stream = nullptr) const noexcept {
    if constexpr (!offloads) {
      return {};
    } else {
      if (seq < 0 || seq >= layout_.sequences || head < 0 || head >= config_.num_kv_heads) return {};
      const std::size_t i = std::size_t(seq) * config_.num_kv_heads + head;
      std::int32_t live = 0;
      std::int32_t* out = hst<std::int32_t>(layout_.inspect_slots);
      const bool read =
          ok(copy_from_device(&live, layout_.seq_live + sizeof(std::int32_t) * seq, 1, stream)) &&
          ok(copy_from_device(out, layout_.slot_map + sizeof(std::int32_t) * i * layout_.slots, layout_.slots, stream)) &&
          cudaStreamSynchronize(stream) == cudaSuccess;
      if (!read || live == 0) return {};
      return {out, static_cast<std::size_t>(layout_.slots)};
    }
  }
  const state_layout& layout() const noexcept { return layout_; }
  /// The kernels' view of the state (typed device pointers and extents), for tools and benchmarks that
  /// launch one stage's kernel on its own. Not needed to run a layer.
  const detail::cuda_state<element_type, head_dim>& kernel_state() const noexcept { return state_; }
  /// Parts each (sequence, KV head)'s attention is split into for a batch of `rows` (sequence, KV head)
  /// pairs: as many as fit in one wave of attention CTAs on the device (a second, partly empty wave would
  /// leave SMs idle), at least 1 and at most `layout().max_splits`, with `rows` times the parts within the
  /// split scratch (`layout().partials`).
  int attention_splits(int rows) const noexcept {
    const int wanted = attention_slots_ / std::max(rows, 1);
    const int held = layout_.partials / std::max(rows, 1);  // the scratch holds `partials` parts in all
    return std::max(1, std::min({wanted, layout_.max_splits, held}));
  }

 private:
  static constexpr bool offloads = P::store::offloads;
  /// 16-bit storage with D = 64 or 128 attends on tensor cores; other shapes on CUDA cores.
  static constexpr bool mma_attention = detail::uses_mma_attention<element_type, head_dim>;
  /// Complete blocks are FP8 codes plus a scale (spec §6b); the current block stays in the element type.
  static constexpr bool quantized = P::store::kv_format::quantized;
  /// A quantized format the kernels support: codes read by the tensor-core FP8 attention.
  static constexpr bool fp8_attention = quantized && detail::uses_fp8_attention<element_type, head_dim>;

  /// Prefill runs on tensor cores only: 16-bit storage, D 64 or 128, complete blocks in the element type.
  static constexpr bool prefill_on_tensor_cores = mma_attention && !quantized;

  /// True when every row of a packed `[N][H][D]` view starts on a 16-byte boundary (the prefill copies rows
  /// of K and V asynchronously in 16-byte pieces).
  static bool rows_aligned(const tensor_view<const element_type, 3>& x) noexcept {
    constexpr std::int64_t per = 16 / sizeof(element_type);
    return reinterpret_cast<std::uintptr_t>(x.data) % 16 == 0 && x.strides[0] % per == 0 && x.strides[1] % per == 0;
  }

  layer_config config_{};
  state_layout layout_{};
  std::byte* device_ = nullptr;
  std::byte* host_ = nullptr;
  std::byte* host_mapped_ = nullptr;
  int attention_slots_ = 1;
  detail::score_device scoring_{};
  detail::cuda_state<element_type, head_dim> state_{};
  detail::tma_maps tma_{};  ///< the attention's tensor maps (Hopper), when valid
  int tma_clusters_[3] = {0, 0, 0};  ///< clusters of 2, 4 and 8 attention CTAs the device holds at once

  static status check_config(const layer_config& config) noexcept {
    NOSA_TRY(validate(config));
    // FP8 blocks are attended on tensor cores only (bf16, fp16; D 64, 128).
    if (quantized && !fp8_attention) return status::not_supported;
    if (config.group_size() > max_group || config.selection.top_k > max_top_k) return status::not_supported;
    if (config.selection.block_size % 8 != 0) return status::not_supported;
    // The set-difference runs one thread per slot.
    if (P::store::offloads && config.selection.top_k + 1 + config.limits.cache_slots > detail::select_threads) {
      return status::not_supported;
    }
    return status::success;
  }

  template <class T>
  T* hst(std::size_t offset) const noexcept {
    return reinterpret_cast<T*>(host_ + offset);
  }
  std::int32_t* staging() const noexcept { return hst<std::int32_t>(layout_.staging); }
  // The staging area during `reserve`: block tables [S][MB], then live flags [S], then lengths [S].
  std::int32_t* staged_table(int seq) const noexcept { return staging() + std::size_t(seq) * layout_.max_blocks; }
  std::int32_t* staged_live() const noexcept { return staging() + std::size_t(layout_.sequences) * layout_.max_blocks; }
  std::int32_t* staged_lengths() const noexcept { return staged_live() + layout_.sequences; }
  page_pool::sequence_rows staged_rows() const noexcept {
    return {staged_live(), staged_lengths(), staged_table(0), layout_.max_blocks};
  }

  /// Enqueues a copy of `count` values of T at `offset` in the device arena to `dst`.
  template <class T>
  status copy_from_device(T* dst, std::size_t offset, std::size_t count, cudaStream_t stream) const noexcept {
    if (count == 0) return status::success;
    return detail::from_cuda(cudaMemcpyAsync(dst, device_ + offset, sizeof(T) * count, cudaMemcpyDeviceToHost, stream));
  }
  /// Copies `count` values of T from the device arena and waits.
  template <class T>
  status read_device(T* dst, std::size_t offset, std::size_t count, cudaStream_t stream) const noexcept {
    NOSA_TRY(copy_from_device(dst, offset, count, stream));
    return detail::from_cuda(cudaStreamSynchronize(stream));
  }

  counters read_counters(std::size_t offset, cudaStream_t stream) const noexcept {
    counters c{};
    if (!ok(read_device(&c, offset, 1, stream))) return counters{};
    return c;
  }

  status finish_plan(cudaStream_t stream) noexcept {
    NOSA_CUDA_TRY(cudaGetLastError());
    return detail::from_cuda(cudaStreamSynchronize(stream));
  }

  status initialise(cudaStream_t stream) noexcept {
    NOSA_CUDA_TRY(cudaMemsetAsync(device_, 0, layout_.device_bytes, stream));
    const std::size_t i32 = sizeof(std::int32_t);
    const std::size_t sh_total = std::size_t(layout_.sequences) * layout_.kv_heads;
    NOSA_CUDA_TRY(cudaMemsetAsync(device_ + layout_.block_table, 0xff,
                                  std::size_t(layout_.sequences) * layout_.max_blocks * i32, stream));
    if constexpr (offloads) {
      NOSA_CUDA_TRY(cudaMemsetAsync(device_ + layout_.slot_map, 0xff, sh_total * layout_.slots * i32, stream));
      NOSA_CUDA_TRY(cudaMemsetAsync(device_ + layout_.block_slot, 0xff, sh_total * layout_.max_blocks * i32, stream));
    }
    pages().reset();
    return detail::from_cuda(cudaStreamSynchronize(stream));
  }

  page_pool pages() const noexcept { return page_pool(layout_, host_); }

  /// Brings block tables, live flags and lengths into the staging area.
  status load_plan_state(cudaStream_t stream) noexcept {
    const std::size_t i32 = sizeof(std::int32_t);
    NOSA_CUDA_TRY(cudaStreamSynchronize(stream));
    NOSA_CUDA_TRY(cudaMemcpyAsync(staged_table(0), device_ + layout_.block_table,
                                  std::size_t(layout_.sequences) * layout_.max_blocks * i32, cudaMemcpyDeviceToHost,
                                  stream));
    NOSA_CUDA_TRY(cudaMemcpyAsync(staged_live(), device_ + layout_.seq_live, layout_.sequences * i32,
                                  cudaMemcpyDeviceToHost, stream));
    NOSA_CUDA_TRY(cudaMemcpyAsync(staged_lengths(), device_ + layout_.seq_length, layout_.sequences * i32,
                                  cudaMemcpyDeviceToHost, stream));
    return detail::from_cuda(cudaStreamSynchronize(stream));
  }

  status store_block_table(cudaStream_t stream) noexcept {
    NOSA_CUDA_TRY(cudaMemcpyAsync(device_ + layout_.block_table, staged_table(0),
                                  std::size_t(layout_.sequences) * layout_.max_blocks * sizeof(std::int32_t),
                                  cudaMemcpyHostToDevice, stream));
    return detail::from_cuda(cudaStreamSynchronize(stream));
  }
};

}  // namespace nosa
