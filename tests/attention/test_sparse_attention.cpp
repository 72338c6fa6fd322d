// The bias modes and the log-sum-exp merge that lets a softmax be split over slots in any grouping.
#include <nosa/attention/sparse_attention.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

TEST_CASE("bias modes: trained semantics, NOSI's, and none") {
  const float dot = 3.0f, c = 0.5f, scale = 0.125f;
  CHECK(nosa::sparse_attention<nosa::bias_mode::after_scale>::logit(dot, c, scale) == doctest::Approx(0.875f));
  CHECK(nosa::sparse_attention<nosa::bias_mode::before_scale>::logit(dot, c, scale) == doctest::Approx(0.4375f));
  CHECK(nosa::sparse_attention<nosa::bias_mode::none>::logit(dot, c, scale) == doctest::Approx(0.375f));
}

TEST_CASE("merging partial softmaxes equals one softmax over all keys") {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<float> logits(37);
    for (auto& x : logits) x = normal(rng);
    double ref_max = -1e30, ref_sum = 0.0;
    for (float x : logits) ref_max = std::max<double>(ref_max, x);
    for (float x : logits) ref_sum += std::exp(x - ref_max);

    // Split into uneven parts, merge them left to right.
    nosa::softmax_partial total;
    for (std::size_t first = 0; first < logits.size();) {
      const std::size_t len = 1 + (first * 7 + static_cast<std::size_t>(trial)) % 9;
      nosa::softmax_partial part;
      for (std::size_t i = first; i < std::min(first + len, logits.size()); ++i) {
        part.max = std::max(part.max, logits[i]);
      }
      for (std::size_t i = first; i < std::min(first + len, logits.size()); ++i) {
        part.sum += std::exp(logits[i] - part.max);
      }
      float a = 0.0f, b = 0.0f;
      const float m = total.merge_factors(part, a, b);
      total.sum = total.sum * a + part.sum * b;
      total.max = m;
      first += len;
    }
    CHECK(total.max == doctest::Approx(ref_max));
    CHECK(total.sum == doctest::Approx(ref_sum).epsilon(1e-5));
  }
}

TEST_CASE("an empty partial merges as the identity") {
  nosa::softmax_partial empty, one;
  one.max = 2.0f;
  one.sum = 3.0f;
  float a = -1.0f, b = -1.0f;
  CHECK(empty.merge_factors(one, a, b) == 2.0f);
  CHECK(a == 0.0f);
  CHECK(b == 1.0f);
  CHECK(empty.merge_factors(empty, a, b) == nosa::negative_infinity);
  CHECK(a == 0.0f);
  CHECK(b == 0.0f);
}
