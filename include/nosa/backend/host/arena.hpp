#pragma once
/// \file
/// Owning, aligned host memory for a layer's arenas. Allocation happens here, once, at set-up; steps never
/// allocate.

#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>

#include <cstddef>
#include <cstring>
#include <memory>
#include <new>
#include <span>

namespace nosa {

/// A zero-initialised block of host memory aligned to `arena_alignment`.
class host_arena {
 public:
  host_arena() = default;

  /// Allocates `bytes`; returns `insufficient_memory` if the allocation fails.
  [[nodiscard]] status allocate(std::size_t bytes) noexcept {
    data_.reset();
    size_ = 0;
    if (bytes == 0) return status::success;
    auto* p = static_cast<std::byte*>(::operator new(bytes, std::align_val_t{arena_alignment}, std::nothrow));
    if (p == nullptr) return status::insufficient_memory;
    std::memset(p, 0, bytes);
    data_.reset(p);
    size_ = bytes;
    return status::success;
  }

  std::span<std::byte> span() const noexcept { return {data_.get(), size_}; }
  std::size_t size() const noexcept { return size_; }

 private:
  struct aligned_delete {
    void operator()(std::byte* p) const noexcept { ::operator delete(p, std::align_val_t{arena_alignment}); }
  };
  std::unique_ptr<std::byte, aligned_delete> data_;
  std::size_t size_ = 0;
};

/// The host backend's two tiers are both ordinary memory.
template <>
struct arena_traits<host_backend> {
  using device_arena = nosa::host_arena;
  using host_arena = nosa::host_arena;
};

/// A layer together with the memory it runs in: the convenient form for tests, tools and engines that do
/// not manage memory themselves. `Layer` is a `decode_layer<P, Backend>`; the arenas come from
/// `arena_traits<Backend>` (include the backend's arena header).
template <class Layer>
class owning_layer {
  using traits = arena_traits<typename Layer::backend_type>;

 public:
  /// Allocates both arenas and creates the layer.
  [[nodiscard]] status create(const layer_config& config) noexcept {
    arena_sizes sizes;
    NOSA_TRY(Layer::required_bytes(config, sizes));
    NOSA_TRY(device_.allocate(sizes.device));
    NOSA_TRY(host_.allocate(sizes.host));
    return Layer::create(config, device_.span(), host_.span(), layer_);
  }

  Layer& operator*() noexcept { return layer_; }
  Layer* operator->() noexcept { return &layer_; }
  const Layer& operator*() const noexcept { return layer_; }
  const Layer* operator->() const noexcept { return &layer_; }

 private:
  typename traits::device_arena device_;
  typename traits::host_arena host_;
  Layer layer_;
};

}  // namespace nosa
