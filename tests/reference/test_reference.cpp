// Tests of the independent reference itself, against cases small enough to compute by hand. The library
// tests trust this reference, so every rule it implements is pinned here by at least one worked example.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reference/nosa_reference.hpp"
#include "reference/prefill_reference.hpp"
#include "reference/selection_compare.hpp"

namespace {

using nosa_ref::config;
using nosa_ref::history;
using std::vector;

constexpr double inf = std::numeric_limits<double>::infinity();

/// Deterministic uniform numbers in [-1, 1), identical on every platform (unlike std distributions).
struct uniform_source {
  std::uint64_t state;
  double next() {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(state >> 11) * 0x1.0p-52 - 1.0;
  }
  vector<double> vec(std::size_t n) {
    vector<double> out(n);
    for (double& x : out) x = next();
    return out;
  }
};

/// A config whose windows coincide with blocks (l_c = s_c = b_s = 4), so Sq[m] = P[m] and Se[m] = cc[m]:
/// scores can be read off the inputs directly.
config aligned_config() {
  config cfg;
  cfg.block = 4;
  cfg.window = 4;
  cfg.stride = 4;
  cfg.n_init = 0;
  cfg.n_local = 0;
  cfg.topk = 4;
  cfg.topk_qa = 2;
  cfg.head_dim = 2;
  cfg.group = 1;
  return cfg;
}

/// `length` tokens where every token of block m has key (key_x[m], 0, ...), value 0 and score c[m].
history blockwise_history(const config& cfg, int length, const vector<double>& key_x,
                          const vector<double>& c) {
  history h(cfg);
  vector<double> k(static_cast<std::size_t>(cfg.head_dim), 0.0);
  const vector<double> v(static_cast<std::size_t>(cfg.head_dim), 0.0);
  for (int j = 0; j < length; ++j) {
    k[0] = key_x[static_cast<std::size_t>(j / cfg.block)];
    h.append(k.data(), v.data(), c[static_cast<std::size_t>(j / cfg.block)]);
  }
  return h;
}

/// The hand example used by several tests: 8 blocks of 4 tokens; the query (1, 0) favours blocks 5, 3, 6
/// in that order (all others tie); eviction scores fall from 0.9 (block 0) to 0.2 (block 7).
struct hand_example {
  config cfg = aligned_config();
  vector<double> key_x{0, 0, 0, 5, 0, 10, 3, 0};
  vector<double> c{0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2};
  vector<double> q{1.0, 0.0};  // [G=1][D=2]

  nosa_ref::selection run(const vector<int>* resident = nullptr) const {
    const history h = blockwise_history(cfg, 32, key_x, c);
    return nosa_ref::select(cfg, nosa_ref::scores(cfg, h, q.data(), true), resident, true);
  }
};

vector<int> iota_blocks(int first, int last) {
  vector<int> out;
  for (int m = first; m < last; ++m) out.push_back(m);
  return out;
}

vector<int> forced_blocks(const vector<bool>& forced) {
  vector<int> out;
  for (std::size_t m = 0; m < forced.size(); ++m) {
    if (forced[m]) out.push_back(static_cast<int>(m));
  }
  return out;
}

}  // namespace

TEST_CASE("window_count is (L - l_c) / s_c + 1 once a window is complete") {
  const config cfg;  // l_c = 32, s_c = 16
  CHECK(nosa_ref::window_count(0, cfg) == 0);
  CHECK(nosa_ref::window_count(31, cfg) == 0);
  CHECK(nosa_ref::window_count(32, cfg) == 1);
  CHECK(nosa_ref::window_count(47, cfg) == 1);
  CHECK(nosa_ref::window_count(48, cfg) == 2);
  CHECK(nosa_ref::window_count(100, cfg) == 5);  // windows start at 0, 16, 32, 48, 64; 80 + 32 > 100

  // The history's memoized windows agree with the formula as tokens arrive.
  config small;
  small.head_dim = 1;
  small.window = 5;
  small.stride = 3;
  history h(small);
  const double zero = 0.0;
  for (int L = 1; L <= 40; ++L) {
    h.append(&zero, &zero, 0.0);
    CHECK(h.window_count() == nosa_ref::window_count(L, small));
  }
}

TEST_CASE("compressed keys and scores are the means over each window") {
  config cfg;
  cfg.head_dim = 2;
  cfg.window = 3;
  cfg.stride = 2;
  history h(cfg);
  for (int j = 0; j < 7; ++j) {
    const double k[2] = {static_cast<double>(j), static_cast<double>(j * j)};
    const double v[2] = {0.0, 0.0};
    h.append(k, v, 10.0 * j);
  }
  REQUIRE(h.window_count() == 3);  // windows [0,3), [2,5), [4,7)
  CHECK(h.compressed_key(1)[0] == doctest::Approx((2.0 + 3.0 + 4.0) / 3.0));
  CHECK(h.compressed_key(1)[1] == doctest::Approx((4.0 + 9.0 + 16.0) / 3.0));
  CHECK(h.compressed_score(2) == doctest::Approx((40.0 + 50.0 + 60.0) / 3.0));
}

TEST_CASE("rounding to bf16 and fp16 is to nearest, ties to even, down to the subnormals") {
  // bf16: 8 significant bits. 1 + 2^-8 is halfway between 1 and 1 + 2^-7: the even one (1) wins; 1 + 3 * 2^-8
  // is halfway between 1 + 2^-7 and 1 + 2^-6: the even one (1 + 2^-6) wins.
  CHECK(nosa_ref::round_to_format(1.0 + 0x1p-8, 7, -126) == 1.0);
  CHECK(nosa_ref::round_to_format(1.0 + 3 * 0x1p-8, 7, -126) == 1.0 + 0x1p-6);
  CHECK(nosa_ref::round_to_format(1.0 + 0x1p-8 + 0x1p-20, 7, -126) == 1.0 + 0x1p-7);
  CHECK(nosa_ref::round_to_format(-3.0 - 0x1p-7, 7, -126) == -3.0);
  // fp16: 11 significant bits; subnormals are multiples of 2^-24.
  CHECK(nosa_ref::round_to_format(1.0 + 0x1p-11, 10, -14) == 1.0);
  CHECK(nosa_ref::round_to_format(1.0 + 3 * 0x1p-11, 10, -14) == 1.0 + 0x1p-9);
  CHECK(nosa_ref::round_to_format(3 * 0x1p-26, 10, -14) == 0x1p-24);
  CHECK(nosa_ref::round_to_format(0x1p-25, 10, -14) == 0.0);
}

TEST_CASE("compressed keys in the element type: the fp32 mean, rounded once") {
  // Keys whose fp32 sum is not a bf16 or fp16 value: the stored key is the fp32 mean, rounded once.
  for (const nosa_ref::key_storage storage :
       {nosa_ref::key_storage::fp32, nosa_ref::key_storage::bf16, nosa_ref::key_storage::fp16}) {
    config cfg;
    cfg.head_dim = 1;
    cfg.window = 3;
    cfg.stride = 3;
    cfg.compressed_keys = storage;
    history h(cfg);
    const double keys[3] = {1.0, 0.0078125, 0.0009765625};  // 1, 2^-7, 2^-10: exact in bf16 and fp16
    for (const double k : keys) {
      const double v = 0.0;
      h.append(&k, &v, 0.0);
    }
    REQUIRE(h.window_count() == 1);
    const float mean = (1.0f + 0.0078125f + 0.0009765625f) / 3.0f;
    const double expect = storage == nosa_ref::key_storage::fp32   ? double(mean)
                          : storage == nosa_ref::key_storage::bf16 ? nosa_ref::round_to_format(mean, 7, -126)
                                                                   : nosa_ref::round_to_format(mean, 10, -14);
    CHECK(h.compressed_key(0)[0] == expect);
    if (storage != nosa_ref::key_storage::fp32) CHECK(h.compressed_key(0)[0] != double(mean));
  }
}

TEST_CASE("with the defaults, block m is overlapped by windows 4m-1 .. 4m+3") {
  const config cfg;
  for (int m = 0; m < 50; ++m) {
    vector<int> overlapping;
    for (int w = 0; w < 400; ++w) {
      if (nosa_ref::window_overlaps_block(w, m, cfg)) overlapping.push_back(w);
    }
    CAPTURE(m);
    CHECK(overlapping == iota_blocks(std::max(0, 4 * m - 1), 4 * m + 4));
    const nosa_ref::window_range r = nosa_ref::overlapping_windows(m, 400, cfg);
    CHECK(r.first == std::max(0, 4 * m - 1));
    CHECK(r.last == 4 * m + 4);
  }
  // Only existing windows count.
  const nosa_ref::window_range r = nosa_ref::overlapping_windows(10, 41, cfg);
  CHECK(r.first == 39);
  CHECK(r.last == 41);
}

TEST_CASE("overlapping_windows matches the overlap predicate on geometries that do not divide") {
  struct geometry {
    int block, window, stride;
  };
  const geometry geometries[] = {{64, 32, 16}, {4, 4, 4},  {10, 7, 3}, {4, 8, 2},   {4, 2, 8},
                                 {3, 12, 5},   {16, 1, 1}, {5, 5, 7},  {7, 64, 64}, {1, 3, 2}};
  for (const geometry& g : geometries) {
    config cfg;
    cfg.block = g.block;
    cfg.window = g.window;
    cfg.stride = g.stride;
    for (int n_windows = 0; n_windows < 40; n_windows += 3) {
      for (int m = 0; m < 40; ++m) {
        vector<int> expected;
        for (int w = 0; w < n_windows; ++w) {
          if (nosa_ref::window_overlaps_block(w, m, cfg)) expected.push_back(w);
        }
        const nosa_ref::window_range r = nosa_ref::overlapping_windows(m, n_windows, cfg);
        vector<int> got;
        for (int w = r.first; w < r.last; ++w) got.push_back(w);
        CAPTURE(g.block);
        CAPTURE(g.window);
        CAPTURE(g.stride);
        CAPTURE(n_windows);
        CAPTURE(m);
        CHECK(got == expected);
      }
    }
  }
}

TEST_CASE("with the defaults at M = 40 the forced blocks are {0} and 23..39") {
  config cfg;
  cfg.head_dim = 1;  // forcing does not depend on D; keep the history small
  history h(cfg);
  const double zero = 0.0;
  for (int j = 0; j < 39 * 64 + 1; ++j) h.append(&zero, &zero, 0.0);
  const nosa_ref::block_scores s = nosa_ref::scores(cfg, h, nullptr, false);
  REQUIRE(s.block_count() == 40);
  vector<int> expected{0};
  for (int m = 23; m < 40; ++m) expected.push_back(m);
  CHECK(forced_blocks(s.forced) == expected);
  CHECK(expected.size() == 18);
}

TEST_CASE("block scores of the hand example") {
  const hand_example ex;
  const history h = blockwise_history(ex.cfg, 32, ex.key_x, ex.c);
  const nosa_ref::block_scores s = nosa_ref::scores(ex.cfg, h, ex.q.data(), true);
  REQUIRE(s.block_count() == 8);
  // P[w] = exp(a_w / sqrt 2) / sum; five windows have a = 0.
  const double r = 1.0 / std::sqrt(2.0);
  const double sum = 5.0 + std::exp(5.0 * r) + std::exp(10.0 * r) + std::exp(3.0 * r);
  CHECK(s.sq[5] == doctest::Approx(std::exp(10.0 * r) / sum));
  CHECK(s.sq[3] == doctest::Approx(std::exp(5.0 * r) / sum));
  CHECK(s.sq[0] == doctest::Approx(1.0 / sum));
  for (int m = 0; m < 8; ++m) CHECK(s.se[m] == doctest::Approx(ex.c[static_cast<std::size_t>(m)]));
  CHECK(forced_blocks(s.forced) == vector<int>{7});

  // Without a query Sq is -inf everywhere; Se is unchanged.
  const nosa_ref::block_scores no_query = nosa_ref::scores(ex.cfg, h, nullptr, false);
  for (int m = 0; m < 8; ++m) CHECK(no_query.sq[m] == -inf);
  CHECK(no_query.se == s.se);

  // With G = 2 the per-head probabilities add up: the second head (0, 1) sees equal logits everywhere.
  config two_heads = ex.cfg;
  two_heads.group = 2;
  const vector<double> q2{1.0, 0.0, 0.0, 1.0};
  const nosa_ref::block_scores s2 = nosa_ref::scores(two_heads, h, q2.data(), true);
  CHECK(s2.sq[5] == doctest::Approx(std::exp(10.0 * r) / sum + 1.0 / 8.0));
  CHECK(s2.sq[1] == doctest::Approx(1.0 / sum + 1.0 / 8.0));

  // Blocks that no existing window overlaps score -inf: a partial tail block here.
  const history partial = blockwise_history(ex.cfg, 30, ex.key_x, ex.c);
  const nosa_ref::block_scores sp = nosa_ref::scores(ex.cfg, partial, ex.q.data(), true);
  REQUIRE(sp.block_count() == 8);
  CHECK(sp.sq[7] == -inf);
  CHECK(sp.se[7] == -inf);
  CHECK(sp.forced[7]);
}

TEST_CASE("NOSA and InfLLMv2 on the hand example") {
  hand_example ex;
  SUBCASE("NOSA: forced, then the query-aware pick, then the highest eviction scores") {
    const nosa_ref::selection sel = ex.run();
    CHECK(sel.ranked == vector<int>{7, 5, 0, 1});
    CHECK(sel.ascending == vector<int>{0, 1, 5, 7});
    CHECK(sel.forced_count == 1);
    CHECK(sel.se[5] == inf);  // Q overwrite
    CHECK(sel.se_base[5] == doctest::Approx(0.4));
    CHECK(sel.query_aware[5]);
    CHECK(sel.query_aware[7]);
    CHECK(sel.decisive == sel.se);
  }
  SUBCASE("InfLLMv2: forced, then Sq order") {
    ex.cfg.query_agnostic = false;
    const nosa_ref::selection sel = ex.run();
    CHECK(sel.ranked == vector<int>{7, 5, 3, 6});
    CHECK(sel.decisive == sel.sq);
    CHECK(std::none_of(sel.query_aware.begin(), sel.query_aware.end(), [](bool b) { return b; }));
  }
  SUBCASE("k_qa = k: the query alone decides") {
    ex.cfg.topk_qa = 4;
    CHECK(ex.run().ranked == vector<int>{7, 5, 3, 6});
  }
  SUBCASE("k_qa below the forced count: Q is the lowest forced blocks, S still holds all of them") {
    ex.cfg.n_local = 3;  // forced {4, 5, 6, 7}
    ex.cfg.topk = 5;
    ex.cfg.topk_qa = 2;
    const nosa_ref::selection sel = ex.run();
    CHECK(sel.ranked == vector<int>{4, 5, 6, 7, 0});
    CHECK(sel.forced_count == 4);
    CHECK(sel.query_aware[4]);
    CHECK(sel.query_aware[5]);
    CHECK_FALSE(sel.query_aware[6]);
  }
  SUBCASE("sink and local blocks") {
    ex.cfg.n_init = 2;
    ex.cfg.n_local = 1;
    ex.cfg.topk = 6;
    ex.cfg.topk_qa = 5;  // forced {0, 1, 6, 7}, one free query pick
    const nosa_ref::selection sel = ex.run();
    CHECK(sel.ranked == vector<int>{0, 1, 6, 7, 5, 2});
    CHECK(sel.forced_count == 4);
  }
}

TEST_CASE("ties go to the lower block index") {
  hand_example ex;
  ex.key_x.assign(8, 0.0);  // every Sq equal
  ex.c = {0.5, 0.9, 0.5, 0.9, 0.5, 0.9, 0.5, 0.2};
  SUBCASE("equal Se") {
    ex.cfg.topk = 3;
    ex.cfg.topk_qa = 1;  // Q = {current block}
    CHECK(ex.run().ranked == vector<int>{7, 1, 3});
  }
  SUBCASE("equal Sq in Q, then equal Se") {
    ex.cfg.topk = 4;
    ex.cfg.topk_qa = 3;  // Q = {7, 0, 1}
    CHECK(ex.run().ranked == vector<int>{7, 0, 1, 3});
  }
  SUBCASE("equal Sq in InfLLMv2") {
    ex.cfg.query_agnostic = false;
    ex.cfg.topk = 3;
    CHECK(ex.run().ranked == vector<int>{7, 0, 1});
  }
  SUBCASE("order::topk on infinities") {
    const vector<double> s{-inf, inf, 1.0, inf, -inf, 1.0};
    CHECK(nosa_ref::order::topk(s, 6) == vector<int>{1, 3, 2, 5, 0, 4});
    CHECK(nosa_ref::order::topk(s, 3) == vector<int>{1, 3, 2});
    CHECK(nosa_ref::order::topk(s, 100).size() == 6);
    CHECK(nosa_ref::order::topk(s, 0).empty());
  }
}

TEST_CASE("NaN scores rank as -inf") {
  const config cfg = aligned_config();
  nosa_ref::block_scores s;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  s.sq = {0.1, nan, 0.3, -inf, 0.2, 0.0};
  s.se = {nan, 0.5, -inf, 0.4, 0.3, 0.0};
  s.forced = {false, false, false, false, false, true};
  const nosa_ref::selection sel = nosa_ref::select(cfg, s, nullptr, true);
  // Q = {5, 2}; then Se: 1 (0.5), 3 (0.4) ... 0 (NaN) ranks with the -inf block 2, but 2 is in Q.
  CHECK(sel.ranked == vector<int>{5, 2, 1, 3});
  CHECK(sel.sq[1] == -inf);
  CHECK(sel.se_base[0] == -inf);
}

TEST_CASE("M <= k selects every block") {
  uniform_source rng{42};
  struct geometry {
    int block, window, stride;
  };
  // The last geometry leaves blocks that no window ever overlaps (Se = Sq = -inf); they are still selected.
  const geometry geometries[] = {{4, 4, 4}, {4, 8, 2}, {10, 7, 3}, {4, 2, 12}};
  for (const geometry& g : geometries) {
    for (const bool agnostic : {true, false}) {
      config cfg;
      cfg.block = g.block;
      cfg.window = g.window;
      cfg.stride = g.stride;
      cfg.topk = 8;
      cfg.topk_qa = 3;
      cfg.n_init = 1;
      cfg.n_local = 1;
      cfg.head_dim = 3;
      cfg.group = 2;
      cfg.query_agnostic = agnostic;
      history h(cfg);
      for (int L = 1; L <= 8 * g.block; ++L) {
        const vector<double> k = rng.vec(3), v = rng.vec(3);
        h.append(k.data(), v.data(), rng.next());
        const vector<double> q = rng.vec(6);
        const nosa_ref::selection sel =
            nosa_ref::select(cfg, nosa_ref::scores(cfg, h, q.data(), true), nullptr, true);
        CAPTURE(L);
        CHECK(sel.ascending == iota_blocks(0, nosa_ref::block_count(L, cfg)));
      }
    }
  }
}

TEST_CASE("attention over three blocks, by hand, in all three bias modes") {
  config cfg;
  cfg.block = 2;
  cfg.window = 2;
  cfg.stride = 2;
  cfg.head_dim = 2;
  cfg.group = 2;
  history h(cfg);
  // Tokens 0..4; block 1 (tokens 2, 3) has extreme values so that attending to it by mistake shows.
  const double k[5][2] = {{1, 0}, {0, 2}, {3, 3}, {-3, 1}, {1, 1}};
  const double v[5][2] = {{1, 0}, {0, 1}, {9, 9}, {-9, 9}, {2, 3}};
  const double c[5] = {0.3, -0.2, 5.0, 5.0, 1.0};
  for (int j = 0; j < 5; ++j) h.append(k[j], v[j], c[j]);
  const double q[2][2] = {{0.5, -1.0}, {0.0, 1.0}};
  const double r = 1.0 / std::sqrt(2.0);

  // Softmax over tokens 0, 1, 4 given their logits, for output coordinate d.
  const auto expected = [&](double l0, double l1, double l4, int d) {
    const double e0 = std::exp(l0), e1 = std::exp(l1), e4 = std::exp(l4);
    return (e0 * v[0][d] + e1 * v[1][d] + e4 * v[4][d]) / (e0 + e1 + e4);
  };
  // q.k for head 0: 0.5, -2, -0.5; for head 1: 0, 2, 1.
  const double dots[2][3] = {{0.5, -2.0, -0.5}, {0.0, 2.0, 1.0}};

  for (const nosa_ref::bias_mode mode :
       {nosa_ref::bias_mode::after_scale, nosa_ref::bias_mode::before_scale, nosa_ref::bias_mode::none}) {
    cfg.bias = mode;
    double o[2][2];
    nosa_ref::attend(cfg, h, &q[0][0], {2, 0}, 5, &o[0][0]);
    for (int g = 0; g < 2; ++g) {
      double l[3];
      const double cs[3] = {c[0], c[1], c[4]};
      for (int i = 0; i < 3; ++i) {
        switch (mode) {
        case nosa_ref::bias_mode::after_scale:
          l[i] = dots[g][i] * r + cs[i];
          break;
        case nosa_ref::bias_mode::before_scale:
          l[i] = (dots[g][i] + cs[i]) * r;
          break;
        case nosa_ref::bias_mode::none:
          l[i] = dots[g][i] * r;
          break;
        }
      }
      for (int d = 0; d < 2; ++d) {
        CAPTURE(g);
        CAPTURE(d);
        CHECK(o[g][d] == doctest::Approx(expected(l[0], l[1], l[2], d)).epsilon(1e-14));
      }
    }
  }

  // Two tokens in the example by explicit numbers, head 0, after_scale:
  // logits 0.5/sqrt2 + 0.3 and -2/sqrt2 - 0.2 over v0 = (1, 0), v1 = (0, 1).
  cfg.bias = nosa_ref::bias_mode::after_scale;
  double o2[2][2];
  nosa_ref::attend(cfg, h, &q[0][0], {0}, 5, &o2[0][0]);
  const double w0 = std::exp(0.5 * r + 0.3), w1 = std::exp(-2.0 * r - 0.2);
  CHECK(o2[0][0] == doctest::Approx(w0 / (w0 + w1)).epsilon(1e-14));
  CHECK(o2[0][1] == doctest::Approx(w1 / (w0 + w1)).epsilon(1e-14));

  // The partial tail alone is one token: the output is its value exactly. No blocks: zeros.
  double o1[2][2];
  nosa_ref::attend(cfg, h, &q[0][0], {2}, 5, &o1[0][0]);
  CHECK(o1[1][0] == 2.0);
  CHECK(o1[1][1] == 3.0);
  nosa_ref::attend(cfg, h, &q[0][0], {}, 5, &o1[0][0]);
  CHECK(o1[0][0] == 0.0);
  // A shorter length hides later tokens: block 1 then holds token 2 only.
  nosa_ref::attend(cfg, h, &q[0][0], {1}, 3, &o1[0][0]);
  CHECK(o1[0][0] == 9.0);
  CHECK_THROWS_AS(nosa_ref::attend(cfg, h, &q[0][0], {3}, 5, &o1[0][0]), std::invalid_argument);
  CHECK_THROWS_AS(nosa_ref::attend(cfg, h, &q[0][0], {0, 0}, 5, &o1[0][0]), std::invalid_argument);
}

TEST_CASE("hard budget drops the lowest-ranked misses and refills from resident blocks") {
  hand_example ex;  // unbudgeted NOSA selection: ranked {7, 5, 0, 1}
  SUBCASE("budget 1 with resident {2, 3, 6, 7}: misses 5, 0, 1; 1 and 0 give way to 2 and 3") {
    ex.cfg.budget = 1;
    const vector<int> resident{2, 3, 6, 7};
    const nosa_ref::selection sel = ex.run(&resident);
    CHECK(sel.budget_checked);
    CHECK(sel.dropped == vector<int>{1, 0});
    CHECK(sel.replacements == vector<int>{2, 3});
    CHECK(sel.ranked == vector<int>{7, 5, 2, 3});
    CHECK(sel.ascending == vector<int>{2, 3, 5, 7});
  }
  SUBCASE("budget 0: even the query-aware pick goes; replacements by Se") {
    ex.cfg.budget = 0;
    const vector<int> resident{2, 3, 6, 7};
    const nosa_ref::selection sel = ex.run(&resident);
    CHECK(sel.dropped == vector<int>{1, 0, 5});
    CHECK(sel.replacements == vector<int>{2, 3, 6});
    CHECK(sel.ranked == vector<int>{7, 2, 3, 6});
  }
  SUBCASE("too few resident candidates: the selection shrinks") {
    ex.cfg.budget = 0;
    const vector<int> resident{7};
    const nosa_ref::selection sel = ex.run(&resident);
    CHECK(sel.ranked == vector<int>{7});
  }
  SUBCASE("forced blocks are never dropped, even when they alone exceed the budget") {
    ex.cfg.budget = 0;
    const vector<int> resident{0, 1, 2, 3};
    const nosa_ref::selection sel = ex.run(&resident);
    CHECK(sel.dropped == vector<int>{5});
    CHECK(sel.replacements == vector<int>{2});
    CHECK(sel.ranked == vector<int>{7, 0, 1, 2});  // 7 still misses
  }
  SUBCASE("budget equal to the misses, no resident set, or a negative budget: no change") {
    const vector<int> resident{2, 3, 6, 7};
    ex.cfg.budget = 3;
    CHECK(ex.run(&resident).ranked == vector<int>{7, 5, 0, 1});
    CHECK(ex.run(&resident).dropped.empty());
    ex.cfg.budget = 0;
    CHECK(ex.run(nullptr).ranked == vector<int>{7, 5, 0, 1});
    CHECK_FALSE(ex.run(nullptr).budget_checked);
    ex.cfg.budget = -1;
    CHECK(ex.run(&resident).ranked == vector<int>{7, 5, 0, 1});
  }
  SUBCASE("InfLLMv2: replacements by Sq, ties to the lower index") {
    ex.cfg.query_agnostic = false;  // unbudgeted: {7, 5, 3, 6}
    ex.cfg.budget = 0;
    const vector<int> resident{0, 1, 2, 3, 6, 7};
    const nosa_ref::selection sel = ex.run(&resident);
    CHECK(sel.dropped == vector<int>{5});
    CHECK(sel.replacements == vector<int>{0});
    CHECK(sel.ranked == vector<int>{7, 3, 6, 0});
  }
}

TEST_CASE("without a query") {
  const hand_example ex;
  const history h = blockwise_history(ex.cfg, 32, ex.key_x, ex.c);
  const nosa_ref::block_scores s = nosa_ref::scores(ex.cfg, h, nullptr, false);
  SUBCASE("NOSA: Q is the forced set, the rest by Se") {
    CHECK(nosa_ref::select(ex.cfg, s, nullptr, false).ranked == vector<int>{7, 0, 1, 2});
  }
  SUBCASE("InfLLMv2: the forced blocks only") {
    config cfg = ex.cfg;
    cfg.query_agnostic = false;
    cfg.n_init = 1;
    const nosa_ref::selection sel =
        nosa_ref::select(cfg, nosa_ref::scores(cfg, h, nullptr, false), nullptr, false);
    CHECK(sel.ranked == vector<int>{0, 7});
    CHECK(sel.forced_count == 2);
  }
}

TEST_CASE("head_sim: an empty prompt, then decode steps") {
  config cfg;
  cfg.block = 4;
  cfg.window = 4;
  cfg.stride = 2;
  cfg.topk = 5;
  cfg.topk_qa = 4;
  cfg.n_init = 1;
  cfg.n_local = 1;
  cfg.head_dim = 4;
  cfg.group = 2;
  nosa_ref::head_sim sim(cfg);
  const nosa_ref::selection first = sim.ingest(nullptr, nullptr, nullptr, 0);
  CHECK(first.ranked.empty());
  CHECK(sim.length() == 0);
  CHECK(sim.block_count() == 0);
  CHECK(sim.resident().empty());

  uniform_source rng{7};
  vector<int> previous;
  for (int t = 0; t < 60; ++t) {
    const vector<double> q = rng.vec(8), k = rng.vec(4), v = rng.vec(4);
    const nosa_ref::step_result r = sim.step(q.data(), k.data(), v.data(), rng.next());
    const int M = t / cfg.block + 1;
    CAPTURE(t);
    REQUIRE(sim.length() == t + 1);
    REQUIRE(sim.block_count() == M);
    CHECK(r.sel.ascending.size() == static_cast<std::size_t>(std::min(cfg.topk, M)));
    vector<int> forced;
    for (int m = 0; m < M; ++m) {
      if (m < 1 || m >= M - 2) forced.push_back(m);
    }
    CHECK(forced_blocks(r.sel.forced) == forced);
    CHECK(r.forced_count == static_cast<int>(forced.size()));
    CHECK(std::includes(r.sel.ascending.begin(), r.sel.ascending.end(), forced.begin(), forced.end()));

    // Misses against the previous selection plus the tail block, counted independently.
    vector<int> before = previous;
    if (!std::binary_search(before.begin(), before.end(), M - 1)) before.push_back(M - 1);
    int misses = 0;
    for (int m : r.sel.ascending) misses += std::count(before.begin(), before.end(), m) ? 0 : 1;
    CHECK(r.misses == misses);
    if (t == 0) {
      CHECK(r.sel.ascending == vector<int>{0});
      CHECK(r.misses == 0);
      for (int g = 0; g < 2; ++g) {
        for (int d = 0; d < 4; ++d)
          CHECK(r.o[static_cast<std::size_t>(g * 4 + d)] == v[static_cast<std::size_t>(d)]);
      }
    }

    vector<double> o(8);
    nosa_ref::attend(cfg, sim.history(), q.data(), r.sel.ascending, sim.length(), o.data());
    CHECK(r.o == o);
    CHECK(sim.resident() == r.sel.ascending);
    previous = r.sel.ascending;
  }
}

TEST_CASE("head_sim: NOSA misses stay within the free query-aware picks; a budget caps them") {
  config cfg;
  cfg.block = 8;
  cfg.window = 4;
  cfg.stride = 2;
  cfg.topk = 12;
  cfg.topk_qa = 7;
  cfg.n_init = 1;
  cfg.n_local = 2;
  cfg.head_dim = 8;
  cfg.group = 2;
  for (const int budget : {-1, 2, 0}) {
    config c = cfg;
    c.budget = budget;
    nosa_ref::head_sim sim(c);
    uniform_source rng{11};
    const int prompt = 150;
    const vector<double> k = rng.vec(prompt * 8), v = rng.vec(prompt * 8), s = rng.vec(prompt);
    const nosa_ref::selection initial = sim.ingest(k.data(), v.data(), s.data(), prompt);
    CHECK(initial.ascending.size() == 12);
    int max_misses = 0;
    for (int t = 0; t < 400; ++t) {
      const vector<double> q = rng.vec(16), kt = rng.vec(8), vt = rng.vec(8);
      const nosa_ref::step_result r = sim.step(q.data(), kt.data(), vt.data(), rng.next());
      CAPTURE(budget);
      CAPTURE(t);
      // Complete windows never change and new ones only touch forced blocks, so only free query-aware
      // picks (k_qa - forced = 3) can be new. A budget can only lower that, and keeps |S| = k because
      // the resident set always has enough candidates.
      CHECK(r.misses <= c.topk_qa - r.forced_count);
      if (budget >= 0) CHECK(r.misses <= budget);
      CHECK(r.sel.ascending.size() == 12);
      max_misses = std::max(max_misses, r.misses);
    }
    if (budget != 0) CHECK(max_misses > 0);  // the data does exercise loads
  }
}

TEST_CASE("head_sim: an InfLLMv2 prompt leaves only forced blocks resident") {
  config cfg;
  cfg.block = 4;
  cfg.window = 4;
  cfg.stride = 2;
  cfg.topk = 6;
  cfg.topk_qa = 6;
  cfg.n_init = 1;
  cfg.n_local = 1;
  cfg.head_dim = 2;
  cfg.query_agnostic = false;
  cfg.budget = 1;
  nosa_ref::head_sim sim(cfg);
  uniform_source rng{3};
  const vector<double> k = rng.vec(80), v = rng.vec(80), s = rng.vec(40);
  CHECK(sim.ingest(k.data(), v.data(), s.data(), 40).ascending == vector<int>{0, 8, 9});
  const vector<double> q = rng.vec(2), kt = rng.vec(2), vt = rng.vec(2);
  const nosa_ref::step_result r = sim.step(q.data(), kt.data(), vt.data(), 0.0);
  // Block 10 is the new tail and block 8 stays resident from the prompt. Of the free picks only one may
  // load; at most one resident block (8) can stand in for the others, so S ends one short of k.
  CHECK(r.misses == 1);
  CHECK(r.sel.ascending.size() == 5);
  CHECK(r.forced_count == 3);  // {0, 9, 10}
}

TEST_CASE("compare_selection tells near-ties from real differences") {
  hand_example ex;
  ex.c = {0.9, 0.8, 0.8 + 1e-9, 0.6, 0.5, 0.4, 0.3, 0.2};
  const nosa_ref::selection ref = ex.run();  // {7, 5, 0, 2}: block 2 beats block 1 by 1e-9
  REQUIRE(ref.ranked == vector<int>{7, 5, 0, 2});

  const nosa_ref::compare_result same = nosa_ref::compare_selection({0, 2, 5, 7}, ref);
  CHECK(same.equal);
  CHECK(same.equivalent_up_to_near_ties);
  CHECK(same.message.empty());

  const nosa_ref::compare_result flip = nosa_ref::compare_selection({0, 1, 5, 7}, ref);
  CHECK_FALSE(flip.equal);
  CHECK(flip.equivalent_up_to_near_ties);
  CHECK(flip.message.find("only in got {1") != std::string::npos);

  CHECK_FALSE(nosa_ref::compare_selection({0, 4, 5, 7}, ref).equivalent_up_to_near_ties);
  CHECK_FALSE(nosa_ref::compare_selection({1, 2, 5, 7}, ref).equivalent_up_to_near_ties);
  CHECK_FALSE(nosa_ref::compare_selection({0, 1, 2, 5, 7}, ref).equivalent_up_to_near_ties);
  CHECK_FALSE(nosa_ref::compare_selection({0, 2, 5, 6}, ref).equivalent_up_to_near_ties);  // forced 7
  const nosa_ref::compare_result unsorted = nosa_ref::compare_selection({2, 0, 5, 7}, ref);
  CHECK_FALSE(unsorted.equivalent_up_to_near_ties);
  CHECK(unsorted.message.find("ascending") != std::string::npos);

  SUBCASE("a flip in the query-aware top-k cascades into Se") {
    hand_example near_q;
    near_q.key_x = {0, 0, 0, 10 - 1e-9, 0, 10, 3, 0};
    const nosa_ref::selection r = near_q.run();
    REQUIRE(r.ranked == vector<int>{7, 5, 0, 1});
    // With block 3 in Q instead of 5, block 5 competes on Se (0.4) and loses.
    CHECK(nosa_ref::compare_selection({0, 1, 3, 7}, r).equivalent_up_to_near_ties);
    CHECK_FALSE(nosa_ref::compare_selection({0, 1, 6, 7}, r).equivalent_up_to_near_ties);
  }
  SUBCASE("InfLLMv2 boundary on Sq") {
    hand_example v2;
    v2.cfg.query_agnostic = false;
    v2.key_x = {0, 0, 0, 5, 3 + 1e-9, 10, 3, 0};
    const nosa_ref::selection r = v2.run();
    REQUIRE(r.ranked == vector<int>{7, 5, 3, 4});
    CHECK(nosa_ref::compare_selection({3, 5, 6, 7}, r).equivalent_up_to_near_ties);
    CHECK_FALSE(nosa_ref::compare_selection({0, 3, 5, 7}, r).equivalent_up_to_near_ties);
  }
  SUBCASE("with the budget rule, differing blocks need a near-equal partner") {
    hand_example b = ex;
    b.cfg.budget = 1;
    const vector<int> resident{1, 2, 6, 7};
    const nosa_ref::selection r = b.run(&resident);
    REQUIRE(r.budget_checked);
    REQUIRE(r.ranked == vector<int>{7, 5, 2, 1});  // 0 dropped, replaced by resident 1 (0.8)
    CHECK(nosa_ref::compare_selection({1, 2, 5, 7}, r).equal);
    // Blocks 0 and 2 tie on Sq, but neither is in Q, so that tie excuses nothing.
    CHECK_FALSE(nosa_ref::compare_selection({0, 1, 5, 7}, r).equivalent_up_to_near_ties);
    CHECK_FALSE(nosa_ref::compare_selection({1, 5, 6, 7}, r).equivalent_up_to_near_ties);

    b.cfg.budget = 3;  // checked, but nothing to drop: the Se near-tie of blocks 1 and 2 is excused
    const vector<int> few{6, 7};
    const nosa_ref::selection r3 = b.run(&few);
    REQUIRE(r3.ranked == vector<int>{7, 5, 0, 2});
    CHECK(nosa_ref::compare_selection({0, 1, 5, 7}, r3).equivalent_up_to_near_ties);
    CHECK_FALSE(nosa_ref::compare_selection({0, 5, 6, 7}, r3).equivalent_up_to_near_ties);
  }
}

TEST_CASE("FP8 rounding: nearest E4M3 value, ties to the even code, saturating at 448") {
  using nosa_ref::round_to_e4m3;
  // Steps are 1/8 in [1, 2), 16 in [128, 256), 32 in [256, 448]; 2^-9 below 2^-6.
  CHECK(round_to_e4m3(1.06) == 1.0);
  CHECK(round_to_e4m3(1.0625) == 1.0);     // tie: 1.0 has the even mantissa
  CHECK(round_to_e4m3(1.1875) == 1.25);    // tie: 1.25 has the even mantissa
  CHECK(round_to_e4m3(-149.33) == -144.0);
  CHECK(round_to_e4m3(430.0) == 416.0);
  CHECK(round_to_e4m3(432.0) == 448.0);    // tie between 416 and 448: 448 is even
  CHECK(round_to_e4m3(463.9) == 448.0);
  CHECK(round_to_e4m3(464.0) == 448.0);    // would round to 480, which E4M3 lacks: saturates
  CHECK(round_to_e4m3(-1e9) == -448.0);
  CHECK(round_to_e4m3(0x1p-10) == 0.0);    // half the smallest subnormal: tie to zero
  CHECK(round_to_e4m3(0x1.8p-10) == 0x1p-9);
  CHECK(round_to_e4m3(0x1.4p-7) == 0x1.4p-7);  // 5 * 2^-9, a subnormal, is exact
}

TEST_CASE("FP8 blocks by hand: amax to 448, fp32 scale, zeros, and when a block is read stored") {
  // One block of four values: amax 3, multiplier 448/3 in fp32.
  const double x[4] = {1.0, -2.0, 0.5, 3.0};
  const nosa_ref::fp8_block b = nosa_ref::quantize_fp8(x, 4);
  CHECK(b.scale == 3.0f / 448.0f);
  // 1 * 149.33 -> 144 (steps of 16), -2 * 149.33 -> -288 (steps of 32), 0.5 * 149.33 -> 72 (steps of 8).
  CHECK(b.codes == vector<double>{144.0, -288.0, 72.0, 448.0});
  CHECK(b.value(3) == 448.0 * static_cast<double>(3.0f / 448.0f));
  const double zeros[3] = {0.0, -0.0, 0.0};
  const nosa_ref::fp8_block z = nosa_ref::quantize_fp8(zeros, 3);
  CHECK(z.scale == 1.0f);
  CHECK(z.codes == vector<double>{0.0, 0.0, 0.0});
  const double vanishing[2] = {1e-37, -5e-38};  // 448 / 1e-37 overflows fp32: stored as zeros
  CHECK(nosa_ref::quantize_fp8(vanishing, 2).codes == vector<double>{0.0, 0.0});

  // Blocks of 2 tokens, D = 1. A block is read stored from the step after its last token arrived.
  config cfg;
  cfg.block = 2;
  cfg.window = 2;
  cfg.stride = 2;
  cfg.head_dim = 1;
  cfg.kv = nosa_ref::kv_storage::fp8_e4m3;
  history h(cfg);
  const double k[5] = {1.0, 1.06, 3.0, -1.5, 0.3}, v[5] = {2.0, 2.2, 7.0, 5.0, -1.0};
  for (int j = 0; j < 5; ++j) h.append(&k[j], &v[j], 0.0);
  REQUIRE(h.stored_block_count() == 2);
  // Block 0's keys: 1 * (448 / 1.06) = 422.6 -> 416 (steps of 32); 1.06 -> 448.
  CHECK(h.stored_keys(0).codes == vector<double>{416.0, 448.0});
  CHECK_FALSE(h.attends_stored(1, 2));  // the step that completed block 0 reads it exact
  CHECK(h.attends_stored(1, 3));        // from the next step on, stored
  CHECK(h.attends_stored(3, 5));
  CHECK_FALSE(h.attends_stored(3, 4));
  CHECK_FALSE(h.attends_stored(4, 5));  // the current block
  CHECK(*h.attended_key(1, 2) == 1.06);
  CHECK(*h.attended_key(0, 3) == 416.0 * static_cast<double>(1.06f / 448.0f));
  CHECK(*h.attended_value(2, 5) == 448.0 * static_cast<double>(7.0f / 448.0f));

  // Attention over all five tokens reads blocks 0 and 1 stored and token 4 exact.
  const double q = 0.7;
  double o = 0.0;
  nosa_ref::attend(cfg, h, &q, {0, 1, 2}, 5, &o);
  double num = 0.0, den = 0.0;
  for (int j = 0; j < 5; ++j) {
    const double w = std::exp(q * *h.attended_key(j, 5));
    num += w * *h.attended_value(j, 5);
    den += w;
  }
  CHECK(o == doctest::Approx(num / den).epsilon(1e-14));
  const double exact_o = [&] {
    double n = 0.0, d = 0.0;
    for (int j = 0; j < 5; ++j) {
      n += std::exp(q * k[j]) * v[j];
      d += std::exp(q * k[j]);
    }
    return n / d;
  }();
  CHECK(o != exact_o);  // the stored blocks really differ from the exact ones
}

TEST_CASE("NOSA^S: the spec's per-token selection over the whole prompt is the selection of the prefix") {
  // Spec section 6 ranks every block of the prompt for token t, hiding the windows and blocks t cannot see
  // and dropping the future blocks after the top-k. Those blocks rank after every visible one, so the result
  // is the selection of a sequence that ends at t (what a decode step at t would select without a budget).
  // Geometries whose windows straddle blocks; NOSA and InfLLMv2; sizes from below k to well above.
  for (const bool agnostic : {true, false}) {
    config cfg;
    cfg.block = 6;
    cfg.window = 5;
    cfg.stride = 3;
    cfg.topk = 7;
    cfg.topk_qa = 4;
    cfg.n_init = 1;
    cfg.n_local = 2;
    cfg.head_dim = 4;
    cfg.group = 2;
    cfg.query_agnostic = agnostic;
    uniform_source src{agnostic ? 11u : 12u};
    const int length = 70;
    history prompt(cfg), prefix(cfg);
    vector<vector<double>> k, v;
    vector<double> c;
    for (int j = 0; j < length; ++j) {
      k.push_back(src.vec(4));
      v.push_back(src.vec(4));
      c.push_back(src.next());
      prompt.append(k.back().data(), v.back().data(), c.back());
    }
    for (int t = 0; t < length; ++t) {
      prefix.append(k[std::size_t(t)].data(), v[std::size_t(t)].data(), c[std::size_t(t)]);
      const vector<double> q = src.vec(8);
      const auto per_token = nosa_ref::prefill_selection(cfg, prompt, t, q.data());
      const auto of_prefix =
          nosa_ref::select(cfg, nosa_ref::scores(cfg, prefix, q.data(), true), nullptr, true);
      INFO("token " << t << (agnostic ? " (NOSA)" : " (InfLLMv2)"));
      CHECK(per_token.ranked == of_prefix.ranked);
      CHECK(per_token.forced_count == of_prefix.forced_count);
      CHECK(per_token.ascending.back() == t / cfg.block);  // the token's own block is always attended
    }
  }
}
