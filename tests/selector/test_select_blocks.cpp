// Selection on given block scores against the reference's naive rules: forced blocks, query-aware and
// query-agnostic top-k, tie-breaks and the hard budget, with scores drawn from a small set so that ties
// (finite and infinite) are everywhere.
#include <nosa/selector/select_blocks.hpp>
#include <nosa/selector/forced_topk.hpp>

#include "../reference/nosa_reference.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

namespace {

struct case_result {
  std::vector<int> ranked;
};

template <bool Agnostic>
void check_random_cases(int budget, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> level(0, 6);
  int compared = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    nosa::selection_params p;
    p.block_size = 16;
    p.n_init = static_cast<int>(rng() % 3);
    p.n_local = static_cast<int>(rng() % 4);
    p.top_k = p.forced_blocks() + static_cast<int>(rng() % 8);
    p.top_k_query_aware = static_cast<int>(rng() % (p.top_k + 1));
    p.max_new_blocks = budget;
    const int n_blocks = static_cast<int>(rng() % 40);
    const bool have_query = rng() % 5 != 0;

    std::vector<float> sq(static_cast<std::size_t>(n_blocks)), se(sq.size());
    for (int m = 0; m < n_blocks; ++m) {
      const int a = level(rng), b = level(rng);
      // A handful of levels, -inf and NaN: ties of every kind.
      sq[std::size_t(m)] = a == 0 ? nosa::negative_infinity : (a == 6 ? std::nanf("") : 0.25f * a);
      se[std::size_t(m)] = b == 0 ? nosa::negative_infinity : (b == 6 ? std::nanf("") : 0.5f * b - 1.0f);
    }
    // A resident set: a random previous selection of at most k blocks plus the current block.
    std::vector<std::int32_t> slot_map(static_cast<std::size_t>(p.top_k + 1), -1);
    std::vector<std::int32_t> block_slot(static_cast<std::size_t>(n_blocks), -1);
    std::vector<int> resident;
    for (int m = 0; m < n_blocks; ++m) {
      if (static_cast<int>(resident.size()) < p.top_k && rng() % 2) resident.push_back(m);
    }
    if (n_blocks > 0 && std::find(resident.begin(), resident.end(), n_blocks - 1) == resident.end()) {
      resident.push_back(n_blocks - 1);
    }
    for (std::size_t i = 0; i < resident.size(); ++i) {
      slot_map[i] = resident[i];
      block_slot[std::size_t(resident[i])] = static_cast<std::int32_t>(i);
    }
    std::sort(resident.begin(), resident.end());

    // Library.
    std::vector<float> lsq = sq, lse = se;
    std::vector<std::int32_t> order(sq.size()), mark(sq.size(), 0), out(static_cast<std::size_t>(p.top_k));
    const nosa::selection_workspace ws{lsq.data(), lse.data(), order.data(), mark.data()};
    const nosa::residency res{slot_map.data(), block_slot.data(), p.top_k + 1};
    const int n = nosa::select_blocks<nosa::forced_topk_selector, Agnostic>(p, n_blocks, have_query, ws, res,
                                                                            out.data());
    REQUIRE(std::all_of(mark.begin(), mark.end(), [](std::int32_t x) { return x == 0; }));

    // Reference.
    nosa_ref::config r;
    r.block = 16;
    r.topk = p.top_k;
    r.topk_qa = p.top_k_query_aware;
    r.n_init = p.n_init;
    r.n_local = p.n_local;
    r.budget = budget;
    r.query_agnostic = Agnostic;
    nosa_ref::block_scores bs;
    for (int m = 0; m < n_blocks; ++m) {
      bs.sq.push_back(have_query ? sq[std::size_t(m)] : -INFINITY);
      bs.se.push_back(se[std::size_t(m)]);
      bs.forced.push_back(nosa::is_forced_block(m, n_blocks - 1, p));
    }
    const nosa_ref::selection ref = nosa_ref::select(r, bs, &resident, have_query);
    std::vector<int> mine(out.begin(), out.begin() + n);
    INFO("trial " << trial << " M " << n_blocks << " k " << p.top_k << " k_qa " << p.top_k_query_aware);
    REQUIRE(mine == ref.ranked);
    ++compared;
    if (budget >= 0) {
      int misses = 0;
      int forced_misses = 0;
      for (int m : mine) {
        const bool miss = !std::binary_search(resident.begin(), resident.end(), m);
        misses += miss;
        forced_misses += miss && nosa::is_forced_block(m, n_blocks - 1, p);
      }
      REQUIRE(misses <= std::max(budget, forced_misses));
    }
  }
  CHECK(compared == 3000);
}

}  // namespace

TEST_CASE("NOSA selection equals the reference's ranked list, ties and NaN included") {
  check_random_cases<true>(nosa::no_budget, 1);
}

TEST_CASE("InfLLMv2 selection equals the reference's ranked list") { check_random_cases<false>(nosa::no_budget, 2); }

TEST_CASE_TEMPLATE("the hard budget drops the lowest-ranked misses and refills from resident blocks", B,
                   std::integral_constant<int, 0>, std::integral_constant<int, 1>, std::integral_constant<int, 3>) {
  check_random_cases<true>(B::value, 10 + B::value);
  check_random_cases<false>(B::value, 20 + B::value);
}

TEST_CASE("M <= k selects every block, in forced-then-score order") {
  nosa::selection_params p;  // k 64, k_qa 33, 1 sink, 16 local
  const int n_blocks = 40;
  std::vector<float> sq(n_blocks), se(n_blocks);
  for (int m = 0; m < n_blocks; ++m) {
    sq[std::size_t(m)] = static_cast<float>(m % 7);
    se[std::size_t(m)] = static_cast<float>(-m);
  }
  std::vector<std::int32_t> order(n_blocks), mark(n_blocks, 0), out(64);
  const int n = nosa::select_blocks<nosa::forced_topk_selector, true>(
      p, n_blocks, true, {sq.data(), se.data(), order.data(), mark.data()}, {}, out.data());
  REQUIRE(n == n_blocks);
  std::vector<int> sorted(out.begin(), out.begin() + n);
  std::sort(sorted.begin(), sorted.end());
  for (int m = 0; m < n_blocks; ++m) CHECK(sorted[std::size_t(m)] == m);
  CHECK(out[0] == 0);   // the sink first
  CHECK(out[1] == 23);  // then the local blocks 23 .. 39 in ascending order
}

TEST_CASE("the selector's 64-bit key orders blocks exactly as ranks_before") {
  using sel = nosa::forced_topk_selector;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> values = {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(), 1.0f, -1.0f,
                               std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min(),
                               std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(), 0.5f, 0.5f};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int i = 0; i < 200; ++i) values.push_back(normal(rng));
  const int blocks[] = {0, 1, 2, 17, 4095, 1 << 20};
  int pairs = 0;
  for (const float a : values) {
    for (const float b : values) {
      for (const int ia : blocks) {
        for (const int ib : blocks) {
          if (ia == ib) continue;
          const bool by_order = sel::ranks_before(sel::canonical(a), ia, sel::canonical(b), ib);
          const bool by_key = sel::sort_key(a, ia) > sel::sort_key(b, ib);
          INFO("a=" << a << " block " << ia << ", b=" << b << " block " << ib);
          REQUIRE(by_order == by_key);
          ++pairs;
        }
      }
    }
  }
  CHECK(pairs > 100000);
}
