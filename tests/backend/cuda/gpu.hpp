#pragma once
// What every CUDA test needs besides the library: finding out whether a GPU is there (each test skips itself
// cleanly without one), the short mode the sanitizer runs use, CUDA error checks as doctest assertions, and
// small owners of device memory, pinned memory and streams.

#include <nosa/core/status.hpp>

#include <cuda_runtime.h>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

/// Statuses print by name in assertion messages.
template <>
struct doctest::StringMaker<nosa::status> {
  static doctest::String convert(nosa::status s) { return std::string(nosa::to_string(s)).c_str(); }
};

namespace nosa_cuda_test {

/// Why no CUDA device can be used, or an empty string when one can. Asked once per process.
inline const std::string& gpu_absence_reason() {
  static const std::string reason = [] {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
    }
    if (count == 0) return std::string("cudaGetDeviceCount found no device");
    return std::string();
  }();
  return reason;
}

/// True when a CUDA device can run the tests.
inline bool gpu_available() { return gpu_absence_reason().empty(); }

/// True when NOSA_TEST_SHORT is set to anything but "" or "0": the sanitizer runs, where every kernel is
/// 10-100x slower, ask each test for a short variant of itself.
inline bool short_run() {
  const char* v = std::getenv("NOSA_TEST_SHORT");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// `full` normally, `brief` under NOSA_TEST_SHORT.
inline int scaled(int full, int brief) { return short_run() ? brief : full; }

/// True when NOSA_TEST_REQUIRE_GPU is set to anything but "" or "0": on a machine that is meant to have a
/// GPU (scripts/gpu-suite.sh sets it), a test without one must fail instead of passing by skipping itself.
inline bool gpu_required() {
  const char* v = std::getenv("NOSA_TEST_REQUIRE_GPU");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

}  // namespace nosa_cuda_test

/// First statement of every CUDA test case: without a usable device the case says so and passes (or fails,
/// under NOSA_TEST_REQUIRE_GPU).
#define NOSA_REQUIRE_GPU()                                                                             \
  do {                                                                                                 \
    if (!::nosa_cuda_test::gpu_available()) {                                                          \
      if (::nosa_cuda_test::gpu_required()) {                                                          \
        FAIL("no CUDA device although NOSA_TEST_REQUIRE_GPU is set ("                                  \
             << ::nosa_cuda_test::gpu_absence_reason() << ")");                                        \
      }                                                                                                \
      MESSAGE("no CUDA device: skipping (" << ::nosa_cuda_test::gpu_absence_reason() << ")");          \
      return;                                                                                          \
    }                                                                                                  \
  } while (false)

/// Asserts that a CUDA runtime call succeeded, naming the call and the error otherwise.
#define NOSA_CUDA_REQUIRE(expr)                                                                   \
  do {                                                                                            \
    const cudaError_t nosa_cuda_require_e = (expr);                                               \
    if (nosa_cuda_require_e != cudaSuccess) {                                                     \
      FAIL(#expr << " failed: " << cudaGetErrorName(nosa_cuda_require_e) << " ("                  \
                 << cudaGetErrorString(nosa_cuda_require_e) << ")");                              \
    }                                                                                             \
  } while (false)

namespace nosa_cuda_test {

/// A non-blocking stream (it does not synchronise with the legacy default stream, as an engine's would not).
class stream {
 public:
  stream() { NOSA_CUDA_REQUIRE(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~stream() {
    if (s_ != nullptr) cudaStreamDestroy(s_);
  }
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  cudaStream_t get() const noexcept { return s_; }
  operator cudaStream_t() const noexcept { return s_; }
  void sync() const { NOSA_CUDA_REQUIRE(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

/// `count` elements of device memory (cudaMalloc); null when empty.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t count) : n_(count) {
    if (count > 0) {
      void* p = nullptr;
      NOSA_CUDA_REQUIRE(cudaMalloc(&p, count * sizeof(T)));
      p_ = static_cast<T*>(p);
    }
  }
  ~device_buffer() {
    if (p_ != nullptr) cudaFree(p_);
  }
  device_buffer(device_buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;

  T* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }

  /// Copies `count` elements from host memory on `s` (ordered with the stream's other work).
  void upload(const T* src, std::size_t count, cudaStream_t s) {
    REQUIRE(count <= n_);
    if (count > 0) NOSA_CUDA_REQUIRE(cudaMemcpyAsync(p_, src, count * sizeof(T), cudaMemcpyHostToDevice, s));
  }
  /// Copies `count` elements to host memory on `s` and waits for them.
  void download(T* dst, std::size_t count, cudaStream_t s) const {
    REQUIRE(count <= n_);
    if (count > 0) NOSA_CUDA_REQUIRE(cudaMemcpyAsync(dst, p_, count * sizeof(T), cudaMemcpyDeviceToHost, s));
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(s));
  }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// `count` elements of pinned host memory (cudaMallocHost), for asynchronous copies.
template <class T>
class pinned_buffer {
 public:
  pinned_buffer() = default;
  explicit pinned_buffer(std::size_t count) : n_(count) {
    if (count > 0) {
      void* p = nullptr;
      NOSA_CUDA_REQUIRE(cudaMallocHost(&p, count * sizeof(T)));
      p_ = static_cast<T*>(p);
    }
  }
  ~pinned_buffer() {
    if (p_ != nullptr) cudaFreeHost(p_);
  }
  pinned_buffer(pinned_buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  pinned_buffer& operator=(pinned_buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  pinned_buffer(const pinned_buffer&) = delete;
  pinned_buffer& operator=(const pinned_buffer&) = delete;

  T* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace nosa_cuda_test
