#pragma once
/// \file
/// What `layer_impl` needs to know about the CUDA backend: it reads memory of the layer's GPU (device or
/// managed memory, or pinned host memory, which every GPU can address), on the caller's stream, and every
/// call runs with the layer's device current.

#include "layer.hpp"

#include <nosa/backend/cuda/backend.cuh>
#include <nosa/backend/cuda/decode_layer.cuh>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>

namespace nosa_python {

template <class Backend>
struct backend_glue;

template <>
struct backend_glue<nosa::cuda_backend> {
  static constexpr std::string_view name = "CUDA";
  /// Step arrays are device memory: a failed step's message cannot name the row.
  static constexpr bool host_readable_steps = false;

  static cudaStream_t stream(std::uintptr_t s) noexcept { return reinterpret_cast<cudaStream_t>(s); }

  static problem check_memory(const array_ref& a, std::string_view name, int device) {
    const bool on_device = (a.memory == memory_kind::cuda || a.memory == memory_kind::cuda_managed);
    if ((on_device && a.device_id == device) || a.memory == memory_kind::cuda_host) return {};
    const std::string where = on_device ? "cuda:" + std::to_string(a.device_id) : std::string("host memory");
    return fail(nosa::status::invalid_argument, std::string(name) + " is in " + where +
                                                    "; this layer runs on cuda:" + std::to_string(device) +
                                                    " and reads arrays on that device");
  }

  /// Makes the layer's device current for the duration of a call and restores the caller's afterwards.
  /// Neither call waits for the device or is refused during a stream capture.
  class device_scope {
   public:
    explicit device_scope(int device) noexcept {
      if (cudaGetDevice(&previous_) != cudaSuccess) {
        cudaGetLastError();
        error_ = true;
        return;
      }
      if (previous_ != device && cudaSetDevice(device) != cudaSuccess) {
        cudaGetLastError();
        error_ = true;
        return;
      }
      switched_ = previous_ != device;
    }
    ~device_scope() {
      if (switched_) cudaSetDevice(previous_);
    }
    device_scope(const device_scope&) = delete;
    device_scope& operator=(const device_scope&) = delete;

    problem result() const {
      if (error_)
        return fail(nosa::status::backend_error, "the CUDA runtime could not select the layer's device");
      return {};
    }

   private:
    int previous_ = 0;
    bool switched_ = false;
    bool error_ = false;
  };
};

}  // namespace nosa_python
