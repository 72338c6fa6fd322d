// The engine example on the CUDA backend: each layer's attention output in the captured decode graph, step
// after step, equals dense attention over exactly the tokens of the blocks the layer selected (with the
// method's bias c), computed from the traced q, K, V and c. Skips without a GPU.

#include "backend/cuda/gpu.hpp"
#include "engine/cuda/cuda_engine.cuh"
#include "engine/model.hpp"
#include "engine/run_config.hpp"
#include "examples/engine_reference.hpp"

#include <doctest/doctest.h>

#include <string>
#include <vector>

using namespace nosa_engine;

namespace {

double check_against_reference(method attention, int steps) {
  const model_config model = *find_preset("tiny");
  run_config run;
  run.attention = attention;
  run.batch = 3;
  run.distinct_prompts = 2;
  run.prompt_tokens = 300;
  run.steps = steps;
  run.reserve_ahead = 5;
  run.trace = true;
  std::string error;
  const auto engine = cuda_engine::create(model, nullptr, run, error);  // random weights made on the device
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  // The output is bf16: rounding it costs up to half an ulp (2^-9 relative); one ulp (2^-8) covers fp32
  // summation-order differences on top of it.
  const double gap = nosa_engine_test::check_steps_against_reference(
      *engine, steps,
      [&](int l, int b, int h) { return engine->attention().selection(l, b, h, engine->stream()); },
      1.0 / 256.0, 1e-5);
  REQUIRE_MESSAGE(engine->finish(error), error);
  return gap;
}

}  // namespace

TEST_CASE("CUDA engine attention equals dense attention over the selected tokens: nosa-offload") {
  NOSA_REQUIRE_GPU();
  CHECK(check_against_reference(method::nosa_offload, nosa_cuda_test::scaled(20, 6)) > 1e-2);
}

TEST_CASE("CUDA engine attention equals dense attention over the selected tokens: nosa-resident") {
  NOSA_REQUIRE_GPU();
  CHECK(check_against_reference(method::nosa_resident, nosa_cuda_test::scaled(12, 4)) > 1e-2);
}

TEST_CASE("CUDA engine attention equals dense attention over the selected tokens: infllmv2-offload") {
  NOSA_REQUIRE_GPU();
  CHECK(check_against_reference(method::infllmv2_offload, nosa_cuda_test::scaled(12, 4)) > 1e-2);
}

TEST_CASE("CUDA engine attention equals dense attention over every token: full") {
  NOSA_REQUIRE_GPU();
  check_against_reference(method::full, nosa_cuda_test::scaled(12, 4));
}
