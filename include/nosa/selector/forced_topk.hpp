#pragma once
/// \file
/// The order every backend's top-k follows (spec §4, step 5): higher score first, the lower block index on
/// equal scores (including `+inf == +inf`), NaN treated as `-inf`. With one strict total order the host and
/// the GPU select the same set whatever algorithm each uses.

#include <nosa/core/concepts.hpp>
#include <nosa/core/math.hpp>
#include <nosa/core/numeric.hpp>

#include <cstdint>

namespace nosa {

/// Forced blocks + query-aware top-`k_qa` + query-agnostic top-`k`, lower index wins ties.
struct forced_topk_selector {
  /// Maps NaN to -inf so that a NaN score can never be selected ahead of a real one.
  NOSA_INLINE static constexpr float canonical(float s) noexcept { return s != s ? negative_infinity : s; }
  /// Strict total order: does block `a` with score `sa` rank before block `b` with score `sb`?
  NOSA_INLINE static constexpr bool ranks_before(float sa, int a, float sb, int b) noexcept {
    return sa > sb || (sa == sb && a < b);
  }
  /// A 64-bit key whose unsigned order is `ranks_before`: the canonical score's bits made monotonic (with
  /// -0 folded onto +0, which compare equal) above the complemented block index. Parallel top-k selects
  /// by key; keys of distinct blocks never tie.
  NOSA_INLINE static constexpr std::uint64_t sort_key(float s, int index) noexcept {
    const float c = canonical(s) == 0.0f ? 0.0f : canonical(s);
    const std::uint32_t u = nosa::detail::bit_cast<std::uint32_t>(c);
    const std::uint32_t ordered = (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
    return (std::uint64_t{ordered} << 32) | std::uint64_t{~static_cast<std::uint32_t>(index)};
  }
};
static_assert(selector_policy<forced_topk_selector>);

}  // namespace nosa
