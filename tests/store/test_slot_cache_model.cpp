// The slot-cache model (store/slot_cache_model.hpp) against the host backend's offload store: fed the
// selections one layer made, it predicts, step by step and per (sequence, KV head), exactly the blocks that
// layers with other slot-cache sizes load, since without a budget the selections do not depend on the cache.
#include <nosa/nosa.hpp>

#include "../backend/host/small_config.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <vector>

namespace {

using nosa::status;

template <class P>
void predict_misses(const std::vector<int>& cache_sizes, int budget, std::uint64_t seed) {
  using T = typename P::element_type;
  constexpr int D = P::head_dim;
  using layer_t = nosa::decode_layer<P, nosa::host_backend>;
  nosa::layer_config base = nosa_test::small_layer_config(4, 2, 3, 48);
  if (budget >= 0) base.selection.max_new_blocks = budget;
  const int n = static_cast<int>(cache_sizes.size());
  std::vector<nosa::owning_layer<layer_t>> layers(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    nosa::layer_config cfg = base;
    cfg.limits.cache_slots = cache_sizes[std::size_t(i)];
    REQUIRE(layers[std::size_t(i)].create(cfg) == status::success);
  }
  const int hkv = base.num_kv_heads, hq = base.num_q_heads, B = 3;
  // models[i][s * hkv + h]: the model of cache size i for (sequence s, head h), fed layer 0's selections
  // (or, with a budget, its own layer's selections).
  std::vector<std::vector<nosa::slot_cache_model>> models(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    for (int r = 0; r < B * hkv; ++r) models[std::size_t(i)].emplace_back(base.selection, cache_sizes[std::size_t(i)]);
    CHECK(models[std::size_t(i)][0].slots() == layers[std::size_t(i)]->layout().slots);
  }
  const auto feed = [&](int i) { return budget >= 0 ? i : 0; };  // which layer's selections model i replays

  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto random = [&](std::size_t count) {
    std::vector<T> v(count);
    for (auto& x : v) x = nosa::from_float<T>(normal(rng));
    return v;
  };
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
    for (int i = 0; i < n; ++i) {
      const std::uint64_t before = layers[std::size_t(i)]->total_counters().bytes_h2d;
      REQUIRE(layers[std::size_t(i)]->add_sequence(s, p) == status::success);
      const std::uint64_t loaded = layers[std::size_t(i)]->total_counters().bytes_h2d - before;
      std::uint64_t predicted = 0;
      for (int h = 0; h < hkv; ++h) {
        const auto chosen = layers[std::size_t(feed(i))]->selection(s, h);
        predicted += static_cast<std::uint64_t>(models[std::size_t(i)][std::size_t(s * hkv + h)].admit(len, chosen));
      }
      CHECK(loaded == predicted * 2 * 16 * D * sizeof(T));
    }
  }

  // Queries that drift, so that selections change a little at a time and dropped blocks come back.
  std::vector<float> drift(std::size_t(B) * hq * D);
  for (auto& x : drift) x = normal(rng);
  std::vector<long long> total(static_cast<std::size_t>(n), 0);
  for (int step = 0; step < 150; ++step) {
    for (auto& x : drift) x = 0.9f * x + 0.45f * normal(rng);
    std::vector<T> q(drift.size());
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = nosa::from_float<T>(drift[i]);
    const std::vector<T> kt = random(std::size_t(B) * hkv * D), vt = random(kt.size());
    std::vector<float> ct(std::size_t(B) * hkv);
    for (auto& x : ct) x = normal(rng);
    const std::int32_t seqs[B] = {0, 1, 2};
    std::vector<float> o(q.size());
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(seqs, {B});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {B, hq, D});
    a.k = nosa::make_contiguous<3>(kt.data(), {B, hkv, D});
    a.v = nosa::make_contiguous<3>(vt.data(), {B, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(ct.data()), {B, hkv});
    a.o = nosa::make_contiguous<3>(o.data(), {B, hq, D});
    std::vector<int> positions(B);
    for (int s = 0; s < B; ++s) positions[std::size_t(s)] = layers[0]->length(s);
    for (int i = 0; i < n; ++i) {
      REQUIRE(layers[std::size_t(i)]->reserve(1) == status::success);
      REQUIRE(layers[std::size_t(i)]->step(a) == status::success);
    }
    for (int i = 0; i < n; ++i) {
      for (int s = 0; s < B; ++s) {
        for (int h = 0; h < hkv; ++h) {
          const auto chosen = layers[std::size_t(feed(i))]->selection(s, h);
          nosa::slot_cache_model& model = models[std::size_t(i)][std::size_t(s * hkv + h)];
          const int predicted = model.step(positions[std::size_t(s)], chosen);
          REQUIRE(predicted == layers[std::size_t(i)]->step_misses(s, h));
          total[std::size_t(i)] += predicted;
          // The model's slot map is the store's.
          const auto map = layers[std::size_t(i)]->slots(s, h);
          REQUIRE(std::vector<int>(model.slot_map().begin(), model.slot_map().end()) ==
                  std::vector<int>(map.begin(), map.end()));
        }
      }
    }
  }
  for (int i = 0; i < n; ++i) {
    MESSAGE("cache of " << cache_sizes[std::size_t(i)] << " slots: " << total[std::size_t(i)] << " misses predicted and "
                        << "seen in 150 steps");
  }
  if (budget < 0) {
    for (int i = 1; i < n; ++i) CHECK(total[std::size_t(i)] <= total[std::size_t(i) - 1]);  // a larger cache never loses
  }
}

}  // namespace

TEST_CASE("one run's selections predict the misses of every slot-cache size") {
  predict_misses<nosa::nosa_pipeline<nosa::bf16, 64>>({0, 1, 3, 8, 24}, -1, 11);
  predict_misses<nosa::infllmv2_pipeline<float, 64>>({0, 2, 6, 16}, -1, 12);
}

TEST_CASE("with a transfer budget the model replays a layer of its own size exactly") {
  predict_misses<nosa::nosa_pipeline<nosa::fp16, 64>>({0, 4, 12}, 1, 13);
}
