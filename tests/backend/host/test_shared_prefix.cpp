// Sequences admitted with a shared prompt prefix (`shared_prefix`) on the host backend: the shared blocks
// take no new page, decoding is bit for bit what it is with private copies, the pages outlive the sequence
// they came from, and a bad share is refused without changing anything.
#include <nosa/nosa.hpp>

#include "small_config.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace {

using nosa::status;

template <class P>
struct shared_run {
  using T = typename P::element_type;
  static constexpr int D = P::head_dim;
  using layer_t = nosa::decode_layer<P, nosa::host_backend>;
  nosa::layer_config cfg = nosa_test::small_layer_config(8, 2, 4, 40);
  std::mt19937_64 rng{7};
  std::normal_distribution<float> normal{0.0f, 1.0f};

  std::vector<T> random(std::size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) x = nosa::from_float<T>(normal(rng));
    return v;
  }
};

template <class P>
void check_shared_prefix() {
  using T = typename P::element_type;
  constexpr int D = P::head_dim;
  shared_run<P> r;
  const nosa::layer_config& cfg = r.cfg;
  const int hkv = cfg.num_kv_heads, hq = cfg.num_q_heads, bs = cfg.selection.block_size;
  const int len = 9 * bs + 5;
  nosa::owning_layer<typename shared_run<P>::layer_t> shared, separate;
  REQUIRE(shared.create(cfg) == status::success);
  REQUIRE(separate.create(cfg) == status::success);

  const std::vector<T> k = r.random(std::size_t(len) * hkv * D), v = r.random(k.size()), lq = r.random(std::size_t(hq) * D);
  std::vector<float> c(std::size_t(len) * hkv);
  for (auto& x : c) x = r.normal(r.rng);
  nosa::prompt_args<T> p;
  p.k = nosa::make_contiguous<3>(k.data(), {len, hkv, D});
  p.v = nosa::make_contiguous<3>(v.data(), {len, hkv, D});
  p.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {len, hkv});
  p.last_query = nosa::make_contiguous<2>(lq.data(), {hq, D});

  REQUIRE(shared->add_sequence(0, p) == status::success);
  REQUIRE(separate->add_sequence(0, p) == status::success);
  const int free0 = shared->free_page_count();

  // Refused, and nothing changes.
  CHECK(shared->add_sequence(1, p, nosa::shared_prefix{3, 2}) == status::unknown_sequence);   // not live
  CHECK(shared->add_sequence(1, p, nosa::shared_prefix{1, 2}) == status::unknown_sequence);   // itself
  CHECK(shared->add_sequence(1, p, nosa::shared_prefix{0, 10}) == status::invalid_argument);  // block 9 is partial
  CHECK(shared->add_sequence(1, p, nosa::shared_prefix{0, -1}) == status::invalid_argument);
  CHECK_FALSE(shared->is_live(1));
  CHECK(shared->free_page_count() == free0);

  REQUIRE(shared->add_sequence(1, p, nosa::shared_prefix{0, 9}) == status::success);
  REQUIRE(separate->add_sequence(1, p) == status::success);
  CHECK(shared->free_page_count() == free0 - 1);  // only the tail block's page is new
  CHECK(separate->free_page_count() == free0 - 10);

  const int steps = 3 * bs;
  for (int step = 0; step < steps; ++step) {
    if (step == steps / 2) {
      REQUIRE(shared->remove_sequence(0) == status::success);
      REQUIRE(separate->remove_sequence(0) == status::success);
    }
    std::vector<std::int32_t> seqs;
    for (int s = 0; s < 2; ++s) {
      if (shared->is_live(s)) seqs.push_back(s);
    }
    const int b = static_cast<int>(seqs.size());
    REQUIRE(shared->reserve(1) == status::success);
    REQUIRE(separate->reserve(1) == status::success);
    const std::vector<T> q = r.random(std::size_t(b) * hq * D), kt = r.random(std::size_t(b) * hkv * D),
                         vt = r.random(kt.size());
    std::vector<float> ct(std::size_t(b) * hkv);
    for (auto& x : ct) x = r.normal(r.rng);
    std::vector<float> o1(q.size()), o2(q.size());
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {b});
    a.q = nosa::make_contiguous<3>(q.data(), {b, hq, D});
    a.k = nosa::make_contiguous<3>(kt.data(), {b, hkv, D});
    a.v = nosa::make_contiguous<3>(vt.data(), {b, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(ct.data()), {b, hkv});
    a.o = nosa::make_contiguous<3>(o1.data(), {b, hq, D});
    REQUIRE(shared->step(a) == status::success);
    a.o = nosa::make_contiguous<3>(o2.data(), {b, hq, D});
    REQUIRE(separate->step(a) == status::success);
    REQUIRE(std::memcmp(o1.data(), o2.data(), o1.size() * sizeof(float)) == 0);
    for (const int s : seqs) {
      for (int h = 0; h < hkv; ++h) {
        const auto x = shared->selection(s, h), y = separate->selection(s, h);
        REQUIRE(std::vector<std::int32_t>(x.begin(), x.end()) == std::vector<std::int32_t>(y.begin(), y.end()));
      }
    }
  }
  // Shared blocks were never loaded twice into the pool: the shared layer wrote 9 blocks fewer.
  CHECK(separate->total_counters().bytes_d2h - shared->total_counters().bytes_d2h ==
        (P::store::offloads ? std::uint64_t(9) * hkv * 2 * bs * D * sizeof(T) : 0));
  REQUIRE(shared->remove_sequence(1) == status::success);
  CHECK(shared->free_page_count() == cfg.limits.pool_pages);
}

}  // namespace

TEST_CASE("a shared prompt prefix takes no new pages and decodes like private copies") {
  check_shared_prefix<nosa::nosa_pipeline<nosa::bf16, 64>>();
  check_shared_prefix<nosa::nosa_pipeline<float, 64, nosa::resident_store>>();
  check_shared_prefix<nosa::infllmv2_pipeline<nosa::fp16, 64>>();
}
