#pragma once
/// \file
/// Storage element types, the FP8 E4M3 type of a quantised KV cache, and their bit-exact conversions to and
/// from fp32.
///
/// `bf16` and `fp16` have the same object representation as CUDA's `__nv_bfloat16` and `__half`, so an
/// engine can hand its device buffers to the library through a `reinterpret_cast`. The conversions round to
/// nearest, ties to even, keep NaN quiet and handle subnormals: the host backend and a GPU backend round every
/// value identically.

#include <nosa/core/config.hpp>

#include <concepts>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace nosa {

namespace detail {

template <class To, class From>
NOSA_INLINE constexpr To bit_cast(const From& from) noexcept {
  static_assert(sizeof(To) == sizeof(From));
  return __builtin_bit_cast(To, from);
}

NOSA_INLINE constexpr std::uint16_t float_to_bf16_bits(float f) noexcept {
  const std::uint32_t u = bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  const std::uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((u + rounding_bias) >> 16);
}

NOSA_INLINE constexpr float bf16_bits_to_float(std::uint16_t b) noexcept {
  return bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

NOSA_INLINE constexpr std::uint16_t float_to_fp16_bits(float f) noexcept {
  const std::uint32_t x = bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
  if (ax >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                                     // fp16 subnormal or zero
    if (ax < 0x33000000u) return static_cast<std::uint16_t>(sign);            // below half the smallest step
    const std::uint32_t exponent = ax >> 23;
    const std::uint32_t mantissa = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exponent;  // 14..24
    std::uint32_t r = mantissa >> shift;
    const std::uint32_t rem = mantissa & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  const std::uint32_t rebased = ax - 0x38000000u;  // exponent bias 127 -> 15
  std::uint32_t h = rebased >> 13;
  const std::uint32_t rem = rebased & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

NOSA_INLINE constexpr float fp16_bits_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    // m * 2^-24 is exact in fp32 for m < 1024.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bit_cast<float>(sign | bit_cast<std::uint32_t>(magnitude));
  }
  if (exponent == 31) return bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/// FP8 E4M3 ("fn": exponent bias 7, no infinities, NaN 0x7f/0xff, largest finite 448): round to nearest,
/// ties to even, saturating at +-448 (infinities included); NaN stays NaN.
NOSA_INLINE constexpr std::uint8_t float_to_e4m3_bits(float f) noexcept {
  const std::uint32_t x = bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 24) & 0x80u;
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<std::uint8_t>(sign | 0x7fu);  // NaN
  if (ax >= 0x43e00000u) return static_cast<std::uint8_t>(sign | 0x7eu); // >= 448: saturate
  if (ax < 0x3c800000u) {                                                 // below 2^-6: multiples of 2^-9
    if (ax <= 0x3a800000u) return static_cast<std::uint8_t>(sign);        // at most half a step: zero
    const std::uint32_t exponent = ax >> 23;                              // 117..120
    const std::uint32_t mantissa = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 141u - exponent;                          // 21..24
    std::uint32_t r = mantissa >> shift;
    const std::uint32_t rem = mantissa & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;                     // r == 8 is the smallest normal
    return static_cast<std::uint8_t>(sign | r);
  }
  const std::uint32_t rebased = ax - 0x3c000000u;  // exponent bias 127 -> 7
  std::uint32_t q = rebased >> 20;
  const std::uint32_t rem = rebased & 0xfffffu;
  if (rem > 0x80000u || (rem == 0x80000u && (q & 1u))) ++q;
  if (q > 0x7eu) q = 0x7eu;  // a carry past 448 saturates too
  return static_cast<std::uint8_t>(sign | q);
}

NOSA_INLINE constexpr float e4m3_bits_to_float(std::uint8_t b) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(b & 0x80u) << 24;
  const std::uint32_t exponent = (b >> 3) & 0xfu;
  const std::uint32_t mantissa = b & 0x7u;
  if (exponent == 15 && mantissa == 7) return bit_cast<float>(sign | 0x7fc00000u);  // NaN
  if (exponent == 0) {
    // m * 2^-9 is exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 0.001953125f;
    return bit_cast<float>(sign | bit_cast<std::uint32_t>(magnitude));
  }
  return bit_cast<float>(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

}  // namespace detail

/// bfloat16 storage: 1 sign, 8 exponent, 7 mantissa bits. Arithmetic happens in fp32.
struct bf16 {
  std::uint16_t bits;  ///< raw encoding, identical to `__nv_bfloat16`

  bf16() = default;
  NOSA_HOST_DEVICE constexpr explicit bf16(float f) noexcept : bits(detail::float_to_bf16_bits(f)) {}
  NOSA_HOST_DEVICE constexpr explicit operator float() const noexcept { return detail::bf16_bits_to_float(bits); }
  /// Wraps a raw encoding without conversion.
  NOSA_HOST_DEVICE static constexpr bf16 from_bits(std::uint16_t b) noexcept {
    bf16 r{};
    r.bits = b;
    return r;
  }
};

/// IEEE binary16 storage: 1 sign, 5 exponent, 10 mantissa bits. Arithmetic happens in fp32.
struct fp16 {
  std::uint16_t bits;  ///< raw encoding, identical to `__half`

  fp16() = default;
  NOSA_HOST_DEVICE constexpr explicit fp16(float f) noexcept : bits(detail::float_to_fp16_bits(f)) {}
  NOSA_HOST_DEVICE constexpr explicit operator float() const noexcept { return detail::fp16_bits_to_float(bits); }
  /// Wraps a raw encoding without conversion.
  NOSA_HOST_DEVICE static constexpr fp16 from_bits(std::uint16_t b) noexcept {
    fp16 r{};
    r.bits = b;
    return r;
  }
};

/// FP8 E4M3, the "fn" variant of the OCP 8-bit formats: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no
/// infinities, NaN at 0x7f and 0xff, largest finite value 448, smallest subnormal 2^-9. The encoding of CUDA's
/// `__nv_fp8_e4m3`. Not a storage element of q, K and V: the KV cache may keep its complete blocks in it
/// (`fp8_e4m3_kv`, spec §6b).
struct fp8_e4m3 {
  std::uint8_t bits;  ///< raw encoding, identical to `__nv_fp8_e4m3`

  fp8_e4m3() = default;
  /// Rounds to nearest, ties to even, saturating at +-448 (infinities too); NaN stays NaN (CUDA's
  /// `__NV_SATFINITE` conversion).
  NOSA_HOST_DEVICE constexpr explicit fp8_e4m3(float f) noexcept : bits(detail::float_to_e4m3_bits(f)) {}
  NOSA_HOST_DEVICE constexpr explicit operator float() const noexcept { return detail::e4m3_bits_to_float(bits); }
  /// Wraps a raw encoding without conversion.
  NOSA_HOST_DEVICE static constexpr fp8_e4m3 from_bits(std::uint8_t b) noexcept {
    fp8_e4m3 r{};
    r.bits = b;
    return r;
  }
};

static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16> && std::is_standard_layout_v<bf16>);
static_assert(sizeof(fp16) == 2 && std::is_trivially_copyable_v<fp16> && std::is_standard_layout_v<fp16>);
static_assert(sizeof(fp8_e4m3) == 1 && std::is_trivially_copyable_v<fp8_e4m3> &&
              std::is_standard_layout_v<fp8_e4m3>);

/// A type the KV cache and the queries may be stored in; all arithmetic is fp32.
template <class T>
concept storage_element = std::same_as<T, float> || std::same_as<T, bf16> || std::same_as<T, fp16>;

/// Converts a storage element to fp32 (exact).
template <storage_element T>
NOSA_INLINE constexpr float to_float(T x) noexcept {
  if constexpr (std::same_as<T, float>) {
    return x;
  } else {
    return static_cast<float>(x);
  }
}

/// Rounds an fp32 value to a storage element (nearest, ties to even).
template <storage_element T>
NOSA_INLINE constexpr T from_float(float x) noexcept {
  if constexpr (std::same_as<T, float>) {
    return x;
  } else {
    return T(x);
  }
}

/// Run-time tag of a storage element type, for dispatch from command lines and engines.
enum class dtype : std::uint8_t { fp32, fp16, bf16 };

/// The run-time tag of `T`.
template <storage_element T>
inline constexpr dtype dtype_of = std::same_as<T, float> ? dtype::fp32 : (std::same_as<T, fp16> ? dtype::fp16 : dtype::bf16);

/// Lower-case name of a dtype (`"fp32"`, `"fp16"`, `"bf16"`).
constexpr std::string_view to_string(dtype d) noexcept {
  switch (d) {
    case dtype::fp32: return "fp32";
    case dtype::fp16: return "fp16";
    case dtype::bf16: return "bf16";
  }
  return "?";
}

/// Bytes of one element of the given dtype.
constexpr int size_of(dtype d) noexcept { return d == dtype::fp32 ? 4 : 2; }

}  // namespace nosa
