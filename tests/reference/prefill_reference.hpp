#pragma once
/// \file
/// Independent double-precision reference of the prefill (spec section 6, "Prefill"): the output of each
/// prompt token under dense causal attention (NOSA^F) and under NOSA^S, where each token attends only the
/// blocks of its own selection.
///
/// Like `nosa_reference.hpp`, on which it builds, it shares no code with `include/nosa`. The NOSA^S
/// selection is written the way the specification words it, not the way the library computes it: the token
/// ranks every block of the whole prompt, with the softmax and the pooling over the windows visible to it
/// only and the blocks after its own at `Se = -inf` before the `+inf` overwrite; the top-k runs over all
/// blocks, and the blocks after the token's own are dropped afterwards. (The library instead selects as a
/// decode step at that position would, over the blocks that exist then; the tests check that both agree.)

#include "nosa_reference.hpp"

#include <cstddef>
#include <limits>
#include <stdexcept>
#include <vector>

namespace nosa_ref {

/// True when window `w` (tokens [w*s_c, w*s_c + l_c)) is visible to the token at position `t`: all its
/// tokens are at or before t.
inline bool window_visible(int w, int t, const config& cfg) {
  return static_cast<long long>(w) * cfg.stride + cfg.window - 1 <= t;
}

/// Block scores of every block of `prompt` for the query of token `t` (`q`: [G][D] row-major), causally:
/// windows not visible to t take no part; blocks after t's own have Sq = Se = -inf; the forced blocks are
/// the sinks and the blocks from `t/b - n_local` to t's own block.
inline block_scores causal_scores(const config& cfg, const history& prompt, int t, const double* q) {
  validate(cfg);
  if (!prompt.matches(cfg))
    throw std::invalid_argument("nosa_ref::causal_scores: history of another geometry");
  if (t < 0 || t >= prompt.length())
    throw std::invalid_argument("nosa_ref::causal_scores: token out of range");
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  const int M = block_count(prompt.length(), cfg);
  const int own = t / cfg.block;
  const int D = cfg.head_dim;

  std::vector<int> visible;  // window ids
  for (int w = 0; w < prompt.window_count(); ++w) {
    if (window_visible(w, t, cfg)) visible.push_back(w);
  }
  std::vector<double> p(static_cast<std::size_t>(prompt.window_count()), 0.0);  // [N_c], visible entries only
  for (int g = 0; g < cfg.group && !visible.empty(); ++g) {
    const double* qg = q + static_cast<std::size_t>(g) * D;
    std::vector<double> logit(visible.size());
    double max_logit = neg_inf;
    for (std::size_t i = 0; i < visible.size(); ++i) {
      double dot = 0.0;
      for (int d = 0; d < D; ++d) dot += qg[d] * prompt.compressed_key(visible[i])[d];
      logit[i] = dot / std::sqrt(static_cast<double>(D));
      max_logit = std::max(max_logit, logit[i]);
    }
    double sum = 0.0;
    for (double x : logit) sum += std::exp(x - max_logit);
    for (std::size_t i = 0; i < visible.size(); ++i) p[visible[i]] += std::exp(logit[i] - max_logit) / sum;
  }

  block_scores out;
  out.sq.assign(static_cast<std::size_t>(M), neg_inf);
  out.se.assign(static_cast<std::size_t>(M), neg_inf);
  out.forced.assign(static_cast<std::size_t>(M), false);
  for (int m = 0; m < M; ++m) {
    for (int w : visible) {
      if (!window_overlaps_block(w, m, cfg)) continue;
      out.sq[m] = std::max(out.sq[m], p[w]);
      out.se[m] = std::max(out.se[m], prompt.compressed_score(w));
    }
    if (m > own) out.se[m] = neg_inf;  // a future block (no visible window overlaps it either)
    out.forced[m] = m < cfg.n_init || (m >= own - cfg.n_local && m <= own);
  }
  return out;
}

/// The NOSA^S selection of prompt token `t` for the queries `q` ([G][D] row-major): the top-k over every
/// block of `prompt` under `causal_scores`, without a budget, with the blocks after t's own dropped from
/// `ranked` and `ascending` (the score arrays keep every block, for `compare_selection`).
inline selection prefill_selection(const config& cfg, const history& prompt, int t, const double* q) {
  selection s = select(cfg, causal_scores(cfg, prompt, t, q), nullptr, true);
  const int own = t / cfg.block;
  const auto drop_future = [own](std::vector<int>& blocks) {
    std::vector<int> kept;
    for (int m : blocks) {
      if (m <= own) kept.push_back(m);
    }
    blocks = kept;
  };
  drop_future(s.ranked);
  drop_future(s.ascending);
  s.forced_count = 0;
  for (int m : s.ranked) s.forced_count += s.forced[m] ? 1 : 0;
  return s;
}

/// Every block up to that of token `t`: what a dense prefill query attends.
inline std::vector<int> blocks_through(int t, const config& cfg) {
  std::vector<int> blocks;
  for (int m = 0; m <= t / cfg.block; ++m) blocks.push_back(m);
  return blocks;
}

/// The output of prompt token `t` (`o`: [G][D] row-major) attending the tokens j <= t of `blocks`, each
/// key and value read as stored when t arrived (with FP8, blocks completed before t as stored, t's own
/// block exact).
inline void prefill_attend(const config& cfg, const history& prompt, int t, const double* q,
                           const std::vector<int>& blocks, double* o) {
  attend(cfg, prompt, q, blocks, t + 1, o);
}

}  // namespace nosa_ref
