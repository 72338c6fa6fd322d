// The engine example on the host backend: each layer's attention output, step after step, equals dense
// attention over exactly the tokens of the blocks the layer selected (with the method's bias c), computed
// here from the traced q, K, V and c; and the drift workload raises NOSA's locality.

#include "engine/host_engine.hpp"
#include "engine/model.hpp"
#include "engine/run_config.hpp"
#include "examples/engine_reference.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using namespace nosa_engine;

namespace {

model_config tiny() { return *find_preset("tiny"); }

/// Prefills the tiny model for `attention` and checks `steps` decode steps against the reference. Sequences
/// 0 and 2 share a prompt (and, for the offloading methods, its pages).
double check_against_reference(method attention, int steps, int cache_slots = 0) {
  const model_config model = tiny();
  run_config run;
  run.attention = attention;
  run.batch = 3;
  run.distinct_prompts = 2;
  run.prompt_tokens = 300;  // 19 blocks of 16, the last partial; k = 12, so selection is sparse
  run.steps = steps;
  run.reserve_ahead = 5;  // plan calls between steps, as an engine would
  run.cache_slots = cache_slots;
  run.trace = true;
  std::string error;
  const auto engine = host_engine::create(model, random_weights(model, 7), run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  // fp32 arithmetic over bf16 inputs (fp32 output) against a double reference: only summation order differs.
  return nosa_engine_test::check_steps_against_reference(
      *engine, steps, [&](int l, int b, int h) { return engine->attention().selection(l, b, h, {}); }, 0.0,
      2e-5);
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

/// Decode counters of 24 nosa-offload steps of two 320-token sequences with distinct prompts.
nosa::counters drift_counters(float drift, int cache_slots) {
  run_config run;
  run.attention = method::nosa_offload;
  run.batch = 2;
  run.distinct_prompts = 2;
  run.prompt_tokens = 320;
  run.steps = 24;
  run.drift = drift;
  run.cache_slots = cache_slots;
  std::string error;
  const auto engine = host_engine::create(tiny(), random_weights(tiny(), 3), run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  const nosa::counters before = engine->total_counters();
  for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
  return engine->total_counters() - before;
}

TEST_CASE("cache slots beyond k lower the misses of the drift workload") {
  const auto without = drift_counters(0.05f, 0).misses, with = drift_counters(0.05f, 8).misses;
  MESSAGE("misses over 24 steps: " << without << " without cache slots, " << with << " with 8");
  CHECK(with < without);
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
