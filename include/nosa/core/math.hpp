#pragma once
/// \file
/// Scalar helpers shared by every backend (written once, called from host loops and from kernels).

#include <nosa/core/config.hpp>

#include <cmath>

namespace nosa {

/// +infinity as a constant expression usable on host and device.
inline constexpr float positive_infinity = __builtin_huge_valf();
/// -infinity as a constant expression usable on host and device.
inline constexpr float negative_infinity = -__builtin_huge_valf();

/// max(a, b) that keeps `a` when `b` is NaN (pooling never lets a NaN in).
NOSA_INLINE constexpr float max_keep_left(float a, float b) noexcept { return b > a ? b : a; }

/// softplus(x) = log(1 + e^x), evaluated without overflow for large |x|.
NOSA_INLINE float softplus(float x) noexcept {
  const float ax = x < 0.0f ? -x : x;
  return (x > 0.0f ? x : 0.0f) + std::log1p(std::exp(-ax));
}

/// 1 / sqrt(D), the softmax scale of a head dimension.
NOSA_INLINE float softmax_scale(int head_dim) noexcept { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }

}  // namespace nosa
