// The host decode layer against the independent reference: exact tie-breaking, the paper's defaults, long
// generations across block boundaries, locality and the hard budget.
#include "harness.hpp"

#include <doctest/doctest.h>

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

TEST_CASE("ties are broken by the lower block index, exactly as the reference does") {
  // A constant-key prompt prefix makes the compressed keys of whole stretches identical, so Sq ties
  // exactly; quarter-step eviction scores make the window means exact, so Se ties exactly too.
  run_spec s = property_spec(41);
  s.prompt_lengths = {300, 211, 163};
  s.constant_prompt_prefix = 160;
  s.scores = nosa_test::score_kind::quantized;
  s.require_exact_selection = true;
  s.steps = 40;
  run_against_reference<combo<float, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>>(s);
  run_against_reference<combo<float, nosa::no_query_agnostic, nosa::offload_store, bias_mode::none>>(s);
  run_against_reference<combo<bf16, nosa::eviction_score_pooling, nosa::resident_store, bias_mode::none>>(s);
}

TEST_CASE("defaults of the paper (block 64, window 32, stride 16, k 64, k_qa 33)") {
  run_spec s;
  s.config.num_q_heads = 4;
  s.config.num_kv_heads = 2;
  s.config.limits = {2, 80, 2 * 80};
  s.prompt_lengths = {4100, 2500};  // 65 and 40 blocks: one above k, one below
  s.steps = 130;                    // the second crosses k = 64 blocks
  s.seed = 51;
  const auto stats =
      run_against_reference<combo<bf16, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>>(s);
  CHECK(stats.full_selections > 0);
  CHECK(stats.max_misses_over_bound <= 0);
}

TEST_CASE("long generation: 2,000+ steps across block boundaries, write-back and continuous batching") {
  run_spec s;
  s.config = small_config(3, 2700);
  s.prompt_lengths = {37, 250, 5};
  s.steps = 2100;
  s.seed = 61;
  s.replace_at_step = 1200;  // sequence 0 leaves, a new one with a 77-token prompt takes its slot
  s.replacement_prompt = 77;
  const auto stats =
      run_against_reference<combo<bf16, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>>(s);
  CHECK(stats.near_ties * 100 <= stats.selections);
  // Fixed eviction scores: a block can only enter through the free query-aware picks.
  CHECK(stats.max_misses_over_bound <= 0);
  MESSAGE("misses " << stats.misses << " over " << stats.selections << " selections, max per step "
                    << stats.max_misses << ", near-ties " << stats.near_ties);
}

TEST_CASE("locality: misses bounded by k_qa - forced; the budget is never exceeded; InfLLMv2 misses more") {
  run_spec s;
  s.config = small_config(2, 1400);
  s.prompt_lengths = {400, 333};
  s.steps = 800;
  s.seed = 71;
  using nosa_p = combo<float, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>;
  using infllm_p = combo<float, nosa::no_query_agnostic, nosa::offload_store, bias_mode::none>;
  const auto nosa_stats = run_against_reference<nosa_p>(s);
  const auto infllm_stats = run_against_reference<infllm_p>(s);
  CHECK(nosa_stats.max_misses_over_bound <= 0);
  CHECK(nosa_stats.max_misses <= s.config.selection.top_k_query_aware - s.config.selection.forced_blocks());
  CHECK(infllm_stats.misses > nosa_stats.misses);
  MESSAGE("misses on the same inputs: NOSA " << nosa_stats.misses << ", InfLLMv2 " << infllm_stats.misses);

  for (int budget : {0, 1}) {
    run_spec b = s;
    b.steps = 300;
    b.config.selection.max_new_blocks = budget;
    const auto nb = run_against_reference<nosa_p>(b);
    CHECK(nb.max_misses <= budget);
    const auto ib = run_against_reference<infllm_p>(b);
    CHECK(ib.max_misses <= budget);
  }
}
