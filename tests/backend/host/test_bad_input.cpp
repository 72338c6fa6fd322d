// Every bad input gets a clear status and changes nothing: both arenas are byte-identical after the failed
// call, and the layer then decodes exactly like a twin that never saw the bad call.
#include "harness.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <vector>

namespace {

using P = nosa::nosa_pipeline<float, 64>;
using layer_type = nosa::decode_layer<P, nosa::host_backend>;
constexpr int D = 64;

// A batch of inputs for `batch` rows with the layer's head counts; views can be bent by each case.
struct inputs {
  int batch, hq, hkv;
  std::vector<std::int32_t> seqs;
  std::vector<float> q, k, v, c, o;

  inputs(std::vector<std::int32_t> s, int hq_, int hkv_, std::uint64_t seed)
      : batch(static_cast<int>(s.size())), hq(hq_), hkv(hkv_), seqs(std::move(s)) {
    std::mt19937 rng(static_cast<unsigned>(seed));
    std::normal_distribution<float> n;
    // One spare element at the front of every buffer lets a case build a misaligned pointer in bounds.
    q.resize(std::size_t(batch) * hq * D + 1);
    k.resize(std::size_t(batch) * hkv * D + 1);
    v.resize(k.size());
    c.resize(std::size_t(batch) * hkv + 1);
    o.resize(q.size());
    for (auto* buf : {&q, &k, &v, &c}) {
      for (auto& x : *buf) x = n(rng);
    }
  }

  nosa::step_args<float, float> args() {
    nosa::step_args<float, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {batch});
    a.q = nosa::make_contiguous<3>(static_cast<const float*>(q.data() + 1), {batch, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const float*>(k.data() + 1), {batch, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const float*>(v.data() + 1), {batch, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data() + 1), {batch, hkv});
    a.o = nosa::make_contiguous<3>(o.data() + 1, {batch, hq, D});
    return a;
  }
};

nosa::layer_config config() {
  nosa::layer_config c = nosa_test::small_config(4, 400);
  c.limits.pool_pages = 30;
  return c;
}

// Admits sequence `seq` with `len` random tokens.
nosa::status admit(layer_type& layer, int seq, int len, std::uint64_t seed, int hkv = 2) {
  std::mt19937 rng(static_cast<unsigned>(seed));
  std::normal_distribution<float> n;
  std::vector<float> k(std::size_t(len) * hkv * D), v(k.size()), c(std::size_t(len) * hkv);
  for (auto* buf : {&k, &v, &c}) {
    for (auto& x : *buf) x = n(rng);
  }
  nosa::prompt_args<float> p;
  p.k = nosa::make_contiguous<3>(static_cast<const float*>(k.data()), {len, hkv, D});
  p.v = nosa::make_contiguous<3>(static_cast<const float*>(v.data()), {len, hkv, D});
  p.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {len, hkv});
  return layer.add_sequence(seq, p);
}

// Two identical layers with three live sequences (0, 1, 3) that have decoded a few steps.
struct twins {
  nosa_test::test_layer<P> a, b;
  twins() {
    for (auto* t : {&a, &b}) {
      REQUIRE(t->create(config()) == nosa::status::success);
      REQUIRE(admit(t->layer, 0, 37, 1) == nosa::status::success);
      REQUIRE(admit(t->layer, 1, 64, 2) == nosa::status::success);
      REQUIRE(admit(t->layer, 3, 5, 3) == nosa::status::success);
      for (int s = 0; s < 20; ++s) {
        inputs in({0, 1, 3}, 4, 2, 100 + s);
        REQUIRE(t->layer.reserve(1) == nosa::status::success);
        REQUIRE(t->layer.step(in.args()) == nosa::status::success);
      }
    }
  }

  // Both layers decode `steps` more steps; outputs must be bitwise equal.
  void check_same_future(int steps) {
    for (int s = 0; s < steps; ++s) {
      inputs ia({0, 1, 3}, 4, 2, 500 + s), ib({0, 1, 3}, 4, 2, 500 + s);
      REQUIRE(a.layer.reserve(1) == nosa::status::success);
      REQUIRE(b.layer.reserve(1) == nosa::status::success);
      REQUIRE(a.layer.step(ia.args()) == nosa::status::success);
      REQUIRE(b.layer.step(ib.args()) == nosa::status::success);
      REQUIRE(ia.o == ib.o);
    }
    CHECK(a.snapshot() == b.snapshot());
  }
};

// Runs a failing call on twin `a`, checks the status and that nothing changed, then that the future matches.
template <class Call>
void expect_rejected(twins& t, nosa::status expected, Call&& call) {
  const auto before = t.a.snapshot();
  const nosa::status status_before = t.a.layer.step_status();
  const nosa::status got = call(t.a.layer);
  CHECK(got == expected);
  CHECK(t.a.snapshot() == before);
  // A failed step records its status; a failed plan call leaves the last step's status alone.
  const nosa::status recorded = t.a.layer.step_status();
  CHECK((recorded == expected || recorded == status_before));
  t.check_same_future(30);
}

}  // namespace

TEST_CASE("invalid configurations and arenas are rejected at creation") {
  nosa::layer_config c = config();
  nosa::arena_sizes sizes;
  c.selection.top_k_query_aware = c.selection.top_k + 1;
  CHECK(layer_type::required_bytes(c, sizes) == nosa::status::invalid_config);
  c = config();
  c.selection.top_k = c.selection.forced_blocks() - 1;
  c.selection.top_k_query_aware = 1;
  CHECK(layer_type::required_bytes(c, sizes) == nosa::status::invalid_config);
  c = config();
  c.num_q_heads = 5;  // not a multiple of 2 KV heads
  CHECK(layer_type::required_bytes(c, sizes) == nosa::status::invalid_argument);

  c = config();
  REQUIRE(layer_type::required_bytes(c, sizes) == nosa::status::success);
  nosa::host_arena dev, host;
  REQUIRE(dev.allocate(sizes.device + nosa::arena_alignment) == nosa::status::success);
  REQUIRE(host.allocate(sizes.host + nosa::arena_alignment) == nosa::status::success);
  layer_type layer;
  CHECK(layer_type::create(c, dev.span().first(sizes.device - 1), host.span(), layer) ==
        nosa::status::insufficient_memory);
  CHECK(layer_type::create(c, dev.span().subspan(8), host.span(), layer) == nosa::status::misaligned_pointer);
  CHECK(layer_type::create(c, std::span<std::byte>(static_cast<std::byte*>(nullptr), sizes.device), host.span(),
                           layer) == nosa::status::null_pointer);
  CHECK(layer_type::create(c, dev.span(), host.span(), layer) == nosa::status::success);

  c.num_q_heads = 130;  // group 65 exceeds what the host executor keeps on its stack
  c.num_kv_heads = 2;
  CHECK(layer_type::create(c, dev.span(), host.span(), layer) == nosa::status::not_supported);
}

TEST_CASE("bad steps are rejected and change nothing") {
  twins t;
  SUBCASE("wrong query head count") {
    expect_rejected(t, nosa::status::shape_mismatch, [](layer_type& l) {
      inputs in({0, 1}, 4, 2, 9);
      auto a = in.args();
      a.q.extents[1] = 2;
      return l.step(a);
    });
  }
  SUBCASE("batch extents disagree") {
    expect_rejected(t, nosa::status::shape_mismatch, [](layer_type& l) {
      inputs in({0, 1}, 4, 2, 9);
      auto a = in.args();
      a.k.extents[0] = 1;
      return l.step(a);
    });
  }
  SUBCASE("null key pointer") {
    expect_rejected(t, nosa::status::null_pointer, [](layer_type& l) {
      inputs in({0, 1}, 4, 2, 9);
      auto a = in.args();
      a.k.data = nullptr;
      return l.step(a);
    });
  }
  SUBCASE("null eviction scores when the pipeline needs them") {
    expect_rejected(t, nosa::status::null_pointer, [](layer_type& l) {
      inputs in({0, 1}, 4, 2, 9);
      auto a = in.args();
      a.c.data = nullptr;
      return l.step(a);
    });
  }
  SUBCASE("misaligned query pointer") {
    expect_rejected(t, nosa::status::misaligned_pointer, [](layer_type& l) {
      inputs in({0, 1}, 4, 2, 9);
      auto a = in.args();
      a.q.data = reinterpret_cast<const float*>(reinterpret_cast<const char*>(in.q.data()) + 2);
      return l.step(a);
    });
  }
  SUBCASE("non-unit innermost stride") {
    expect_rejected(t, nosa::status::bad_layout, [](layer_type& l) {
      inputs in({0}, 4, 2, 9);
      std::vector<float> wide(std::size_t(4) * D * 2);
      auto a = in.args();
      a.q = nosa::make_strided<3>(static_cast<const float*>(wide.data()), {1, 4, D}, {8 * D, 2 * D, 2});
      return l.step(a);
    });
  }
  SUBCASE("unknown sequence after valid rows") {
    expect_rejected(t, nosa::status::unknown_sequence, [](layer_type& l) {
      inputs in({0, 1, 2}, 4, 2, 9);  // slot 2 is not live
      return l.step(in.args());
    });
    expect_rejected(t, nosa::status::unknown_sequence, [](layer_type& l) {
      inputs in({0, 7}, 4, 2, 9);  // out of range
      return l.step(in.args());
    });
    expect_rejected(t, nosa::status::unknown_sequence, [](layer_type& l) {
      inputs in({-1}, 4, 2, 9);
      return l.step(in.args());
    });
  }
  SUBCASE("a sequence listed twice") {
    expect_rejected(t, nosa::status::duplicate_sequence, [](layer_type& l) {
      inputs in({0, 1, 0}, 4, 2, 9);
      return l.step(in.args());
    });
  }
  SUBCASE("unknown sequence on removal") {
    expect_rejected(t, nosa::status::unknown_sequence, [](layer_type& l) { return l.remove_sequence(2); });
    expect_rejected(t, nosa::status::unknown_sequence, [](layer_type& l) { return l.remove_sequence(4); });
  }
}

TEST_CASE("a step that needs an unreserved page is rejected") {
  nosa_test::test_layer<P> t;
  REQUIRE(t.create(config()) == nosa::status::success);
  REQUIRE(admit(t.layer, 0, 31, 1) == nosa::status::success);  // next token (31) fills block 1
  REQUIRE(admit(t.layer, 1, 10, 2) == nosa::status::success);
  inputs in({0, 1}, 4, 2, 3);
  REQUIRE(t.layer.step(in.args()) == nosa::status::success);  // position 31 was reserved by admission
  const auto before = t.snapshot();
  inputs again({1, 0}, 4, 2, 4);  // sequence 0 now starts block 2, which nobody reserved
  CHECK(t.layer.step(again.args()) == nosa::status::not_reserved);
  CHECK(t.snapshot() == before);
  REQUIRE(t.layer.reserve(0, 1) == nosa::status::success);
  CHECK(t.layer.step(again.args()) == nosa::status::success);
}

TEST_CASE("plan calls: full pool, full sequence, bad prompts, occupied slots") {
  twins t;
  SUBCASE("admitting into a live slot") {
    expect_rejected(t, nosa::status::sequence_exists, [](layer_type& l) { return admit(l, 1, 10, 9); });
  }
  SUBCASE("admitting out of range") {
    expect_rejected(t, nosa::status::unknown_sequence, [](layer_type& l) { return admit(l, 4, 10, 9); });
  }
  SUBCASE("prompt longer than a sequence may be") {
    expect_rejected(t, nosa::status::sequence_full, [](layer_type& l) {
      return admit(l, 2, config().limits.max_blocks_per_sequence * 16 + 1, 9);
    });
  }
  SUBCASE("prompt that needs more pages than are free") {
    expect_rejected(t, nosa::status::host_pool_full, [](layer_type& l) {
      const int free_pages = l.free_page_count();
      return admit(l, 2, free_pages * 16, 9);  // needs free_pages + 1 pages (the next token's block)
    });
  }
  SUBCASE("prompt with the wrong KV head count") {
    expect_rejected(t, nosa::status::shape_mismatch, [](layer_type& l) { return admit(l, 2, 10, 9, 3); });
  }
  SUBCASE("prompt without eviction scores") {
    expect_rejected(t, nosa::status::null_pointer, [](layer_type& l) {
      std::vector<float> k(std::size_t(10) * 2 * D);
      nosa::prompt_args<float> p;
      p.k = nosa::make_contiguous<3>(static_cast<const float*>(k.data()), {10, 2, D});
      p.v = p.k;
      p.c.extents[0] = 10;
      p.c.extents[1] = 2;
      return l.add_sequence(2, p);
    });
  }
  SUBCASE("reservation beyond the pool is all or nothing") {
    expect_rejected(t, nosa::status::host_pool_full, [](layer_type& l) { return l.reserve(200); });
  }
  SUBCASE("reservation beyond a sequence's capacity") {
    expect_rejected(t, nosa::status::sequence_full, [](layer_type& l) { return l.reserve(1000); });
    expect_rejected(t, nosa::status::invalid_argument, [](layer_type& l) { return l.reserve(-1); });
    expect_rejected(t, nosa::status::unknown_sequence, [](layer_type& l) { return l.reserve(2, 1); });
  }
}

TEST_CASE("a sequence at capacity is rejected by the step and the others keep decoding") {
  nosa::layer_config c = config();
  c.limits.max_blocks_per_sequence = 3;  // 48 tokens
  nosa_test::test_layer<P> t;
  REQUIRE(t.create(c) == nosa::status::success);
  REQUIRE(admit(t.layer, 0, 47, 1) == nosa::status::success);
  REQUIRE(admit(t.layer, 1, 3, 2) == nosa::status::success);
  inputs in({0, 1}, 4, 2, 3);
  REQUIRE(t.layer.step(in.args()) == nosa::status::success);  // sequence 0 reaches 48 tokens
  CHECK(t.layer.reserve(1) == nosa::status::sequence_full);
  const auto before = t.snapshot();
  inputs again({1, 0}, 4, 2, 4);
  CHECK(t.layer.step(again.args()) == nosa::status::sequence_full);
  CHECK(t.snapshot() == before);
  REQUIRE(t.layer.remove_sequence(0) == nosa::status::success);
  REQUIRE(t.layer.reserve(1) == nosa::status::success);
  inputs rest({1}, 4, 2, 5);
  CHECK(t.layer.step(rest.args()) == nosa::status::success);
  CHECK(t.layer.length(1) == 5);
}

TEST_CASE("removing a sequence returns its pages, and the slot can be reused") {
  nosa_test::test_layer<P> t;
  REQUIRE(t.create(config()) == nosa::status::success);
  const int all = t.layer.free_page_count();
  REQUIRE(admit(t.layer, 2, 100, 1) == nosa::status::success);  // 7 blocks + the next token's = 7 pages
  CHECK(t.layer.free_page_count() == all - 7);
  REQUIRE(t.layer.remove_sequence(2) == nosa::status::success);
  CHECK(t.layer.free_page_count() == all);
  CHECK_FALSE(t.layer.is_live(2));
  CHECK(t.layer.selection(2, 0).empty());
  REQUIRE(admit(t.layer, 2, 0, 2) == nosa::status::success);  // an empty prompt is fine
  CHECK(t.layer.length(2) == 0);
  inputs in({2}, 4, 2, 3);
  CHECK(t.layer.step(in.args()) == nosa::status::success);
  CHECK(t.layer.length(2) == 1);
}
