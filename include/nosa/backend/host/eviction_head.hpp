#pragma once
/// \file
/// Host executor of the eviction-head primitive.

#include <nosa/core/backend.hpp>
#include <nosa/core/status.hpp>
#include <nosa/scorer/eviction_head.hpp>

#include <cstdint>

namespace nosa {

/// Computes `c` for every token and KV head of `args` (see `eviction_head_args`). The projection is
/// accumulated in fp32 in index order.
template <storage_element T, storage_element W>
[[nodiscard]] status compute_eviction_scores(host_backend, const eviction_head_args<T, W>& args) noexcept {
  const std::int64_t n = args.values.extents[0];
  const std::int64_t heads = args.values.extents[1];
  const std::int64_t dim = args.values.extents[2];
  NOSA_TRY(validate(args));
  for (std::int64_t t = 0; t < n; ++t) {
    for (std::int64_t h = 0; h < heads; ++h) {
      float dot = 0.0f;
      for (std::int64_t j = 0; j < heads; ++j) {
        for (std::int64_t d = 0; d < dim; ++d) {
          dot += to_float(args.w_delta(h, j * dim + d)) * to_float(args.values(t, j, d));
        }
      }
      const float beta = args.beta.empty() ? 0.0f : args.beta(h);
      args.scores(t, h) = eviction_score(dot, beta, args.scale(h));
    }
  }
  return status::success;
}

}  // namespace nosa
