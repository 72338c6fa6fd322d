// One decode step captured in a CUDA graph and replayed for over 2,000 steps while the sequences grow
// across many block and window boundaries: the step reads every variable quantity from state memory, so
// the replays must decode exactly as the host backend stepping the same inputs.
#include "twin.cuh"

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

namespace {

using nosa::status;
using nosa_cuda_test::random_batch;
using nosa_cuda_test::random_prompt;
using nosa_cuda_test::random_source;
using nosa_cuda_test::scaled;

// Owns a captured graph and its executable instance.
struct captured_graph {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  ~captured_graph() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
};

/// Captures one step (overlapped: the gather on a second stream, forked and joined inside the capture) and
/// replays it for 2,000+ steps against the host backend.
void replay_captured_step(bool overlapped) {
  using P = nosa::nosa_pipeline<nosa::bf16, 64>;
  using T = P::element_type;
  const int steps = scaled(2100, 150);
  const std::vector<int> prompts = {37, 250, 5, 100};  // ragged, none a multiple of the block size
  const int longest = 250 + steps;

  nosa::layer_config cfg;
  cfg.selection.block_size = 32;
  cfg.selection.window = 16;
  cfg.selection.stride = 8;
  cfg.selection.top_k = 8;
  cfg.selection.top_k_query_aware = 5;
  cfg.selection.n_init = 1;
  cfg.selection.n_local = 2;
  cfg.num_q_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.limits.max_sequences = 4;
  cfg.limits.max_blocks_per_sequence = (longest + 31) / 32 + 1;
  cfg.limits.pool_pages = 4 * cfg.limits.max_blocks_per_sequence;

  nosa_cuda_test::stream st;
  nosa_cuda_test::twin<P> t(cfg, st);
  t.context = overlapped ? "graph replay, overlapped: " : "graph replay: ";
  nosa_cuda_test::overlap_resources overlap;
  random_source rng(501);
  for (int seq = 0; seq < 4; ++seq) {
    REQUIRE(t.admit(seq, random_prompt<P>(rng, cfg, prompts[std::size_t(seq)], seq % 2 == 0)) == status::success);
  }
  // Every page the run will need, reserved up front: no plan call from here on.
  REQUIRE(t.reserve(steps) == status::success);

  // Capture one step over the twin's fixed device buffers, rows in a fixed order that is not the slot order.
  const std::vector<std::int32_t> order = {2, 0, 3, 1};
  captured_graph g;
  NOSA_CUDA_REQUIRE(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  const status enqueued = overlapped ? t.gpu.layer.step(t.device_args<T>(4), st, overlap.get())
                                     : t.gpu.layer.step(t.device_args<T>(4), st);
  NOSA_CUDA_REQUIRE(cudaStreamEndCapture(st, &g.graph));
  REQUIRE(enqueued == status::success);
  NOSA_CUDA_REQUIRE(cudaGraphInstantiate(&g.exec, g.graph, 0));

  for (int step = 0; step < steps; ++step) {
    const status s = t.step_with<T>(random_batch<P>(rng, cfg, order), [&] {
      NOSA_CUDA_REQUIRE(cudaGraphLaunch(g.exec, st));
      return status::success;
    });
    REQUIRE(s == status::success);
  }
  for (int seq = 0; seq < 4; ++seq) CHECK(t.gpu.layer.length(seq, st) == prompts[std::size_t(seq)] + steps);
  const auto& r = t.stats;
  MESSAGE(t.context << r.steps << " replays, " << r.selections << " selections, " << r.near_ties << " near-ties, "
                    << r.misses << " misses, max output error / tolerance " << r.max_output_error);
  CHECK(r.near_ties * 100 < r.selections);
  CHECK(r.steps == std::uint64_t(steps));
}

}  // namespace

TEST_CASE("a step captured once in a CUDA graph and replayed for 2,000+ steps decodes like the host backend") {
  NOSA_REQUIRE_GPU();
  replay_captured_step(false);
}

TEST_CASE("an overlapped step (gather on its own stream) captured once and replayed decodes like the host") {
  NOSA_REQUIRE_GPU();
  replay_captured_step(true);
}
