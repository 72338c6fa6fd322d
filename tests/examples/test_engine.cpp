// The engine example on the host backend: each layer's attention output, step after step, equals dense
// attention over exactly the tokens of the blocks the layer selected (with the method's bias c), computed
// here from the traced q, K, V and c; and the drift workload raises NOSA's locality.

#include "engine/host_engine.hpp"
#include "engine/model.hpp"
#include "engine/run_config.hpp"
#include "examples/engine_reference.hpp"

#include <doctest/doctest.h>

#include <numeric>
#include <string>
#include <vector>

using namespace nosa_engine;

namespace {

model_config tiny() { return *find_preset("tiny"); }

/// Runs `steps` steps of `m` and checks every layer, sequence and query head of every step against the
/// reference. Returns the largest difference between the engine and dense attention over all tokens (so the
/// caller can check that the selection mattered).
double check_against_reference(method attention, int steps) {
  const model_config model = tiny();
  run_config run;
  run.attention = attention;
  run.batch = 3;
  run.distinct_prompts = 2;
  run.prompt_tokens = 300;  // 19 blocks of 16, the last partial; k = 12, so selection is sparse
  run.steps = steps;
  run.reserve_ahead = 5;    // plan calls between steps, as an engine would
  run.trace = true;
  std::string error;
  const auto engine = host_engine::create(model, random_weights(model, 7), run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  nosa_engine_test::histories history(model, run, [&](int p, int l) -> const prompt_trace& { return engine->prompt(p, l); });
  const bool bias = uses_bias(attention);
  const int bs = model.selection.block_size;
  double dense_gap = 0.0;
  for (int s = 0; s < steps; ++s) {
    REQUIRE_MESSAGE(engine->step(error), error);
    history.append(model, run.batch, engine->last_step());
    for (int l = 0; l < model.layers; ++l) {
      const layer_trace& t = engine->last_step()[std::size_t(l)];
      for (int b = 0; b < run.batch; ++b) {
        const nosa_engine_test::token_history& h = history.of[std::size_t(l)][std::size_t(b)];
        const int blocks = (h.tokens + bs - 1) / bs;
        std::vector<std::int32_t> every(static_cast<std::size_t>(blocks));
        std::iota(every.begin(), every.end(), 0);
        for (int hk = 0; hk < model.kv_heads; ++hk) {
          const std::vector<std::int32_t> selected = engine->attention().selection(l, b, hk, {});
          REQUIRE(selected.size() == std::size_t(std::min(blocks, model.selection.top_k)));
          const std::vector<int> tokens = nosa_engine_test::tokens_of(selected, bs, h.tokens);
          const std::vector<int> all = nosa_engine_test::tokens_of(every, bs, h.tokens);
          const int group = model.q_heads / model.kv_heads;
          for (int hq = hk * group; hq < (hk + 1) * group; ++hq) {
            const std::size_t row = (std::size_t(b) * model.q_heads + hq) * model.head_dim;
            const auto ref = nosa_engine_test::reference_attention(model, h, t.q.data() + row, hq, bias, tokens);
            const double diff = nosa_engine_test::max_abs_diff(ref, t.o.data() + row);
            INFO("step " << s << " layer " << l << " sequence " << b << " head " << hq);
            // fp32 arithmetic over bf16 inputs against a double reference: only summation order differs.
            CHECK(diff < 2e-5);
            const auto dense = nosa_engine_test::reference_attention(model, h, t.q.data() + row, hq, bias, all);
            dense_gap = std::max(dense_gap, nosa_engine_test::max_abs_diff(dense, t.o.data() + row));
          }
        }
      }
    }
  }
  return dense_gap;
}

}  // namespace

TEST_CASE("engine attention equals dense attention over the selected tokens: nosa-offload") {
  CHECK(check_against_reference(method::nosa_offload, 20) > 1e-3);
}

TEST_CASE("engine attention equals dense attention over the selected tokens: nosa-resident") {
  CHECK(check_against_reference(method::nosa_resident, 12) > 1e-3);
}

TEST_CASE("engine attention equals dense attention over the selected tokens: infllmv2-offload") {
  CHECK(check_against_reference(method::infllmv2_offload, 12) > 1e-3);
}

TEST_CASE("the drift workload raises NOSA's locality") {
  const model_config model = tiny();
  const auto locality = [&](float drift) {
    run_config run;
    run.attention = method::nosa_offload;
    run.batch = 2;
    run.distinct_prompts = 2;
    run.prompt_tokens = 512;
    run.steps = 32;
    run.drift = drift;
    std::string error;
    const auto engine = host_engine::create(model, random_weights(model, 3), run, error);
    REQUIRE_MESSAGE(engine, error);
    REQUIRE_MESSAGE(engine->prefill(error), error);
    const nosa::counters before = engine->total_counters();
    for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
    const nosa::counters d = engine->total_counters() - before;
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
