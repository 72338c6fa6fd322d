#pragma once
/// \file
/// What `layer_impl` needs to know about the host backend: it reads ordinary host memory (CUDA pinned and
/// managed memory included), on the calling thread, with no stream and no device.

#include "layer.hpp"

#include <nosa/core/backend.hpp>

#include <cstdint>
#include <string>
#include <string_view>

namespace nosa_python {

template <class Backend>
struct backend_glue;

template <>
struct backend_glue<nosa::host_backend> {
  static constexpr std::string_view name = "host";
  /// Step arrays are host memory, so a failed step's message can name the offending row.
  static constexpr bool host_readable_steps = true;

  static nosa::host_backend::stream_type stream(std::uintptr_t) noexcept { return {}; }

  static problem check_memory(const array_ref& a, std::string_view name, int) {
    if (a.memory == memory_kind::cpu || a.memory == memory_kind::cuda_host ||
        a.memory == memory_kind::cuda_managed) {
      return {};
    }
    return fail(nosa::status::invalid_argument,
                std::string(name) +
                    " is not in host memory; a layer on device \"cpu\" reads host arrays (NumPy, "
                    "CPU tensors)");
  }

  /// Nothing to select on the host.
  struct device_scope {
    explicit device_scope(int) noexcept {}
    problem result() const { return {}; }
  };
};

}  // namespace nosa_python
