#pragma once
/// \file
/// The eviction head of NOSA (spec §3): `c[t, h] = A[h] * softplus(W_delta[h, :] . v_t + beta[h])`, where
/// `v_t` concatenates the (pre-RoPE) values of all KV heads of token t, head-major (length H_kv * D).
/// Engines may compute `c` themselves and pass it to the decode step; this primitive is the reference form.

#include <nosa/core/math.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>

#include <cstdint>

namespace nosa {

/// Inputs and output of the eviction head for N tokens of one layer.
template <storage_element T, storage_element W = T>
struct eviction_head_args {
  tensor_view<const T, 3> values;    ///< [N][H_kv][D] values of the tokens (read as one H_kv*D vector each)
  tensor_view<const W, 2> w_delta;   ///< [H_kv][H_kv*D] projection; innermost stride 1
  tensor_view<const float, 1> beta;  ///< [H_kv] bias; empty means zero
  tensor_view<const float, 1> scale; ///< [H_kv] the per-head factor A
  tensor_view<float, 2> scores;      ///< [N][H_kv] output c
};

/// Checks the views of `args` against each other (every backend runs this before any work).
template <storage_element T, storage_element W>
constexpr status validate(const eviction_head_args<T, W>& args) noexcept {
  const std::int64_t n = args.values.extents[0];
  const std::int64_t heads = args.values.extents[1];
  const std::int64_t dim = args.values.extents[2];
  if (n < 0 || heads <= 0 || dim <= 0) return status::shape_mismatch;
  NOSA_TRY(check_view(args.values, {n, heads, dim}));
  NOSA_TRY(check_view(args.w_delta, {heads, heads * dim}));
  if (!args.beta.empty()) NOSA_TRY(check_view(args.beta, {heads}));
  NOSA_TRY(check_view(args.scale, {heads}));
  NOSA_TRY(check_view(args.scores, {n, heads}));
  return status::success;
}

/// The head's output for one (token, head) from the projection `dot = W_delta[h] . v_t`.
NOSA_INLINE float eviction_score(float dot, float beta, float a) noexcept { return a * softplus(dot + beta); }

}  // namespace nosa
