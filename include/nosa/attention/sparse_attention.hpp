#pragma once
/// \file
/// Sparse decode attention over the selected blocks with the eviction-score bias (spec §5), and the
/// log-sum-exp state used to split a softmax over slots and merge the parts in any grouping.

#include <nosa/core/concepts.hpp>
#include <nosa/core/math.hpp>

#include <cmath>

namespace nosa {

/// Attention policy: how the bias `c_j` of token j enters its logit.
template <bias_mode Bias = bias_mode::after_scale>
struct sparse_attention {
  static constexpr bias_mode bias = Bias;
  /// Logit of one key: `dot = q . k_j`, `c = c[j, h]`, `scale = 1 / sqrt(D)`.
  NOSA_INLINE static constexpr float logit(float dot, float c, float scale) noexcept {
    if constexpr (Bias == bias_mode::after_scale) {
      return dot * scale + c;
    } else if constexpr (Bias == bias_mode::before_scale) {
      return (dot + c) * scale;
    } else {
      return dot * scale;
    }
  }
};
static_assert(attention_policy<sparse_attention<bias_mode::after_scale>>);
static_assert(attention_policy<sparse_attention<bias_mode::before_scale>>);
static_assert(attention_policy<sparse_attention<bias_mode::none>>);

/// Full (dense) decode attention: every block of the sequence, no scoring and no selection. With the
/// resident store this is the FullAttn baseline (and what sparse attention reduces to when a sequence has
/// at most k blocks). The bias, if any, enters as in `sparse_attention`.
template <bias_mode Bias = bias_mode::none>
struct full_attention : sparse_attention<Bias> {
  static constexpr bool all_blocks = true;
};
static_assert(attention_policy<full_attention<>>);

/// True when the attention policy attends every block instead of a selection.
template <class A>
inline constexpr bool attends_all_blocks = requires { requires A::all_blocks; };

/// Partial softmax over a subset of keys: running maximum `m`, normaliser `l = sum exp(logit - m)`.
/// The weighted value sum lives beside it, scaled by the same `exp(-m)`.
struct softmax_partial {
  float max = negative_infinity;
  float sum = 0.0f;

  /// Rescale factors that bring this partial and `other` to their common maximum. Returns the new max.
  /// After the call `this_scale * sum + other_scale * other.sum` is the merged normaliser.
  NOSA_INLINE float merge_factors(const softmax_partial& other, float& this_scale, float& other_scale) const noexcept {
    const float m = max_keep_left(max, other.max);
    if (m == negative_infinity) {
      this_scale = 0.0f;
      other_scale = 0.0f;
      return m;
    }
    this_scale = max == negative_infinity ? 0.0f : std::exp(max - m);
    other_scale = other.max == negative_infinity ? 0.0f : std::exp(other.max - m);
    return m;
  }
};

}  // namespace nosa
