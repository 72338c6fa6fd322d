// The engine's throughput model (examples/engine/throughput_model.hpp): the GEMM curve, the roofline of
// measured steps, the prediction of a step from the library's sizing figures, and the choice of batch and
// slot-cache size.

#include "engine/model.hpp"
#include "engine/run_config.hpp"
#include "engine/throughput_model.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using namespace nosa_engine;

namespace {

/// The 8B model's workload at 32K tokens on nosa-offload, speeds of the order of the H200's.
throughput_inputs inputs_8b() {
  throughput_inputs in;
  in.model = *find_preset("nosa-8b");
  in.run.attention = method::nosa_offload;
  in.run.prompt_tokens = 32768;
  in.run.steps = 20;
  in.first_step = 4;
  in.steps = 16;
  in.speeds = {54e9, 50e9, 4.5e12};
  in.layer_gemm.points = {{1, 100e-6}, {256, 150e-6}};
  in.head_gemm.points = {{1, 200e-6}, {256, 300e-6}};
  return in;
}

/// A calibration of every layer with one stream whose selection swaps 8 blocks back and forth each step:
/// without cache slots each step loads those 8 blocks again; with 8 or more slots beyond k they stay
/// resident (the two warm-up steps load them once).
std::vector<nosa::miss_calibration> swapping_misses(const model_config& m, const std::vector<int>& sizes) {
  const nosa::selection_params& sel = m.selection;
  const int k = sel.top_k, tail = 100, length = tail * sel.block_size + 1;
  std::vector<std::int32_t> a{tail}, b{tail};
  for (int i = 0; i < k - 1; ++i) a.push_back(i);
  for (int i = 0; i < k - 9; ++i) b.push_back(i);
  for (int i = 0; i < 8; ++i) b.push_back(k + 10 + i);
  std::vector<nosa::miss_calibration> out;
  for (int l = 0; l < m.layers; ++l) {
    out.emplace_back(sel, sizes, 1);
    out.back().admit(0, length, a);
    for (int s = 0; s < 12; ++s) out.back().step(0, length + s, s % 2 == 0 ? b : a, s >= 2);
  }
  return out;
}

}  // namespace

TEST_CASE("the GEMM curve is linear between its points and along the last two beyond them") {
  gemm_curve c;
  CHECK(c.seconds(10) == 0.0);
  c.points = {{1, 1.0}, {11, 2.0}, {21, 4.0}};
  CHECK(c.seconds(1) == doctest::Approx(1.0));
  CHECK(c.seconds(6) == doctest::Approx(1.5));
  CHECK(c.seconds(11) == doctest::Approx(2.0));
  CHECK(c.seconds(16) == doctest::Approx(3.0));
  CHECK(c.seconds(31) == doctest::Approx(6.0));
  c.points = {{4, 2.0}};
  CHECK(c.seconds(8) == doctest::Approx(4.0));
}

TEST_CASE("the roofline of measured steps: per layer the longer of the gather and HBM plus GEMMs") {
  const device_speeds speeds{0, 1e9, 1e12};
  // Layer 0 is bound by its gather (2 ms against 1 + 0.5), layer 1 by HBM and GEMMs (0.5 against 1.5).
  const step_bound b = measured_roofline({2e6, 0.5e6}, 1e9, 0.5e-3, 0.25e-3, speeds);
  CHECK(b.gather_s == doctest::Approx(2.5e-3));
  CHECK(b.hbm_s == doctest::Approx(2e-3));
  CHECK(b.gemm_s == doctest::Approx(1.25e-3));
  CHECK(b.step_s == doctest::Approx(2e-3 + 1.5e-3 + 0.25e-3));
  // Without a measured speed its term is left out.
  CHECK(measured_roofline({2e6}, 1e9, 0.0, 0.0, device_speeds{}).step_s == 0.0);
}

TEST_CASE("a predicted step: HBM bytes of the library's sizing, GEMMs per lane, misses per layer") {
  throughput_inputs in = inputs_8b();
  std::string error;
  layer_traffic traffic;
  run_config run = in.run;
  run.batch = 100;
  REQUIRE(nosa::ok(traffic_of(in.model, run, in.first_step, in.steps, traffic)));
  CHECK(traffic.miss_bytes == 32768.0);
  // The mean over the timed steps' lengths, 32773 .. 32788 tokens (the new token included).
  using P = nosa::nosa_pipeline<nosa::bf16, 128>;
  const nosa::layer_config config = layer_config_for(in.model, run);
  CHECK(traffic.hbm_bytes > double(nosa::step_hbm_bytes<P>(config, 32773)));
  CHECK(traffic.hbm_bytes < double(nosa::step_hbm_bytes<P>(config, 32788)));
  // No misses: every layer is HBM plus GEMMs; 100 rows make two lanes of 50.
  const prediction p = predict(in, 100, 0, error);
  REQUIRE(error.empty());
  const double gemm = 2 * in.layer_gemm.seconds(50), hbm = 100 * traffic.hbm_bytes / in.speeds.hbm;
  CHECK(p.bound.step_s == doctest::Approx(32 * (hbm + gemm) + in.head_gemm.seconds(100)));
  CHECK(p.tokens_per_s() == doctest::Approx(100 / p.bound.step_s));
  CHECK(p.misses_per_step == 0.0);
  // 8 misses per (sequence, KV head) and step in every layer: 1,600 blocks of 32 KiB a layer.
  in.misses = swapping_misses(in.model, {0, 8});
  CHECK(in.misses[0].misses_per_step(0) == doctest::Approx(8.0));
  CHECK(in.misses[0].misses_per_step(1) == 0.0);
  const prediction q = predict(in, 100, 0, error);
  CHECK(q.misses_per_step == doctest::Approx(32 * 200 * 8));
  CHECK(q.bound.gather_s == doctest::Approx(32 * 200 * 8 * 32768 / in.speeds.gather));
  CHECK(q.bound.step_s == doctest::Approx(q.bound.gather_s + in.head_gemm.seconds(100)));  // gather-bound
  CHECK(predict(in, 100, 8, error).misses_per_step == 0.0);
}

TEST_CASE(
    "an FP8 method: half the bytes per miss plus the scales, so the same misses predict a faster step") {
  throughput_inputs in = inputs_8b();
  in.misses = swapping_misses(in.model, {0});
  std::string error;
  const prediction bf16 = predict(in, 100, 0, error);
  in.run.attention = method::nosa_offload_fp8;
  const prediction fp8 = predict(in, 100, 0, error);
  REQUIRE(error.empty());
  run_config run = in.run;
  run.batch = 100;
  layer_traffic traffic;
  REQUIRE(nosa::ok(traffic_of(in.model, run, in.first_step, in.steps, traffic)));
  CHECK(traffic.miss_bytes == 2.0 * (64 * 128 + 4));  // b_s * D + 4 per block-head of K or V
  CHECK(traffic.block_run_bytes == 64 * 128);
  CHECK(fp8.misses_per_step == bf16.misses_per_step);
  CHECK(fp8.bound.gather_s == doctest::Approx(bf16.bound.gather_s * (64 * 128 + 4) / (2.0 * 64 * 128)));
  CHECK(fp8.bound.hbm_s < bf16.bound.hbm_s);
  CHECK(fp8.tokens_per_s() > 1.9 * bf16.tokens_per_s());  // gather-bound at 8 misses per head
}

TEST_CASE("the sizing choice: the largest batch without misses, a slot cache when the link bounds the step") {
  throughput_inputs in = inputs_8b();
  std::string error;
  // Memory: 300 sequences without cache slots, fewer with more.
  const auto largest = [](int size) { return 300 - size; };
  const std::vector<int> sizes{0, 64};
  sizing_choice c = choose_sizing(in, sizes, 0, largest, error);
  REQUIRE(error.empty());
  CHECK(c.best.batch == 300);
  CHECK(c.best.cache_slots == 0);
  REQUIRE(c.per_size.size() == 2);
  CHECK(c.per_size[1].batch == 236);
  // A fixed batch is kept; sizes it does not fit are skipped.
  c = choose_sizing(in, sizes, 250, largest, error);
  CHECK(c.best.batch == 250);
  CHECK(c.per_size.size() == 1);
  // Misses that 64 cache slots remove: the smaller batch with the cache is faster.
  in.misses = swapping_misses(in.model, sizes);
  c = choose_sizing(in, sizes, 0, largest, error);
  CHECK(c.best.cache_slots == 64);
  CHECK(c.best.batch == 236);
  CHECK(c.best.tokens_per_s() > c.per_size[0].tokens_per_s());
  // Nothing fits: no choice.
  CHECK(choose_sizing(
            in, sizes, 0, [](int) { return 0; }, error)
            .best.batch == 0);
}
