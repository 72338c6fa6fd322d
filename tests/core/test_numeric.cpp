// Bit-exactness of the storage conversions: every encoding round-trips, and rounding matches the
// compiler's own IEEE binary16 conversion, a long-hand round-to-nearest-even for bfloat16, and a search of
// the FP8 E4M3 value table built from the format's definition.
#include <nosa/core/numeric.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

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

// FP8 E4M3 ("fn") from its definition: code c = s eeee mmm is (-1)^s 2^(e-7) (1 + m/8) for e > 0 and
// (-1)^s 2^-6 (m/8) for e = 0; s 1111 111 is NaN, so there is no infinity and 448 is the largest value.
double e4m3_value_by_definition(unsigned code) {
  const unsigned e = (code >> 3) & 15u, m = code & 7u;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, int(e) - 7);
  return (code & 0x80u) ? -magnitude : magnitude;
}

// Rounding to E4M3 by searching the table of finite codes: the nearest value, the even code (mantissa bit
// 0) on a tie, +-448 beyond the largest value (saturation), NaN for NaN.
std::uint8_t e4m3_by_search(float f) {
  if (std::isnan(f)) return std::signbit(f) ? 0xff : 0x7f;
  const double x = std::abs(static_cast<double>(f));
  const unsigned sign = std::signbit(f) ? 0x80u : 0u;
  if (x >= 448.0) return static_cast<std::uint8_t>(sign | 0x7eu);
  static const std::vector<double> table = [] {
    std::vector<double> t;
    for (unsigned c = 0; c <= 0x7e; ++c) t.push_back(e4m3_value_by_definition(c));
    return t;
  }();
  unsigned best = 0;
  for (unsigned c = 1; c <= 0x7e; ++c) {
    const double d = std::abs(table[c] - x), d_best = std::abs(table[best] - x);
    if (d < d_best || (d == d_best && (c & 1u) == 0)) best = c;
  }
  return static_cast<std::uint8_t>(sign | best);
}

}  // namespace

TEST_CASE("every FP8 E4M3 encoding decodes to its defined value and round-trips") {
  for (unsigned code = 0; code < 256; ++code) {
    const float f = static_cast<float>(nosa::fp8_e4m3::from_bits(static_cast<std::uint8_t>(code)));
    const double expected = e4m3_value_by_definition(code);
    CAPTURE(code);
    if (std::isnan(expected)) {
      CHECK(std::isnan(f));
      CHECK(std::isnan(static_cast<float>(nosa::fp8_e4m3(f))));
      continue;
    }
    REQUIRE(static_cast<double>(f) == expected);
    REQUIRE(std::signbit(f) == ((code & 0x80u) != 0));
    REQUIRE(nosa::fp8_e4m3(f).bits == code);
  }
}

TEST_CASE("FP8 E4M3 rounding is round-to-nearest-even with saturation, as a search of the table gives") {
  // Every value, every midpoint between neighbours (the ties), and the floats on either side of each.
  std::vector<float> probes;
  for (unsigned c = 0; c < 0x7e; ++c) {
    const double lo = e4m3_value_by_definition(c), hi = e4m3_value_by_definition(c + 1);
    const auto mid = static_cast<float>((lo + hi) / 2);  // exact in fp32
    REQUIRE(static_cast<double>(mid) == (lo + hi) / 2);
    for (const float f : {static_cast<float>(lo), mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      probes.push_back(f);
      probes.push_back(-f);
    }
  }
  // Around and beyond the largest value: 464 is the midpoint to the 480 the format lacks.
  for (const float f : {447.0f, 448.0f, std::nextafter(448.0f, 1e9f), 460.0f, 464.0f, 465.0f, 1e6f, 3.4e38f,
                        std::numeric_limits<float>::infinity(), 0x1p-10f, std::nextafter(0x1p-10f, 1.0f),
                        0x1p-149f, 0x1.8p-10f}) {
    probes.push_back(f);
    probes.push_back(-f);
  }
  // Random bit patterns whose magnitudes span the format and a little beyond.
  std::mt19937 rng(13);
  std::uniform_int_distribution<std::uint32_t> mantissa(0, 0x7fffff), exponent(127 - 13, 127 + 10), sign(0, 1);
  for (int i = 0; i < 200'000; ++i) {
    probes.push_back(std::bit_cast<float>(sign(rng) << 31 | exponent(rng) << 23 | mantissa(rng)));
  }
  for (const float f : probes) {
    CAPTURE(f);
    REQUIRE(nosa::fp8_e4m3(f).bits == e4m3_by_search(f));
  }
  CHECK(nosa::fp8_e4m3(464.0f).bits == 0x7e);                                        // saturates
  CHECK(nosa::fp8_e4m3(-std::numeric_limits<float>::infinity()).bits == 0xfe);        // -448, no infinity
  CHECK(std::isnan(static_cast<float>(nosa::fp8_e4m3(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(nosa::fp8_e4m3(0x1p-10f).bits == 0x00);                                      // tie to the even zero
  CHECK(nosa::fp8_e4m3(0x1.8p-9f).bits == 0x02);                                     // tie 1.5 steps: even 2
  CHECK(nosa::fp8_e4m3(-0.0f).bits == 0x80);
  static_assert(nosa::detail::float_to_e4m3_bits(1.0f) == 0x38);
}

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
