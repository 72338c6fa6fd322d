#pragma once
/// \file
/// Independent double-precision reference of NOSA / InfLLMv2 selection and sparse attention
/// (docs: spec/nosa.md, sections 2-5, and the FP8 KV cache of section 6b), used by the tests to check the
/// library.
///
/// It deliberately shares no code with `include/nosa`: a bug in the library's math must not be able to
/// hide by being reproduced here. Everything is written the plain way (full sorts for top-k, explicit
/// loops over windows and tokens), in double precision. Invalid inputs throw `std::invalid_argument`,
/// which is acceptable in test code and makes a misuse fail loudly.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace nosa_ref {

/// Where the eviction score `c` enters the attention logit (spec section 5).
enum class bias_mode {
  after_scale,   ///< `q.k / sqrt(D) + c`: the semantics the model was trained with
  before_scale,  ///< `(q.k + c) / sqrt(D)`: what the released NOSI kernel computes
  none,          ///< `q.k / sqrt(D)`: plain sparse attention (InfLLMv2)
};

/// How the compressed keys are stored (spec section 3, "Storage"): the exact mean, or the mean accumulated
/// in fp32 over the window's tokens in order, divided in fp32, and rounded once (to nearest, ties to even)
/// to the element type of the keys.
enum class key_storage {
  exact,  ///< the mean in double precision (the mathematical definition)
  fp32,   ///< fp32 engines: the fp32 mean
  bf16,   ///< the fp32 mean rounded to bfloat16
  fp16,   ///< the fp32 mean rounded to IEEE binary16
};

/// Rounds `x` to the nearest value with `mantissa_bits` fraction bits and exponents down to `min_exponent`
/// (below it, the fixed spacing of the subnormals), ties to even. Used for bf16 (7, -126) and fp16 (10, -14);
/// written from the definition, independently of the library's bit manipulations.
inline double round_to_format(double x, int mantissa_bits, int min_exponent) {
  if (x == 0.0 || !std::isfinite(x)) return x;
  int e = 0;
  std::frexp(x, &e);  // |x| in [2^(e-1), 2^e)
  const int exponent = std::max(e - 1, min_exponent);
  const double ulp = std::ldexp(1.0, exponent - mantissa_bits);
  const double q = x / ulp;  // exact: a power-of-two scaling
  double r = std::floor(q);
  const double frac = q - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
  return r * ulp;
}

/// How complete blocks of K and V are stored (spec section 6b).
enum class kv_storage {
  exact,     ///< as given (the element type the inputs were rounded to)
  fp8_e4m3,  ///< FP8 E4M3 ("fn") with one fp32 scale per block of one KV head, K or V
};

/// Rounds `x` to FP8 E4M3 ("fn": 3 fraction bits, exponents down to -6 with the subnormal spacing 2^-9
/// below, no infinities, largest finite value 448), ties to even, saturating at +-448.
inline double round_to_e4m3(double x) { return std::clamp(round_to_format(x, 3, -6), -448.0, 448.0); }

/// One block of one KV head, K or V, stored by the FP8 rule of spec section 6b.
struct fp8_block {
  float scale = 1.0f;          ///< amax / 448, computed in fp32; 1 when the block is stored as zeros
  std::vector<double> codes;   // [b][D] row-major, the E4M3 values before the scale

  /// The value attention reads for element `i`: code times scale (exact in double).
  double value(std::size_t i) const { return codes[i] * static_cast<double>(scale); }
};

/// Quantises the `n` values of one block (each representable in fp32) by spec section 6b: `amax = max |x|`,
/// `scale = amax / 448` and `code = e4m3(x * (448 / amax))`, with the division and the product in fp32 as the
/// specification writes them. Where `448 / amax` is not a finite positive fp32 number (amax = 0, or so small
/// that the division overflows) the block is stored as zeros with scale 1.
inline fp8_block quantize_fp8(const double* x, std::size_t n) {
  float amax = 0.0f;
  for (std::size_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(static_cast<float>(x[i])));
  fp8_block b;
  b.codes.assign(n, 0.0);
  if (!(amax > 0.0f)) return b;
  const float multiplier = 448.0f / amax;
  if (!std::isfinite(multiplier)) return b;
  b.scale = amax / 448.0f;
  for (std::size_t i = 0; i < n; ++i) {
    const float scaled = static_cast<float>(x[i]) * multiplier;  // one fp32 product, as on the device
    b.codes[i] = round_to_e4m3(static_cast<double>(scaled));
  }
  return b;
}

/// The stored value of a compressed key element whose window's keys sum to `sum_fp32` (accumulated in
/// fp32, in token order) over `window` tokens.
inline double stored_compressed_key(float sum_fp32, int window, key_storage storage) {
  const float mean = sum_fp32 / static_cast<float>(window);
  switch (storage) {
    case key_storage::exact:
    case key_storage::fp32: return mean;
    case key_storage::bf16: return round_to_format(mean, 7, -126);
    case key_storage::fp16: return round_to_format(mean, 10, -14);
  }
  return mean;
}

/// Selection and attention parameters of one (sequence, KV head); names follow spec section 2.
struct config {
  int block = 64;              ///< b_s, tokens per block
  int window = 32;             ///< l_c, compression window length in tokens
  int stride = 16;             ///< s_c, compression window stride in tokens
  int topk = 64;               ///< k, selected blocks
  int topk_qa = 33;            ///< k_qa, size of the query-aware top-k, forced blocks included
  int n_init = 1;              ///< sink blocks 0 .. n_init-1, always selected
  int n_local = 16;            ///< blocks before the current one that are always selected
  int budget = -1;             ///< hard cap on newly loaded blocks per step; < 0 means no cap
  bool query_agnostic = true;  ///< false selects the InfLLMv2 variant (no eviction scores in selection)
  bias_mode bias = bias_mode::after_scale;  ///< how `c` enters the attention logit
  int head_dim = 64;                        ///< D
  int group = 1;                            ///< G, query heads per KV head
  key_storage compressed_keys = key_storage::exact;  ///< how Kc is stored (the engine's element type)
  kv_storage kv = kv_storage::exact;                 ///< how complete blocks of K and V are stored
};

/// Throws `std::invalid_argument` unless the sizes of `cfg` are usable (positive extents, non-negative
/// counts). Selection counts such as `topk < forced` are allowed: the rules define a result for them.
inline void validate(const config& cfg) {
  if (cfg.block < 1 || cfg.window < 1 || cfg.stride < 1 || cfg.head_dim < 1 || cfg.group < 1) {
    throw std::invalid_argument("nosa_ref: block, window, stride, head_dim and group must be >= 1");
  }
  if (cfg.n_init < 0 || cfg.n_local < 0 || cfg.topk < 0 || cfg.topk_qa < 0) {
    throw std::invalid_argument("nosa_ref: topk, topk_qa, n_init and n_local must be >= 0");
  }
}

/// N_c(L): number of complete compression windows in a sequence of `length` tokens (spec section 3).
inline int window_count(int length, const config& cfg) {
  return length >= cfg.window ? (length - cfg.window) / cfg.stride + 1 : 0;
}

/// M = ceil(L / b_s): number of blocks, the last one possibly partial.
inline int block_count(int length, const config& cfg) { return (length + cfg.block - 1) / cfg.block; }

/// True when window `w` (tokens [w*s_c, w*s_c + l_c)) shares at least one token with block `m`
/// (tokens [m*b_s, (m+1)*b_s)). Whether the window exists yet is a separate question.
inline bool window_overlaps_block(int w, int m, const config& cfg) {
  const long long w_begin = static_cast<long long>(w) * cfg.stride;
  const long long w_end = w_begin + cfg.window;
  const long long m_begin = static_cast<long long>(m) * cfg.block;
  const long long m_end = m_begin + cfg.block;
  return w_begin < m_end && w_end > m_begin;
}

/// Half-open range [first, last) of window indices.
struct window_range {
  int first = 0;  ///< lowest window index in the range
  int last = 0;   ///< one past the highest window index; empty when last <= first
};

/// The existing windows (w < n_windows) that overlap block `m`. The bounds are the closed form of
/// `window_overlaps_block`; the tests check the two against each other on many configurations.
inline window_range overlapping_windows(int m, int n_windows, const config& cfg) {
  const long long m_begin = static_cast<long long>(m) * cfg.block;
  const long long m_end = m_begin + cfg.block;
  // w*s_c + l_c > m_begin  <=>  w*s_c > m_begin - l_c
  const long long first = m_begin >= cfg.window ? (m_begin - cfg.window) / cfg.stride + 1 : 0;
  // w*s_c < m_end  <=>  w < ceil(m_end / s_c)
  const long long last = (m_end + cfg.stride - 1) / cfg.stride;
  window_range r;
  r.first = static_cast<int>(std::min<long long>(first, n_windows));
  r.last = static_cast<int>(std::min<long long>(last, n_windows));
  return r;
}

/// Full token history of one (sequence, KV head), plus the compressed windows derived from it.
///
/// The compressed keys and scores are the plain means over each window's tokens; they are memoized as
/// windows complete only so that long simulations stay fast. Appending is the only way to change the
/// history, which keeps the memo consistent by construction.
class history {
 public:
  /// An empty history for the window geometry and head dimension of `cfg`.
  explicit history(const config& cfg)
      : window_(cfg.window), stride_(cfg.stride), head_dim_(cfg.head_dim), block_(cfg.block),
        storage_(cfg.compressed_keys), kv_(cfg.kv) {
    validate(cfg);
  }

  /// Appends one token. `k`, `v`: [D]; `c`: its eviction score.
  void append(const double* k, const double* v, double c) {
    k_.insert(k_.end(), k, k + head_dim_);
    v_.insert(v_.end(), v, v + head_dim_);
    c_.push_back(c);
    complete_windows();
    complete_blocks();
  }

  /// Appends `n` tokens. `k`, `v`: [n][D] row-major; `c`: [n]. Pointers may be null when `n == 0`.
  void append(const double* k, const double* v, const double* c, int n) {
    for (int i = 0; i < n; ++i) {
      append(k + static_cast<std::size_t>(i) * head_dim_, v + static_cast<std::size_t>(i) * head_dim_, c[i]);
    }
  }

  /// L, the number of tokens.
  int length() const { return static_cast<int>(c_.size()); }
  /// D.
  int head_dim() const { return head_dim_; }
  /// Key of token `j`: [D].
  const double* key(int j) const { return k_.data() + static_cast<std::size_t>(j) * head_dim_; }
  /// Value of token `j`: [D].
  const double* value(int j) const { return v_.data() + static_cast<std::size_t>(j) * head_dim_; }
  /// Eviction score c of token `j`.
  double score(int j) const { return c_[static_cast<std::size_t>(j)]; }
  /// N_c, the number of complete windows.
  int window_count() const { return static_cast<int>(cc_.size()); }
  /// Kc[w], the mean key over window `w`: [D].
  const double* compressed_key(int w) const { return kc_.data() + static_cast<std::size_t>(w) * head_dim_; }
  /// cc[w], the mean eviction score over window `w`.
  double compressed_score(int w) const { return cc_[static_cast<std::size_t>(w)]; }

  /// True when `cfg` has the geometry this history was built with.
  bool matches(const config& cfg) const {
    return cfg.window == window_ && cfg.stride == stride_ && cfg.head_dim == head_dim_;
  }
  /// True when `cfg` stores K and V as this history does (and, for FP8, in blocks of the same size).
  bool stores_like(const config& cfg) const {
    return cfg.kv == kv_ && (kv_ == kv_storage::exact || cfg.block == block_);
  }

  /// True when attention over the first `length` tokens reads token `j` from a stored FP8 block: its block
  /// was complete before the token at `length - 1` arrived (spec section 6b: the step at which a block's
  /// last token arrives still attends it in the element type; a prompt's complete blocks are stored at
  /// admission, before any step).
  bool attends_stored(int j, int length) const {
    return kv_ == kv_storage::fp8_e4m3 && (j / block_ + 1) * block_ <= length - 1;
  }
  /// Key of token `j` as attention over the first `length` tokens reads it: [D].
  const double* attended_key(int j, int length) const {
    return attends_stored(j, length) ? kq_.data() + static_cast<std::size_t>(j) * head_dim_ : key(j);
  }
  /// Value of token `j` as attention over the first `length` tokens reads it: [D].
  const double* attended_value(int j, int length) const {
    return attends_stored(j, length) ? vq_.data() + static_cast<std::size_t>(j) * head_dim_ : value(j);
  }
  /// FP8 storage: complete blocks so far.
  int stored_block_count() const { return static_cast<int>(k_blocks_.size()); }
  /// FP8 storage: block `m`'s keys as stored (codes and scale).
  const fp8_block& stored_keys(int m) const { return k_blocks_[static_cast<std::size_t>(m)]; }
  /// FP8 storage: block `m`'s values as stored.
  const fp8_block& stored_values(int m) const { return v_blocks_[static_cast<std::size_t>(m)]; }

 private:
  void complete_windows() {
    const int target = length() >= window_ ? (length() - window_) / stride_ + 1 : 0;
    while (window_count() < target) {
      const int w = window_count();
      const int first = w * stride_;
      for (int d = 0; d < head_dim_; ++d) {
        if (storage_ == key_storage::exact) {
          double sum = 0.0;
          for (int j = first; j < first + window_; ++j) sum += key(j)[d];
          kc_.push_back(sum / window_);
        } else {
          float sum = 0.0f;
          for (int j = first; j < first + window_; ++j) sum += static_cast<float>(key(j)[d]);
          kc_.push_back(stored_compressed_key(sum, window_, storage_));
        }
      }
      double sum = 0.0;
      for (int j = first; j < first + window_; ++j) sum += score(j);
      cc_.push_back(sum / window_);
    }
  }

  // FP8 storage: quantises each block once, from its tokens as given, when its last token arrives.
  void complete_blocks() {
    if (kv_ != kv_storage::fp8_e4m3) return;
    while ((stored_block_count() + 1) * block_ <= length()) {
      const std::size_t first = static_cast<std::size_t>(stored_block_count()) * block_ * head_dim_;
      const std::size_t n = static_cast<std::size_t>(block_) * head_dim_;
      k_blocks_.push_back(quantize_fp8(k_.data() + first, n));
      v_blocks_.push_back(quantize_fp8(v_.data() + first, n));
      for (std::size_t i = 0; i < n; ++i) {
        kq_.push_back(k_blocks_.back().value(i));
        vq_.push_back(v_blocks_.back().value(i));
      }
    }
  }

  int window_;
  int stride_;
  int head_dim_;
  int block_;
  key_storage storage_;
  kv_storage kv_;
  std::vector<fp8_block> k_blocks_;  // [complete blocks] FP8 storage: K of each block as stored
  std::vector<fp8_block> v_blocks_;  // [complete blocks] FP8 storage: V of each block as stored
  std::vector<double> kq_;           // [complete blocks * b][D] FP8 storage: the K values attention reads
  std::vector<double> vq_;           // [complete blocks * b][D] FP8 storage: the V values attention reads
  std::vector<double> k_;   // [L][D] row-major
  std::vector<double> v_;   // [L][D] row-major
  std::vector<double> c_;   // [L]
  std::vector<double> kc_;  // [N_c][D] row-major, mean of k over each complete window
  std::vector<double> cc_;  // [N_c], mean of c over each complete window
};

/// Per-block scores of one selection, before any forcing (spec section 4, steps 1-2), and which
/// blocks the rules force.
struct block_scores {
  std::vector<double> sq;    // [M] max query-aware window probability; -inf when no window overlaps
  std::vector<double> se;    // [M] max compressed eviction score; -inf when no window overlaps
  std::vector<bool> forced;  // [M] sink or local block (the current block always is)

  /// M.
  int block_count() const { return static_cast<int>(sq.size()); }
};

/// Scores every block of `h` for the queries `q`: [G][D] row-major (ignored, and may be null, when
/// `have_query` is false, in which case `sq` is -inf everywhere).
inline block_scores scores(const config& cfg, const history& h, const double* q, bool have_query) {
  validate(cfg);
  if (!h.matches(cfg)) throw std::invalid_argument("nosa_ref::scores: history built with another geometry");
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  const int L = h.length();
  const int M = block_count(L, cfg);
  const int n_windows = h.window_count();
  const int D = cfg.head_dim;

  // P[w] = sum over the group of each head's softmax over all existing windows.
  std::vector<double> p(static_cast<std::size_t>(n_windows), 0.0);  // [N_c]
  if (have_query && n_windows > 0) {
    std::vector<double> logit(static_cast<std::size_t>(n_windows));  // [N_c]
    for (int g = 0; g < cfg.group; ++g) {
      const double* qg = q + static_cast<std::size_t>(g) * D;
      double max_logit = neg_inf;
      for (int w = 0; w < n_windows; ++w) {
        double dot = 0.0;
        for (int d = 0; d < D; ++d) dot += qg[d] * h.compressed_key(w)[d];
        logit[w] = dot / std::sqrt(static_cast<double>(D));
        max_logit = std::max(max_logit, logit[w]);
      }
      double sum = 0.0;
      for (int w = 0; w < n_windows; ++w) sum += std::exp(logit[w] - max_logit);
      for (int w = 0; w < n_windows; ++w) p[w] += std::exp(logit[w] - max_logit) / sum;
    }
  }

  block_scores out;
  out.sq.assign(static_cast<std::size_t>(M), neg_inf);
  out.se.assign(static_cast<std::size_t>(M), neg_inf);
  out.forced.assign(static_cast<std::size_t>(M), false);
  const int current = M - 1;
  for (int m = 0; m < M; ++m) {
    const window_range r = overlapping_windows(m, n_windows, cfg);
    for (int w = r.first; w < r.last; ++w) {
      if (have_query) out.sq[m] = std::max(out.sq[m], p[w]);
      out.se[m] = std::max(out.se[m], h.compressed_score(w));
    }
    out.forced[m] = m < cfg.n_init || m >= current - cfg.n_local;
  }
  return out;
}

/// Result of one selection.
struct selection {
  std::vector<int> ranked;        // [|S|] selected blocks in rank order (see `select`)
  std::vector<int> ascending;     // [|S|] the same blocks, ascending
  int forced_count = 0;           ///< forced blocks in S
  std::vector<double> sq;         // [M] Sq after NaN -> -inf and forcing
  std::vector<double> se;         // [M] Se after NaN -> -inf, forcing and (NOSA) the +inf overwrite of Q
  std::vector<double> se_base;    // [M] Se after NaN -> -inf and forcing, before the overwrite of Q
  std::vector<double> decisive;   // [M] the score the final top-k ranked: `se` (NOSA) or `sq` (InfLLMv2)
  std::vector<bool> forced;       // [M] forced blocks
  std::vector<bool> query_aware;  // [M] member of Q (NOSA only; all false for InfLLMv2)
  std::vector<int> dropped;       // [n] blocks the budget removed, lowest-ranked first
  std::vector<int> replacements;  // [<= n] resident blocks that took their places, best first
  bool query_agnostic = true;     ///< which variant produced this selection
  bool have_query = false;        ///< whether a query took part
  bool budget_checked = false;    ///< a budget and a resident set were given, so the budget rule ran

  /// M.
  int block_count() const { return static_cast<int>(sq.size()); }
};

/// Orders of (score, block) pairs and the top-k built on them.
namespace order {

/// True when block `a` precedes block `b`: higher score first, lower index on equal scores (equal
/// infinities included). Scores must be free of NaN, which makes this a strict weak order.
inline bool before(const std::vector<double>& score, int a, int b) {
  return score[a] > score[b] || (score[a] == score[b] && a < b);
}

/// `blocks` sorted by `before` under `score`.
inline std::vector<int> sorted(const std::vector<double>& score, std::vector<int> blocks) {
  std::sort(blocks.begin(), blocks.end(), [&](int a, int b) { return before(score, a, b); });
  return blocks;
}

/// topk(score, n): the first min(n, M) blocks of all M blocks in the order `before`.
inline std::vector<int> topk(const std::vector<double>& score, int n) {
  std::vector<int> all(score.size());
  for (std::size_t m = 0; m < all.size(); ++m) all[m] = static_cast<int>(m);
  all = sorted(score, std::move(all));
  all.resize(std::min(all.size(), static_cast<std::size_t>(std::max(n, 0))));
  return all;
}

}  // namespace order

/// Selects the blocks of one step from `scores` (spec section 4 and the hard budget).
///
/// `resident`: block ids resident before this step's loads (any order), or null; the budget rule runs only
/// when `cfg.budget >= 0` and `resident` is given. `have_query`: false at ingest, where NOSA's Q is the
/// forced set and InfLLMv2 selects the forced blocks only.
///
/// Rank order of `ranked`: forced blocks ascending; then (NOSA) the other members of Q by (Sq desc,
/// index asc); then the rest by (Se desc, index asc); InfLLMv2: forced, then the rest by (Sq desc, index
/// asc). Blocks the budget brings in are appended after the kept blocks.
inline selection select(const config& cfg, const block_scores& scores, const std::vector<int>* resident,
                        bool have_query) {
  validate(cfg);
  constexpr double inf = std::numeric_limits<double>::infinity();
  const int M = scores.block_count();
  if (static_cast<int>(scores.se.size()) != M || static_cast<int>(scores.forced.size()) != M) {
    throw std::invalid_argument("nosa_ref::select: sq, se and forced differ in length");
  }

  selection out;
  out.query_agnostic = cfg.query_agnostic;
  out.have_query = have_query;
  out.forced = scores.forced;
  out.sq = scores.sq;
  out.se_base = scores.se;
  out.query_aware.assign(static_cast<std::size_t>(M), false);
  for (int m = 0; m < M; ++m) {
    if (std::isnan(out.sq[m])) out.sq[m] = -inf;
    if (std::isnan(out.se_base[m])) out.se_base[m] = -inf;
    if (out.forced[m]) out.sq[m] = out.se_base[m] = inf;
  }
  out.se = out.se_base;

  std::vector<int> forced_blocks;  // ascending
  for (int m = 0; m < M; ++m) {
    if (out.forced[m]) forced_blocks.push_back(m);
  }

  std::vector<bool> in_s(static_cast<std::size_t>(M), false);
  if (cfg.query_agnostic) {
    const std::vector<int> q_set = have_query ? order::topk(out.sq, cfg.topk_qa) : forced_blocks;
    for (int m : q_set) {
      out.query_aware[m] = true;
      out.se[m] = inf;
    }
    for (int m : order::topk(out.se, cfg.topk)) in_s[m] = true;
    out.decisive = out.se;
  } else {
    if (have_query) {
      for (int m : order::topk(out.sq, cfg.topk)) in_s[m] = true;
    } else {
      // Without a query InfLLMv2 has nothing to rank by, so only the forced blocks are selected
      // (lowest index first should k be smaller than the forced set, as +inf ties would give).
      for (std::size_t i = 0; i < forced_blocks.size() && static_cast<int>(i) < cfg.topk; ++i) {
        in_s[forced_blocks[i]] = true;
      }
    }
    out.decisive = out.sq;
  }

  // Rank order.
  std::vector<int> query_picks;  // non-forced members of Q in S (NOSA)
  std::vector<int> rest;         // everything else in S
  for (int m = 0; m < M; ++m) {
    if (!in_s[m]) continue;
    if (out.forced[m]) {
      out.ranked.push_back(m);
    } else if (cfg.query_agnostic && out.query_aware[m]) {
      query_picks.push_back(m);
    } else {
      rest.push_back(m);
    }
  }
  const std::vector<double>& rest_score = cfg.query_agnostic ? out.se_base : out.sq;
  for (int m : order::sorted(out.sq, query_picks)) out.ranked.push_back(m);
  for (int m : order::sorted(rest_score, rest)) out.ranked.push_back(m);

  // Hard budget: drop the lowest-ranked missing non-forced blocks, refill from resident blocks.
  if (cfg.budget >= 0 && resident != nullptr) {
    out.budget_checked = true;
    std::vector<bool> is_resident(static_cast<std::size_t>(M), false);
    for (int m : *resident) {
      if (m < 0 || m >= M) throw std::invalid_argument("nosa_ref::select: resident block out of range");
      is_resident[m] = true;
    }
    int misses = 0;
    for (int m : out.ranked) misses += is_resident[m] ? 0 : 1;
    const int excess = misses - cfg.budget;
    if (excess > 0) {
      for (auto it = out.ranked.rbegin(); it != out.ranked.rend(); ++it) {
        if (static_cast<int>(out.dropped.size()) == excess) break;
        if (!is_resident[*it] && !out.forced[*it]) out.dropped.push_back(*it);
      }
      for (int m : out.dropped) in_s[m] = false;
      std::vector<int> kept;
      for (int m : out.ranked) {
        if (in_s[m]) kept.push_back(m);
      }
      std::vector<int> candidates;
      for (int m = 0; m < M; ++m) {
        if (is_resident[m] && !in_s[m]) candidates.push_back(m);
      }
      candidates = order::sorted(rest_score, candidates);
      const std::size_t take = std::min(candidates.size(), out.dropped.size());
      out.replacements.assign(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(take));
      out.ranked = kept;
      out.ranked.insert(out.ranked.end(), out.replacements.begin(), out.replacements.end());
    }
  }

  out.ascending = out.ranked;
  std::sort(out.ascending.begin(), out.ascending.end());
  for (int m : out.ranked) out.forced_count += out.forced[m] ? 1 : 0;
  return out;
}

/// Dense attention over exactly the tokens j < `length` of `blocks` (any order, no duplicates), for each
/// query head of the group (spec section 5), reading each key and value as stored (`history::attended_key`).
/// `q`, `o`: [G][D] row-major. An empty block list gives o = 0.
inline void attend(const config& cfg, const history& h, const double* q, const std::vector<int>& blocks,
                   int length, double* o) {
  validate(cfg);
  if (length < 0 || length > h.length()) throw std::invalid_argument("nosa_ref::attend: length out of range");
  if (!h.stores_like(cfg)) throw std::invalid_argument("nosa_ref::attend: history stores K and V otherwise");
  const int D = cfg.head_dim;
  const int M = block_count(length, cfg);
  std::vector<int> sorted_blocks = blocks;
  std::sort(sorted_blocks.begin(), sorted_blocks.end());
  if (std::adjacent_find(sorted_blocks.begin(), sorted_blocks.end()) != sorted_blocks.end()) {
    throw std::invalid_argument("nosa_ref::attend: a block is listed twice");
  }
  std::vector<int> tokens;
  for (int m : sorted_blocks) {
    if (m < 0 || m >= M) throw std::invalid_argument("nosa_ref::attend: block out of range");
    for (int j = m * cfg.block; j < std::min((m + 1) * cfg.block, length); ++j) tokens.push_back(j);
  }

  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> logit(tokens.size());  // [tokens]
  for (int g = 0; g < cfg.group; ++g) {
    const double* qg = q + static_cast<std::size_t>(g) * D;
    double* og = o + static_cast<std::size_t>(g) * D;
    std::fill(og, og + D, 0.0);
    if (tokens.empty()) continue;
    double max_logit = -std::numeric_limits<double>::infinity();
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      double dot = 0.0;
      const double* key = h.attended_key(tokens[i], length);
      for (int d = 0; d < D; ++d) dot += qg[d] * key[d];
      const double c = h.score(tokens[i]);
      switch (cfg.bias) {
      case bias_mode::after_scale:
        logit[i] = dot * scale + c;
        break;
      case bias_mode::before_scale:
        logit[i] = (dot + c) * scale;
        break;
      case bias_mode::none:
        logit[i] = dot * scale;
        break;
      }
      max_logit = std::max(max_logit, logit[i]);
    }
    double sum = 0.0;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const double weight = std::exp(logit[i] - max_logit);
      sum += weight;
      const double* value = h.attended_value(tokens[i], length);
      for (int d = 0; d < D; ++d) og[d] += weight * value[d];
    }
    for (int d = 0; d < D; ++d) og[d] /= sum;
  }
}

/// What one decode step of `head_sim` produced.
struct step_result {
  selection sel;          ///< the selection after the budget rule
  int misses = 0;         ///< |S \ resident before the step|, the blocks this step had to load
  std::vector<double> o;  // [G][D] row-major attention output
  int forced_count = 0;   ///< forced blocks in S
};

/// One (sequence, KV head) of an offloading decoder: the token history plus the resident-block set.
///
/// The resident set after a step is exactly that step's selection; before a step's loads it is the
/// previous selection plus the block of the new token, because the tail block always lives on the GPU.
class head_sim {
 public:
  /// An empty sequence under `cfg`.
  explicit head_sim(const config& cfg) : cfg_(cfg), history_(cfg) {}

  /// Appends a prompt of `n` tokens (`k`, `v`: [n][D] row-major; `c`: [n]; null allowed when n == 0),
  /// computes the initial selection without a query and without a budget, and makes it resident.
  selection ingest(const double* k, const double* v, const double* c, int n) {
    history_.append(k, v, c, n);
    selection sel = select(cfg_, scores(cfg_, history_, nullptr, false), nullptr, false);
    resident_ = sel.ascending;
    return sel;
  }

  /// Appends one token (`k`, `v`: [D]; `c` its score), selects for the queries `q` ([G][D] row-major)
  /// under the budget, attends, and makes the selection resident.
  step_result step(const double* q, const double* k, const double* v, double c) {
    history_.append(k, v, c);
    const int tail = (history_.length() - 1) / cfg_.block;
    std::vector<int> before = resident_;
    if (std::find(before.begin(), before.end(), tail) == before.end()) before.push_back(tail);
    std::sort(before.begin(), before.end());

    step_result r;
    r.sel = select(cfg_, scores(cfg_, history_, q, true), &before, true);
    for (int m : r.sel.ascending) {
      if (!std::binary_search(before.begin(), before.end(), m)) ++r.misses;
    }
    r.o.assign(static_cast<std::size_t>(cfg_.group) * cfg_.head_dim, 0.0);
    attend(cfg_, history_, q, r.sel.ascending, history_.length(), r.o.data());
    r.forced_count = r.sel.forced_count;
    resident_ = r.sel.ascending;
    return r;
  }

  /// L.
  int length() const { return history_.length(); }
  /// M.
  int block_count() const { return nosa_ref::block_count(history_.length(), cfg_); }
  /// The token history.
  const nosa_ref::history& history() const { return history_; }
  /// Blocks resident after the last ingest or step, ascending.
  const std::vector<int>& resident() const { return resident_; }
  /// The configuration.
  const config& configuration() const { return cfg_; }

 private:
  config cfg_;
  nosa_ref::history history_;
  std::vector<int> resident_;  // [<= k] ascending
};

}  // namespace nosa_ref
