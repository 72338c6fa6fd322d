#pragma once
/// \file
/// The demo on the CUDA backend: `layer_runner<Pipeline, nosa::cuda_backend>` and `run_demo_cuda`.
///
/// The demo hands every runner host views. This one copies them into device buffers on its own stream and
/// copies the attention output back: the step buffers are allocated once, at creation, for a full batch;
/// the prompt buffers grow at admission (a plan call) to the longest prompt so far. A step enqueues the
/// copies and the layer's kernels, then reads `step_status` on the stream, which waits for the step: the
/// time the demo measures around `step` therefore includes the copies of the batch and the wait.

#include "../demo.hpp"

#include <nosa/cuda.cuh>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <span>

namespace demo {

namespace cuda_detail {

/// Bytes of a contiguous view (0 for an empty one).
template <class T, int Rank>
std::size_t bytes_of(const nosa::tensor_view<T, Rank>& v) noexcept {
  if (v.empty()) return 0;
  std::size_t n = sizeof(T);
  for (int d = 0; d < Rank; ++d) n *= static_cast<std::size_t>(v.extents[d]);
  return n;
}

/// Makes `buffer` hold at least `bytes` (growing only; the contents are not kept).
inline nosa::status reserve_bytes(nosa::cuda_device_arena& buffer, std::size_t bytes) noexcept {
  return buffer.size() >= bytes ? nosa::status::success : buffer.allocate(bytes);
}

/// Copies the contiguous host view `src` into `buffer` on `stream` and returns the same view over the copy
/// (an empty view stays empty).
template <class T, int Rank>
nosa::status stage(const nosa::tensor_view<const T, Rank>& src, const nosa::cuda_device_arena& buffer,
                   cudaStream_t stream, nosa::tensor_view<const T, Rank>& out) noexcept {
  out = src;
  if (src.empty()) return nosa::status::success;
  const std::size_t bytes = bytes_of(src);
  out.data = reinterpret_cast<const T*>(buffer.span().data());
  if (bytes == 0) return nosa::status::success;
  NOSA_CUDA_TRY(cudaMemcpyAsync(buffer.span().data(), src.data, bytes, cudaMemcpyHostToDevice, stream));
  return nosa::status::success;
}

}  // namespace cuda_detail

template <class Pipeline>
class layer_runner<Pipeline, nosa::cuda_backend> {
 public:
  using element_type = typename Pipeline::element_type;
  using layer_type = nosa::decode_layer<Pipeline, nosa::cuda_backend>;

  layer_runner() = default;
  layer_runner(const layer_runner&) = delete;
  layer_runner& operator=(const layer_runner&) = delete;
  ~layer_runner() {
    if (stream_ != nullptr) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
  }

  [[nodiscard]] nosa::status create(const nosa::layer_config& config) {
    NOSA_TRY(layer_type::required_bytes(config, sizes_));
    // A blocking stream: it is ordered after the legacy default stream, on which the arenas and the
    // buffers below are initialised.
    NOSA_CUDA_TRY(cudaStreamCreate(&stream_));
    NOSA_TRY(layer_.create(config));
    const std::size_t rows = static_cast<std::size_t>(config.limits.max_sequences);
    const std::size_t hq = static_cast<std::size_t>(config.num_q_heads);
    const std::size_t hkv = static_cast<std::size_t>(config.num_kv_heads);
    const std::size_t d = Pipeline::head_dim;
    NOSA_TRY(sequences_.allocate(rows * sizeof(std::int32_t)));
    NOSA_TRY(q_.allocate(rows * hq * d * sizeof(element_type)));
    NOSA_TRY(k_.allocate(rows * hkv * d * sizeof(element_type)));
    NOSA_TRY(v_.allocate(rows * hkv * d * sizeof(element_type)));
    NOSA_TRY(c_.allocate(rows * hkv * sizeof(float)));
    NOSA_TRY(o_.allocate(rows * hq * d * sizeof(float)));
    return nosa::status::success;
  }
  /// Bytes of the device tier and of the host tier (pinned) of the layer.
  nosa::arena_sizes arena_bytes() const noexcept { return sizes_; }

  [[nodiscard]] nosa::status add_sequence(int slot, const nosa::prompt_args<element_type>& prompt) {
    using cuda_detail::bytes_of;
    using cuda_detail::reserve_bytes;
    NOSA_TRY(reserve_bytes(prompt_k_, bytes_of(prompt.k)));
    NOSA_TRY(reserve_bytes(prompt_v_, bytes_of(prompt.v)));
    NOSA_TRY(reserve_bytes(prompt_c_, bytes_of(prompt.c)));
    NOSA_TRY(reserve_bytes(prompt_q_, bytes_of(prompt.last_query)));
    nosa::prompt_args<element_type> staged;
    NOSA_TRY(cuda_detail::stage(prompt.k, prompt_k_, stream_, staged.k));
    NOSA_TRY(cuda_detail::stage(prompt.v, prompt_v_, stream_, staged.v));
    NOSA_TRY(cuda_detail::stage(prompt.c, prompt_c_, stream_, staged.c));
    NOSA_TRY(cuda_detail::stage(prompt.last_query, prompt_q_, stream_, staged.last_query));
    return layer_->add_sequence(slot, staged, stream_);
  }
  [[nodiscard]] nosa::status remove_sequence(int slot) { return layer_->remove_sequence(slot, stream_); }
  [[nodiscard]] nosa::status reserve(int tokens_ahead) { return layer_->reserve(tokens_ahead, stream_); }

  /// Stages the batch, enqueues the step, copies the output back and waits for the step's status.
  [[nodiscard]] nosa::status step(const nosa::step_args<element_type, float>& args) {
    nosa::step_args<element_type, float> staged;
    NOSA_TRY(cuda_detail::stage(args.sequences, sequences_, stream_, staged.sequences));
    NOSA_TRY(cuda_detail::stage(args.q, q_, stream_, staged.q));
    NOSA_TRY(cuda_detail::stage(args.k, k_, stream_, staged.k));
    NOSA_TRY(cuda_detail::stage(args.v, v_, stream_, staged.v));
    NOSA_TRY(cuda_detail::stage(args.c, c_, stream_, staged.c));
    staged.o = args.o;
    staged.o.data = reinterpret_cast<float*>(o_.span().data());
    NOSA_TRY(layer_->step(staged, stream_));
    if (const std::size_t bytes = cuda_detail::bytes_of(args.o); bytes > 0) {
      NOSA_CUDA_TRY(cudaMemcpyAsync(args.o.data, staged.o.data, bytes, cudaMemcpyDeviceToHost, stream_));
    }
    return layer_->step_status(stream_);
  }

  nosa::counters last_step_counters() const noexcept { return layer_->last_step_counters(stream_); }
  nosa::counters total_counters() const noexcept { return layer_->total_counters(stream_); }
  /// Valid until the next call of `selection` on this runner.
  std::span<const std::int32_t> selection(int slot, int head) const noexcept {
    return layer_->selection(slot, head, stream_);
  }
  int step_misses(int slot, int head) const noexcept { return layer_->step_misses(slot, head, stream_); }
  int free_pages() const noexcept { return layer_->free_page_count(); }

 private:
  cudaStream_t stream_ = nullptr;
  nosa::owning_layer<layer_type> layer_;
  nosa::arena_sizes sizes_{};
  nosa::cuda_device_arena sequences_, q_, k_, v_, c_, o_;              // one batch, sized at creation
  nosa::cuda_device_arena prompt_k_, prompt_v_, prompt_c_, prompt_q_;  // the longest prompt so far
};

template <nosa::storage_element Element, int HeadDim>
run_error run_demo_cuda(const options& opt) {
  return run_demo<Element, HeadDim, nosa::cuda_backend>(opt);
}

}  // namespace demo
