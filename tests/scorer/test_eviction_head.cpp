// The eviction-head primitive against the formula of spec §3 evaluated in double precision.
#include <nosa/backend/host/eviction_head.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

namespace {

double softplus_ref(double x) { return x > 30 ? x : std::log1p(std::exp(x)); }

template <class T>
void check_against_formula(int n, int heads, int dim, bool with_beta) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<T> values(std::size_t(n) * heads * dim), w(std::size_t(heads) * heads * dim);
  std::vector<float> beta(static_cast<std::size_t>(heads)), scale(static_cast<std::size_t>(heads));
  std::vector<float> c(std::size_t(n) * heads, -1.0f);
  for (auto& x : values) x = nosa::from_float<T>(normal(rng));
  // Small weights keep the projection in softplus's interesting range.
  for (auto& x : w) x = nosa::from_float<T>(0.05f * normal(rng));
  for (auto& x : beta) x = normal(rng);
  for (auto& x : scale) x = 0.5f + std::abs(normal(rng));

  nosa::eviction_head_args<T, T> a;
  a.values = nosa::make_contiguous<3>(static_cast<const T*>(values.data()), {n, heads, dim});
  a.w_delta = nosa::make_contiguous<2>(static_cast<const T*>(w.data()), {heads, heads * dim});
  if (with_beta) a.beta = nosa::make_contiguous<1>(static_cast<const float*>(beta.data()), {heads});
  a.scale = nosa::make_contiguous<1>(static_cast<const float*>(scale.data()), {heads});
  a.scores = nosa::make_contiguous<2>(c.data(), {n, heads});
  REQUIRE(nosa::compute_eviction_scores(nosa::host_backend{}, a) == nosa::status::success);

  for (int t = 0; t < n; ++t) {
    for (int h = 0; h < heads; ++h) {
      double dot = with_beta ? beta[std::size_t(h)] : 0.0;
      for (int j = 0; j < heads * dim; ++j) {
        dot += double(nosa::to_float(w[std::size_t(h) * heads * dim + j])) *
               nosa::to_float(values[std::size_t(t) * heads * dim + j]);  // head-major concatenation
      }
      const double expect = scale[std::size_t(h)] * softplus_ref(dot);
      CHECK(c[std::size_t(t) * heads + h] == doctest::Approx(expect).epsilon(2e-5));
    }
  }
}

}  // namespace

TEST_CASE("eviction head equals A * softplus(W . v + beta) over the concatenated KV heads") {
  check_against_formula<float>(17, 2, 64, true);
  check_against_formula<nosa::bf16>(9, 3, 128, false);
  check_against_formula<nosa::fp16>(5, 1, 256, true);
}

TEST_CASE("softplus is stable at the extremes") {
  CHECK(nosa::softplus(100.0f) == 100.0f);
  CHECK(nosa::softplus(-100.0f) == doctest::Approx(std::exp(-100.0)).epsilon(1e-3));
  CHECK(nosa::softplus(0.0f) == doctest::Approx(std::log(2.0)));
}

TEST_CASE("eviction head rejects inconsistent shapes") {
  std::vector<float> v(2 * 2 * 64), w(2 * 128), s(2), c(4);
  nosa::eviction_head_args<float, float> a;
  a.values = nosa::make_contiguous<3>(static_cast<const float*>(v.data()), {2, 2, 64});
  a.w_delta = nosa::make_contiguous<2>(static_cast<const float*>(w.data()), {2, 64});  // should be [2][128]
  a.scale = nosa::make_contiguous<1>(static_cast<const float*>(s.data()), {2});
  a.scores = nosa::make_contiguous<2>(c.data(), {2, 2});
  CHECK(nosa::compute_eviction_scores(nosa::host_backend{}, a) == nosa::status::shape_mismatch);
  a.w_delta = nosa::make_contiguous<2>(static_cast<const float*>(w.data()), {2, 128});
  a.scores.data = nullptr;
  CHECK(nosa::compute_eviction_scores(nosa::host_backend{}, a) == nosa::status::null_pointer);
}
