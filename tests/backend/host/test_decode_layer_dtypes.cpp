// The host decode layer against the independent reference: 16-bit storage, head dims 128/256, GQA
// groups that are not powers of two.
#include "harness.hpp"
#include "small_config.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

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


TEST_CASE_TEMPLATE("compressed keys are the fp32 window means of the keys, rounded once to the element type", T, float,
                   bf16, fp16) {
  // Spec §3, "Storage": the mean is accumulated in fp32 in token order and rounded once (nearest, ties to
  // even) to the element type. Windows completed by the prompt and by decode steps alike.
  using P = combo<T, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>;
  constexpr int D = P::head_dim;
  const nosa::layer_config cfg = nosa_test::small_layer_config(4, 2, 1, 16);
  nosa_test::test_layer<P> t;
  REQUIRE(t.create(cfg) == nosa::status::success);
  const int hkv = cfg.num_kv_heads, hq = cfg.num_q_heads, prompt = 37, steps = 40;
  std::mt19937_64 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> keys;  // [token][hkv][D], every token of the sequence
  const auto random = [&](std::size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) x = nosa::from_float<T>(normal(rng) * 3.0f);
    return v;
  };
  {
    const std::vector<T> k = random(std::size_t(prompt) * hkv * D), v = random(k.size());
    keys = k;
    nosa::prompt_args<T> p;
    p.k = nosa::make_contiguous<3>(k.data(), {prompt, hkv, D});
    p.v = nosa::make_contiguous<3>(v.data(), {prompt, hkv, D});
    const std::vector<float> c(std::size_t(prompt) * hkv, 0.5f);
    p.c = nosa::make_contiguous<2>(c.data(), {prompt, hkv});
    REQUIRE(t.layer.add_sequence(0, p) == nosa::status::success);
  }
  for (int step = 0; step < steps; ++step) {
    const std::vector<T> q = random(std::size_t(hq) * D), k = random(std::size_t(hkv) * D), v = random(k.size());
    keys.insert(keys.end(), k.begin(), k.end());
    const std::vector<float> c(std::size_t(hkv), 0.25f);
    std::vector<float> o(q.size());
    const std::int32_t seq = 0;
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(&seq, {1});
    a.q = nosa::make_contiguous<3>(q.data(), {1, hq, D});
    a.k = nosa::make_contiguous<3>(k.data(), {1, hkv, D});
    a.v = nosa::make_contiguous<3>(v.data(), {1, hkv, D});
    a.c = nosa::make_contiguous<2>(c.data(), {1, hkv});
    a.o = nosa::make_contiguous<3>(o.data(), {1, hq, D});
    REQUIRE(t.layer.reserve(1) == nosa::status::success);
    REQUIRE(t.layer.step(a) == nosa::status::success);
  }
  const nosa::state_layout& l = t.layer.layout();
  const int length = prompt + steps, windows = nosa::window_count(length, cfg.selection);
  REQUIRE(windows > 8);
  const auto* kc = reinterpret_cast<const T*>(t.device.span().data() + l.compressed_keys);
  int rounded = 0;  // elements whose fp32 mean is not a value of T
  for (int h = 0; h < hkv; ++h) {
    for (int w = 0; w < windows; ++w) {
      for (int d = 0; d < D; ++d) {
        float sum = 0.0f;
        for (int i = 0; i < cfg.selection.window; ++i) {
          const int token = w * cfg.selection.stride + i;
          sum += nosa::to_float(keys[(std::size_t(token) * hkv + h) * D + d]);
        }
        const float mean = sum / static_cast<float>(cfg.selection.window);
        const T stored = kc[(std::size_t(h) * l.max_windows + w) * D + d];
        REQUIRE(nosa::to_float(stored) == nosa::to_float(nosa::from_float<T>(mean)));
        rounded += nosa::to_float(stored) != mean;
      }
    }
  }
  if constexpr (!std::is_same_v<T, float>) CHECK(rounded > windows * D);  // the rounding really happened
}
