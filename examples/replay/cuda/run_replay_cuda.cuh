#pragma once
/// \file
/// Definition of `run_replay_cuda<Element, HeadDim, Format>`: the replay loop of `run_replay_impl.hpp` on the
/// CUDA backend. The inputs are converted to the storage element on the host and copied to device memory
/// once, before the first step; the attention output of every step goes to one device buffer that is copied
/// back at the end. Included only by the CUDA sources of this directory that instantiate it.

#include "../run_replay_impl.hpp"

#include <nosa/backend/cuda/arena.cuh>
#include <nosa/backend/cuda/backend.cuh>
#include <nosa/backend/cuda/decode_layer.cuh>
#include <nosa/backend/cuda/detail/attention_fp8.cuh>

#include <cuda_runtime.h>

#include <concepts>
#include <cstddef>
#include <string_view>
#include <type_traits>
#include <vector>

namespace replay {

namespace detail {

/// `{status, call, CUDA's description of e}`, or success.
inline replay_status cuda_failure(cudaError_t e, std::string_view call) noexcept {
  if (e == cudaSuccess) return {};
  cudaGetLastError();
  return {nosa::detail::from_cuda(e), call, cudaGetErrorString(e)};
}

/// Device memory for `bytes`, or the failure of `cudaMalloc`.
inline replay_status allocate_device(nosa::cuda_device_arena& memory, std::size_t bytes) noexcept {
  if (const nosa::status s = memory.allocate(bytes); !nosa::ok(s)) {
    // The arena reports a status; CUDA's last error says what happened.
    const cudaError_t e = cudaGetLastError();
    return e != cudaSuccess ? cuda_failure(e, "cudaMalloc") : replay_status{s, "cudaMalloc"};
  }
  return {};
}

template <>
struct replay_memory<nosa::cuda_backend> {
  template <class T>
  class input {
   public:
    template <class Source>
    input(const Source* src, std::size_t count) {
      status_ = allocate_device(memory_, count * sizeof(T));
      if (!nosa::ok(status_.status) || count == 0) return;
      const T* host = nullptr;
      std::vector<T> converted;
      if constexpr (std::same_as<T, Source>) {
        host = src;
      } else {
        converted.reserve(count);
        for (std::size_t i = 0; i < count; ++i) converted.push_back(T(src[i]));
        host = converted.data();
      }
      status_ = cuda_failure(
          cudaMemcpy(memory_.span().data(), host, count * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    }
    replay_status status() const noexcept { return status_; }
    const T* data() const noexcept { return reinterpret_cast<const T*>(memory_.span().data()); }

   private:
    nosa::cuda_device_arena memory_;
    replay_status status_;
  };

  class output {
   public:
    explicit output(std::vector<float>& o) : host_(o) {
      status_ = allocate_device(memory_, o.size() * sizeof(float));
    }
    replay_status status() const noexcept { return status_; }
    float* data() const noexcept { return reinterpret_cast<float*>(memory_.span().data()); }
    replay_status copy_back() noexcept {
      if (host_.empty()) return {};
      return cuda_failure(
          cudaMemcpy(host_.data(), data(), host_.size() * sizeof(float), cudaMemcpyDeviceToHost),
          "cudaMemcpy");
    }

   private:
    std::vector<float>& host_;
    nosa::cuda_device_arena memory_;
    replay_status status_;
  };

  static std::string_view explain_create(nosa::status s) noexcept {
    switch (s) {
    case nosa::status::not_supported:
      return "not supported by the cuda backend (it needs Hq/Hkv <= 16, --topk <= 256 and --block a multiple "
             "of 8)";
    case nosa::status::insufficient_memory:
      return "cannot allocate the layer's device memory and pinned host memory";
    default:
      return {};
    }
  }
};

}  // namespace detail

template <nosa::storage_element Element, int HeadDim, kv_format_kind Format>
replay_status run_replay_cuda(const options& opt, const replay_inputs& in, replay_outputs& out) {
  static_assert(cuda_fp8_compiled<Element, HeadDim> == nosa::detail::uses_fp8_attention<Element, HeadDim>,
                "the replay compiles FP8 for exactly the shapes of the CUDA backend's FP8 attention");
  static_assert(Format == kv_format_kind::element || cuda_fp8_compiled<Element, HeadDim>);
  replay_status result;
  const nosa::status dispatched =
      nosa::dispatch_value<variant_kind::nosa, variant_kind::infllmv2>(opt.variant, [&](auto variant) {
        return nosa::dispatch_value<store_kind::offload, store_kind::resident>(opt.store, [&](auto store) {
          using store_type = detail::store_of<decltype(store)::value, Format>;
          using pipeline = std::conditional_t<decltype(variant)::value == variant_kind::nosa,
                                              nosa::nosa_pipeline<Element, HeadDim, store_type>,
                                              nosa::infllmv2_pipeline<Element, HeadDim, store_type>>;
          static_assert(pipeline::attention::bias == cuda_bias(decltype(variant)::value));
          // parse_options refuses any other bias for the cuda backend; the caller dispatched the format.
          if (opt.bias != cuda_bias(opt.variant) || opt.kv_format != Format)
            return nosa::status::not_supported;
          result = detail::run_pipeline<pipeline, nosa::cuda_backend>(opt, in, out);
          return result.status;
        });
      });
  // A value outside the compiled lists never reached a pipeline.
  if (!nosa::ok(dispatched) && nosa::ok(result.status)) result = {dispatched, "dispatch"};
  return result;
}

}  // namespace replay
