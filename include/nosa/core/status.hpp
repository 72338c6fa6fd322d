#pragma once
/// \file
/// Errors are values: every public entry point returns a `status`; nothing throws across the API.

#include <cstdint>
#include <string_view>

namespace nosa {

/// Outcome of a public call. Anything but `success` means the call changed no state.
enum class status : std::uint8_t {
  success = 0,
  invalid_argument,     ///< a parameter is out of its documented range
  invalid_config,       ///< inconsistent selection parameters (e.g. `k_qa > k`, `k` below the forced blocks)
  shape_mismatch,       ///< a view's extents disagree with the layer's configuration or with each other
  bad_layout,           ///< a view's innermost stride is not 1, or strides are negative
  null_pointer,         ///< a required pointer is null
  misaligned_pointer,   ///< a pointer is not aligned to its element type
  unknown_sequence,     ///< the sequence slot is out of range or not live
  sequence_exists,      ///< the sequence slot is already live
  duplicate_sequence,   ///< a batch names the same sequence twice
  sequence_full,        ///< the sequence would exceed the blocks-per-sequence capacity
  host_pool_full,       ///< not enough free pages in the paged pool
  not_reserved,         ///< a step needs a page that no plan call reserved
  insufficient_memory,  ///< an arena is smaller than `required_bytes`, or allocating one failed
  not_supported,        ///< a value outside the compiled set (head dim, dtype, ...)
  backend_error,        ///< the execution backend reported a failure
};

/// Short, stable, human-readable name of a status (no allocation).
constexpr std::string_view to_string(status s) noexcept {
  switch (s) {
    case status::success: return "success";
    case status::invalid_argument: return "invalid argument";
    case status::invalid_config: return "invalid selection configuration";
    case status::shape_mismatch: return "shape mismatch";
    case status::bad_layout: return "unsupported layout (innermost stride must be 1)";
    case status::null_pointer: return "null pointer";
    case status::misaligned_pointer: return "misaligned pointer";
    case status::unknown_sequence: return "unknown sequence";
    case status::sequence_exists: return "sequence slot already in use";
    case status::duplicate_sequence: return "sequence listed twice in one batch";
    case status::sequence_full: return "sequence exceeds its block capacity";
    case status::host_pool_full: return "page pool exhausted";
    case status::not_reserved: return "page not reserved by a plan call";
    case status::insufficient_memory: return "not enough memory (arena smaller than required, or allocation failed)";
    case status::not_supported: return "not supported";
    case status::backend_error: return "backend error";
  }
  return "unknown status";
}

/// True for `status::success`.
constexpr bool ok(status s) noexcept { return s == status::success; }

}  // namespace nosa

/// Returns early from the enclosing function with the status of `expr` unless it succeeded.
#define NOSA_TRY(expr)                                   \
  do {                                                   \
    if (const ::nosa::status nosa_try_s_ = (expr); !::nosa::ok(nosa_try_s_)) return nosa_try_s_; \
  } while (0)
