#pragma once
/// \file
/// Query-aware block scorer (spec §4, steps 1–2): for each query head of a GQA group, a softmax over the
/// compressed keys of its KV head; the group's probabilities are summed per window and max-pooled over the
/// windows that overlap each block.

#include <nosa/core/concepts.hpp>
#include <nosa/core/math.hpp>

namespace nosa {

/// NOSA / InfLLMv2 query-aware scoring: `P[w] = sum_g softmax_w(q_g . Kc[w] * scale)`, `Sq[m] = max P[w]`.
struct group_softmax_scorer {
  /// Logit of one window for one query head.
  NOSA_INLINE static constexpr float window_logit(float dot, float scale) noexcept { return dot * scale; }
  /// Combines a block's running score with one overlapping window's score.
  NOSA_INLINE static constexpr float pool(float block_score, float window_score) noexcept {
    return max_keep_left(block_score, window_score);
  }
  /// Score of a block no existing window overlaps.
  static constexpr float pool_identity = negative_infinity;
};
static_assert(query_aware_scorer_policy<group_softmax_scorer>);

}  // namespace nosa
