// The engine example on the CUDA backend: each layer's attention output in the captured decode graph, step
// after step, equals dense attention over exactly the tokens of the blocks the layer selected (with the
// method's bias c), computed from the traced q, K, V and c; and the model it runs is the host engine's.
// Skips without a GPU.

#include "backend/cuda/gpu.hpp"
#include "engine/cuda/cuda_engine.cuh"
#include "engine/host_engine.hpp"
#include "engine/model.hpp"
#include "engine/run_config.hpp"
#include "engine/throughput_model.hpp"
#include "examples/engine_reference.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

using namespace nosa_engine;

namespace {

/// Bounds on top of the bf16 output's: |o - ref| <= (rel + 2^-8) * |ref| + abs + 1e-5 per element.
double check_against_reference(method attention, int steps, int cache_slots = 0, int lanes = 1, int batch = 3,
                               double rel = 0.0, double abs = 0.0) {
  const model_config model = *find_preset("tiny");
  run_config run;
  run.attention = attention;
  run.batch = batch;
  run.distinct_prompts = 2;
  run.prompt_tokens = 300;
  run.steps = steps;
  run.reserve_ahead = 5;
  run.cache_slots = cache_slots;
  run.lanes = lanes;
  run.trace = true;
  std::string error;
  const auto engine = cuda_engine::create(model, nullptr, run, error);  // random weights made on the device
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  // The output is bf16: rounding it costs up to half an ulp (2^-9 relative); one ulp (2^-8) covers fp32
  // summation-order differences on top of it.
  const double gap = nosa_engine_test::check_steps_against_reference(
      *engine, steps, [&](int l, int b, int h) { return engine->selection(l, b, h); }, rel + 1.0 / 256.0,
      abs + 1e-5);
  REQUIRE_MESSAGE(engine->finish(error), error);
  return gap;
}

}  // namespace

TEST_CASE("CUDA engine attention equals dense attention over the selected tokens: nosa-offload") {
  NOSA_REQUIRE_GPU();
  CHECK(check_against_reference(method::nosa_offload, nosa_cuda_test::scaled(20, 6)) > 0.05);
}

TEST_CASE("CUDA engine attention equals dense attention over the selected tokens: nosa-resident") {
  NOSA_REQUIRE_GPU();
  CHECK(check_against_reference(method::nosa_resident, nosa_cuda_test::scaled(12, 4)) > 0.05);
}

TEST_CASE("CUDA engine attention equals dense attention over the selected tokens: infllmv2-offload") {
  NOSA_REQUIRE_GPU();
  CHECK(check_against_reference(method::infllmv2_offload, nosa_cuda_test::scaled(12, 4)) > 0.05);
}

TEST_CASE(
    "CUDA engine attention equals dense attention over the selected tokens: nosa-offload, cache slots") {
  NOSA_REQUIRE_GPU();
  CHECK(check_against_reference(method::nosa_offload, nosa_cuda_test::scaled(12, 4), 6) > 0.05);
}

TEST_CASE("CUDA engine attention equals dense attention over the selected tokens: two lanes side by side") {
  NOSA_REQUIRE_GPU();
  // Five rows in lanes of 2 and 3, each lane on its own stream with its own gather stream, half a layer
  // apart, all in one captured graph.
  CHECK(check_against_reference(method::nosa_offload, nosa_cuda_test::scaled(16, 4), 0, 2, 5) > 0.05);
  CHECK(check_against_reference(method::infllmv2_offload, nosa_cuda_test::scaled(10, 4), 4, 2, 5) > 0.05);
  check_against_reference(method::full, nosa_cuda_test::scaled(8, 3), 0, 3, 5);
}

TEST_CASE("CUDA engine: lanes decode what one lane decodes") {
  NOSA_REQUIRE_GPU();
  const model_config model = *find_preset("tiny");
  const auto run_with = [&](int lanes) {
    run_config run;
    run.attention = method::nosa_offload;
    run.batch = 6;
    run.distinct_prompts = 2;
    run.prompt_tokens = 250;
    run.steps = 10;
    run.reserve_ahead = 4;
    run.drift = 0.05f;
    run.lanes = lanes;
    std::string error;
    const auto engine = cuda_engine::create(model, nullptr, run, error);
    REQUIRE_MESSAGE(engine, error);
    REQUIRE_MESSAGE(engine->prefill(error), error);
    const nosa::counters before = engine->total_counters();
    for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
    REQUIRE_MESSAGE(engine->finish(error), error);
    return std::pair(engine->tokens(), engine->total_counters() - before);
  };
  const auto [tokens1, counts1] = run_with(1);
  const auto [tokens2, counts2] = run_with(2);
  // cuBLAS may pick other kernels for 3 rows than for 6, so the activations can differ in their last bits;
  // the drift workload feeds no tokens back, so the selections stay comparable: the traffic agrees within
  // a few blocks, and most tokens agree.
  int same = 0;
  for (std::size_t b = 0; b < tokens1.size(); ++b) same += tokens1[b] == tokens2[b];
  MESSAGE("tokens equal in " << same << " of 6 rows; misses " << counts1.misses << " (one lane) and " << counts2.misses
                             << " (two)");
  CHECK(same >= 4);
  CHECK(std::abs(double(counts2.misses) - double(counts1.misses)) <= 0.05 * double(counts1.misses) + 8);
  CHECK(counts2.hits + counts2.misses == counts1.hits + counts1.misses);
}

TEST_CASE("CUDA engine: the profile step accounts for every component") {
  NOSA_REQUIRE_GPU();
  const model_config model = *find_preset("tiny");
  run_config run;
  run.attention = method::nosa_offload;
  run.batch = 4;
  run.prompt_tokens = 300;
  run.steps = 4;
  run.lanes = 2;
  std::string error;
  const auto engine = cuda_engine::create(model, nullptr, run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  for (int s = 0; s < 3; ++s) REQUIRE_MESSAGE(engine->step(error), error);
  std::vector<std::pair<std::string, double>> ms;
  REQUIRE_MESSAGE(engine->profile_step(ms, error), error);
  REQUIRE_MESSAGE(engine->finish(error), error);
  double parts = 0.0, total = -1.0;
  for (const auto& [what, t] : ms) {
    INFO(what);
    CHECK(t >= 0.0);
    if (what == "total") {
      total = t;
    } else {
      parts += t;
    }
    if (what == "gemm" || what == "scoring" || what == "selection" || what == "attention") CHECK(t > 0.0);
  }
  CHECK(total > 0.0);
  CHECK(std::abs(parts - total) <= 1e-6 * total + 1e-9);
}

TEST_CASE("CUDA engine FP8 methods attend the selected tokens within the rounding of their complete blocks") {
  NOSA_REQUIRE_GPU();
  for (const method m : {method::nosa_offload_fp8, method::infllmv2_offload_fp8, method::full_fp8}) {
    INFO(method_name(m));
    check_against_reference(m, nosa_cuda_test::scaled(8, 3), 0, m == method::nosa_offload_fp8 ? 2 : 1, 3,
                            nosa_engine_test::fp8_rel, nosa_engine_test::fp8_abs);
  }
}

TEST_CASE("CUDA engine: a miss of nosa-offload-fp8 moves b_s * D + 4 bytes per block-head of K or V") {
  NOSA_REQUIRE_GPU();
  const model_config model = *find_preset("tiny");
  run_config run = nosa_engine_test::drift_workload(0.05f, 0, 10);
  run.attention = method::nosa_offload_fp8;
  std::string error;
  const auto engine = cuda_engine::create(model, nullptr, run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  REQUIRE_MESSAGE(engine->finish(error), error);
  const nosa::counters before = engine->total_counters();
  for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
  REQUIRE_MESSAGE(engine->finish(error), error);
  const nosa::counters d = engine->total_counters() - before;
  REQUIRE(d.misses > 0);
  CHECK(d.bytes_h2d == d.misses * 2 * (model.selection.block_size * model.head_dim + 4));
}

TEST_CASE("CUDA engine attention equals dense attention over every token: full") {
  NOSA_REQUIRE_GPU();
  check_against_reference(method::full, nosa_cuda_test::scaled(12, 4));
}

namespace {

/// Largest |a - b| over two traced tensors, relative to the largest |a|.
double relative_gap(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(a[i])));
  }
  return scale > 0.0 ? diff / scale : diff;
}

}  // namespace

TEST_CASE("the CUDA engine computes the host engine's model") {
  NOSA_REQUIRE_GPU();
  // Same seeds, same random weights (one generator on both sides), same prompts: the K, V, c ingested at
  // prefill and the q, k, v, c of the first decode steps agree up to where the two engines round. The CUDA
  // engine rounds the normed activations, the MLP activation and the attention output to bf16 before each
  // GEMM (2^-9 relative each) where the host keeps fp32, and the error grows through the residual stream of
  // the two layers; 2^-5 of each tensor's largest magnitude bounds that, while a wrong RoPE pairing,
  // position, transposition or weight offset gives differences of the order of the values themselves.
  const model_config model = *find_preset("tiny");
  run_config run;
  run.attention = method::nosa_offload;
  run.batch = 2;
  run.distinct_prompts = 2;
  run.prompt_tokens = 80;
  run.steps = 3;
  run.trace = true;
  std::string error;
  const auto host = host_engine::create(model, random_weights(model, run.weight_seed), run, error);
  REQUIRE_MESSAGE(host, error);
  const auto cuda = cuda_engine::create(model, nullptr, run, error);
  REQUIRE_MESSAGE(cuda, error);
  REQUIRE_MESSAGE(host->prefill(error), error);
  REQUIRE_MESSAGE(cuda->prefill(error), error);
  constexpr double bound = 1.0 / 32.0;
  for (int p = 0; p < run.distinct_prompts; ++p) {
    for (int l = 0; l < model.layers; ++l) {
      INFO("prompt " << p << " layer " << l);
      CHECK(relative_gap(host->prompt(p, l).k, cuda->prompt(p, l).k) < bound);
      CHECK(relative_gap(host->prompt(p, l).v, cuda->prompt(p, l).v) < bound);
      CHECK(relative_gap(host->prompt(p, l).c, cuda->prompt(p, l).c) < bound);
    }
  }
  for (int s = 0; s < run.steps; ++s) {
    // Greedy decoding feeds back argmax tokens; compare only while both engines chose the same ones (a near
    // tie may go either way).
    if (host->tokens() != cuda->tokens()) break;
    REQUIRE_MESSAGE(host->step(error), error);
    REQUIRE_MESSAGE(cuda->step(error), error);
    for (int l = 0; l < model.layers; ++l) {
      INFO("step " << s << " layer " << l);
      const layer_trace &h = host->last_step()[std::size_t(l)], &c = cuda->last_step()[std::size_t(l)];
      CHECK(relative_gap(h.q, c.q) < bound);
      CHECK(relative_gap(h.k, c.k) < bound);
      CHECK(relative_gap(h.v, c.v) < bound);
      CHECK(relative_gap(h.c, c.c) < bound);
    }
  }
  REQUIRE_MESSAGE(cuda->finish(error), error);
}

namespace {

/// A prefilled tiny nosa-offload engine on the drift workload with `cache_slots` slots beyond k.
std::unique_ptr<cuda_engine> drift_engine(int cache_slots, int steps) {
  std::string error;
  auto engine = cuda_engine::create(*find_preset("tiny"), nullptr,
                                    nosa_engine_test::drift_workload(0.05f, cache_slots, steps), error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  return engine;
}

}  // namespace

TEST_CASE("CUDA engine: a calibration run predicts the misses of every slot-cache size exactly") {
  NOSA_REQUIRE_GPU();
  const int warmup = 2, steps = nosa_cuda_test::scaled(16, 6);
  const auto engine = drift_engine(0, warmup + steps);
  const std::vector<int> sizes{0, 3, 8};
  std::vector<nosa::miss_calibration> layers;
  std::string error;
  REQUIRE_MESSAGE(calibrate_misses(*engine, sizes, warmup, steps, layers, error), error);
  REQUIRE_MESSAGE(engine->finish(error), error);
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const auto measured = drift_engine(sizes[i], warmup + steps);
    for (int s = 0; s < warmup; ++s) REQUIRE_MESSAGE(measured->step(error), error);
    REQUIRE_MESSAGE(measured->finish(error), error);
    const nosa::counters before = measured->total_counters();
    for (int s = 0; s < steps; ++s) REQUIRE_MESSAGE(measured->step(error), error);
    REQUIRE_MESSAGE(measured->finish(error), error);
    double predicted = 0.0;
    for (const nosa::miss_calibration& c : layers)
      predicted += c.misses_per_step(i) * double(c.counted_steps());
    MESSAGE(sizes[i] << " cache slots: " << predicted << " misses predicted");
    // The same selections on the same device: the prediction is exact.
    CHECK(predicted == doctest::Approx(double((measured->total_counters() - before).misses)));
  }
}

TEST_CASE("CUDA engine: the start-up measurements of the link, HBM and the GEMMs") {
  NOSA_REQUIRE_GPU();
  std::string error;
  double copy = 0.0, gather = 0.0, hbm = 0.0;
  REQUIRE_MESSAGE(measure_h2d_copy(copy, error), error);
  REQUIRE_MESSAGE(measure_gather(std::size_t(16) * 64 * 2, gather, error), error);
  REQUIRE_MESSAGE(measure_hbm_read(hbm, error), error);
  MESSAGE("copy " << copy << " GB/s, gather " << gather / 1e9 << " GB/s, HBM read " << hbm / 1e9 << " GB/s");
  // Any link and any HBM of a card that runs this: 1 to 1000 GB/s over PCIe or NVLink-C2C, 100 GB/s to 100
  // TB/s.
  // Under a sanitizer (short runs) every kernel is 10-100x slower: only the upper bounds hold there.
  if (!nosa_cuda_test::short_run()) {
    CHECK(copy > 1.0);
    CHECK(gather > 1e9);
    CHECK(hbm > 1e11);
  }
  CHECK(gather < 1e12);
  CHECK(hbm < 1e14);
  const auto engine = drift_engine(0, 2);
  gemm_curve layer, head;
  // Up to the batch in the decode activations, beyond it in a scratch.
  for (const std::vector<int>& rows : {std::vector<int>{1, 2}, std::vector<int>{64}}) {
    REQUIRE_MESSAGE(engine->measure_gemms(rows, layer, head, error), error);
    REQUIRE(layer.points.size() == rows.size());
    REQUIRE(head.points.size() == rows.size());
    for (const auto& [r, seconds] : layer.points) CHECK(seconds > 0.0);
    for (const auto& [r, seconds] : head.points) CHECK(seconds > 0.0);
  }
  // The decode step recomputes every activation the measurement overwrote.
  for (int s = 0; s < 2; ++s) REQUIRE_MESSAGE(engine->step(error), error);
  REQUIRE_MESSAGE(engine->finish(error), error);
}
