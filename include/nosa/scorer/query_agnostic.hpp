#pragma once
/// \file
/// Query-agnostic block scorer (spec §3–§4): the per-token eviction scores `c` are averaged per compression
/// window (`cc`) and max-pooled over the windows overlapping each block (`Se`). The InfLLMv2 variant has no
/// query-agnostic part.

#include <nosa/core/concepts.hpp>
#include <nosa/core/math.hpp>

namespace nosa {

/// NOSA: `Se[m] = max { cc[w] : window w overlaps block m }`.
struct eviction_score_pooling {
  static constexpr bool enabled = true;
  NOSA_INLINE static constexpr float pool(float block_score, float window_score) noexcept {
    return max_keep_left(block_score, window_score);
  }
  static constexpr float pool_identity = negative_infinity;
};
static_assert(query_agnostic_scorer_policy<eviction_score_pooling>);

/// InfLLMv2: no query-agnostic scores; the selection is `topk(Sq, k)` with the same forced blocks.
struct no_query_agnostic {
  static constexpr bool enabled = false;
  NOSA_INLINE static constexpr float pool(float block_score, float) noexcept { return block_score; }
  static constexpr float pool_identity = negative_infinity;
};
static_assert(query_agnostic_scorer_policy<no_query_agnostic>);

}  // namespace nosa
