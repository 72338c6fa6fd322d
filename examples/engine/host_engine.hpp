#pragma once
/// \file
/// The engine on the host backend: the whole model in plain C++ (fp32 arithmetic over bf16 weights), nosa's
/// host executor for attention. Slow but small and readable: it is what the tests check against the
/// reference, and what CI runs with the `tiny` preset.

#include "attention_stack.hpp"
#include "model.hpp"
#include "prefill_cache.hpp"
#include "run_config.hpp"

#include <nosa/core/backend.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace nosa_engine {

using host_stack = attention_stack<float, nosa::host_backend::stream_type>;

/// The attention of `layers` layers for method `m` at head dim `head_dim` (64 or 128 on the host); the
/// error names what is not supported.
nosa::status make_host_stack(method m, int head_dim, const nosa::layer_config& config, int layers,
                             std::unique_ptr<host_stack>& out);

/// A model, its weights and the state of one batch of sequences on the host backend.
class host_engine {
 public:
  /// Checks the workload against the model and creates the attention layers. On failure returns nothing
  /// and sets `error` to one line.
  static std::unique_ptr<host_engine> create(const model_config& model, host_weights weights,
                                             const run_config& run, std::string& error);

  /// Dense causal prefill of every distinct prompt, then ingest into every sequence that uses it; leaves the
  /// first decode input (the argmax token after the prompt).
  bool prefill(std::string& error);
  /// One decode step of every sequence: all layers, LM head, argmax.
  bool step(std::string& error);

  const model_config& model() const { return model_; }
  const run_config& run() const { return run_; }
  /// Argmax token of each sequence from the last step (or the prefill).
  const std::vector<std::int32_t>& tokens() const { return tokens_; }
  /// Steps taken since the prefill.
  int steps_done() const { return steps_done_; }
  /// The per-layer tensors of the last step (empty unless `run.trace`).
  const std::vector<layer_trace>& last_step() const { return step_trace_; }
  /// The ingested K, V, c of distinct prompt `p` in layer `l` (empty unless `run.trace`).
  const prompt_trace& prompt(int p, int l) const {
    return prompt_trace_[static_cast<std::size_t>(p * model_.layers + l)];
  }
  /// The lanes the batch is split into (one stack of layers each; the host runs them one after the other).
  const lane_layout& lanes() const { return lanes_; }
  /// The current selection of row `b`'s KV head `h` in layer `l`, in rank order.
  std::vector<std::int32_t> selection(int l, int b, int h) const;
  /// Counters of all layers summed.
  nosa::counters total_counters() const;
  /// True when the last `prefill` read the prompts from the prefill cache.
  bool prefill_cached() const { return prefill_cached_; }
  /// Bytes of weights and arenas.
  double device_bytes() const;
  double host_bytes() const;

 private:
  host_engine() = default;

  model_config model_;
  run_config run_;
  host_weights w_;
  lane_layout lanes_{1, 1};
  std::vector<std::unique_ptr<host_stack>> stacks_;  // one per lane
  std::vector<std::int32_t> tokens_;     // [B] last argmax
  std::vector<std::int32_t> positions_;  // [B] position of the next token
  std::vector<float> drift_state_;       // [B][hidden] input embedding of the drift workload
  std::vector<layer_trace> step_trace_;
  std::vector<prompt_trace> prompt_trace_;
  int steps_done_ = 0;
  bool prefill_cached_ = false;

  const nosa::bf16* w(int layer, layer_tensor t) const { return w_.bf16_tensor(spec_index(layer, t)); }
  const float* wf(int layer, layer_tensor t) const { return w_.f32_tensor(spec_index(layer, t)); }
  /// RMSNorm, Q/K/V projections and RoPE (row r at `position(r)`) of `rows` hidden states; bf16 results.
  template <class Position>
  void project_qkv(int l, const std::vector<float>& x, int rows, Position position,
                   std::vector<nosa::bf16>& qb, std::vector<nosa::bf16>& kb,
                   std::vector<nosa::bf16>& vb) const;
  /// The eviction head of layer `l` over the values of `rows` tokens.
  bool eviction_scores(int l, const std::vector<nosa::bf16>& vb, int rows, std::vector<float>& c,
                       std::string& error) const;
  /// Output projection and residual, then the MLP block and its residual.
  void finish_layer(int l, const std::vector<float>& o, int rows, std::vector<float>& x) const;
  /// Final norm, LM head and argmax of `rows` hidden states.
  std::vector<std::int32_t> next_tokens(const std::vector<float>& x, int rows) const;
  /// Dense causal prefill of distinct prompt `p`, layer by layer: `layer(l, data)` receives each layer's
  /// K, V, c and last query. Returns the first decode token.
  template <class Layer>
  bool compute_prompt(int p, Layer layer, std::int32_t& first_token, std::string& error) const;
  /// Hands a layer of prompt `p` to every sequence that uses it (ingest), and keeps its trace.
  bool ingest(int p, int l, const prefill_layer& data, std::string& error);
};

// ---- Building blocks of the forward pass (fp32 activations, bf16 weights), used by both engines' tests ----

/// y[r][o] = sum_i w[o][i] * x[r][i] (+ y when `accumulate`), for `rows` rows.
void host_linear(const nosa::bf16* w, int out, int in, const float* x, int rows, float* y,
                 bool accumulate = false);
/// y[r] = x[r] / rms(x[r]) * g, rms with eps.
void host_rmsnorm(const float* x, const nosa::bf16* g, int width, int rows, float eps, float* y);
/// Rotates pairs (i, i + D/2) of each head of `x` [heads][D] by position `pos` (Llama's rotate-half RoPE).
void host_rope(float* x, int heads, int head_dim, int pos, float theta);

}  // namespace nosa_engine
