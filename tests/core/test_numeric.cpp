// Bit-exactness of the storage conversions: every encoding round-trips, and rounding matches the
// compiler's own IEEE binary16 conversion and a long-hand round-to-nearest-even for bfloat16.
#include <nosa/core/numeric.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

namespace {

// bfloat16 rounding written out from the definition: keep the upper 16 bits, round the lower 16 to nearest,
// ties to the even upper half.
std::uint16_t bf16_by_definition(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if (std::isnan(f)) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  std::uint32_t upper = u >> 16;
  const std::uint32_t lower = u & 0xffffu;
  if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) ++upper;
  return static_cast<std::uint16_t>(upper);
}

}  // namespace

TEST_CASE("every fp16 and bf16 encoding round-trips through fp32") {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float h = static_cast<float>(nosa::fp16::from_bits(bits));
    const float bf = static_cast<float>(nosa::bf16::from_bits(bits));
    if (std::isnan(h)) {
      CHECK(std::isnan(static_cast<float>(nosa::fp16(h))));
    } else {
      REQUIRE(nosa::fp16(h).bits == bits);
    }
    if (std::isnan(bf)) {
      CHECK(std::isnan(static_cast<float>(nosa::bf16(bf))));
    } else {
      REQUIRE(nosa::bf16(bf).bits == bits);
    }
  }
}

TEST_CASE("fp16 rounding equals the compiler's IEEE binary16 conversion") {
#if defined(__FLT16_MAX__)
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 2'000'000; ++i) {
    // Random bit patterns cover subnormals, overflow and ties far more often than random values would.
    const float f = std::bit_cast<float>(any(rng));
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    REQUIRE(nosa::fp16(f).bits == std::bit_cast<std::uint16_t>(ref));
  }
  // Exact ties at both ends of the subnormal range and at the overflow threshold.
  for (float f : {0x1p-25f, 0x1.8p-24f, 0x1.4p-24f, 65520.0f, 65519.996f, -0x1p-25f, 0x1.002p-14f}) {
    CHECK(nosa::fp16(f).bits == std::bit_cast<std::uint16_t>(static_cast<_Float16>(f)));
  }
#else
  MESSAGE("compiler has no _Float16; covered by the round-trip test only");
#endif
}

TEST_CASE("bf16 rounding is round-to-nearest-even") {
  std::mt19937 rng(11);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 2'000'000; ++i) {
    const float f = std::bit_cast<float>(any(rng));
    if (std::isnan(f)) continue;
    REQUIRE(nosa::bf16(f).bits == bf16_by_definition(f));
  }
  CHECK(nosa::bf16(1.0f).bits == 0x3f80);
  CHECK(nosa::bf16(std::bit_cast<float>(0x3f808000u)).bits == 0x3f80);  // tie, even stays
  CHECK(nosa::bf16(std::bit_cast<float>(0x3f818000u)).bits == 0x3f82);  // tie, odd rounds up
  CHECK(nosa::bf16(std::numeric_limits<float>::max()).bits == 0x7f80);   // overflows to +inf
}

TEST_CASE("NaN stays NaN and infinities are preserved") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(std::isnan(static_cast<float>(nosa::bf16(nan))));
  CHECK(std::isnan(static_cast<float>(nosa::fp16(nan))));
  CHECK(static_cast<float>(nosa::bf16(-inf)) == -inf);
  CHECK(static_cast<float>(nosa::fp16(inf)) == inf);
  CHECK(nosa::fp16(-0.0f).bits == 0x8000);
}

TEST_CASE("dtype tags and conversions") {
  static_assert(nosa::dtype_of<float> == nosa::dtype::fp32);
  static_assert(nosa::dtype_of<nosa::fp16> == nosa::dtype::fp16);
  static_assert(nosa::dtype_of<nosa::bf16> == nosa::dtype::bf16);
  static_assert(nosa::detail::float_to_bf16_bits(1.0f) == 0x3f80);
  CHECK(nosa::to_string(nosa::dtype::bf16) == "bf16");
  CHECK(nosa::size_of(nosa::dtype::fp32) == 4);
  CHECK(nosa::to_float(nosa::from_float<nosa::fp16>(0.1f)) == doctest::Approx(0.1f).epsilon(1e-3));
  CHECK(nosa::from_float<float>(0.1f) == 0.1f);
}
