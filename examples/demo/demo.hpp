#pragma once
/// \file
/// nosa-demo: a synthetic long-context decode that runs NOSA and InfLLMv2 side by side on identical inputs
/// and shows what the query-agnostic selection buys: fewer blocks gathered host -> device per step, a
/// higher slot-cache hit rate and a more stable selection (locality gamma), and the throughput of the
/// backend it runs on (host, or CUDA when the build has it and a GPU is present).
///
/// The workload is a ragged batch with continuous batching: sequences whose prompts differ in length (and
/// are not multiples of the block size) decode in lockstep; one of them finishes early and leaves, and a
/// new request takes its slot while the others keep decoding. Every input is a pure function of the seed,
/// so two runs of one build with the same flags and backend select, move and output exactly the same data
/// (the two backends sum in different orders, so their outputs differ in the last bits).
///
/// This header is the whole demo but `main` (main.cpp). It is plain C++ and runs on the host backend; the
/// CUDA sources under cuda/ add `layer_runner<Pipeline, nosa::cuda_backend>` and instantiate `run_demo`
/// for it, so only they include CUDA headers.

#include <nosa/nosa.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#define NOSA_DEMO_HAS_ISATTY 1
#endif

namespace demo {

// =====================================================================================================
// Command line
// =====================================================================================================

/// Execution backends the demo can drive: each has a `layer_runner` specialisation.
enum class backend_kind : unsigned char { host, cuda };

/// The demo's selection defaults: the paper's method scaled down so that a full run takes seconds on one
/// core (forced blocks 1 + 4 + 1 = 6, so 3 free query-aware picks and 7 query-agnostic ones).
constexpr nosa::selection_params demo_selection() noexcept {
  nosa::selection_params p;
  p.block_size = 64;
  p.window = 32;
  p.stride = 16;
  p.top_k = 16;
  p.top_k_query_aware = 9;
  p.n_init = 1;
  p.n_local = 4;
  p.max_new_blocks = nosa::no_budget;
  return p;
}

/// Everything the command line chooses.
struct options {
  /// `--backend`; empty is `auto`: cuda when the build has it and a usable GPU is present, host otherwise.
  std::optional<backend_kind> requested_backend;
  backend_kind backend = backend_kind::host;  ///< the backend that runs, chosen by main
  std::string backend_detail;  ///< printed after the backend's name: the GPU, or why auto chose host
  int steps = 1024;            ///< decode steps of the batch; every live sequence advances one token per step
  int batch = 4;               ///< sequence slots decoding together
  int finish_early =
      -1;             ///< step at which request 0 leaves and a new request joins; -1 = steps / 3, 0 = never
  int q_heads = 8;    ///< H_q
  int kv_heads = 2;   ///< H_kv
  int head_dim = 64;  ///< D, one of the compiled head dimensions
  nosa::dtype element = nosa::dtype::bf16;
  nosa::selection_params selection = demo_selection();
  std::uint64_t seed = 1;
  int report_every = 64;  ///< steps between progress updates; 0 = no progress line
  bool show_help = false;
};

inline constexpr std::string_view usage_text =
    R"(usage: nosa-demo [options]

Runs a synthetic long-context decode of one attention layer with NOSA and with InfLLMv2 on the same
inputs, and compares host->device traffic, misses per step, hit rate, selection locality and throughput.

options (defaults in brackets):
  --backend NAME      execution backend: host, cuda, or auto = cuda when this build has it and
                      a GPU is present, host otherwise [auto]
  --steps N           decode steps of the batch [1024]
  --batch N           sequences decoding together [4]
  --finish-early N    step at which request 0 leaves and a new request takes its slot;
                      0 = never [steps / 3]
  --q-heads N         query heads H_q [8]
  --kv-heads N        KV heads H_kv; must divide H_q [2]
  --dim N             head dimension D: 64, 128 or 256 [64]
  --dtype NAME        storage type of q, K, V: fp32 or bf16 [bf16]
  --block N           block size in tokens [64]
  --window N          compression window length [32]
  --stride N          compression window stride [16]
  --topk N            selected blocks per (sequence, KV head) [16]
  --topk-qa N         query-aware top-k, forced blocks included [9]
  --init N            sink blocks [1]
  --local N           local blocks before the current one [4]
  --budget N          hard cap on blocks loaded per step per (sequence, KV head); -1 = none [-1]
  --seed N            seed of every synthetic input [1]
  --report N          steps between progress updates; 0 = none [64]
  --help              print this text and exit
)";

/// Parses a whole string as an integer of type `T` no smaller than `min`.
template <class T>
bool parse_integer(std::string_view text, T min, T& out) {
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value < min) return false;
  out = value;
  return true;
}

/// Parses `argv` into `opt`. Prints one line to stderr and returns false on the first bad argument.
inline bool parse_options(int argc, char** argv, options& opt) {
  bool finish_early_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      opt.show_help = true;
      return true;
    }
    // Both "--name value" and "--name=value".
    std::string_view value;
    bool has_value = false;
    if (const auto eq = arg.find('='); eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    } else if (i + 1 < argc) {
      value = argv[i + 1];
    }
    const auto take_value = [&]() -> bool {
      if (has_value) return true;
      if (i + 1 >= argc) return false;
      ++i;
      return true;
    };
    const auto bad = [&](std::string_view expected) {
      std::fprintf(stderr, "nosa-demo: %.*s expects %.*s (try --help)\n", static_cast<int>(arg.size()),
                   arg.data(), static_cast<int>(expected.size()), expected.data());
      return false;
    };
    const auto integer = [&](int min, int& out, std::string_view expected) {
      return take_value() && parse_integer(value, min, out) ? true : bad(expected);
    };

    bool good = true;
    if (arg == "--backend") {
      if (!take_value()) return bad("host, cuda or auto");
      if (value == "host") {
        opt.requested_backend = backend_kind::host;
      } else if (value == "cuda") {
        opt.requested_backend = backend_kind::cuda;
      } else if (value == "auto") {
        opt.requested_backend.reset();
      } else {
        return bad("host, cuda or auto");
      }
    } else if (arg == "--steps") {
      good = integer(1, opt.steps, "an integer >= 1");
    } else if (arg == "--batch") {
      good = integer(1, opt.batch, "an integer >= 1");
    } else if (arg == "--finish-early") {
      good = integer(0, opt.finish_early, "an integer >= 0");
      finish_early_given = true;
    } else if (arg == "--q-heads") {
      good = integer(1, opt.q_heads, "an integer >= 1");
    } else if (arg == "--kv-heads") {
      good = integer(1, opt.kv_heads, "an integer >= 1");
    } else if (arg == "--dim") {
      good = integer(1, opt.head_dim, "an integer >= 1");
    } else if (arg == "--dtype") {
      if (!take_value()) return bad("fp32 or bf16");
      if (value == "fp32") {
        opt.element = nosa::dtype::fp32;
      } else if (value == "bf16") {
        opt.element = nosa::dtype::bf16;
      } else if (value == "fp16") {
        opt.element =
            nosa::dtype::fp16;  // a real dtype that this demo does not compile: reported at dispatch
      } else {
        return bad("fp32 or bf16");
      }
    } else if (arg == "--block") {
      good = integer(1, opt.selection.block_size, "an integer >= 1");
    } else if (arg == "--window") {
      good = integer(1, opt.selection.window, "an integer >= 1");
    } else if (arg == "--stride") {
      good = integer(1, opt.selection.stride, "an integer >= 1");
    } else if (arg == "--topk") {
      good = integer(1, opt.selection.top_k, "an integer >= 1");
    } else if (arg == "--topk-qa") {
      good = integer(0, opt.selection.top_k_query_aware, "an integer >= 0");
    } else if (arg == "--init") {
      good = integer(0, opt.selection.n_init, "an integer >= 0");
    } else if (arg == "--local") {
      good = integer(0, opt.selection.n_local, "an integer >= 0");
    } else if (arg == "--budget") {
      good = integer(nosa::no_budget, opt.selection.max_new_blocks, "an integer >= -1");
    } else if (arg == "--seed") {
      if (!take_value() || !parse_integer<std::uint64_t>(value, 0, opt.seed))
        return bad("an unsigned integer");
    } else if (arg == "--report") {
      good = integer(0, opt.report_every, "an integer >= 0");
    } else {
      std::fprintf(stderr, "nosa-demo: unknown option '%s' (try --help)\n", argv[i]);
      return false;
    }
    if (!good) return false;
  }
  if (!finish_early_given) opt.finish_early = opt.steps / 3;
  return true;
}

// =====================================================================================================
// Deterministic random numbers
// =====================================================================================================

/// splitmix64 finaliser: spreads any 64-bit value over all bits. Used to derive independent streams.
constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// The seed of the stream named by `ids` under the run seed: every quantity keyed this way is a pure
/// function of (seed, ids), whatever else the run draws and in whatever order.
constexpr std::uint64_t derive_seed(std::uint64_t seed, std::initializer_list<std::uint64_t> ids) noexcept {
  std::uint64_t h = splitmix64(seed);
  for (const std::uint64_t id : ids) h = splitmix64(h ^ splitmix64(id));
  return h;
}

/// xoshiro256** with Box-Muller normals, written out because the standard distributions are
/// implementation-defined and the demo promises the same numbers from every standard library.
class random_stream {
 public:
  explicit random_stream(std::uint64_t seed) noexcept {
    for (std::uint64_t& s : state_) s = seed = splitmix64(seed);
  }

  std::uint64_t next() noexcept {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  /// Uniform in (0, 1]: never 0, so `log` and negative powers stay finite.
  double uniform() noexcept { return static_cast<double>((next() >> 11) + 1) * 0x1.0p-53; }

  /// Standard normal.
  float normal() noexcept {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double r = std::sqrt(-2.0 * std::log(uniform()));
    const double angle = 6.283185307179586 * uniform();
    spare_ = static_cast<float>(r * std::sin(angle));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(angle));
  }

  /// Pareto-shaped tail starting at 0: `u^(-1/alpha) - 1`, capped at `cap`. Most draws are near 0, a few
  /// are large.
  float heavy_tail(double alpha, double cap) noexcept {
    return static_cast<float>(std::min(std::pow(uniform(), -1.0 / alpha) - 1.0, cap));
  }

 private:
  static constexpr std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }

  std::uint64_t state_[4];
  float spare_ = 0.0f;
  bool has_spare_ = false;
};

/// Scales `v` (length `n`) to unit norm.
inline void normalize(float* v, int n) noexcept {
  double norm2 = 0.0;
  for (int i = 0; i < n; ++i) norm2 += double(v[i]) * v[i];
  const float inv = norm2 > 0.0 ? static_cast<float>(1.0 / std::sqrt(norm2)) : 0.0f;
  for (int i = 0; i < n; ++i) v[i] *= inv;
}

// =====================================================================================================
// Synthetic workload
// =====================================================================================================

/// Sizes the synthetic data depends on.
struct workload_shape {
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
};

/// One request: a prompt to ingest, then tokens to decode.
struct request {
  int id = 0;
  int prompt_tokens = 0;
  int decode_tokens = 0;
};

/// Prompt length of request `i`: ragged and never a multiple of the block size, so every sequence starts
/// with a partial tail block and crosses block boundaries at its own steps.
inline int prompt_tokens_of(int i, int block_size) {
  static constexpr std::array<int, 5> lengths = {1000, 1531, 2100, 2777, 1843};
  int n =
      i < static_cast<int>(lengths.size()) ? lengths[static_cast<std::size_t>(i)] : 1000 + (i * 617) % 2048;
  if (n % block_size == 0) ++n;
  return n;
}

/// The requests of a run: `batch` start together; with continuous batching, request 0 decodes only
/// `finish_early` tokens and one more request joins for the remaining steps, so the batch stays full.
inline std::vector<request> make_requests(const options& opt) {
  const bool swap = opt.finish_early > 0 && opt.finish_early < opt.steps;
  std::vector<request> out;
  for (int i = 0; i < opt.batch; ++i) {
    out.push_back(
        {i, prompt_tokens_of(i, opt.selection.block_size), (i == 0 && swap) ? opt.finish_early : opt.steps});
  }
  if (swap) {
    out.push_back(
        {opt.batch, prompt_tokens_of(opt.batch, opt.selection.block_size), opt.steps - opt.finish_early});
  }
  return out;
}

/// Generates the keys, values, eviction scores and queries of one request, with the structure that makes
/// block selection meaningful:
///  - each KV head has a few themes; every block draws one and a topic direction near it, so the keys of a
///    block cluster and the compressed keys of its windows tell what the block is about;
///  - values carry a per-block mean;
///  - the eviction score c of a token is fixed when the token is written (query-agnostic): a heavy-tailed
///    per-block importance plus a smaller heavy-tailed per-token part, so a few blocks matter a lot;
///  - every query head drifts smoothly, q_t = normalize(0.95 q_{t-1} + 0.3 n_t) with n_t ~ N(0, I/D), so
///    the blocks it favours change over tens of steps, as a model's attention does while it writes.
/// Keys are `sqrt(D) * topic + N(0, I)` and queries have norm `sqrt(D)`: q.k / sqrt(D) then spreads over a
/// few units between blocks, as real attention logits do.
class synthetic_sequence {
 public:
  static constexpr int themes = 8;

  synthetic_sequence(const workload_shape& shape, std::uint64_t seed, int request_id)
      : shape_(shape), seed_(seed), request_(static_cast<std::uint64_t>(request_id)),
        tokens_(derive_seed(seed, {request_, tag_tokens})), drift_(derive_seed(seed, {request_, tag_drift})),
        themes_(std::size_t(shape.kv_heads) * themes * shape.head_dim),
        topic_(std::size_t(shape.kv_heads) * shape.head_dim), value_mean_(topic_.size()),
        importance_(std::size_t(shape.kv_heads)), query_(std::size_t(shape.q_heads) * shape.head_dim) {
    const int d = shape.head_dim;
    random_stream init(derive_seed(seed, {request_, tag_init}));
    for (std::size_t i = 0; i < themes_.size(); i += std::size_t(d)) {
      for (int j = 0; j < d; ++j) themes_[i + std::size_t(j)] = init.normal();
      normalize(&themes_[i], d);
    }
    for (std::size_t i = 0; i < query_.size(); i += std::size_t(d)) {
      for (int j = 0; j < d; ++j) query_[i + std::size_t(j)] = drift_.normal();
      normalize(&query_[i], d);
    }
  }

  /// Position of the next token.
  int position() const noexcept { return position_; }

  /// Writes K and V ([H_kv][D], fp32) and c ([H_kv]) of the token at `position()`, then advances.
  void next_token(float* k, float* v, float* c) {
    const int block = position_ / shape_.block_size;
    if (block != block_) enter_block(block);
    const int d = shape_.head_dim;
    const float key_scale = std::sqrt(static_cast<float>(d));
    for (int h = 0; h < shape_.kv_heads; ++h) {
      const std::size_t row = std::size_t(h) * d;
      for (int j = 0; j < d; ++j) k[row + j] = key_scale * topic_[row + j] + tokens_.normal();
      for (int j = 0; j < d; ++j) v[row + j] = value_mean_[row + j] + tokens_.normal();
      c[h] = importance_[std::size_t(h)] + 0.25f * tokens_.heavy_tail(2.0, 16.0);
    }
    ++position_;
  }

  /// Writes the current queries ([H_q][D], fp32), each of norm sqrt(D).
  void queries(float* q) const noexcept {
    const float scale = std::sqrt(static_cast<float>(shape_.head_dim));
    for (std::size_t i = 0; i < query_.size(); ++i) q[i] = scale * query_[i];
  }

  /// Moves every query head one step along its drift.
  void drift_queries() {
    const int d = shape_.head_dim;
    const float noise_scale = 0.3f / std::sqrt(static_cast<float>(d));
    for (std::size_t i = 0; i < query_.size(); i += std::size_t(d)) {
      for (int j = 0; j < d; ++j) query_[i + j] = 0.95f * query_[i + j] + noise_scale * drift_.normal();
      normalize(&query_[i], d);
    }
  }

 private:
  // Stream tags: one independent stream per purpose.
  static constexpr std::uint64_t tag_tokens = 1, tag_drift = 2, tag_init = 3, tag_block = 4;

  /// Draws the per-block structure of `block` for every KV head, keyed by (request, head, block) only.
  void enter_block(int block) {
    const int d = shape_.head_dim;
    for (int h = 0; h < shape_.kv_heads; ++h) {
      random_stream r(derive_seed(seed_, {request_, tag_block, std::uint64_t(h), std::uint64_t(block)}));
      const float* theme = &themes_[(std::size_t(h) * themes + r.next() % themes) * d];
      float* topic = &topic_[std::size_t(h) * d];
      const float spread = 0.6f / std::sqrt(static_cast<float>(d));
      for (int j = 0; j < d; ++j) topic[j] = theme[j] + spread * r.normal();
      normalize(topic, d);
      for (int j = 0; j < d; ++j) value_mean_[std::size_t(h) * d + j] = 0.5f * r.normal();
      importance_[std::size_t(h)] = 0.5f * r.heavy_tail(1.5, 12.0);
    }
    block_ = block;
  }

  workload_shape shape_;
  std::uint64_t seed_;
  std::uint64_t request_;
  int position_ = 0;
  int block_ = -1;
  random_stream tokens_;           // per-token noise, drawn in position order
  random_stream drift_;            // initial queries, then their drift
  std::vector<float> themes_;      // [H_kv][themes][D] unit vectors
  std::vector<float> topic_;       // [H_kv][D] unit direction of the current block's keys
  std::vector<float> value_mean_;  // [H_kv][D] mean of the current block's values
  std::vector<float> importance_;  // [H_kv] the current block's share of c
  std::vector<float> query_;       // [H_q][D] unit query directions
};

/// Rounds `n` fp32 values into storage elements.
template <nosa::storage_element Element>
void store_row(const float* src, Element* dst, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) dst[i] = nosa::from_float<Element>(src[i]);
}

// =====================================================================================================
// Measurements
// =====================================================================================================

/// What the demo measures for one variant over the decode steps (prompt ingestion excluded).
struct variant_metrics {
  double step_seconds = 0.0;      ///< time spent inside `step`
  std::uint64_t steps = 0;        ///< batch steps
  std::uint64_t token_steps = 0;  ///< tokens decoded: sum of the batch sizes
  std::uint64_t head_steps = 0;   ///< (sequence, KV head) pairs stepped
  std::uint64_t hits = 0;         ///< summed from `last_step_counters()`
  std::uint64_t misses = 0;
  std::uint64_t bytes_h2d = 0;
  std::uint64_t bytes_d2h = 0;
  int max_misses = 0;      ///< largest `step_misses` of one (sequence, KV head) in one step
  double gamma_sum = 0.0;  ///< sum of gamma over (step, sequence, KV head)
  std::uint64_t gamma_samples = 0;

  double tokens_per_second() const noexcept {
    return step_seconds > 0.0 ? double(token_steps) / step_seconds : 0.0;
  }
  double hit_rate() const noexcept { return hits + misses > 0 ? double(hits) / double(hits + misses) : 1.0; }
  double misses_per_head_step() const noexcept {
    return head_steps > 0 ? double(misses) / double(head_steps) : 0.0;
  }
  double gamma() const noexcept { return gamma_samples > 0 ? gamma_sum / double(gamma_samples) : 1.0; }

  /// The measurements accumulated since `earlier` (the maximum is kept as is).
  variant_metrics since(const variant_metrics& earlier) const noexcept {
    variant_metrics d = *this;
    d.step_seconds -= earlier.step_seconds;
    d.steps -= earlier.steps;
    d.token_steps -= earlier.token_steps;
    d.head_steps -= earlier.head_steps;
    d.hits -= earlier.hits;
    d.misses -= earlier.misses;
    d.bytes_h2d -= earlier.bytes_h2d;
    d.bytes_d2h -= earlier.bytes_d2h;
    d.gamma_sum -= earlier.gamma_sum;
    d.gamma_samples -= earlier.gamma_samples;
    return d;
  }
};

/// Locality of the selection, gamma(t) = |S(t) ∩ S(t-1)| / |S(t)| per (sequence, KV head) (spec §4),
/// computed from the selections the layer exposes. The selection a sequence is admitted with counts as
/// S(t-1) of its first decode step, since that is what its slot cache holds.
class locality_tracker {
 public:
  void resize(int slots, int kv_heads, int top_k, int max_blocks) {
    kv_heads_ = kv_heads;
    top_k_ = top_k;
    previous_.assign(std::size_t(slots) * kv_heads * top_k, -1);
    count_.assign(std::size_t(slots) * kv_heads, 0);
    mark_.assign(std::size_t(max_blocks), 0);
  }

  /// Remembers the selection of (slot, head) without scoring it.
  void remember(int slot, int head, std::span<const std::int32_t> selection) {
    const std::size_t i = index(slot, head);
    const std::size_t n = std::min(selection.size(), std::size_t(top_k_));
    std::copy_n(selection.begin(), n, previous_.begin() + std::ptrdiff_t(i * top_k_));
    count_[i] = static_cast<int>(n);
  }

  /// gamma of the new selection of (slot, head) against the remembered one, which it then replaces.
  /// Returns a negative value for an empty selection (gamma undefined).
  double update(int slot, int head, std::span<const std::int32_t> selection) {
    const std::size_t i = index(slot, head);
    const std::int32_t* prev = &previous_[i * top_k_];
    for (int j = 0; j < count_[i]; ++j) mark_[std::size_t(prev[j])] = 1;
    int common = 0;
    for (const std::int32_t b : selection) common += mark_[std::size_t(b)];
    for (int j = 0; j < count_[i]; ++j) mark_[std::size_t(prev[j])] = 0;
    remember(slot, head, selection);
    return selection.empty() ? -1.0 : double(common) / double(selection.size());
  }

 private:
  std::size_t index(int slot, int head) const noexcept { return std::size_t(slot) * kv_heads_ + head; }

  int kv_heads_ = 0;
  int top_k_ = 0;
  std::vector<std::int32_t> previous_;  // [slots][H_kv][top_k] last selection of each (slot, head)
  std::vector<int> count_;              // [slots][H_kv] entries of `previous_` in use
  std::vector<std::uint8_t> mark_;      // [max_blocks] membership marks, kept zero between calls
};

// =====================================================================================================
// Backends
// =====================================================================================================

/// The seam between the demo and an execution backend: one layer of one pipeline, created, planned,
/// stepped and inspected through the same calls on every backend, always with host views. The host
/// specialisation steps the caller's views in place; the CUDA one (cuda/runner.cuh) stages the batch into
/// device buffers on its stream, copies the output back and reads counters and selections back.
template <class Pipeline, class Backend>
class layer_runner;

template <class Pipeline>
class layer_runner<Pipeline, nosa::host_backend> {
 public:
  using element_type = typename Pipeline::element_type;
  using layer_type = nosa::decode_layer<Pipeline, nosa::host_backend>;

  [[nodiscard]] nosa::status create(const nosa::layer_config& config) {
    NOSA_TRY(layer_type::required_bytes(config, sizes_));
    return layer_.create(config);
  }
  /// Bytes of the device tier and of the host tier of the layer.
  nosa::arena_sizes arena_bytes() const noexcept { return sizes_; }

  [[nodiscard]] nosa::status add_sequence(int slot, const nosa::prompt_args<element_type>& prompt) {
    return layer_->add_sequence(slot, prompt);
  }
  [[nodiscard]] nosa::status remove_sequence(int slot) { return layer_->remove_sequence(slot); }
  [[nodiscard]] nosa::status reserve(int tokens_ahead) { return layer_->reserve(tokens_ahead); }
  [[nodiscard]] nosa::status step(const nosa::step_args<element_type, float>& args) {
    return layer_->step(args);
  }

  nosa::counters last_step_counters() const noexcept { return layer_->last_step_counters(); }
  nosa::counters total_counters() const noexcept { return layer_->total_counters(); }
  std::span<const std::int32_t> selection(int slot, int head) const noexcept {
    return layer_->selection(slot, head);
  }
  int step_misses(int slot, int head) const noexcept { return layer_->step_misses(slot, head); }
  int free_pages() const noexcept { return layer_->free_page_count(); }

 private:
  nosa::owning_layer<layer_type> layer_;
  nosa::arena_sizes sizes_{};
};

/// Name of a backend, for the report.
constexpr std::string_view to_string(backend_kind kind) noexcept {
  switch (kind) {
  case backend_kind::host:
    return "host";
  case backend_kind::cuda:
    return "cuda";
  }
  return "?";
}

// =====================================================================================================
// The run
// =====================================================================================================

/// The first library call of a run that did not succeed.
struct run_error {
  nosa::status status = nosa::status::success;
  std::string call;  ///< what was being done, e.g. "NOSA: reserve(1)"
  explicit operator bool() const noexcept { return !nosa::ok(status); }
};

/// Records `s` in `err` when it is a failure; returns true then.
inline bool fails(nosa::status s, std::string_view call, run_error& err) {
  if (nosa::ok(s)) return false;
  err.status = s;
  err.call = call;
  return true;
}

/// One variant under test: its layer, its measurements and its output buffer.
template <class Pipeline, class Backend>
struct variant {
  explicit variant(std::string_view variant_name) : name(variant_name) {}

  std::string_view name;
  layer_runner<Pipeline, Backend> runner;
  variant_metrics metrics;
  variant_metrics at_last_report;
  locality_tracker locality;
  std::vector<float> output;                          // [batch][H_q][D] attention output of the last step
  std::uint64_t output_hash = 0xcbf29ce484222325ull;  // FNV-1a over every output, a determinism check
};

/// A sequence that is decoding: where it lives, what it is and how far it has got.
struct live_sequence {
  int slot = 0;
  request req;
  int decoded = 0;
  synthetic_sequence data;
};

/// Progress output: updates one line in place on a terminal, writes one line per update otherwise.
class progress_line {
 public:
  progress_line() {
#ifdef NOSA_DEMO_HAS_ISATTY
    in_place_ = isatty(fileno(stdout)) != 0;
#endif
  }

  void update(const std::string& text) {
    if (in_place_) {
      std::printf("\r%-*s", static_cast<int>(width_), text.c_str());
      width_ = std::max(width_, text.size());
    } else {
      std::printf("%s\n", text.c_str());
    }
    std::fflush(stdout);
  }

  /// Prints a line of its own, clearing the progress line first.
  void event(const std::string& text) {
    if (in_place_ && width_ > 0) std::printf("\r%-*s\r", static_cast<int>(width_), "");
    std::printf("%s\n", text.c_str());
    std::fflush(stdout);
    width_ = 0;
  }

  /// Ends the progress line so that what follows starts on a fresh line.
  void finish() {
    if (in_place_ && width_ > 0) std::printf("\n");
    width_ = 0;
  }

 private:
  bool in_place_ = false;
  std::size_t width_ = 0;
};

/// printf into a string (report lines are short; longer text is cut at 511 characters).
template <class... Args>
std::string format(const char* fmt, Args... args) {
  char buffer[512];
  const int n = std::snprintf(buffer, sizeof buffer, fmt, args...);
  return std::string(buffer, static_cast<std::size_t>(std::clamp(n, 0, int(sizeof buffer) - 1)));
}

/// Bytes in MB (10^6 bytes).
inline double megabytes(std::uint64_t bytes) noexcept { return double(bytes) / 1e6; }

/// Compact tokens/s for the progress line.
inline std::string rate_text(double tokens_per_second) {
  return tokens_per_second >= 1e5 ? format("%4.0fk", tokens_per_second / 1e3)
                                  : format("%5.0f", tokens_per_second);
}

/// "1 sequence", "3 sequences".
inline std::string sequences_text(std::size_t n) { return format("%zu sequence%s", n, n == 1 ? "" : "s"); }

/// The layer configuration for a set of requests: capacities fit the longest request, and the pool holds
/// every request's blocks at once (request 0's pages come back when it leaves, so this is an upper bound).
inline nosa::layer_config make_config(const options& opt, const std::vector<request>& requests) {
  nosa::layer_config config;
  config.selection = opt.selection;
  config.num_q_heads = opt.q_heads;
  config.num_kv_heads = opt.kv_heads;
  config.limits.max_sequences = opt.batch;
  int max_blocks = 1;
  int pages = 0;
  for (const request& r : requests) {
    const int blocks = nosa::block_count(r.prompt_tokens + r.decode_tokens, opt.selection);
    max_blocks = std::max(max_blocks, blocks);
    pages += blocks;
  }
  config.limits.max_blocks_per_sequence = max_blocks;
  config.limits.pool_pages = std::max(pages, 1);
  return config;
}

/// Runs the whole demo for one storage element, head dimension and backend.
template <nosa::storage_element Element, int HeadDim, class Backend>
run_error run_demo(const options& opt) {
  run_error err;
  const auto wall_start = std::chrono::steady_clock::now();
  const int hq = opt.q_heads, hkv = opt.kv_heads;
  constexpr int d = HeadDim;
  const std::vector<request> requests = make_requests(opt);
  const nosa::layer_config config = make_config(opt, requests);

  variant<nosa::nosa_pipeline<Element, HeadDim>, Backend> nosa_variant("NOSA");
  variant<nosa::infllmv2_pipeline<Element, HeadDim>, Backend> infllm_variant("InfLLMv2");
  // Applies `f` to both variants in turn, stopping at the first failure.
  const auto both = [&](auto&& f) -> bool { return f(nosa_variant) || f(infllm_variant); };
  const auto call = [](const auto& v, std::string_view what) {
    return std::string(v.name) + ": " + std::string(what);
  };

  if (both([&](auto& v) { return fails(v.runner.create(config), call(v, "create"), err); })) return err;
  // The library has validated the configuration; sizes derived from it are safe to use from here on.
  both([&](auto& v) {
    v.locality.resize(opt.batch, hkv, opt.selection.top_k, config.limits.max_blocks_per_sequence);
    v.output.assign(std::size_t(opt.batch) * hq * d, 0.0f);
    return false;
  });

  // ---- Header --------------------------------------------------------------------------------------------
  const nosa::selection_params& sel = opt.selection;
  const int forced = sel.forced_blocks();
  std::printf("nosa-demo %s | backend %.*s%s | one attention layer, NOSA and InfLLMv2 on identical inputs\n",
              NOSA_VERSION_STRING, static_cast<int>(to_string(opt.backend).size()),
              to_string(opt.backend).data(), opt.backend_detail.c_str());
  std::printf(
      "shape     H_q %d, H_kv %d, D %d, %.*s | block %d, window %d stride %d | top-k %d (query-aware %d, "
      "sinks %d, local %d) | budget %s\n",
      hq, hkv, d, static_cast<int>(nosa::to_string(opt.element).size()), nosa::to_string(opt.element).data(),
      sel.block_size, sel.window, sel.stride, sel.top_k, sel.top_k_query_aware, sel.n_init, sel.n_local,
      sel.max_new_blocks == nosa::no_budget ? "none" : format("%d", sel.max_new_blocks).c_str());
  std::string prompts;
  for (int i = 0; i < opt.batch; ++i)
    prompts += format("%s%d", i ? " " : "", requests[std::size_t(i)].prompt_tokens);
  std::printf("workload  %d sequences, %d steps, seed %llu; prompts %s tokens\n", opt.batch, opt.steps,
              static_cast<unsigned long long>(opt.seed), prompts.c_str());
  if (requests.size() > std::size_t(opt.batch)) {
    const request& late = requests.back();
    std::printf("          continuous batching: request 0 leaves after %d steps, request %d (prompt %d) "
                "takes its slot\n",
                requests.front().decode_tokens, late.id, late.prompt_tokens);
  }
  both([&](auto& v) {
    const nosa::arena_sizes s = v.runner.arena_bytes();
    std::printf("memory    %-9.*s device tier %6.2f MB, host tier %6.2f MB\n",
                static_cast<int>(v.name.size()), v.name.data(), megabytes(s.device), megabytes(s.host));
    return false;
  });
  std::printf("bound     NOSA loads at most k_qa - forced = %d - %d = %d new blocks per (sequence, KV head) "
              "and step; "
              "InfLLMv2 up to k - forced = %d\n\n",
              sel.top_k_query_aware, forced, std::max(sel.top_k_query_aware - forced, 0), sel.top_k - forced);
  std::fflush(stdout);

  // ---- Buffers (allocated once; steps only fill them)
  // ------------------------------------------------------
  const workload_shape shape{hq, hkv, d, sel.block_size};
  std::vector<std::int32_t> batch_slots(std::size_t(opt.batch));
  std::vector<Element> q(std::size_t(opt.batch) * hq * d), k(std::size_t(opt.batch) * hkv * d), v(k.size());
  std::vector<float> c(std::size_t(opt.batch) * hkv);
  std::vector<float> q32(std::size_t(hq) * d), k32(std::size_t(hkv) * d), v32(k32.size());
  std::vector<live_sequence> live;  // in admission order: batch row b is live[b]
  live.reserve(std::size_t(opt.batch));
  std::vector<bool> slot_busy(std::size_t(opt.batch), false);
  std::size_t next_request = 0;
  progress_line progress;

  // Ingests the next waiting request into the lowest free slot of both layers.
  const auto admit = [&](int slot) -> bool {
    const request& r = requests[next_request++];
    live_sequence s{slot, r, 0, synthetic_sequence(shape, opt.seed, r.id)};
    const std::size_t n = std::size_t(r.prompt_tokens);
    std::vector<Element> pk(n * hkv * d), pv(pk.size()), last_query(std::size_t(hq) * d);
    std::vector<float> pc(n * hkv);
    for (std::size_t t = 0; t < n; ++t) {
      s.data.next_token(k32.data(), v32.data(), &pc[t * hkv]);
      store_row(k32.data(), &pk[t * hkv * d], k32.size());
      store_row(v32.data(), &pv[t * hkv * d], v32.size());
    }
    s.data.queries(q32.data());
    store_row(q32.data(), last_query.data(), q32.size());
    const std::int64_t p = r.prompt_tokens;
    nosa::prompt_args<Element> prompt;
    prompt.k = nosa::make_contiguous<3>(static_cast<const Element*>(pk.data()), {p, hkv, d});
    prompt.v = nosa::make_contiguous<3>(static_cast<const Element*>(pv.data()), {p, hkv, d});
    prompt.c = nosa::make_contiguous<2>(static_cast<const float*>(pc.data()), {p, hkv});
    prompt.last_query = nosa::make_contiguous<2>(static_cast<const Element*>(last_query.data()), {hq, d});
    const std::string what = format("add_sequence(slot %d, %d-token prompt)", slot, r.prompt_tokens);
    if (both([&](auto& var) { return fails(var.runner.add_sequence(slot, prompt), call(var, what), err); })) {
      return false;
    }
    both([&](auto& var) {
      for (int h = 0; h < hkv; ++h) var.locality.remember(slot, h, var.runner.selection(slot, h));
      return false;
    });
    slot_busy[std::size_t(slot)] = true;
    live.push_back(std::move(s));
    return true;
  };

  // Prints the progress line for the steps since the last report (bytes: host -> device, cumulative).
  const auto report = [&](int step) {
    std::string text = format("step %5d/%d live %d", step, opt.steps, static_cast<int>(live.size()));
    both([&](auto& var) {
      const variant_metrics dm = var.metrics.since(var.at_last_report);
      text += format(" | %s %s tok/s hit %4.1f%% miss %4.2f H2D %6.1f MB", std::string(var.name).c_str(),
                     rate_text(dm.tokens_per_second()).c_str(), 100.0 * dm.hit_rate(),
                     dm.misses_per_head_step(), megabytes(var.metrics.bytes_h2d));
      var.at_last_report = var.metrics;
      return false;
    });
    progress.update(text);
  };

  for (int i = 0; i < opt.batch; ++i) {
    if (!admit(i)) return err;
  }

  // ---- Decode loop -------------------------------------------------------------------------------------
  int step = 0;
  for (;; ++step) {
    // Plan: retire finished requests, admit waiting ones into the freed slots, reserve the next page.
    std::string events;
    std::size_t joined = 0;
    for (std::size_t b = 0; b < live.size();) {
      live_sequence& s = live[b];
      if (s.decoded < s.req.decode_tokens) {
        ++b;
        continue;
      }
      const std::string what = format("remove_sequence(slot %d)", s.slot);
      if (both([&](auto& var) { return fails(var.runner.remove_sequence(s.slot), call(var, what), err); }))
        return err;
      slot_busy[std::size_t(s.slot)] = false;
      events += format("%srequest %d leaves slot %d after %d tokens (length %d)", events.empty() ? "" : "; ",
                       s.req.id, s.slot, s.decoded, s.req.prompt_tokens + s.decoded);
      live.erase(live.begin() + std::ptrdiff_t(b));
    }
    while (next_request < requests.size()) {
      const auto free_slot = std::find(slot_busy.begin(), slot_busy.end(), false);
      if (free_slot == slot_busy.end()) break;
      const int slot = static_cast<int>(free_slot - slot_busy.begin());
      const request& r = requests[next_request];
      if (!admit(slot)) return err;
      ++joined;
      events += format("; request %d joins slot %d with a %d-token prompt", r.id, slot, r.prompt_tokens);
    }
    if (!events.empty() && !live.empty()) {
      progress.event(format("step %5d: %s; %s keep decoding", step, events.c_str(),
                            sequences_text(live.size() - joined).c_str()));
    }
    if (live.empty()) break;
    if (both([&](auto& var) { return fails(var.runner.reserve(1), call(var, "reserve(1)"), err); }))
      return err;

    // Inputs of this step, identical for both variants.
    const std::int64_t rows = static_cast<std::int64_t>(live.size());
    for (std::size_t b = 0; b < live.size(); ++b) {
      live_sequence& s = live[b];
      batch_slots[b] = s.slot;
      s.data.drift_queries();
      s.data.queries(q32.data());
      s.data.next_token(k32.data(), v32.data(), &c[b * hkv]);
      store_row(q32.data(), &q[b * hq * d], q32.size());
      store_row(k32.data(), &k[b * hkv * d], k32.size());
      store_row(v32.data(), &v[b * hkv * d], v32.size());
    }

    const bool failed = both([&](auto& var) {
      nosa::step_args<Element, float> args;
      args.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(batch_slots.data()), {rows});
      args.q = nosa::make_contiguous<3>(static_cast<const Element*>(q.data()), {rows, hq, d});
      args.k = nosa::make_contiguous<3>(static_cast<const Element*>(k.data()), {rows, hkv, d});
      args.v = nosa::make_contiguous<3>(static_cast<const Element*>(v.data()), {rows, hkv, d});
      args.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {rows, hkv});
      args.o = nosa::make_contiguous<3>(var.output.data(), {rows, hq, d});
      const auto start = std::chrono::steady_clock::now();
      const nosa::status s = var.runner.step(args);
      const auto stop = std::chrono::steady_clock::now();
      if (fails(s, call(var, format("step %d", step)), err)) return true;

      variant_metrics& m = var.metrics;
      m.step_seconds += std::chrono::duration<double>(stop - start).count();
      const nosa::counters last = var.runner.last_step_counters();
      m.steps += last.steps;
      m.token_steps += std::uint64_t(rows);
      m.hits += last.hits;
      m.misses += last.misses;
      m.bytes_h2d += last.bytes_h2d;
      m.bytes_d2h += last.bytes_d2h;
      for (std::int64_t b = 0; b < rows; ++b) {
        const int slot = batch_slots[std::size_t(b)];
        for (int h = 0; h < hkv; ++h) {
          m.max_misses = std::max(m.max_misses, var.runner.step_misses(slot, h));
          const double gamma = var.locality.update(slot, h, var.runner.selection(slot, h));
          if (gamma >= 0.0) {
            m.gamma_sum += gamma;
            ++m.gamma_samples;
          }
          ++m.head_steps;
        }
      }
      const std::size_t out_elements = std::size_t(rows) * hq * d;
      for (std::size_t i = 0; i < out_elements; ++i) {
        std::uint32_t bits = 0;
        static_assert(sizeof bits == sizeof(float));
        std::memcpy(&bits, &var.output[i], sizeof bits);
        var.output_hash = (var.output_hash ^ bits) * 0x100000001b3ull;
      }
      return false;
    });
    if (failed) return err;
    for (live_sequence& s : live) ++s.decoded;
    if (opt.report_every > 0 && ((step + 1) % opt.report_every == 0 || step + 1 == opt.steps))
      report(step + 1);
  }
  progress.finish();
  // Every sequence has left: the pool must hold every page again, in both layers.
  std::string pool_text = format("step %5d: all requests finished; free pool pages", step);
  both([&](auto& var) {
    pool_text +=
        format(" %s %d/%d", std::string(var.name).c_str(), var.runner.free_pages(), config.limits.pool_pages);
    return false;
  });
  progress.event(pool_text);
  const double wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - wall_start).count();

  // ---- Summary -------------------------------------------------------------------------------------------
  std::printf("\n%-9s %6s %7s %9s %9s %11s %10s %9s %9s %7s\n", "variant", "steps", "tokens", "tokens/s",
              "hit rate", "misses/step", "max misses", "MB H2D", "MB D2H", "gamma");
  both([&](auto& var) {
    const variant_metrics& m = var.metrics;
    std::printf("%-9s %6llu %7llu %9.0f %8.2f%% %11.3f %10d %9.2f %9.2f %7.4f\n",
                std::string(var.name).c_str(), static_cast<unsigned long long>(m.steps),
                static_cast<unsigned long long>(m.token_steps), m.tokens_per_second(), 100.0 * m.hit_rate(),
                m.misses_per_head_step(), m.max_misses, megabytes(m.bytes_h2d), megabytes(m.bytes_d2h),
                m.gamma());
    return false;
  });
  std::printf("(misses per (sequence, KV head) and step, mean and maximum; MB moved by the decode steps;\n"
              " gamma = mean over steps and (sequence, KV head) of |S(t) & S(t-1)| / |S(t)|)\n\n");

  const variant_metrics& mn = nosa_variant.metrics;
  const variant_metrics& mi = infllm_variant.metrics;
  if (mi.misses > 0) {
    const double ratio = double(mn.misses) / double(mi.misses);
    std::printf("NOSA / InfLLMv2 misses: %llu / %llu = %.3f", static_cast<unsigned long long>(mn.misses),
                static_cast<unsigned long long>(mi.misses), ratio);
    if (mn.misses > 0) std::printf(" (%.2fx fewer blocks gathered host -> device)", 1.0 / ratio);
    std::printf("\n");
  } else {
    std::printf("NOSA / InfLLMv2 misses: %llu / 0 (InfLLMv2 never missed)\n",
                static_cast<unsigned long long>(mn.misses));
  }
  // The totals also count prompt ingestion: its write-back of every complete block and its first load.
  both([&](auto& var) {
    const nosa::counters total = var.runner.total_counters();
    std::printf(
        "%-9s totals incl. prompt ingestion: %llu steps, %llu hits, %llu misses, %.2f MB H2D, %.2f MB D2H\n",
        std::string(var.name).c_str(), static_cast<unsigned long long>(total.steps),
        static_cast<unsigned long long>(total.hits), static_cast<unsigned long long>(total.misses),
        megabytes(total.bytes_h2d), megabytes(total.bytes_d2h));
    return false;
  });
  std::printf(
      "output hashes (equal across runs of one build with the same flags): NOSA %016llx, InfLLMv2 %016llx\n",
      static_cast<unsigned long long>(nosa_variant.output_hash),
      static_cast<unsigned long long>(infllm_variant.output_hash));
  std::printf(
      "wall time %.2f s (steps: NOSA %.2f s, InfLLMv2 %.2f s; the rest is synthetic data and ingestion)\n",
      wall_seconds, mn.step_seconds, mi.step_seconds);
  return err;
}

/// `run_demo<Element, HeadDim, nosa::cuda_backend>`, named without CUDA types so that host sources can call
/// it. Defined in cuda/runner.cuh and instantiated by the CUDA sources of builds with CUDA (where
/// `NOSA_DEMO_CUDA` is defined) for fp32 and bf16 and head dims 64, 128 and 256.
template <nosa::storage_element Element, int HeadDim>
run_error run_demo_cuda(const options& opt);

}  // namespace demo
