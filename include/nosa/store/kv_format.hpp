#pragma once
/// \file
/// How the complete blocks of the KV cache are stored (spec §6b): in the engine's element type, or in FP8
/// E4M3 with one fp32 scale per (block, KV head) for K and one for V.
///
/// The format is a knob of the store (`basic_offload_store<Format>`, `basic_resident_store<Format>`). It
/// covers complete blocks only, in the pool and the slot cache: the tail (current) block, the key ring and
/// the compressed keys stay in the element type, so the selection never depends on the format. A block is
/// quantised once, when it completes (the write-back of its step) or, for the complete blocks of a prompt,
/// at admission; the step at which its last token arrives still attends it in the element type.

#include <nosa/core/concepts.hpp>
#include <nosa/core/config.hpp>
#include <nosa/core/numeric.hpp>

namespace nosa {

/// Complete blocks in the pipeline's element type, exactly as the engine handed them over (the default).
struct element_kv {
  static constexpr bool quantized = false;
  template <storage_element Element>
  using value_type = Element;
};
static_assert(kv_format_policy<element_kv>);

/// FP8 E4M3 ("fn", largest finite value 448) with one fp32 scale per (block, KV head) for K and one for V.
///
/// For the `b_s x D` values `x` of one block of one KV head, K or V: `amax = max |x|`,
/// `scale = amax / 448` and `code = e4m3(x * (448 / amax))`, rounded to nearest, ties to even, saturating at
/// +-448; attention reads `float(code) * scale`. A block whose `448 / amax` is not a finite positive fp32
/// number (all zeros; a largest magnitude below about 1.3e-36, where the division overflows; or an infinite
/// value) is stored with multiplier 0 and scale 1: its finite values become zeros, which a block of zeros
/// keeps exactly. The block's largest magnitude ignores NaN; inputs are expected to be finite.
///
/// One block-head of K or V takes `b_s * D + 4` bytes, against `2 b_s D` for bf16 and fp16.
struct fp8_e4m3_kv {
  static constexpr bool quantized = true;
  template <storage_element Element>
  using value_type = fp8_e4m3;
  /// The largest finite E4M3 value, to which a block's largest magnitude is mapped.
  static constexpr float code_max = 448.0f;

  /// The factor every value of a block with largest magnitude `amax` is multiplied by before rounding:
  /// `448 / amax`, or 0 when that is not a finite positive number.
  NOSA_INLINE static constexpr float multiplier(float amax) noexcept {
    if (!(amax > 0.0f)) return 0.0f;
    const float m = code_max / amax;
    return m > 0.0f && m <= 0x1.fffffep+127f ? m : 0.0f;
  }
  /// The block's fp32 scale: `amax / 448`, or 1 where `multiplier` is 0.
  NOSA_INLINE static constexpr float scale(float amax) noexcept {
    return multiplier(amax) > 0.0f ? amax / code_max : 1.0f;
  }
  /// The code of value `x` of a block whose `multiplier(amax)` is `multiplier`.
  NOSA_INLINE static constexpr fp8_e4m3 encode(float x, float multiplier) noexcept {
    return fp8_e4m3(x * multiplier);
  }
  /// The value attention reads for `code` of a block with scale `scale`.
  NOSA_INLINE static constexpr float decode(fp8_e4m3 code, float scale) noexcept {
    return static_cast<float>(code) * scale;
  }
};
static_assert(kv_format_policy<fp8_e4m3_kv>);

}  // namespace nosa
