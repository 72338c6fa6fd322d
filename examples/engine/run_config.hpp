#pragma once
/// \file
/// What one engine run does (shared by both backends), what it reports, and the drifting-query workload.

#include "attention_stack.hpp"
#include "model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace nosa_engine {

/// The workload of a run.
struct run_config {
  method attention = method::nosa_offload;
  int batch = 1;            ///< sequences decoded together
  int prompt_tokens = 256;  ///< prompt length of every sequence (the context at the first decode step)
  int steps = 16;           ///< decode steps (generated tokens per sequence)
  /// Distinct prompts; sequence b gets prompt b % distinct_prompts. Dense prefill runs once per distinct
  /// prompt and its K, V and c are ingested into every sequence that shares it (each still stores its own
  /// copy in the KV cache), so a study of long contexts at large batch does not pay prefill per sequence.
  int distinct_prompts = 1;
  std::uint64_t weight_seed = 1;  ///< random weights (ignored when weights are loaded)
  std::uint64_t prompt_seed = 2;  ///< random prompt tokens and the drift's random walk
  /// 0: greedy decoding, each step's input is the embedding of the previous argmax token. > 0: the input
  /// embedding of each sequence follows a random walk `e <- sqrt(1 - drift^2) e + drift n` (n has the
  /// embedding's unit variance per element), which makes successive queries drift smoothly; the argmax tokens
  /// are still computed and reported.
  float drift = 0.0f;
  /// Offloading methods: the sequences of one prompt share its complete blocks' pages in the host pool
  /// (`nosa::shared_prefix`), so the pool holds each distinct prompt once.
  bool share_prompts = true;
  /// Offload store: slots per (sequence, KV head) beyond the `k + 1` a step needs, keeping recently dropped
  /// blocks resident (`nosa::capacity::cache_slots`).
  int cache_slots = 0;
  /// CUDA, offloading methods: each layer's gather runs on a second stream while attention reads the blocks
  /// already resident (`nosa::cuda_overlap`).
  bool overlap = true;
  /// Tokens reserved ahead by each plan call (`reserve`), so the plan call runs once per this many steps.
  int reserve_ahead = 64;
  /// The batch split into this many lanes (micro-batches of contiguous rows), each with its own attention
  /// layers. On the CUDA backend the lanes run the model side by side on their own streams, offset by half a
  /// layer, so that one lane's gathers cross PCIe while the other lane computes. 0: `default_lanes`.
  int lanes = 0;
  /// Directory of the prefill cache (empty: none). The K, V, c and last query a dense prefill computes for
  /// a prompt are stored there once and read back by later runs of the same model, prompt and method family,
  /// which then skip the prefill (its time is reported apart from decoding either way).
  std::string prefill_cache;
  bool trace = false;  ///< keep every layer's q, k, v, c and attention output of the last step (tests)
};

/// The lanes a run uses when `run_config::lanes` is 0: two for the offloading methods on the CUDA backend
/// once the batch is large enough for the transfers to matter (32), otherwise one. At small batches a
/// second lane would read the weights a second time per step for little transfer to hide.
inline int default_lanes(method m, int batch, bool cuda) { return cuda && offloads(m) && batch >= 32 ? 2 : 1; }

/// How a batch of `batch` rows splits into `lanes` lanes of contiguous rows whose sizes differ by one at
/// most. Row `b` of the batch is sequence `local(b)` of lane `lane_of(b)`'s layers.
struct lane_layout {
  int batch = 1;
  int lanes = 1;
  lane_layout(int batch_rows, int lane_count)
      : batch(batch_rows), lanes(std::max(1, std::min(lane_count, batch_rows))) {}
  int first(int lane) const { return static_cast<int>(static_cast<long long>(batch) * lane / lanes); }
  int rows(int lane) const { return first(lane + 1) - first(lane); }
  int lane_of(int b) const {
    int lane = static_cast<int>(static_cast<long long>(b) * lanes / batch);
    while (lane > 0 && first(lane) > b) --lane;
    while (lane + 1 < lanes && first(lane + 1) <= b) ++lane;
    return lane;
  }
  int local(int b) const { return b - first(lane_of(b)); }
  /// The lane-local sequence whose prompt pages row `b` shares when the sequences of one prompt share
  /// pages within a lane: the lane's first row with `b`'s prompt (`b % distinct_prompts`), or -1 when `b`
  /// is that row.
  int share_source(int b, int distinct_prompts) const {
    const int lane = lane_of(b), f = first(lane);
    const int source = f + ((b - f) % distinct_prompts);
    return source == b ? -1 : source - f;
  }
  /// The workload of lane `lane`'s layers: its rows, with as many distinct prompts as it holds.
  run_config lane_run(const run_config& run, int lane) const {
    run_config r = run;
    r.batch = rows(lane);
    r.distinct_prompts = std::min(run.distinct_prompts, r.batch);
    return r;
  }
};

/// The layer configuration of a workload on `m`.
inline nosa::layer_config layer_config_for(const model_config& m, const run_config& run) {
  return make_layer_config(
      m.selection, m.q_heads, m.kv_heads, run.batch, run.prompt_tokens + run.steps, run.distinct_prompts,
      shared_prompt_blocks(run.attention, run.share_prompts, run.prompt_tokens, m.selection.block_size),
      offloads(run.attention) ? run.cache_slots : 0);
}

/// Checks a workload on its own; on failure returns false and sets `error` to one line.
inline bool validate_workload(const run_config& run, std::string& error) {
  if (run.batch < 1 || run.prompt_tokens < 1 || run.steps < 0 || run.distinct_prompts < 1 ||
      run.distinct_prompts > run.batch || run.reserve_ahead < 1 || run.cache_slots < 0 || run.lanes < 0) {
    error = "the workload needs batch >= 1, context >= 1, steps >= 0, 1 <= distinct prompts <= batch";
    return false;
  }
  if (!(run.drift >= 0.0f && run.drift <= 1.0f)) {
    error = "drift must be in [0, 1]";
    return false;
  }
  return true;
}

/// The element `i` of the drift noise for (step, row): unit variance, like the random embedding rows.
NOSA_ENGINE_HOST_DEVICE inline float drift_noise(std::uint64_t seed, int step, int row, int batch, int i) {
  return 1.7320508f * random_uniform(seed ^ 0xD81F7ull, static_cast<std::uint64_t>(step) * batch + row, i);
}

/// Prompt token `t` of distinct prompt `p`.
inline std::int32_t prompt_token(std::uint64_t seed, int p, int t, int vocab) {
  const float u = 0.5f * (random_uniform(seed, 0x5EED0000ull + p, t) + 1.0f);  // [0, 1)
  const int tok = static_cast<int>(u * static_cast<float>(vocab));
  return tok < vocab ? tok : vocab - 1;
}

/// The tensors of one layer in the last decode step (with `run_config::trace`), as fp32 values.
struct layer_trace {
  std::vector<float> q;  ///< [B][H_q][D] post-RoPE queries, as passed to the layer (bf16 values)
  std::vector<float> k;  ///< [B][H_kv][D] post-RoPE keys of the new token
  std::vector<float> v;  ///< [B][H_kv][D] values of the new token
  std::vector<float> c;  ///< [B][H_kv] eviction scores of the new token
  std::vector<float> o;  ///< [B][H_q][D] the layer's attention output
};

/// A distinct prompt's ingested K, V and c of one layer (with `run_config::trace`), as fp32 values.
struct prompt_trace {
  std::vector<float> k;  ///< [P][H_kv][D]
  std::vector<float> v;  ///< [P][H_kv][D]
  std::vector<float> c;  ///< [P][H_kv]
};

/// Measurements of a run (the decode phase unless said otherwise).
struct run_report {
  std::string preset, method, backend;
  int batch = 0, context = 0, steps = 0, layers = 0, distinct_prompts = 0;
  bool batch_auto = false;  ///< the batch was chosen by --batch auto
  int shared_blocks = 0;    ///< prompt blocks each sequence shares with its prompt's first sequence
  int cache_slots = 0;      ///< slots beyond k + 1 per (sequence, KV head)
  bool overlap = false;     ///< the gathers ran beside attention (CUDA, offloading methods)
  int lanes = 1;            ///< lanes the batch was split into
  float drift = 0.0f;
  double prefill_s = 0.0;        ///< dense prefill and ingest of every sequence
  bool prefill_cached = false;   ///< the prefill was read from the prefill cache
  double decode_s = 0.0;         ///< the timed decode steps
  double tokens_per_s = 0.0;     ///< batch * steps / decode_s
  double ms_per_step = 0.0;      ///< one token of every sequence, all layers
  double ms_per_layer = 0.0;     ///< ms_per_step / layers
  double misses_per_step = 0.0;  ///< blocks loaded per step, summed over layers, sequences and KV heads
  double misses_per_head = 0.0;  ///< per (layer, sequence, KV head) and step
  double locality = -1.0;     ///< selected blocks already resident / selected blocks; -1 when not offloaded
  double h2d_gb_per_s = 0.0;  ///< bytes gathered host -> device during decode / decode_s
  double d2h_gb_per_s = 0.0;  ///< bytes written back during decode / decode_s
  double device_bytes = 0.0;  ///< weights + arenas + activations (HBM on the CUDA backend)
  double host_bytes = 0.0;    ///< host arenas (pinned on the CUDA backend)
  double hbm_budget_bytes = 0.0;          ///< 0 on the host backend
  /// The PCIe ceiling measured by the same run: a 64 MiB host-to-device copy from pinned memory, best of
  /// five (CUDA; 0 when not measured).
  double link_h2d_gb_per_s = 0.0;
  /// The link as the gather uses it: random K and V blocks read by a kernel from pinned host memory
  /// (CUDA; 0 when not measured).
  double gather_gb_per_s = 0.0;
  double hbm_gb_per_s = 0.0;  ///< HBM read speed of a streaming kernel (CUDA; 0 when not measured)
  /// The roofline of the timed steps, ms per step (CUDA; 0 when not measured): summed over layers,
  /// max(gather bytes / gather speed, HBM bytes / HBM speed + GEMM time), plus the LM head; and its parts.
  double roofline_ms = 0.0, roofline_gather_ms = 0.0, roofline_hbm_ms = 0.0, roofline_gemm_ms = 0.0;
  /// --batch auto or --cache-slots auto: what the calibration predicted for the chosen configuration.
  bool cache_slots_auto = false;
  double calibration_s = 0.0;  ///< the calibration run (its prefill included)
  double predicted_tokens_per_s = 0.0, predicted_ms_per_step = 0.0, predicted_misses_per_step = 0.0;
  /// The best batch of each slot-cache size tried, with its predicted tokens/s.
  struct sizing_row {
    int cache_slots = 0, batch = 0;
    double tokens_per_s = 0.0;
  };
  std::vector<sizing_row> sizing;
  /// With --profile: ms of one step by component, summed over layers and lanes, each stage run on its own.
  std::vector<std::pair<std::string, double>> profile_ms;
  std::vector<std::int32_t> last_tokens;  ///< argmax tokens of the last step, per sequence
};

/// The difference of two counter readings (decode steps only, plan calls excluded by taking both readings
/// around the decode loop).
inline nosa::counters operator-(const nosa::counters& a, const nosa::counters& b) {
  return {a.steps - b.steps, a.hits - b.hits, a.misses - b.misses, a.bytes_h2d - b.bytes_h2d,
          a.bytes_d2h - b.bytes_d2h};
}
inline nosa::counters& operator+=(nosa::counters& a, const nosa::counters& b) {
  a.steps += b.steps;
  a.hits += b.hits;
  a.misses += b.misses;
  a.bytes_h2d += b.bytes_h2d;
  a.bytes_d2h += b.bytes_d2h;
  return a;
}

/// Fills the timing and traffic fields of `r` from the decode phase: `decode` is the sum over layers of the
/// counters accumulated by the timed steps, `seconds` their wall time.
inline void finish_report(run_report& r, const nosa::counters& decode, double seconds, int kv_heads) {
  r.decode_s = seconds;
  const double steps = r.steps > 0 ? r.steps : 1;
  r.tokens_per_s = seconds > 0 ? static_cast<double>(r.batch) * r.steps / seconds : 0.0;
  r.ms_per_step = 1e3 * seconds / steps;
  r.ms_per_layer = r.layers > 0 ? r.ms_per_step / r.layers : 0.0;
  r.misses_per_step = static_cast<double>(decode.misses) / steps;
  r.misses_per_head = r.misses_per_step / (static_cast<double>(r.layers) * r.batch * kv_heads);
  const double selected = static_cast<double>(decode.hits + decode.misses);
  r.locality =
      offloads(*find_method(r.method)) && selected > 0 ? static_cast<double>(decode.hits) / selected : -1.0;
  r.h2d_gb_per_s = seconds > 0 ? static_cast<double>(decode.bytes_h2d) / seconds / 1e9 : 0.0;
  r.d2h_gb_per_s = seconds > 0 ? static_cast<double>(decode.bytes_d2h) / seconds / 1e9 : 0.0;
}

}  // namespace nosa_engine
