// The engine example on the host backend: each layer's attention output, step after step, equals dense
// attention over exactly the tokens of the blocks the layer selected (with the method's bias c), computed
// here from the traced q, K, V and c; and the drift workload raises NOSA's locality.

#include "engine/host_engine.hpp"
#include "engine/model.hpp"
#include "engine/prefill_cache.hpp"
#include "engine/run_config.hpp"
#include "engine/throughput_model.hpp"
#include "examples/engine_reference.hpp"
#include "examples/temp_dir.hpp"

#include <doctest/doctest.h>

#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

using namespace nosa_engine;

namespace {

model_config tiny() { return *find_preset("tiny"); }

/// Prefills the tiny model for `attention` and checks `steps` decode steps against the reference. Sequences
/// 0 and 2 share a prompt (and, for the offloading methods, its pages).
/// Bounds: |o - ref| <= rel * |ref| + abs per element.
double check_against_reference(method attention, int steps, int cache_slots = 0, int lanes = 1,
                               double rel = 0.0, double abs = 2e-5) {
  const model_config model = tiny();
  run_config run;
  run.attention = attention;
  run.batch = 3;
  run.distinct_prompts = 2;
  run.prompt_tokens = 300;  // 19 blocks of 16, the last partial; k = 12, so selection is sparse
  run.steps = steps;
  run.reserve_ahead = 5;  // plan calls between steps, as an engine would
  run.cache_slots = cache_slots;
  run.lanes = lanes;
  run.trace = true;
  std::string error;
  const auto engine = host_engine::create(model, random_weights(model, 7), run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  // fp32 arithmetic over bf16 inputs (fp32 output) against a double reference: only summation order differs
  // (by default; the FP8 methods also round complete blocks).
  return nosa_engine_test::check_steps_against_reference(
      *engine, steps, [&](int l, int b, int h) { return engine->selection(l, b, h); }, rel, abs);
}

}  // namespace

TEST_CASE("engine attention equals dense attention over the selected tokens: nosa-offload") {
  const double gap = check_against_reference(method::nosa_offload, 20);
  MESSAGE("largest difference to dense attention over all tokens: " << gap);
  CHECK(gap > 0.05);
}

TEST_CASE("engine attention equals dense attention over the selected tokens: nosa-resident") {
  CHECK(check_against_reference(method::nosa_resident, 12) > 0.05);
}

TEST_CASE("engine attention equals dense attention over the selected tokens: infllmv2-offload") {
  CHECK(check_against_reference(method::infllmv2_offload, 12) > 0.05);
}

TEST_CASE("engine attention equals dense attention over every token: full") {
  check_against_reference(method::full,
                          12);  // the selection is every block: the reference is dense attention
}

TEST_CASE("engine attention equals dense attention over the selected tokens: nosa-offload, cache slots") {
  CHECK(check_against_reference(method::nosa_offload, 12, 6) > 0.05);
}

TEST_CASE("engine attention equals dense attention over the selected tokens: nosa-offload, two lanes") {
  CHECK(check_against_reference(method::nosa_offload, 12, 0, 2) > 0.05);
}

TEST_CASE("FP8 methods attend the selected tokens within the rounding of their complete blocks") {
  for (const method m : {method::nosa_offload_fp8, method::infllmv2_offload_fp8, method::full_fp8}) {
    INFO(method_name(m));
    check_against_reference(m, 8, 0, 1, nosa_engine_test::fp8_rel, nosa_engine_test::fp8_abs);
  }
}

TEST_CASE("FP8 methods move b_s * D + 4 bytes per block-head of K or V, half of bf16, and report tokens/s") {
  const model_config model = tiny();
  const int block_head = model.selection.block_size * model.head_dim;
  for (const auto& [fp8, bf16] : {std::pair(method::nosa_offload_fp8, method::nosa_offload),
                                  std::pair(method::infllmv2_offload_fp8, method::infllmv2_offload)}) {
    INFO(method_name(fp8));
    run_config run = nosa_engine_test::drift_workload(0.05f, 0, 10);
    run.attention = fp8;
    std::string error;
    const auto engine = host_engine::create(model, random_weights(model, 5), run, error);
    REQUIRE_MESSAGE(engine, error);
    REQUIRE_MESSAGE(engine->prefill(error), error);
    const nosa::counters before = engine->total_counters();
    for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
    const nosa::counters d = engine->total_counters() - before;
    REQUIRE(d.misses > 0);
    CHECK(d.bytes_h2d == d.misses * 2 * (block_head + 4));
    // The sizing the engine plans with counts the same bytes, and half a bf16 block's values per run.
    layer_traffic f8, b16;
    REQUIRE(nosa::ok(traffic_of(model, run, 0, run.steps, f8)));
    run.attention = bf16;
    REQUIRE(nosa::ok(traffic_of(model, run, 0, run.steps, b16)));
    CHECK(f8.miss_bytes == 2.0 * (block_head + 4));
    CHECK(b16.miss_bytes == 2.0 * 2 * block_head);
    CHECK(f8.block_run_bytes == std::size_t(block_head));
    CHECK(b16.block_run_bytes == 2 * std::size_t(block_head));
    CHECK(f8.hbm_bytes < b16.hbm_bytes);
    run_report r;
    r.method = std::string(method_name(fp8));
    r.batch = run.batch;
    r.steps = run.steps;
    r.layers = model.layers;
    finish_report(r, d, 0.5, model.kv_heads);
    CHECK(r.tokens_per_s == doctest::Approx(2 * 10 / 0.5));
    CHECK(r.locality >= 0.0);
  }
}

TEST_CASE("lanes split the batch without changing what any sequence computes") {
  const model_config model = tiny();
  for (const method m : {method::nosa_offload, method::infllmv2_offload, method::nosa_resident, method::full,
                         method::nosa_offload_fp8}) {
    INFO(method_name(m));
    const auto run_with = [&](int lanes) {
      run_config run;
      run.attention = m;
      run.batch = 5;
      run.distinct_prompts = 2;  // lanes of rows {0, 1} and {2, 3, 4} each hold both prompts
      run.prompt_tokens = 200;
      run.steps = 8;
      run.reserve_ahead = 3;
      run.drift = 0.05f;
      run.lanes = lanes;
      std::string error;
      auto engine = host_engine::create(model, random_weights(model, 4), run, error);
      REQUIRE_MESSAGE(engine, error);
      REQUIRE_MESSAGE(engine->prefill(error), error);
      const nosa::counters before = engine->total_counters();
      for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
      return std::pair(engine->tokens(), engine->total_counters() - before);
    };
    const auto [one_tokens, one] = run_with(1);
    for (const int lanes : {2, 3}) {
      INFO(lanes << " lanes");
      const auto [tokens, counts] = run_with(lanes);
      CHECK(tokens == one_tokens);
      CHECK(counts.hits == one.hits);
      CHECK(counts.misses == one.misses);
      CHECK(counts.bytes_h2d == one.bytes_h2d);
      CHECK(counts.bytes_d2h == one.bytes_d2h);
    }
  }
}

TEST_CASE("lane layout: contiguous rows, and the first row of a prompt in each lane holds its pages") {
  const lane_layout two(5, 2);
  CHECK(two.first(0) == 0);
  CHECK(two.first(1) == 2);
  CHECK(two.rows(1) == 3);
  CHECK(two.lane_of(1) == 0);
  CHECK(two.lane_of(2) == 1);
  CHECK(two.local(4) == 2);
  CHECK(two.share_source(0, 2) == -1);
  CHECK(two.share_source(1, 2) == -1);
  CHECK(two.share_source(2, 2) == -1);  // the first row of lane 1 (prompt 0) stores its prompt again
  CHECK(two.share_source(3, 2) == -1);  // prompt 1, first in lane 1
  CHECK(two.share_source(4, 2) == 0);   // prompt 0 again: shares lane 1's sequence 0
  CHECK(lane_layout(3, 8).lanes == 3);  // never an empty lane
  const lane_layout uneven(1000, 3);
  for (int b = 0; b < 1000; ++b) REQUIRE(uneven.first(uneven.lane_of(b)) + uneven.local(b) == b);
}

TEST_CASE("sequences of one prompt share its pages and decode as if they did not") {
  const model_config model = tiny();
  const auto run_with = [&](bool share) {
    run_config run;
    run.attention = method::nosa_offload;
    run.batch = 4;
    run.distinct_prompts = 2;
    run.prompt_tokens = 200;
    run.steps = 6;
    run.drift = 0.05f;  // the sequences of one prompt diverge
    run.share_prompts = share;
    std::string error;
    auto engine = host_engine::create(model, random_weights(model, 2), run, error);
    REQUIRE_MESSAGE(engine, error);
    REQUIRE_MESSAGE(engine->prefill(error), error);
    for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
    return engine;
  };
  const auto shared = run_with(true), separate = run_with(false);
  CHECK(shared->tokens() == separate->tokens());
  // 2 of the 4 sequences reference the 12 complete blocks of their prompt instead of storing them.
  const nosa::layer_config a = layer_config_for(model, shared->run()),
                           b = layer_config_for(model, separate->run());
  CHECK(b.limits.pool_pages - a.limits.pool_pages == 2 * 12);
  CHECK(shared->host_bytes() < separate->host_bytes());
}

/// A prefilled engine for 24 nosa-offload steps of two 320-token sequences with distinct prompts.
std::unique_ptr<host_engine> drift_engine(float drift, int cache_slots) {
  std::string error;
  auto engine = host_engine::create(tiny(), random_weights(tiny(), 3),
                                    nosa_engine_test::drift_workload(drift, cache_slots, 24), error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  return engine;
}

/// Decode counters of the 24 steps of `drift_engine`.
nosa::counters drift_counters(float drift, int cache_slots) {
  const auto engine = drift_engine(drift, cache_slots);
  const run_config& run = engine->run();
  std::string error;
  const nosa::counters before = engine->total_counters();
  for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
  return engine->total_counters() - before;
}

TEST_CASE("cache slots beyond k lower the misses of the drift workload") {
  const auto without = drift_counters(0.05f, 0).misses, with = drift_counters(0.05f, 8).misses;
  MESSAGE("misses over 24 steps: " << without << " without cache slots, " << with << " with 8");
  CHECK(with < without);
}

TEST_CASE("a calibration run predicts the misses of every slot-cache size exactly") {
  // The selections of a run without cache slots, replayed through slot-cache models of each size, give the
  // misses that runs with those sizes count (selections do not depend on the cache).
  const auto engine = drift_engine(0.05f, 0);
  const std::vector<int> sizes{0, 3, 8};
  std::vector<nosa::miss_calibration> layers;
  std::string error;
  const int warmup = 4, steps = engine->run().steps - warmup;
  REQUIRE_MESSAGE(calibrate_misses(*engine, sizes, warmup, steps, layers, error), error);
  REQUIRE(layers.size() == std::size_t(tiny().layers));
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    // The measured run, counted over the same steps as the calibration.
    const auto measured = drift_engine(0.05f, sizes[i]);
    for (int s = 0; s < warmup; ++s) REQUIRE_MESSAGE(measured->step(error), error);
    const nosa::counters before = measured->total_counters();
    for (int s = 0; s < steps; ++s) REQUIRE_MESSAGE(measured->step(error), error);
    double predicted = 0.0;
    for (const nosa::miss_calibration& c : layers)
      predicted += c.misses_per_step(i) * double(c.counted_steps());
    MESSAGE(sizes[i] << " cache slots: " << predicted << " misses predicted");
    CHECK(predicted == doctest::Approx(double((measured->total_counters() - before).misses)));
  }
  CHECK(layers[0].misses_per_step(2) < layers[0].misses_per_step(0));
}

TEST_CASE("the drift workload raises NOSA's locality") {
  const auto locality = [](float drift) {
    const nosa::counters d = drift_counters(drift, 0);
    REQUIRE(d.hits + d.misses > 0);
    return double(d.hits) / double(d.hits + d.misses);
  };
  const double greedy = locality(0.0f), drifting = locality(0.05f);
  MESSAGE("locality: greedy " << greedy << ", drift 0.05 " << drifting);
  CHECK(drifting > greedy + 0.05);
}

TEST_CASE("the engine rejects a workload it cannot run, with a message") {
  const model_config model = tiny();
  run_config run;
  run.batch = 2;
  run.distinct_prompts = 3;
  std::string error;
  CHECK_FALSE(host_engine::create(model, random_weights(model, 1), run, error));
  CHECK(error.find("distinct prompts") != std::string::npos);
}

namespace {

/// A prefilled tiny engine for `m` whose prefill cache is `dir`, after `steps` decode steps.
std::unique_ptr<host_engine> cached_run(method m, const std::filesystem::path& dir, int steps = 4) {
  const model_config model = tiny();
  run_config run;
  run.attention = m;
  run.batch = 3;
  run.distinct_prompts = 2;
  run.prompt_tokens = 150;
  run.steps = steps;
  run.prefill_cache = dir.string();
  run.trace = true;
  std::string error;
  auto engine = host_engine::create(model, random_weights(model, run.weight_seed), run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  for (int s = 0; s < steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
  return engine;
}

}  // namespace

TEST_CASE("the prefill cache gives the decode a computed prefill gives") {
  const nosa_test::temp_dir dir("nosa_prefill_cache_");
  const auto first = cached_run(method::nosa_offload, dir.path);
  CHECK_FALSE(first->prefill_cached());
  // One file per distinct prompt, complete (no temporary left behind).
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path)) {
    CHECK(entry.path().extension() == ".bin");
    ++files;
  }
  CHECK(files == 2);
  const auto second = cached_run(method::nosa_offload, dir.path);
  CHECK(second->prefill_cached());
  CHECK(second->tokens() == first->tokens());
  for (int p = 0; p < 2; ++p) {
    for (int l = 0; l < tiny().layers; ++l) {
      CHECK(second->prompt(p, l).k == first->prompt(p, l).k);
      CHECK(second->prompt(p, l).c == first->prompt(p, l).c);
    }
  }
  for (int l = 0; l < tiny().layers; ++l)
    CHECK(second->last_step()[std::size_t(l)].o == first->last_step()[std::size_t(l)].o);
  // NOSA's resident store uses the same prefill (same bias); full attention has none and gets its own files.
  CHECK(cached_run(method::nosa_resident, dir.path)->prefill_cached());
  CHECK_FALSE(cached_run(method::full, dir.path)->prefill_cached());
  CHECK(cached_run(method::infllmv2_offload, dir.path)->prefill_cached());
  // The FP8 methods quantise at ingest: their prefill is their namesake's.
  CHECK(cached_run(method::nosa_offload_fp8, dir.path)->prefill_cached());
  CHECK(cached_run(method::full_fp8, dir.path)->prefill_cached());
}

TEST_CASE("a truncated or foreign prefill cache file is recomputed, not read") {
  const nosa_test::temp_dir dir("nosa_prefill_cache_");
  const auto reference = cached_run(method::nosa_offload, dir.path);
  const prefill_key key{"host", 1, 2, 0, 150, true};
  const std::filesystem::path file = prefill_cache_path(dir.path.string(), tiny(), key);
  REQUIRE(std::filesystem::exists(file));
  const std::string whole = nosa_test::read_bytes(file);
  nosa_test::write_bytes(file, whole.substr(0, whole.size() - 5));
  const auto after_cut = cached_run(method::nosa_offload, dir.path);
  CHECK_FALSE(after_cut->prefill_cached());
  CHECK(after_cut->tokens() == reference->tokens());
  CHECK(nosa_test::read_bytes(file) == whole);  // written again, complete
  // The same bytes under another key's name (another prompt seed) are not taken for that key.
  const prefill_key other{"host", 1, 9, 0, 150, true};
  nosa_test::write_bytes(prefill_cache_path(dir.path.string(), tiny(), other), whole);
  prefill_cache_reader reader;
  CHECK_FALSE(reader.open(dir.path.string(), tiny(), other));
  CHECK(reader.open(dir.path.string(), tiny(), key));
}
