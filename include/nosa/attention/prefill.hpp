#pragma once
/// \file
/// Prefill policies (spec §6, "Prefill"): which earlier tokens each query of a prompt chunk attends when the
/// library runs the prefill itself (`decode_layer::prefill`). Both write the chunk's K, V and c into the
/// store as decode steps would, and apply the pipeline's bias mode; they differ only in the blocks a query
/// reads.

#include <nosa/core/concepts.hpp>

namespace nosa {

/// Dense causal prefill (NOSA^F): the query at position t attends every token j <= t.
struct dense_prefill {
  static constexpr bool selects_per_token = false;
};
static_assert(prefill_policy<dense_prefill>);

/// Sparse prefill (NOSA^S): the query at position t attends only the blocks of its own selection, made
/// exactly as a decode step at position t makes it (without the transfer budget, which concerns decode
/// transfers): the windows visible to t are those that end at or before t (`w*s_c + l_c - 1 <= t`), the
/// blocks are those up to t's own, and the forced blocks are counted from t's block. This is the spec's
/// per-token selection: blocks after t's have no visible window and `Se = -inf`, so they rank after every
/// block up to t's and drop out after the top-k without displacing one. Needs a selection, so a pipeline
/// of full attention has only `dense_prefill`.
struct sparse_prefill {
  static constexpr bool selects_per_token = true;
};
static_assert(prefill_policy<sparse_prefill>);

}  // namespace nosa
