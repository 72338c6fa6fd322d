#pragma once
// An independent reference for the engine's attention: dense softmax attention, in double precision, over
// exactly the tokens of the blocks a layer selected, with the method's bias c. The token history (every K,
// V and c a sequence has seen) is rebuilt from what the engine traced: the ingested prompt, then each step's
// new token. Shared by the host and CUDA engine tests.

#include "engine/model.hpp"
#include "engine/run_config.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace nosa_engine_test {

/// Every K, V and c of one sequence in one layer, in token order.
struct token_history {
  std::vector<float> k, v;  // [T][H_kv][D]
  std::vector<float> c;     // [T][H_kv]
  int tokens = 0;
};

/// Histories of all sequences and layers: [layer][sequence].
struct histories {
  std::vector<std::vector<token_history>> of;

  /// Starts every sequence from its distinct prompt's trace (`prompt(p, l)`).
  template <class PromptOf>
  histories(const nosa_engine::model_config& m, const nosa_engine::run_config& run, PromptOf prompt)
      : of(std::size_t(m.layers), std::vector<token_history>(std::size_t(run.batch))) {
    for (int l = 0; l < m.layers; ++l) {
      for (int b = 0; b < run.batch; ++b) {
        const nosa_engine::prompt_trace& p = prompt(b % run.distinct_prompts, l);
        token_history& h = of[std::size_t(l)][std::size_t(b)];
        h.k = p.k;
        h.v = p.v;
        h.c = p.c;
        h.tokens = run.prompt_tokens;
      }
    }
  }

  /// Appends each sequence's new token of the step traced in `step` (one trace per layer).
  void append(const nosa_engine::model_config& m, int batch,
              const std::vector<nosa_engine::layer_trace>& step) {
    const std::size_t kv = std::size_t(m.kv_width());
    for (int l = 0; l < m.layers; ++l) {
      const nosa_engine::layer_trace& t = step[std::size_t(l)];
      for (int b = 0; b < batch; ++b) {
        token_history& h = of[std::size_t(l)][std::size_t(b)];
        h.k.insert(h.k.end(), t.k.begin() + b * kv, t.k.begin() + (b + 1) * kv);
        h.v.insert(h.v.end(), t.v.begin() + b * kv, t.v.begin() + (b + 1) * kv);
        h.c.insert(h.c.end(), t.c.begin() + b * m.kv_heads, t.c.begin() + (b + 1) * m.kv_heads);
        ++h.tokens;
      }
    }
  }
};

/// The tokens of the blocks in `selected` (all of them when `selected` is empty is NOT assumed: pass the
/// list of every block for dense attention).
inline std::vector<int> tokens_of(const std::vector<std::int32_t>& selected, int block_size, int length) {
  std::vector<int> tokens;
  for (const std::int32_t m : selected) {
    for (int t = m * block_size; t < std::min((m + 1) * block_size, length); ++t) tokens.push_back(t);
  }
  return tokens;
}

/// softmax_j(q . k_j / sqrt(D) + bias * c_j) v_j over `tokens`, for query head `hq` of a GQA model.
inline std::vector<double> reference_attention(const nosa_engine::model_config& m, const token_history& h,
                                               const float* q, int hq, bool bias,
                                               const std::vector<int>& tokens) {
  const int D = m.head_dim, hk = hq / (m.q_heads / m.kv_heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> logits;
  double mx = -INFINITY;
  for (const int t : tokens) {
    double dot = 0.0;
    for (int d = 0; d < D; ++d) dot += double(q[d]) * h.k[(std::size_t(t) * m.kv_heads + hk) * D + d];
    logits.push_back(dot * scale + (bias ? double(h.c[std::size_t(t) * m.kv_heads + hk]) : 0.0));
    mx = std::max(mx, logits.back());
  }
  std::vector<double> o(std::size_t(D), 0.0);
  double sum = 0.0;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const double p = std::exp(logits[i] - mx);
    sum += p;
    for (int d = 0; d < D; ++d)
      o[std::size_t(d)] += p * h.v[(std::size_t(tokens[i]) * m.kv_heads + hk) * D + d];
  }
  for (double& x : o) x /= sum;
  return o;
}

/// Largest |a - b| over a head's output.
inline double max_abs_diff(const std::vector<double>& ref, const float* o) {
  double worst = 0.0;
  for (std::size_t d = 0; d < ref.size(); ++d) worst = std::max(worst, std::abs(ref[d] - double(o[d])));
  return worst;
}

/// Runs `steps` decode steps of a prefilled engine (host or CUDA) whose run has `trace` on, and checks every
/// layer, sequence and query head of every step against the reference: |o - ref| <= rel * |ref| + abs per
/// element. `selection(l, b, h)` reads a layer's current selection. Returns the largest difference between
/// the engine and dense attention over every token, so the caller can check that the selection mattered.
template <class Engine, class Selection>
double check_steps_against_reference(Engine& engine, int steps, Selection selection, double rel, double abs) {
  const nosa_engine::model_config& model = engine.model();
  const nosa_engine::run_config& run = engine.run();
  histories history(model, run,
                    [&](int p, int l) -> const nosa_engine::prompt_trace& { return engine.prompt(p, l); });
  const bool bias = nosa_engine::uses_bias(run.attention);
  const int bs = model.selection.block_size, group = model.q_heads / model.kv_heads;
  double dense_gap = 0.0;
  std::string error;
  for (int s = 0; s < steps; ++s) {
    REQUIRE_MESSAGE(engine.step(error), error);
    history.append(model, run.batch, engine.last_step());
    for (int l = 0; l < model.layers; ++l) {
      const nosa_engine::layer_trace& t = engine.last_step()[std::size_t(l)];
      for (int b = 0; b < run.batch; ++b) {
        const token_history& h = history.of[std::size_t(l)][std::size_t(b)];
        const int blocks = (h.tokens + bs - 1) / bs;
        std::vector<std::int32_t> every(static_cast<std::size_t>(blocks));
        for (int m = 0; m < blocks; ++m) every[std::size_t(m)] = m;
        const std::vector<int> all = tokens_of(every, bs, h.tokens);
        for (int hk = 0; hk < model.kv_heads; ++hk) {
          const std::vector<std::int32_t> selected = selection(l, b, hk);
          // Full attention selects nothing and attends every block.
          const bool dense_method = nosa_engine::attends_every_block(run.attention);
          REQUIRE(selected.size() ==
                  (dense_method ? 0 : std::size_t(std::min(blocks, model.selection.top_k))));
          const std::vector<int> tokens = dense_method ? all : tokens_of(selected, bs, h.tokens);
          for (int hq = hk * group; hq < (hk + 1) * group; ++hq) {
            const std::size_t row = (std::size_t(b) * model.q_heads + hq) * model.head_dim;
            const std::vector<double> ref = reference_attention(model, h, t.q.data() + row, hq, bias, tokens);
            double excess = 0.0;
            for (std::size_t d = 0; d < ref.size(); ++d) {
              excess = std::max(excess, std::abs(ref[d] - double(t.o[row + d])) - rel * std::abs(ref[d]));
            }
            INFO("step " << s << " layer " << l << " sequence " << b << " head " << hq);
            CHECK(excess <= abs);
            const std::vector<double> dense = reference_attention(model, h, t.q.data() + row, hq, bias, all);
            dense_gap = std::max(dense_gap, max_abs_diff(dense, t.o.data() + row));
          }
        }
      }
    }
  }
  return dense_gap;
}

/// Tolerances of the FP8 methods against the reference over the unrounded K and V: E4M3 keeps 3 mantissa
/// bits, so each value of a complete block is off by up to 1/16 of itself (the relative part, for V); the
/// rounding of K moves the softmax weights too, which the absolute part covers (the tiny preset's largest
/// excess over the relative part is 0.027, with NOSA's bias). The tail block is exact.
inline constexpr double fp8_rel = 0.0625, fp8_abs = 0.04;

/// The drift workload the cache-slot and FP8 tests of both engines decode: nosa-offload, two 320-token
/// sequences with distinct prompts, `steps` steps at drift `drift`, `cache_slots` slots beyond k.
inline nosa_engine::run_config drift_workload(float drift, int cache_slots, int steps) {
  nosa_engine::run_config run;
  run.attention = nosa_engine::method::nosa_offload;
  run.batch = 2;
  run.distinct_prompts = 2;
  run.prompt_tokens = 320;
  run.steps = steps;
  run.drift = drift;
  run.cache_slots = cache_slots;
  return run;
}

}  // namespace nosa_engine_test
