#pragma once
/// \file
/// Sequential block selection (spec §4) for one (sequence, KV head): forced blocks, the query-aware top-k,
/// the query-agnostic top-k and the optional hard transfer budget. The host backend runs it as written;
/// other backends compute the same set in parallel and are tested against it.

#include <nosa/core/concepts.hpp>
#include <nosa/core/math.hpp>
#include <nosa/core/params.hpp>
#include <nosa/scorer/windows.hpp>

#include <algorithm>
#include <cstdint>

namespace nosa {

/// Per-(sequence, KV head) arrays the selection reads and uses as scratch. All are sized by the
/// blocks-per-sequence capacity; only the first `n_blocks` entries are touched.
struct selection_workspace {
  float* query_scores;     ///< [M] pooled Sq; canonicalised and forced in place
  float* agnostic_scores;  ///< [M] pooled Se; canonicalised and forced in place (unused without Se)
  std::int32_t* order;     ///< [M] scratch for ranking
  std::int32_t* mark;      ///< [M] membership marks; zero on entry and on exit
};

/// Residency of one (sequence, KV head), needed only by the hard budget.
struct residency {
  const std::int32_t* slot_map = nullptr;    ///< [slots] block held by each slot, -1 if free; null = no budget
  const std::int32_t* block_slot = nullptr;  ///< [M] slot of each block, -1 if not resident
  int slots = 0;
};

/// Selects at most `top_k` blocks and writes them to `out` in rank order: forced blocks by ascending index;
/// then (with query-agnostic scores) the free query-aware picks by descending Sq; then the rest by
/// descending Se (descending Sq for InfLLMv2). Without a query the query-aware part is empty, and the
/// InfLLMv2 variant then selects the forced blocks only. With a budget, the lowest-ranked missing
/// non-forced blocks beyond it are replaced by the best resident blocks outside the selection.
/// \returns the number of blocks written to `out` ([top_k] capacity)
template <selector_policy Selector, bool QueryAgnostic>
int select_blocks(const selection_params& p, int n_blocks, bool have_query, const selection_workspace& ws,
                  const residency& resident, std::int32_t* out) {
  const int current = n_blocks - 1;
  float* sq = ws.query_scores;
  float* se = ws.agnostic_scores;
  for (int m = 0; m < n_blocks; ++m) {
    const bool forced = is_forced_block(m, current, p);
    sq[m] = forced ? positive_infinity : (have_query ? Selector::canonical(sq[m]) : negative_infinity);
    if constexpr (QueryAgnostic) se[m] = forced ? positive_infinity : Selector::canonical(se[m]);
  }

  int n = 0;
  for (int m = 0; m < n_blocks; ++m) {
    if (is_forced_block(m, current, p)) {
      out[n++] = m;
      ws.mark[m] = 1;
    }
  }
  const int n_forced = n;

  // Appends the best `count` unmarked blocks by `score` to the selection.
  const auto take_best = [&](const float* score, int count) {
    if (count <= 0) return;
    int candidates = 0;
    for (int m = 0; m < n_blocks; ++m) {
      if (!ws.mark[m]) ws.order[candidates++] = m;
    }
    const int taken = std::min(count, candidates);
    std::partial_sort(ws.order, ws.order + taken, ws.order + candidates, [score](std::int32_t a, std::int32_t b) {
      return Selector::ranks_before(score[a], a, score[b], b);
    });
    for (int i = 0; i < taken; ++i) {
      out[n++] = ws.order[i];
      ws.mark[ws.order[i]] = 1;
    }
  };

  if constexpr (QueryAgnostic) {
    if (have_query) take_best(sq, p.top_k_query_aware - n_forced);
    take_best(se, p.top_k - n);
  } else if (have_query) {
    take_best(sq, p.top_k - n);
  }

  if (p.max_new_blocks != no_budget && resident.slot_map != nullptr) {
    int missing = 0;
    for (int i = 0; i < n; ++i) missing += resident.block_slot[out[i]] < 0;
    int excess = missing - p.max_new_blocks;
    int kept = n;
    if (excess > 0) {
      // Drop the lowest-ranked missing free picks, walking up from the end of the ranking.
      int dropped = 0;
      for (int i = n - 1; i >= n_forced && dropped < excess; --i) {
        if (resident.block_slot[out[i]] < 0) {
          ws.mark[out[i]] = 0;
          out[i] = -1;
          ++dropped;
        }
      }
      kept = 0;
      for (int i = 0; i < n; ++i) {
        if (out[i] >= 0) out[kept++] = out[i];
      }
      // Replace them with the best resident blocks outside the selection.
      const float* score = QueryAgnostic ? se : sq;
      int candidates = 0;
      for (int j = 0; j < resident.slots; ++j) {
        const std::int32_t b = resident.slot_map[j];
        if (b >= 0 && !ws.mark[b]) ws.order[candidates++] = b;
      }
      std::sort(ws.order, ws.order + candidates, [score](std::int32_t a, std::int32_t b) {
        return Selector::ranks_before(score[a], a, score[b], b);
      });
      for (int i = 0; i < candidates && i < dropped; ++i) {
        out[kept++] = ws.order[i];
        ws.mark[ws.order[i]] = 1;
      }
    }
    n = kept;
  }

  for (int i = 0; i < n; ++i) ws.mark[out[i]] = 0;
  return n;
}

}  // namespace nosa
