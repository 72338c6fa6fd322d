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

}  // namespace nosa
