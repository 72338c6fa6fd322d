// The KV-format policies (spec §6b): the FP8 scale and multiplier of a block from its largest magnitude,
// including the blocks that have none (zeros) or whose multiplier would overflow, the encoding of each value
// (rounded, saturating) and the value attention reads. The rounding itself is checked bit for bit in
// tests/core/test_numeric.cpp.
#include <nosa/pipeline.hpp>
#include <nosa/store/kv_format.hpp>
#include <nosa/store/policies.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace {

using nosa::fp8_e4m3;
using nosa::fp8_e4m3_kv;

// A format that claims to be quantized but has no quantisation functions is not a format.
struct half_a_format {
  static constexpr bool quantized = true;
  template <class E>
  using value_type = unsigned char;
};

// Whether a store can be formed with format F at all.
template <class F>
concept offload_store_with = requires { typename nosa::basic_offload_store<F>; };

}  // namespace

TEST_CASE("the formats and stores satisfy their concepts, and the stores carry their format") {
  static_assert(nosa::kv_format_policy<nosa::element_kv>);
  static_assert(nosa::kv_format_policy<fp8_e4m3_kv>);
  static_assert(!nosa::kv_format_policy<half_a_format>);
  static_assert(offload_store_with<fp8_e4m3_kv> && !offload_store_with<half_a_format>);
  static_assert(std::is_same_v<nosa::offload_store::kv_format, nosa::element_kv>);
  static_assert(std::is_same_v<nosa::fp8_resident_store::kv_format, fp8_e4m3_kv>);
  static_assert(nosa::fp8_offload_store::offloads && !nosa::fp8_resident_store::offloads);
  static_assert(std::is_same_v<nosa::element_kv::value_type<nosa::bf16>, nosa::bf16>);
  static_assert(std::is_same_v<fp8_e4m3_kv::value_type<nosa::bf16>, fp8_e4m3>);
  static_assert(std::is_same_v<nosa::nosa_pipeline<nosa::fp16, 64, nosa::fp8_offload_store>::kv_format, fp8_e4m3_kv>);
  static_assert(nosa::full_attention_pipeline<float, 64, nosa::bias_mode::none, nosa::fp8_resident_store>::dense);
  CHECK(fp8_e4m3_kv::code_max == 448.0f);
}

TEST_CASE("an FP8 block maps its largest magnitude to 448 and reads back code times amax / 448") {
  for (const float amax : {1.0f, 448.0f, 0.0173f, 3.0e5f, 1.0e-30f, 6.1e-5f}) {
    CAPTURE(amax);
    const float multiplier = fp8_e4m3_kv::multiplier(amax);
    const float scale = fp8_e4m3_kv::scale(amax);
    CHECK(multiplier == 448.0f / amax);  // the spec's formula, in fp32
    CHECK(scale == amax / 448.0f);
    // The largest magnitude lands on the largest code (rounding of the fp32 product cannot leave it).
    CHECK(fp8_e4m3_kv::encode(amax, multiplier).bits == 0x7e);
    CHECK(fp8_e4m3_kv::encode(-amax, multiplier).bits == 0xfe);
    CHECK(fp8_e4m3_kv::decode(fp8_e4m3_kv::encode(amax, multiplier), scale) == 448.0f * scale);
    // Half the largest magnitude is a power-of-two step down: exact.
    CHECK(static_cast<float>(fp8_e4m3_kv::encode(amax / 2, multiplier)) == 224.0f);
  }
  // Near 1 the codes are 1/8 apart: 1.06 rounds to 1, 1.07 to 1.125.
  CHECK(fp8_e4m3_kv::encode(1.06f, 1.0f).bits == fp8_e4m3_kv::encode(1.0f, 1.0f).bits);
  CHECK(fp8_e4m3_kv::encode(1.07f, 1.0f).bits == 0x39);
  // A product that rounds just past 448 in fp32 still saturates to 448.
  CHECK(fp8_e4m3_kv::encode(448.0f, 1.0000001f).bits == 0x7e);
  CHECK(fp8_e4m3_kv::decode(fp8_e4m3::from_bits(0x01), 2.0f) == 0x1p-8f);  // the smallest subnormal, scaled
}

TEST_CASE("a block of zeros, a vanishing block and an infinite value get multiplier 0 and scale 1") {
  constexpr float inf = std::numeric_limits<float>::infinity();
  // amax = 0: the spec's scale 1; every value (zero) encodes to zero and reads back as zero.
  CHECK(fp8_e4m3_kv::multiplier(0.0f) == 0.0f);
  CHECK(fp8_e4m3_kv::scale(0.0f) == 1.0f);
  CHECK(fp8_e4m3_kv::encode(0.0f, 0.0f).bits == 0x00);
  CHECK(fp8_e4m3_kv::encode(-0.0f, 0.0f).bits == 0x80);
  CHECK(fp8_e4m3_kv::decode(fp8_e4m3_kv::encode(-0.0f, 0.0f), 1.0f) == 0.0f);
  // 448 / amax overflows fp32 below about 1.3e-36: such a block is stored as zeros, not as NaN (0 * inf).
  CHECK(std::isinf(448.0f / 1.0e-37f));
  CHECK(fp8_e4m3_kv::multiplier(1.0e-37f) == 0.0f);
  CHECK(fp8_e4m3_kv::scale(1.0e-37f) == 1.0f);
  CHECK(fp8_e4m3_kv::encode(1.0e-37f, fp8_e4m3_kv::multiplier(1.0e-37f)).bits == 0x00);
  CHECK(fp8_e4m3_kv::multiplier(2.0e-36f) == 448.0f / 2.0e-36f);  // just above the threshold: the formula
  // An infinite magnitude leaves no finite multiplier either.
  CHECK(fp8_e4m3_kv::multiplier(inf) == 0.0f);
  CHECK(fp8_e4m3_kv::scale(inf) == 1.0f);
  CHECK(fp8_e4m3_kv::multiplier(std::numeric_limits<float>::quiet_NaN()) == 0.0f);
}
