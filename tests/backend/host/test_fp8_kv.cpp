// The FP8 KV cache (spec §6b) on the host backend: every stage against the independent reference extended
// with the FP8 rule, and against the same pipeline in the element type, which must select, miss and slot
// exactly alike while moving `b_s * D + 4` bytes a block-head. Blocks are quantised once, when they
// complete or at admission, from the values as given; the tail stays exact; bad calls change nothing.
#include "harness.hpp"
#include "small_config.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <tuple>
#include <vector>

namespace {

using nosa::bf16;
using nosa::bias_mode;
using nosa::fp16;
using nosa::status;
using nosa_test::check_combination;
using nosa_test::combo;
using nosa_test::property_spec;
using nosa_test::run_against_reference;
using nosa_test::run_spec;
using nosa_test::small_config;

using nosa_fp8 = combo<bf16, nosa::eviction_score_pooling, nosa::fp8_offload_store, bias_mode::after_scale>;
using nosa_bf16 = combo<bf16, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>;
using resident_fp8 = combo<fp16, nosa::eviction_score_pooling, nosa::fp8_resident_store, bias_mode::before_scale>;
using resident_fp16 = combo<fp16, nosa::eviction_score_pooling, nosa::resident_store, bias_mode::before_scale>;
using infllm_fp8 = combo<float, nosa::no_query_agnostic, nosa::fp8_offload_store, bias_mode::none>;
using infllm_fp32 = combo<float, nosa::no_query_agnostic, nosa::offload_store, bias_mode::none>;

/// Heavy-tailed keys with outlier channels, as post-RoPE keys of real models have them, and values whose
/// magnitudes vary from token to token: the structure an FP8 scale has to cope with.
template <class T>
struct realistic_source {
  std::mt19937_64 rng;
  std::normal_distribution<float> normal{0.0f, 1.0f};
  std::student_t_distribution<float> heavy{3.0f};

  explicit realistic_source(std::uint64_t seed) : rng(seed) {}

  T key(int d) {
    const float outlier = d % 16 == 3 ? 12.0f : 1.0f;  // one channel in 16
    return nosa::from_float<T>(outlier * heavy(rng));
  }
  T value() { return nosa::from_float<T>(normal(rng) * std::exp(0.7f * normal(rng))); }
  T query() { return nosa::from_float<T>(0.3f * normal(rng)); }
  float score() { return normal(rng); }

  /// `tokens` rows of [hkv][D] keys and values, and [hkv] scores.
  void tokens(int tokens, int hkv, int D, std::vector<T>& k, std::vector<T>& v, std::vector<float>& c) {
    k.resize(std::size_t(tokens) * hkv * D);
    v.resize(k.size());
    c.resize(std::size_t(tokens) * hkv);
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = key(static_cast<int>(i % D));
      v[i] = value();
    }
    for (auto& x : c) x = score();
  }
};

using nosa_pair = std::tuple<nosa_bf16, nosa_fp8>;
using resident_pair = std::tuple<resident_fp16, resident_fp8>;
using infllm_pair = std::tuple<infllm_fp32, infllm_fp8>;

/// Bytes a block-head of K or V moves as: `b_s * D` times the element size, or `b_s * D + 4` in FP8.
template <class P>
std::uint64_t moved(const nosa::layer_config& cfg) {
  return nosa_test::moved_block_bytes<P>(cfg.selection.block_size);
}

}  // namespace

TEST_CASE("FP8 pipelines match the reference extended with the FP8 rule") {
  // Heavy-tailed K and V, so block scales vary and many codes are subnormal; ragged prompts whose partial
  // tails stay exact; both stores, both variants, every bias mode, outputs in fp32 and in the storage type.
  const auto spec = [](std::uint64_t seed) {
    run_spec s = property_spec(seed);
    s.kv_spread = 1.0f;
    return s;
  };
  for (const std::uint64_t seed : {41u, 42u}) {
    const auto stats = run_against_reference<nosa_fp8>(spec(seed));
    CHECK(stats.near_ties * 100 <= stats.selections);
    CHECK(stats.misses > 0);
  }
  run_against_reference<nosa_fp8, bf16>(spec(43));
  run_against_reference<resident_fp8, fp16>(spec(44));
  run_against_reference<infllm_fp8>(spec(45));
  check_combination<combo<float, nosa::no_query_agnostic, nosa::fp8_resident_store, bias_mode::after_scale>>(46);
}

TEST_CASE("FP8: prompts on block boundaries, head dim 128, group 3, a budget and a sequence replaced") {
  run_spec s = property_spec(47);
  s.kv_spread = 1.0f;
  s.prompt_lengths = {32, 0, 16};
  s.steps = 90;
  run_against_reference<nosa_fp8>(s);
  s.config = small_config(3, 600, /*hq=*/6, /*hkv=*/2);
  s.config.selection.max_new_blocks = 1;
  s.replace_at_step = 45;
  s.replacement_prompt = 21;
  using P128 = combo<bf16, nosa::eviction_score_pooling, nosa::fp8_offload_store, bias_mode::after_scale, 128>;
  run_against_reference<P128>(s);
}

TEST_CASE_TEMPLATE("FP8 selects, misses and slots exactly as the element type, moving b_s*D + 4 bytes a block-head",
                   Pair, nosa_pair, resident_pair, infllm_pair) {
  using Plain = std::tuple_element_t<0, Pair>;
  using Fp8 = std::tuple_element_t<1, Pair>;
  using T = typename Plain::element_type;
  constexpr int D = Plain::head_dim;
  static_assert(std::is_same_v<T, typename Fp8::element_type> && !Plain::store::kv_format::quantized &&
                Fp8::store::kv_format::quantized);
  nosa::layer_config cfg = nosa_test::small_layer_config(4, 2, 3, 40);
  cfg.limits.cache_slots = 3;
  cfg.selection.max_new_blocks = 2;
  nosa::owning_layer<nosa::decode_layer<Plain, nosa::host_backend>> plain;
  nosa::owning_layer<nosa::decode_layer<Fp8, nosa::host_backend>> fp8;
  REQUIRE(plain.create(cfg) == status::success);
  REQUIRE(fp8.create(cfg) == status::success);
  const int hkv = cfg.num_kv_heads, hq = cfg.num_q_heads, B = 3;
  realistic_source<T> src(5);
  const auto admit = [&](int seq, int len) {
    std::vector<T> k, v;
    std::vector<float> c;
    src.tokens(len, hkv, D, k, v, c);
    std::vector<T> lq(std::size_t(hq) * D);
    for (auto& x : lq) x = src.query();
    nosa::prompt_args<T> p;
    p.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {len, hkv, D});
    p.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {len, hkv, D});
    p.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {len, hkv});
    p.last_query = nosa::make_contiguous<2>(static_cast<const T*>(lq.data()), {hq, D});
    REQUIRE(plain->add_sequence(seq, p) == status::success);
    REQUIRE(fp8->add_sequence(seq, p) == status::success);
  };
  admit(0, 20 * 16 + 3);
  admit(1, 12 * 16);
  admit(2, 7);

  bool outputs_differ = false;
  for (int step = 0; step < 220; ++step) {
    if (step == 100) {
      REQUIRE(plain->remove_sequence(1) == status::success);
      REQUIRE(fp8->remove_sequence(1) == status::success);
      admit(1, 9 * 16 + 11);
    }
    std::vector<T> k, v, q(std::size_t(B) * hq * D);
    std::vector<float> c;
    src.tokens(B, hkv, D, k, v, c);
    for (auto& x : q) x = src.query();
    const std::int32_t seqs[B] = {2, 0, 1};
    std::vector<float> o1(q.size()), o2(q.size());
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(seqs, {B});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {B, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {B, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {B, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {B, hkv});
    REQUIRE(plain->reserve(1) == status::success);
    REQUIRE(fp8->reserve(1) == status::success);
    a.o = nosa::make_contiguous<3>(o1.data(), {B, hq, D});
    REQUIRE(plain->step(a) == status::success);
    a.o = nosa::make_contiguous<3>(o2.data(), {B, hq, D});
    REQUIRE(fp8->step(a) == status::success);
    for (std::size_t i = 0; i < o2.size(); ++i) {
      REQUIRE(std::isfinite(o2[i]));
      outputs_differ = outputs_differ || o1[i] != o2[i];
    }
    for (int s = 0; s < B; ++s) {
      for (int h = 0; h < hkv; ++h) {
        CAPTURE(step);
        CAPTURE(s);
        CAPTURE(h);
        const auto x = plain->selection(s, h), y = fp8->selection(s, h);
        REQUIRE(std::vector<std::int32_t>(x.begin(), x.end()) == std::vector<std::int32_t>(y.begin(), y.end()));
        REQUIRE(plain->step_misses(s, h) == fp8->step_misses(s, h));
        const auto sx = plain->slots(s, h), sy = fp8->slots(s, h);
        REQUIRE(std::vector<std::int32_t>(sx.begin(), sx.end()) == std::vector<std::int32_t>(sy.begin(), sy.end()));
      }
    }
    const nosa::counters lp = plain->last_step_counters(), lf = fp8->last_step_counters();
    REQUIRE(lp.hits == lf.hits);
    REQUIRE(lp.misses == lf.misses);
    REQUIRE(lf.bytes_h2d * moved<Plain>(cfg) == lp.bytes_h2d * moved<Fp8>(cfg));
    REQUIRE(lf.bytes_d2h * moved<Plain>(cfg) == lp.bytes_d2h * moved<Fp8>(cfg));
  }
  CHECK(outputs_differ);  // the FP8 layer really attended quantised blocks
  const nosa::counters tp = plain->total_counters(), tf = fp8->total_counters();
  CHECK(tf.misses == tp.misses);
  CHECK(tf.bytes_h2d * moved<Plain>(cfg) == tp.bytes_h2d * moved<Fp8>(cfg));
  CHECK(tf.bytes_d2h * moved<Plain>(cfg) == tp.bytes_d2h * moved<Fp8>(cfg));
  if constexpr (Plain::store::offloads) {
    CHECK(tf.misses > 0);
    CHECK(moved<Fp8>(cfg) == std::uint64_t(16) * D + 4);
  }
}

namespace {

/// One FP8 layer held with its arenas, and the exact K and V of each of its sequences and heads.
template <class P>
struct fp8_watch {
  using T = typename P::element_type;
  static constexpr int D = P::head_dim;
  nosa::layer_config cfg;
  nosa_test::test_layer<P> t;
  std::vector<std::vector<std::vector<double>>> k, v;  // [seq][h][token * D + d]
  /// The bytes (codes, then the two scales) of each stored block when it was first written: [seq][h][m].
  std::map<std::tuple<int, int, int>, std::vector<std::byte>> written;

  explicit fp8_watch(int sequences) : cfg(nosa_test::small_layer_config(4, 2, sequences, 12)) {
    cfg.limits.pool_pages = sequences * 12;
    REQUIRE(t.create(cfg) == status::success);
    k.assign(std::size_t(sequences), std::vector<std::vector<double>>(std::size_t(cfg.num_kv_heads)));
    v = k;
  }

  int bs() const { return cfg.selection.block_size; }

  /// The stored bytes of block m of (seq, h): K codes, V codes, K scale, V scale.
  std::vector<std::byte> stored(int seq, int h, int m) const {
    const std::size_t n = std::size_t(bs()) * D;
    std::vector<std::byte> out(2 * n + 2 * sizeof(float));
    std::memcpy(out.data(), t.page_block(seq, h, m, false), n);
    std::memcpy(out.data() + n, t.page_block(seq, h, m, true), n);
    const float scales[2] = {t.page_scale(seq, h, m, false), t.page_scale(seq, h, m, true)};
    std::memcpy(out.data() + 2 * n, scales, sizeof(scales));
    return out;
  }

  /// True when block m of (seq, h) holds the reference's storage of its exact values: the same scales and
  /// the same codes (compared as values: the reference does not track the sign of a zero).
  bool matches_reference(int seq, int h, int m) const {
    const std::size_t n = std::size_t(bs()) * D, first = std::size_t(m) * n;
    const auto& ks = k[std::size_t(seq)][std::size_t(h)];
    const auto& vs = v[std::size_t(seq)][std::size_t(h)];
    const nosa_ref::fp8_block qk = nosa_ref::quantize_fp8(ks.data() + first, n);
    const nosa_ref::fp8_block qv = nosa_ref::quantize_fp8(vs.data() + first, n);
    if (t.page_scale(seq, h, m, false) != qk.scale || t.page_scale(seq, h, m, true) != qv.scale) return false;
    const nosa::fp8_e4m3* pk = t.page_block(seq, h, m, false);
    const nosa::fp8_e4m3* pv = t.page_block(seq, h, m, true);
    for (std::size_t i = 0; i < n; ++i) {
      if (static_cast<double>(static_cast<float>(pk[i])) != qk.codes[i]) return false;
      if (static_cast<double>(static_cast<float>(pv[i])) != qv.codes[i]) return false;
    }
    return true;
  }

  void record(int seq, const std::vector<T>& kt, const std::vector<T>& vt, int tokens) {
    const int hkv = cfg.num_kv_heads;
    for (int i = 0; i < tokens; ++i) {
      for (int h = 0; h < hkv; ++h) {
        for (int d = 0; d < D; ++d) {
          const std::size_t at = (std::size_t(i) * hkv + h) * D + d;
          k[std::size_t(seq)][std::size_t(h)].push_back(nosa::to_float(kt[at]));
          v[std::size_t(seq)][std::size_t(h)].push_back(nosa::to_float(vt[at]));
        }
      }
    }
  }

  /// Every stored block is the reference's quantisation of its exact values and has not changed since it
  /// was first written; a partial current block's page is still unwritten and its rows are exact in the
  /// tail buffer; offload store: every resident complete block's slot holds its page's bytes.
  void check(int seq) {
    const int hkv = cfg.num_kv_heads, length = t.layer.length(seq);
    const std::size_t n = std::size_t(bs()) * D;
    for (int h = 0; h < hkv; ++h) {
      CAPTURE(seq);
      CAPTURE(h);
      for (int m = 0; m < length / bs(); ++m) {
        CAPTURE(m);
        const auto key = std::make_tuple(seq, h, m);
        const std::vector<std::byte> now = stored(seq, h, m);
        if (!written.count(key)) {
          REQUIRE(matches_reference(seq, h, m));
          written[key] = now;
        }
        REQUIRE(now == written[key]);
      }
      if (length % bs() != 0) {
        const int tail = length / bs();
        const std::vector<std::byte> unwritten = stored(seq, h, tail);
        REQUIRE(std::all_of(unwritten.begin(), unwritten.end(), [](std::byte b) { return b == std::byte{0}; }));
      }
      // The rows of a partial current block, exact in the element type.
      const int first = length / bs() * bs();
      for (int token = first; token < length; ++token) {
        for (int d = 0; d < D; ++d) {
          REQUIRE(nosa::to_float(t.tail_block(seq, h, false)[(token - first) * D + d]) ==
                  k[std::size_t(seq)][std::size_t(h)][std::size_t(token) * D + d]);
          REQUIRE(nosa::to_float(t.tail_block(seq, h, true)[(token - first) * D + d]) ==
                  v[std::size_t(seq)][std::size_t(h)][std::size_t(token) * D + d]);
        }
      }
      if constexpr (P::store::offloads) {
        const nosa::state_layout& l = t.layer.layout();
        const auto slots = t.layer.slots(seq, h);
        for (int slot = 0; slot < static_cast<int>(slots.size()); ++slot) {
          const int m = slots[std::size_t(slot)];
          if (m < 0 || (m + 1) * bs() > length) continue;  // free, or the current block
          const std::size_t at = (std::size_t(seq) * hkv + h) * l.slots + slot;
          const std::byte* dev = t.device.span().data();
          std::vector<std::byte> held(2 * n + 2 * sizeof(float));
          std::memcpy(held.data(), dev + l.slot_keys + at * n, n);
          std::memcpy(held.data() + n, dev + l.slot_values + at * n, n);
          std::memcpy(held.data() + 2 * n, dev + l.slot_key_scales + at * sizeof(float), sizeof(float));
          std::memcpy(held.data() + 2 * n + sizeof(float), dev + l.slot_value_scales + at * sizeof(float),
                      sizeof(float));
          REQUIRE(held == written[std::make_tuple(seq, h, m)]);
        }
      }
    }
  }
};

template <class P>
void check_quantised_once() {
  using T = typename P::element_type;
  constexpr int D = P::head_dim;
  const std::vector<int> prompts = {0, 5, 16, 37, 48};
  const int B = static_cast<int>(prompts.size());
  fp8_watch<P> w(B);
  const int hkv = w.cfg.num_kv_heads, hq = w.cfg.num_q_heads, bs = w.bs();
  const std::uint64_t block = std::uint64_t(bs) * D + 4;
  realistic_source<T> src(9);

  // Admission: complete prompt blocks are quantised into their pages at once, partial tails are not.
  std::uint64_t complete = 0;
  for (int s = 0; s < B; ++s) {
    const int len = prompts[std::size_t(s)];
    std::vector<T> k, v;
    std::vector<float> c;
    src.tokens(len, hkv, D, k, v, c);
    nosa::prompt_args<T> p;
    p.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {len, hkv, D});
    p.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {len, hkv, D});
    p.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {len, hkv});
    const nosa::counters before = w.t.layer.total_counters();
    REQUIRE(w.t.layer.add_sequence(s, p) == status::success);
    w.record(s, k, v, len);
    w.check(s);
    const nosa::counters after = w.t.layer.total_counters();
    complete += std::uint64_t(len / bs);
    if constexpr (P::store::offloads) {
      CHECK(after.bytes_d2h - before.bytes_d2h == std::uint64_t(len / bs) * hkv * 2 * block);
      std::uint64_t loaded = 0;  // every complete block of a short prompt is selected and loaded
      for (int h = 0; h < hkv; ++h) loaded += w.t.layer.selection(s, h).size() - (len % bs != 0 ? 1 : 0);
      CHECK(after.bytes_h2d - before.bytes_h2d == loaded * 2 * block);
    }
  }
  CHECK(complete == 0 + 0 + 1 + 2 + 3);

  // Decode across several block boundaries of every sequence.
  std::vector<std::int32_t> seqs(std::size_t(B), 0);
  for (int s = 0; s < B; ++s) seqs[std::size_t(s)] = s;
  for (int step = 0; step < 3 * bs + 5; ++step) {
    std::vector<T> k, v, q(std::size_t(B) * hq * D);
    std::vector<float> c, o(q.size());
    src.tokens(B, hkv, D, k, v, c);
    for (auto& x : q) x = src.query();
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {B});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {B, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {B, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {B, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {B, hkv});
    a.o = nosa::make_contiguous<3>(o.data(), {B, hq, D});
    REQUIRE(w.t.layer.reserve(1) == status::success);
    REQUIRE(w.t.layer.step(a) == status::success);
    std::uint64_t completed = 0;
    for (int s = 0; s < B; ++s) {
      std::vector<T> ks(k.begin() + std::ptrdiff_t(s) * hkv * D, k.begin() + std::ptrdiff_t(s + 1) * hkv * D);
      std::vector<T> vs(v.begin() + std::ptrdiff_t(s) * hkv * D, v.begin() + std::ptrdiff_t(s + 1) * hkv * D);
      w.record(s, ks, vs, 1);
      w.check(s);
      completed += w.t.layer.length(s) % bs == 0 ? 1 : 0;
    }
    if constexpr (P::store::offloads) CHECK(w.t.layer.last_step_counters().bytes_d2h == completed * hkv * 2 * block);
  }
  std::size_t blocks = 0;
  for (int s = 0; s < B; ++s) blocks += std::size_t(w.t.layer.length(s) / bs) * hkv;
  CHECK(w.written.size() == blocks);
}

}  // namespace

TEST_CASE("blocks are quantised once, when complete or at admission, and never rewritten; tails stay exact") {
  check_quantised_once<nosa_fp8>();
  check_quantised_once<resident_fp8>();
}

TEST_CASE("a block of zeros keeps scale 1, an outlier saturates nothing else, and full attention reads FP8") {
  // Full attention attends every block, so its output checks each stored block against the reference.
  using P = nosa::full_attention_pipeline<bf16, 64, bias_mode::none, nosa::fp8_resident_store>;
  constexpr int D = 64;
  nosa::layer_config cfg = nosa_test::small_layer_config(2, 1, 1, 8);
  nosa_test::test_layer<P> t;
  REQUIRE(t.create(cfg) == status::success);
  const int bs = cfg.selection.block_size, len = 3 * bs + 4;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<bf16> k(std::size_t(len) * D), v(k.size());
  for (int i = 0; i < len * D; ++i) {
    const int token = i / D;
    // Block 0 all zeros; block 1 small values and one outlier of 9984 in K and V; the rest N(0, 1).
    float x = token < bs ? 0.0f : token < 2 * bs ? 1e-3f * normal(rng) : normal(rng);
    float y = token < bs ? 0.0f : token < 2 * bs ? 1e-3f * normal(rng) : normal(rng);
    if (i == (bs + 5) * D + 7) x = y = -9984.0f;
    k[std::size_t(i)] = bf16(x);
    v[std::size_t(i)] = bf16(y);
  }
  nosa::prompt_args<bf16> p;
  p.k = nosa::make_contiguous<3>(static_cast<const bf16*>(k.data()), {len, 1, D});
  p.v = nosa::make_contiguous<3>(static_cast<const bf16*>(v.data()), {len, 1, D});
  REQUIRE(t.layer.add_sequence(0, p) == status::success);

  CHECK(t.page_scale(0, 0, 0, false) == 1.0f);
  CHECK(t.page_scale(0, 0, 0, true) == 1.0f);
  for (int i = 0; i < bs * D; ++i) CHECK(t.page_block(0, 0, 0, false)[i].bits == 0);
  CHECK(t.page_scale(0, 0, 1, false) == 9984.0f / 448.0f);
  const nosa::fp8_e4m3* block1 = t.page_block(0, 0, 1, false);
  int saturated = 0, zero = 0;
  for (int i = 0; i < bs * D; ++i) {
    saturated += (block1[i].bits & 0x7f) == 0x7e;
    zero += (block1[i].bits & 0x7f) == 0;
  }
  CHECK(saturated == 1);
  CHECK(block1[5 * D + 7].bits == 0xfe);  // -448
  CHECK(zero > bs * D / 2);              // 1e-3 against an amax of 9984 is mostly below E4M3's range

  // One step, against the reference over every block.
  nosa_ref::config rcfg;
  rcfg.block = bs;
  rcfg.window = cfg.selection.window;
  rcfg.stride = cfg.selection.stride;
  rcfg.head_dim = D;
  rcfg.group = 2;
  rcfg.bias = nosa_ref::bias_mode::none;
  rcfg.kv = nosa_ref::kv_storage::fp8_e4m3;
  nosa_ref::history h(rcfg);
  for (int token = 0; token < len; ++token) {
    const auto kd = nosa_test::to_double(k.data() + std::size_t(token) * D, D);
    const auto vd = nosa_test::to_double(v.data() + std::size_t(token) * D, D);
    h.append(kd.data(), vd.data(), 0.0);
  }
  std::vector<bf16> q(2 * D), kt(D), vt(D);
  for (auto& x : q) x = bf16(0.05f * normal(rng));
  for (auto& x : kt) x = bf16(normal(rng));
  for (auto& x : vt) x = bf16(normal(rng));
  std::vector<float> o(2 * D);
  const std::int32_t seq = 0;
  nosa::step_args<bf16, float> a;
  a.sequences = nosa::make_contiguous<1>(&seq, {1});
  a.q = nosa::make_contiguous<3>(static_cast<const bf16*>(q.data()), {1, 2, D});
  a.k = nosa::make_contiguous<3>(static_cast<const bf16*>(kt.data()), {1, 1, D});
  a.v = nosa::make_contiguous<3>(static_cast<const bf16*>(vt.data()), {1, 1, D});
  a.o = nosa::make_contiguous<3>(o.data(), {1, 2, D});
  REQUIRE(t.layer.reserve(1) == status::success);
  REQUIRE(t.layer.step(a) == status::success);
  const auto kd = nosa_test::to_double(kt.data(), D), vd = nosa_test::to_double(vt.data(), D);
  h.append(kd.data(), vd.data(), 0.0);
  const auto qd = nosa_test::to_double(q.data(), 2 * D);
  std::vector<double> expect(2 * D);
  nosa_ref::attend(rcfg, h, qd.data(), {0, 1, 2, 3}, len + 1, expect.data());
  for (int i = 0; i < 2 * D; ++i) {
    CAPTURE(i);
    CHECK(std::abs(o[std::size_t(i)] - expect[std::size_t(i)]) <=
          nosa_test::output_atol<float>() + nosa_test::output_rtol<float>() * std::abs(expect[std::size_t(i)]));
  }
}

TEST_CASE("FP8 layouts: codes and scales in the pool and slots, tail buffers, and the arena sizes") {
  // One layer of an 8B-like model: H_q 32, H_kv 8, D 128, the paper's selection, 16 sequences of 32K.
  nosa::layer_config cfg;
  cfg.num_q_heads = 32;
  cfg.num_kv_heads = 8;
  cfg.limits = {16, 513, 16 * 513};
  const nosa::state_layout bf = nosa::make_state_layout<nosa::nosa_pipeline<bf16, 128>>(cfg);
  const nosa::state_layout f8 = nosa::make_state_layout<nosa::nosa_pipeline<bf16, 128, nosa::fp8_offload_store>>(cfg);
  const nosa::state_layout rf8 =
      nosa::make_state_layout<nosa::nosa_pipeline<bf16, 128, nosa::fp8_resident_store>>(cfg);
  CHECK(bf.block_bytes() == 64 * 128 * 2);
  CHECK(f8.block_bytes() == 64 * 128 + 4);
  CHECK((f8.quantized && f8.value_size == 1 && f8.element_size == 2 && !bf.quantized && bf.value_size == 2));
  const auto align = [](std::size_t n) { return (n + 255) / 256 * 256; };
  const std::size_t pages = 16 * 513, sh = 16 * 8, slots = 65, block = 64 * 128;
  // Host arena: the pool halves and gains its scales, [P][2][H] f32.
  CHECK(bf.host_bytes - f8.host_bytes == pages * 2 * 8 * block - align(pages * 2 * 8 * 4));
  CHECK(f8.host_pool_scales == f8.host_pool + pages * 2 * 8 * block);
  // Device arena: the slot cache halves and gains its scales; tail buffers hold the current blocks.
  const std::size_t saved = 2 * sh * slots * block;  // one byte a value instead of two, K and V
  const std::size_t added = 2 * align(sh * slots * 4) + 2 * align(sh * block * 2);
  CHECK(bf.device_bytes - f8.device_bytes == saved - added);
  CHECK(f8.tail_keys != 0);
  CHECK(f8.tail_values == f8.tail_keys + sh * block * 2);
  // The resident store keeps the pool and its scales in the device arena.
  CHECK(rf8.device_pool_scales == rf8.device_pool + pages * 2 * 8 * block);
  CHECK(rf8.host_pool_scales == 0);
  MESSAGE("FP8 offload: device " << f8.device_bytes / 1048576.0 << " MiB (bf16 " << bf.device_bytes / 1048576.0
                                 << "), host " << f8.host_bytes / 1048576.0 << " MiB (bf16 "
                                 << bf.host_bytes / 1048576.0 << ")");
}

TEST_CASE("FP8 layers refuse bad calls without changing a byte, and share prompt pages") {
  using P = nosa_fp8;
  using T = bf16;
  constexpr int D = 64;
  nosa::layer_config cfg = nosa_test::small_layer_config(4, 2, 3, 20);
  cfg.limits.pool_pages = 20;
  nosa_test::test_layer<P> shared, separate;
  REQUIRE(shared.create(cfg) == status::success);
  REQUIRE(separate.create(cfg) == status::success);
  const int hkv = 2, hq = 4, bs = 16, len = 4 * bs + 3;
  realistic_source<T> src(21);
  std::vector<T> k, v;
  std::vector<float> c;
  src.tokens(len, hkv, D, k, v, c);
  nosa::prompt_args<T> p;
  p.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {len, hkv, D});
  p.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {len, hkv, D});
  p.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {len, hkv});
  for (auto* t : {&shared, &separate}) REQUIRE(t->layer.add_sequence(0, p) == status::success);
  REQUIRE(shared.layer.add_sequence(1, p, nosa::shared_prefix{0, 4}) == status::success);
  REQUIRE(separate.layer.add_sequence(1, p) == status::success);
  CHECK(separate.layer.total_counters().bytes_d2h - shared.layer.total_counters().bytes_d2h ==
        std::uint64_t(4) * hkv * 2 * (bs * D + 4));

  const auto step = [&](nosa_test::test_layer<P>& t, std::vector<std::int32_t> seqs, std::uint64_t seed,
                        std::vector<float>& o) {
    realistic_source<T> s(seed);
    const int b = static_cast<int>(seqs.size());
    std::vector<T> kt, vt, q(std::size_t(b) * hq * D);
    std::vector<float> ct;
    s.tokens(b, hkv, D, kt, vt, ct);
    for (auto& x : q) x = s.query();
    o.assign(q.size(), 0.0f);
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {b});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {b, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(kt.data()), {b, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(vt.data()), {b, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(ct.data()), {b, hkv});
    a.o = nosa::make_contiguous<3>(o.data(), {b, hq, D});
    return t.layer.step(a);
  };
  std::vector<float> o1, o2;
  for (int s = 0; s < 2 * bs; ++s) {
    REQUIRE(shared.layer.reserve(1) == status::success);
    REQUIRE(separate.layer.reserve(1) == status::success);
    REQUIRE(step(shared, {0, 1}, 100 + s, o1) == status::success);
    REQUIRE(step(separate, {0, 1}, 100 + s, o2) == status::success);
    REQUIRE(o1 == o2);  // the shared FP8 pages are the ones each sequence would have written
  }

  // A duplicate, an unknown sequence, a token whose block has no reserved page: refused, and not a byte of
  // either arena changes (the FP8 pool, scales and tail buffers included).
  REQUIRE(shared.layer.reserve(1) == status::success);
  const auto reserved = shared.snapshot();
  CHECK(step(shared, {1, 1}, 899, o1) == status::duplicate_sequence);
  CHECK(shared.snapshot() == reserved);
  const int length = shared.layer.length(0);
  for (int s = 0; s < bs - length % bs; ++s) {
    REQUIRE(shared.layer.reserve(1) == status::success);
    REQUIRE(step(shared, {0, 1}, 500 + s, o1) == status::success);
  }
  REQUIRE(shared.layer.length(0) % bs == 0);  // the next token starts a block whose page is not reserved
  const auto before = shared.snapshot();
  CHECK(step(shared, {0}, 900, o1) == status::not_reserved);
  CHECK(step(shared, {2}, 901, o1) == status::unknown_sequence);
  CHECK(shared.snapshot() == before);
  REQUIRE(shared.layer.reserve(1) == status::success);
  CHECK(step(shared, {0, 1}, 903, o1) == status::success);
}
