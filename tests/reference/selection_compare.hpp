#pragma once
/// \file
/// Compares a selection computed with fp32 scores (the library) against the double-precision reference.
///
/// fp32 rounding can legitimately flip a near-tie: two blocks whose scores agree to ~1e-7 relative may
/// swap order, and with them membership at the boundary of a top-k. Such a difference is reported as
/// "equivalent up to near-ties" so tests can accept it while still failing on real disagreements.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "nosa_reference.hpp"

namespace nosa_ref {

/// Outcome of `compare_selection`.
struct compare_result {
  bool equal = false;                       ///< the two sets are identical
  bool equivalent_up_to_near_ties = false;  ///< equal, or every difference is a near-tie (see below)
  std::string message;                      ///< empty when equal; otherwise the differing blocks and scores
};

namespace compare_detail {

/// True when `a` and `b` agree within `abs_tol + rel_tol * max(|a|, |b|)`; equal infinities agree,
/// any other infinity agrees with nothing.
inline bool near(double a, double b, double rel_tol, double abs_tol) {
  if (a == b) return true;
  if (!std::isfinite(a) || !std::isfinite(b)) return false;
  return std::abs(a - b) <= abs_tol + rel_tol * std::max(std::abs(a), std::abs(b));
}

inline void describe(std::ostringstream& os, const selection& ref, const std::vector<int>& blocks) {
  os << '{';
  for (std::size_t i = 0; i < blocks.size(); ++i) {
    const int m = blocks[i];
    os << (i ? ", " : "") << m << " (sq=" << ref.sq[m] << ", se=" << ref.se_base[m];
    if (ref.forced[m]) os << ", forced";
    if (ref.query_aware[m]) os << ", in Q";
    os << ')';
  }
  os << '}';
}

}  // namespace compare_detail

/// Compares `got_ascending` (the library's selected blocks, strictly ascending) with `ref`.
///
/// Near-tie rule without a budget. A forced block is never a near-tie (forcing does not depend on any
/// score), and the two sets must have the same size. Every other block in the symmetric difference must
/// sit at a boundary that a rounding error could move:
/// - NOSA: its Sq is near the Sq of the lowest-ranked non-forced member of Q (a flip of the query-aware
///   top-k), or its Se (before the Q overwrite) is near the Se of the lowest-ranked selected block outside
///   Q (a flip of the query-agnostic top-k). A flip in Q cascades into Se, and each block of that cascade
///   is caught by one of the two tests.
/// - InfLLMv2 with a query: its Sq is near the Sq of the lowest-ranked non-forced selected block.
/// - InfLLMv2 without a query selects the forced blocks only, so no difference is a near-tie.
///
/// Near-tie rule when the reference ran the budget rule. Which blocks miss, get dropped and get replaced
/// all follow from rounding-sensitive orders, so no single boundary exists. The difference is accepted only
/// if every non-forced differing block has a partner on the other side of the difference that it could
/// have swapped with through rounding: InfLLMv2, a near-equal Sq; NOSA, a near-equal Se (before the
/// overwrite), or a near-equal Sq where one of the two is in the reference's Q.
inline compare_result compare_selection(const std::vector<int>& got_ascending, const selection& ref,
                                        double rel_tol = 1e-5, double abs_tol = 1e-6) {
  using compare_detail::near;
  compare_result result;
  const int M = ref.block_count();
  std::ostringstream os;
  os.precision(10);

  for (std::size_t i = 0; i < got_ascending.size(); ++i) {
    const int m = got_ascending[i];
    if (m < 0 || m >= M) {
      os << "got block " << m << " outside [0, " << M << ')';
      result.message = os.str();
      return result;
    }
    if (i > 0 && got_ascending[i - 1] >= m) {
      os << "got is not strictly ascending at position " << i;
      result.message = os.str();
      return result;
    }
  }

  std::vector<int> only_got;
  std::vector<int> only_ref;
  std::set_difference(got_ascending.begin(), got_ascending.end(), ref.ascending.begin(), ref.ascending.end(),
                      std::back_inserter(only_got));
  std::set_difference(ref.ascending.begin(), ref.ascending.end(), got_ascending.begin(), got_ascending.end(),
                      std::back_inserter(only_ref));
  if (only_got.empty() && only_ref.empty()) {
    result.equal = true;
    result.equivalent_up_to_near_ties = true;
    return result;
  }

  os << "selection differs: only in got ";
  compare_detail::describe(os, ref, only_got);
  os << ", only in reference ";
  compare_detail::describe(os, ref, only_ref);

  std::vector<int> differing = only_got;
  differing.insert(differing.end(), only_ref.begin(), only_ref.end());
  const bool forced_differs = std::any_of(differing.begin(), differing.end(),
                                          [&](int m) { return static_cast<bool>(ref.forced[m]); });

  bool equivalent = !forced_differs;
  if (forced_differs) {
    os << "; a forced block differs";
  } else if (ref.budget_checked) {
    const auto interchangeable = [&](int a, int b) {
      if (!ref.query_agnostic) return near(ref.sq[a], ref.sq[b], rel_tol, abs_tol);
      // Sq matters to NOSA only at the boundary of Q, which a swap crosses with a member of Q; outside Q,
      // tiny window probabilities are all "near" each other and would excuse anything.
      const bool sq_swap =
          (ref.query_aware[a] || ref.query_aware[b]) && near(ref.sq[a], ref.sq[b], rel_tol, abs_tol);
      return sq_swap || near(ref.se_base[a], ref.se_base[b], rel_tol, abs_tol);
    };
    const auto has_partner = [&](int m, const std::vector<int>& other) {
      return std::any_of(other.begin(), other.end(), [&](int n) { return interchangeable(m, n); });
    };
    for (int m : only_got) equivalent = equivalent && has_partner(m, only_ref);
    for (int m : only_ref) equivalent = equivalent && has_partner(m, only_got);
    os << "; budget rule active: "
       << (equivalent ? "each block has a near-equal partner" : "no near-equal partner");
  } else if (got_ascending.size() != ref.ascending.size()) {
    equivalent = false;
    os << "; sizes differ (" << got_ascending.size() << " vs " << ref.ascending.size() << ')';
  } else {
    // Boundary scores of the reference: the lowest-ranked member of each group of `ranked`.
    bool have_q_boundary = false;
    bool have_s_boundary = false;
    double q_boundary = 0.0;
    double s_boundary = 0.0;
    for (int m : ref.ranked) {
      if (ref.forced[m]) continue;
      if (ref.query_agnostic && ref.query_aware[m]) {
        have_q_boundary = true;
        q_boundary = ref.sq[m];
      } else if (ref.query_agnostic) {
        have_s_boundary = true;
        s_boundary = ref.se_base[m];
      } else {
        have_q_boundary = true;
        q_boundary = ref.sq[m];
      }
    }
    for (int m : differing) {
      const bool q_tie = have_q_boundary && near(ref.sq[m], q_boundary, rel_tol, abs_tol);
      const bool s_tie = have_s_boundary && near(ref.se_base[m], s_boundary, rel_tol, abs_tol);
      equivalent = equivalent && (q_tie || s_tie);
    }
    os << "; boundaries:";
    if (have_q_boundary) os << " sq=" << q_boundary;
    if (have_s_boundary) os << " se=" << s_boundary;
    if (!have_q_boundary && !have_s_boundary) os << " none";
    os << (equivalent ? " (near-ties)" : " (not near-ties)");
  }

  result.equivalent_up_to_near_ties = equivalent;
  result.message = os.str();
  return result;
}

}  // namespace nosa_ref
