#pragma once
/// \file
/// Backend tags. A pipeline runs on the backend named by one template argument; user code changes nothing
/// else to move between them.

namespace nosa {

/// Plain C++ executor: every stage runs on the calling thread over host memory. The readable reference the
/// other backends are tested against, and a usable CPU path. Its "device" tier is ordinary memory.
struct host_backend {
  /// Host work is synchronous; the stream parameter exists so call sites look alike on every backend.
  struct stream_type {};
};

/// The owning memory types a backend's arenas live in, for `owning_layer`: `device_arena` and `host_arena`,
/// each with `status allocate(std::size_t)` and `std::span<std::byte> span() const`. Specialised next to
/// each backend.
template <class Backend>
struct arena_traits;

}  // namespace nosa
