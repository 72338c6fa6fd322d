#pragma once
/// \file
/// Owning CUDA memory for a layer's arenas: device memory for the device arena, pinned and mapped host
/// memory for the host arena (the pool the gather reads and the write-back writes over PCIe). Allocation
/// happens here, once, at set-up; steps never allocate.

#include <nosa/backend/cuda/backend.cuh>
#include <nosa/backend/host/arena.hpp>
#include <nosa/pipeline.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstring>
#include <span>
#include <utility>

namespace nosa {

namespace detail {
/// Move-only owner of one CUDA allocation; `Kind` supplies `allocate`, `release` and `zero`.
template <class Kind>
class cuda_allocation {
 public:
  cuda_allocation() = default;
  cuda_allocation(const cuda_allocation&) = delete;
  cuda_allocation& operator=(const cuda_allocation&) = delete;
  cuda_allocation(cuda_allocation&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  cuda_allocation& operator=(cuda_allocation&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  ~cuda_allocation() { reset(); }

  /// Allocates `bytes` (pinned host memory zero-filled); `insufficient_memory` or `backend_error` on failure.
  [[nodiscard]] status allocate(std::size_t bytes) noexcept {
    reset();
    if (bytes == 0) return status::success;
    void* p = nullptr;
    NOSA_CUDA_TRY(Kind::allocate(&p, bytes));
    data_ = static_cast<std::byte*>(p);
    size_ = bytes;
    return detail::from_cuda(Kind::zero(p, bytes));
  }

  std::span<std::byte> span() const noexcept { return {data_, size_}; }
  std::size_t size() const noexcept { return size_; }

 private:
  void reset() noexcept {
    if (data_ != nullptr) Kind::release(data_);
    data_ = nullptr;
    size_ = 0;
  }
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

struct device_memory {
  static cudaError_t allocate(void** p, std::size_t n) noexcept { return cudaMalloc(p, n); }
  static void release(void* p) noexcept { cudaFree(p); }
  /// Left as allocated: `decode_layer::create` initialises every byte of the device arena on its stream.
  static cudaError_t zero(void*, std::size_t) noexcept { return cudaSuccess; }
};

struct mapped_host_memory {
  static cudaError_t allocate(void** p, std::size_t n) noexcept {
    return cudaHostAlloc(p, n, cudaHostAllocMapped | cudaHostAllocPortable);
  }
  static void release(void* p) noexcept { cudaFreeHost(p); }
  static cudaError_t zero(void* p, std::size_t n) noexcept {
    std::memset(p, 0, n);
    return cudaSuccess;
  }
};
}  // namespace detail

/// Device memory from `cudaMalloc` (256-byte aligned). Not filled: `create` initialises the state.
using cuda_device_arena = detail::cuda_allocation<detail::device_memory>;
/// Pinned host memory mapped into the device address space (`cudaHostAlloc` with `cudaHostAllocMapped`),
/// zero-filled: what `decode_layer<P, cuda_backend>` requires of its host arena.
using cuda_pinned_arena = detail::cuda_allocation<detail::mapped_host_memory>;

template <>
struct arena_traits<cuda_backend> {
  using device_arena = cuda_device_arena;
  using host_arena = cuda_pinned_arena;
};

}  // namespace nosa
