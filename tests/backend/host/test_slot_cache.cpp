// The offload store's slot cache beyond k (`capacity::cache_slots`) on the host backend: dropped blocks stay
// resident until their slot is needed, so a block selected again is a hit. Against the same layer without a
// cache: the same selections and bit-identical outputs, never more misses in any step, fewer in all, and a
// consistent slot map.
#include <nosa/nosa.hpp>

#include "small_config.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <vector>

namespace {

using nosa::status;

template <class P>
void compare_with_and_without_cache(int cache_slots, std::uint64_t seed) {
  using T = typename P::element_type;
  constexpr int D = P::head_dim;
  using layer_t = nosa::decode_layer<P, nosa::host_backend>;
  const nosa::layer_config cfg = nosa_test::small_layer_config(4, 2, 3, 48);
  nosa::layer_config cached_cfg = cfg;
  cached_cfg.limits.cache_slots = cache_slots;
  nosa::owning_layer<layer_t> plain, cached;
  REQUIRE(plain.create(cfg) == status::success);
  REQUIRE(cached.create(cached_cfg) == status::success);
  CHECK(cached->layout().slots == cfg.selection.top_k + 1 + cache_slots);

  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto random = [&](std::size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) x = nosa::from_float<T>(normal(rng));
    return v;
  };
  const int hkv = cfg.num_kv_heads, hq = cfg.num_q_heads, B = 3;
  const int prompts[B] = {20 * 16 + 3, 12 * 16, 30 * 16 + 9};
  for (int s = 0; s < B; ++s) {
    const int len = prompts[s];
    const std::vector<T> k = random(std::size_t(len) * hkv * D), v = random(k.size()), lq = random(std::size_t(hq) * D);
    std::vector<float> c(std::size_t(len) * hkv);
    for (auto& x : c) x = normal(rng);
    nosa::prompt_args<T> p;
    p.k = nosa::make_contiguous<3>(k.data(), {len, hkv, D});
    p.v = nosa::make_contiguous<3>(v.data(), {len, hkv, D});
    p.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {len, hkv});
    p.last_query = nosa::make_contiguous<2>(lq.data(), {hq, D});
    REQUIRE(plain->add_sequence(s, p) == status::success);
    REQUIRE(cached->add_sequence(s, p) == status::success);
  }

  // Queries that drift (each step keeps most of the last one), so selections change a little at a time and
  // dropped blocks come back.
  std::vector<float> drift(std::size_t(B) * hq * D);
  for (auto& x : drift) x = normal(rng);
  std::uint64_t misses_plain = 0, misses_cached = 0;
  const int steps = 160;
  for (int step = 0; step < steps; ++step) {
    for (auto& x : drift) x = 0.9f * x + 0.45f * normal(rng);
    std::vector<T> q(drift.size());
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = nosa::from_float<T>(drift[i]);
    const std::vector<T> kt = random(std::size_t(B) * hkv * D), vt = random(kt.size());
    std::vector<float> ct(std::size_t(B) * hkv);
    for (auto& x : ct) x = normal(rng);
    const std::int32_t seqs[B] = {0, 1, 2};
    std::vector<float> o1(q.size()), o2(q.size());
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(seqs, {B});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {B, hq, D});
    a.k = nosa::make_contiguous<3>(kt.data(), {B, hkv, D});
    a.v = nosa::make_contiguous<3>(vt.data(), {B, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(ct.data()), {B, hkv});
    REQUIRE(plain->reserve(1) == status::success);
    REQUIRE(cached->reserve(1) == status::success);
    a.o = nosa::make_contiguous<3>(o1.data(), {B, hq, D});
    REQUIRE(plain->step(a) == status::success);
    a.o = nosa::make_contiguous<3>(o2.data(), {B, hq, D});
    REQUIRE(cached->step(a) == status::success);
    REQUIRE(std::memcmp(o1.data(), o2.data(), o1.size() * sizeof(float)) == 0);
    for (int s = 0; s < B; ++s) {
      for (int h = 0; h < hkv; ++h) {
        const auto x = plain->selection(s, h), y = cached->selection(s, h);
        REQUIRE(std::vector<std::int32_t>(x.begin(), x.end()) == std::vector<std::int32_t>(y.begin(), y.end()));
        CHECK(cached->step_misses(s, h) <= plain->step_misses(s, h));
        // Every selected block is in exactly one slot; no block is in two.
        const auto map = cached->slots(s, h);
        std::set<int> held;
        for (const int b : map) {
          if (b >= 0) CHECK(held.insert(b).second);
        }
        for (const int b : y) CHECK(held.count(b) == 1);
      }
    }
    misses_plain += plain->last_step_counters().misses;
    misses_cached += cached->last_step_counters().misses;
  }
  MESSAGE("cache of " << cache_slots << " slots: " << misses_cached << " misses against " << misses_plain
                      << " without");
  CHECK(misses_cached < misses_plain);
  CHECK(cached->total_counters().bytes_h2d < plain->total_counters().bytes_h2d);
}

}  // namespace

TEST_CASE("a slot cache beyond k keeps dropped blocks and turns re-selections into hits") {
  compare_with_and_without_cache<nosa::nosa_pipeline<nosa::bf16, 64>>(8, 1);
  compare_with_and_without_cache<nosa::nosa_pipeline<float, 64>>(1, 2);
  compare_with_and_without_cache<nosa::infllmv2_pipeline<nosa::fp16, 64>>(24, 3);
}

TEST_CASE("the resident store ignores the slot cache, and a negative one is refused") {
  nosa::layer_config cfg;
  cfg.limits = {2, 16, 32};
  cfg.limits.cache_slots = 4;
  nosa::arena_sizes a{}, b{};
  using resident = nosa::decode_layer<nosa::nosa_pipeline<float, 64, nosa::resident_store>, nosa::host_backend>;
  REQUIRE(resident::required_bytes(cfg, a) == status::success);
  cfg.limits.cache_slots = 0;
  REQUIRE(resident::required_bytes(cfg, b) == status::success);
  CHECK(a.device == b.device);
  cfg.limits.cache_slots = -1;
  CHECK(resident::required_bytes(cfg, a) == status::invalid_argument);
}
