// One decode step captured in a CUDA graph and replayed for over 2,000 steps while the sequences grow
// across many block and window boundaries: the step reads every variable quantity from state memory, so
// the replays must decode exactly as the host backend stepping the same inputs.
#include "twin.cuh"

#include <doctest/doctest.h>

namespace {

using P = nosa::nosa_pipeline<nosa::bf16, 64>;
using nosa_cuda_test::replay_captured_step;
using nosa_cuda_test::scaled;

}  // namespace

TEST_CASE(
    "a step captured once in a CUDA graph and replayed for 2,000+ steps decodes like the host backend") {
  NOSA_REQUIRE_GPU();
  replay_captured_step<P>(scaled(2100, 150), false, "graph replay: ");
}

TEST_CASE("an overlapped step (gather on its own stream) captured once and replayed decodes like the host") {
  NOSA_REQUIRE_GPU();
  replay_captured_step<P>(scaled(2100, 150), true, "graph replay, overlapped: ");
}
