#pragma once
/// \file
/// The CUDA backend tag and the mapping of CUDA runtime errors to library statuses.

#include <nosa/core/backend.hpp>
#include <nosa/core/status.hpp>

#include <cuda_runtime.h>

namespace nosa {

/// Executes every stage of a decode step as kernels on a CUDA stream. Steps only enqueue work: they never
/// allocate, synchronise or read device memory on the host, so an engine can capture them in a CUDA graph.
struct cuda_backend {
  /// The stream a step (or a plan call) is enqueued on; null is the legacy default stream.
  using stream_type = cudaStream_t;
};

namespace detail {
/// `success` for `cudaSuccess`; `insufficient_memory` for allocation failures; `backend_error` otherwise.
inline status from_cuda(cudaError_t e) noexcept {
  if (e == cudaSuccess) return status::success;
  if (e == cudaErrorMemoryAllocation) return status::insufficient_memory;
  return status::backend_error;
}
}  // namespace detail

}  // namespace nosa

/// Returns the mapped status from the enclosing function when a CUDA runtime call fails.
#define NOSA_CUDA_TRY(expr)                                                 \
  do {                                                                      \
    const ::nosa::status nosa_cuda_try_s = ::nosa::detail::from_cuda(expr); \
    if (nosa_cuda_try_s != ::nosa::status::success) return nosa_cuda_try_s; \
  } while (false)
