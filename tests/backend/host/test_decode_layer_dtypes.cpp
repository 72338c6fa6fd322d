// The host decode layer against the independent reference: 16-bit storage, head dims 128/256, GQA
// groups that are not powers of two.
#include "harness.hpp"

#include <doctest/doctest.h>

namespace {

using nosa::bf16;
using nosa::bias_mode;
using nosa::fp16;
using nosa_test::check_combination;
using nosa_test::combo;
using nosa_test::property_spec;
using nosa_test::run_against_reference;
using nosa_test::run_spec;
using nosa_test::small_config;

}  // namespace

TEST_CASE_TEMPLATE("16-bit storage matches the reference, output in fp32 and in the storage type", T, bf16, fp16) {
  check_combination<combo<T, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>>(21);
  check_combination<combo<T, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>, T>(22);
  check_combination<combo<T, nosa::eviction_score_pooling, nosa::resident_store, bias_mode::before_scale>, T>(23);
  check_combination<combo<T, nosa::no_query_agnostic, nosa::offload_store, bias_mode::none>, T>(24);
}

TEST_CASE("head dims 128 and 256, GQA groups that are not powers of two") {
  using P128 = combo<bf16, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale, 128>;
  using P256 = combo<float, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale, 256>;
  run_spec s = property_spec(31);
  s.config = small_config(3, 600, /*hq=*/6, /*hkv=*/2);  // group 3
  s.steps = 60;
  run_against_reference<P128>(s);
  s.config = small_config(3, 600, /*hq=*/5, /*hkv=*/1);  // group 5
  run_against_reference<P256>(s);
  s.config = small_config(3, 600, /*hq=*/3, /*hkv=*/3);  // group 1
  run_against_reference<P128>(s);
}

