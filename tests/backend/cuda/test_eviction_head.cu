// The CUDA eviction head against the host one: c[t, h] = A[h] * softplus(W_delta[h] . v_t + beta[h]) for bf16
// and fp32 values and weights, KV head counts below, at and above the kernel's eight warps, contiguous and
// strided value views; and the same statuses for bad views.
#include "gpu.hpp"

#include <nosa/cuda.cuh>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace {

using nosa::status;
using nosa_cuda_test::device_buffer;

// The projection is an fp32 dot product of n = H_kv * D terms summed in another order on each backend (lane-
// strided partial sums and a warp reduction against one sequential loop). Rounding errors of such sums grow
// like sqrt(n) ulps of the terms' magnitude M = sum |w_i v_i|; softplus has slope below 1 and is evaluated to
// a few ulps on both sides. The tolerance is four times that estimate, scaled by |A|, plus four ulps of the
// result: a wrong head, term, bias or scale is off by far more.
double tolerance(double host, double a, double magnitude, int terms) {
  const double u = std::ldexp(1.0, -24);
  return 4.0 * std::sqrt(double(terms)) * u * std::abs(a) * magnitude + 4.0 * u * std::abs(host);
}

template <class T, class W>
void compare(int tokens, int heads, int dim, bool with_beta, int token_pad, std::uint64_t seed) {
  nosa_cuda_test::stream st;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> positive(0.25f, 2.0f);
  const std::int64_t row = std::int64_t(heads) * dim + token_pad;  // token stride of the value view
  std::vector<T> values(std::size_t(tokens) * row);
  std::vector<W> w(std::size_t(heads) * heads * dim);
  std::vector<float> beta(static_cast<std::size_t>(heads)), scale(static_cast<std::size_t>(heads));
  for (auto& x : values) x = nosa::from_float<T>(normal(rng));
  // Weights of 1/sqrt(n) keep the projection of order one, where softplus is neither linear nor zero.
  for (auto& x : w) x = nosa::from_float<W>(normal(rng) / std::sqrt(float(heads * dim)));
  for (auto& x : beta) x = 0.5f * normal(rng);
  for (auto& x : scale) x = positive(rng);

  nosa::eviction_head_args<T, W> ha;
  ha.values = nosa::make_strided<3>(static_cast<const T*>(values.data()), {tokens, heads, dim}, {row, dim, 1});
  ha.w_delta = nosa::make_contiguous<2>(static_cast<const W*>(w.data()), {heads, heads * dim});
  if (with_beta) ha.beta = nosa::make_contiguous<1>(static_cast<const float*>(beta.data()), {heads});
  ha.scale = nosa::make_contiguous<1>(static_cast<const float*>(scale.data()), {heads});
  std::vector<float> host_c(std::size_t(tokens) * heads);
  ha.scores = nosa::make_contiguous<2>(host_c.data(), {tokens, heads});
  REQUIRE(nosa::compute_eviction_scores(nosa::host_backend{}, ha) == status::success);

  device_buffer<T> dv(values.size());
  device_buffer<W> dw(w.size());
  device_buffer<float> db(beta.size()), ds(scale.size()), dc(host_c.size());
  dv.upload(values.data(), values.size(), st);
  dw.upload(w.data(), w.size(), st);
  db.upload(beta.data(), beta.size(), st);
  ds.upload(scale.data(), scale.size(), st);
  nosa::eviction_head_args<T, W> ga;
  ga.values = nosa::make_strided<3>(static_cast<const T*>(dv.data()), {tokens, heads, dim}, {row, dim, 1});
  ga.w_delta = nosa::make_contiguous<2>(static_cast<const W*>(dw.data()), {heads, heads * dim});
  if (with_beta) ga.beta = nosa::make_contiguous<1>(static_cast<const float*>(db.data()), {heads});
  ga.scale = nosa::make_contiguous<1>(static_cast<const float*>(ds.data()), {heads});
  ga.scores = nosa::make_contiguous<2>(dc.data(), {tokens, heads});
  REQUIRE(nosa::compute_eviction_scores(nosa::cuda_backend{}, ga, st.get()) == status::success);
  std::vector<float> gpu_c(host_c.size());
  dc.download(gpu_c.data(), gpu_c.size(), st);

  double worst = 0.0;
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      double magnitude = 0.0;
      for (int i = 0; i < heads * dim; ++i) {
        magnitude += std::abs(double(nosa::to_float(w[std::size_t(h) * heads * dim + i])) *
                              double(nosa::to_float(values[std::size_t(t) * row + i])));
      }
      const double e = host_c[std::size_t(t) * heads + h], x = gpu_c[std::size_t(t) * heads + h];
      const double tol = tolerance(e, scale[std::size_t(h)], magnitude, heads * dim);
      worst = std::max(worst, std::abs(x - e) / tol);
      if (!(std::abs(x - e) <= tol)) {
        FAIL("token " << t << " head " << h << ": cuda " << x << ", host " << e << " (tolerance " << tol << ")");
      }
    }
  }
  const std::string beta_note = with_beta ? "with beta" : "no beta";
  MESSAGE(tokens << " tokens, " << heads << " KV heads, D " << dim << ", " << beta_note
                 << ": max error / tolerance " << worst);
}

}  // namespace

TEST_CASE("the CUDA eviction head matches the host one") {
  NOSA_REQUIRE_GPU();
  const int tokens = nosa_cuda_test::scaled(3000, 64);
  compare<nosa::bf16, nosa::bf16>(tokens, 2, 128, true, 0, 1);
  compare<nosa::bf16, nosa::bf16>(tokens, 8, 128, false, 0, 2);
  compare<nosa::bf16, nosa::bf16>(tokens, 9, 64, true, 64, 3);  // more heads than warps, strided tokens
  compare<float, float>(tokens, 1, 64, true, 0, 4);
  compare<float, float>(tokens, 4, 256, true, 32, 5);
  compare<float, float>(tokens, 12, 128, false, 0, 6);
  compare<nosa::bf16, float>(tokens, 3, 64, true, 0, 7);  // bf16 values, fp32 weights
}

TEST_CASE("the CUDA eviction head rejects bad views like the host one, before any work") {
  NOSA_REQUIRE_GPU();
  nosa_cuda_test::stream st;
  const int tokens = 5, heads = 2, dim = 64;
  device_buffer<float> dv(std::size_t(tokens) * heads * dim), dw(std::size_t(heads) * heads * dim), ds(heads),
      dc(std::size_t(tokens) * heads);
  std::vector<float> hv(dv.size()), hw(dw.size()), hs(heads, 1.0f), hc(dc.size());
  const auto make = [&](float* v, float* w, float* s, float* c) {
    nosa::eviction_head_args<float, float> a;
    a.values = nosa::make_contiguous<3>(static_cast<const float*>(v), {tokens, heads, dim});
    a.w_delta = nosa::make_contiguous<2>(static_cast<const float*>(w), {heads, heads * dim});
    a.scale = nosa::make_contiguous<1>(static_cast<const float*>(s), {heads});
    a.scores = nosa::make_contiguous<2>(c, {tokens, heads});
    return a;
  };
  const auto both = [&](status expected, auto&& bend) {
    auto ha = make(hv.data(), hw.data(), hs.data(), hc.data());
    auto ga = make(dv.data(), dw.data(), ds.data(), dc.data());
    bend(ha);
    bend(ga);
    CHECK(nosa::compute_eviction_scores(nosa::host_backend{}, ha) == expected);
    CHECK(nosa::compute_eviction_scores(nosa::cuda_backend{}, ga, st.get()) == expected);
  };
  both(status::shape_mismatch, [](auto& a) { a.w_delta.extents[1] = heads * dim - 1; });
  both(status::shape_mismatch, [](auto& a) { a.scores.extents[1] = 3; });
  both(status::shape_mismatch, [](auto& a) { a.beta.extents[0] = 1; a.beta.data = a.scale.data; });
  both(status::shape_mismatch, [](auto& a) { a.values.extents[1] = 0; });
  both(status::null_pointer, [](auto& a) { a.scale.data = nullptr; });
  both(status::null_pointer, [](auto& a) { a.values.data = nullptr; });
  both(status::bad_layout, [](auto& a) { a.w_delta.strides[1] = 2; });
  both(status::success, [](auto& a) {  // no tokens: nothing to do
    a.values.extents[0] = 0;
    a.scores.extents[0] = 0;
  });
  st.sync();
  NOSA_CUDA_REQUIRE(cudaGetLastError());
}
