// The library's prefill on the host backend, dense (NOSA^F) and sparse (NOSA^S): every output row and every
// per-token selection against the independent double-precision reference, chunk by chunk over ragged
// prompts; the state the prefill leaves against admission of the same tokens (`add_sequence` with the last
// query), and the decode that follows, bit for bit; bad calls that return their status and change nothing.
#include "../../reference/prefill_reference.hpp"
#include "harness.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace {

using nosa::bf16;
using nosa::bias_mode;
using nosa::fp16;
using nosa::status;
using nosa_test::combo;
using nosa_test::small_config;
using nosa_test::test_layer;
using nosa_test::to_double;
using nosa_test::token_source;

/// One run: prompts prefilled in chunks, then decode steps.
struct prefill_spec {
  nosa::layer_config config;
  std::vector<int> prompts;  ///< prompt length of sequence slot b
  int chunk = 40;            ///< rows of each sequence per prefill call
  int steps = 24;            ///< decode steps after the prefill, beside a layer that admitted the prompts
  std::uint64_t seed = 1;
};

/// The tokens of one sequence, prompt then decode, already rounded to the storage type.
template <class T>
struct sequence_tokens {
  int hq = 0, hkv = 0, d = 0;
  std::vector<T> q, k, v;  // [tokens][H][D]
  std::vector<float> c;    // [tokens][H_kv]

  sequence_tokens(token_source<T>& src, int count, int q_heads, int kv_heads, int head_dim)
      : hq(q_heads), hkv(kv_heads), d(head_dim) {
    for (int i = 0; i < count; ++i) {
      for (int j = 0; j < hq * d; ++j) q.push_back(src.element());
      for (int j = 0; j < hkv * d; ++j) k.push_back(src.kv_element());
      for (int j = 0; j < hkv * d; ++j) v.push_back(src.kv_element());
      for (int h = 0; h < hkv; ++h) c.push_back(src.score());
    }
  }
  const T* q_row(int token) const { return q.data() + std::size_t(token) * hq * d; }
  const T* k_row(int token) const { return k.data() + std::size_t(token) * hkv * d; }
  const T* v_row(int token) const { return v.data() + std::size_t(token) * hkv * d; }
  const float* c_row(int token) const { return c.data() + std::size_t(token) * hkv; }

  /// The first `n` tokens as a prompt, with the query of the last as `last_query` (none when n is 0).
  nosa::prompt_args<T> prompt(int n) const {
    nosa::prompt_args<T> p;
    p.k = nosa::make_contiguous<3>(k_row(0), {n, hkv, d});
    p.v = nosa::make_contiguous<3>(v_row(0), {n, hkv, d});
    p.c = nosa::make_contiguous<2>(c_row(0), {n, hkv});
    if (n > 0) p.last_query = nosa::make_contiguous<2>(q_row(n - 1), {hq, d});
    return p;
  }
};

template <class T>
std::vector<std::byte> bytes_of(const T* p, std::size_t count) {
  std::vector<std::byte> b(count * sizeof(T));
  if (count > 0) std::memcpy(b.data(), p, b.size());
  return b;
}

/// The state of sequence `seq` that admission defines, piece by piece, read from the arenas: what a prefill
/// must leave exactly as `add_sequence` leaves it. Pages are compared by block, not by page id (the two
/// layers reserve in different orders); rows of a slot or page that no token reached are left out.
template <class Pipeline>
std::vector<std::pair<std::string, std::vector<std::byte>>> sequence_state(const test_layer<Pipeline>& t,
                                                                           int seq) {
  using T = typename Pipeline::element_type;
  using V = typename test_layer<Pipeline>::stored_type;
  constexpr bool offloads = Pipeline::store::offloads;
  constexpr bool quantized = Pipeline::store::kv_format::quantized;
  const nosa::state_layout& l = t.layer.layout();
  const std::byte* dev = t.device.span().data();
  const int length = t.layer.length(seq), bs = l.block_size, D = l.head_dim;
  const int complete = length / bs, partial = length % bs;
  std::vector<std::pair<std::string, std::vector<std::byte>>> s;
  s.emplace_back("length", bytes_of(&length, 1));
  for (int h = 0; h < l.kv_heads; ++h) {
    const std::string head = " of head " + std::to_string(h);
    const std::size_t sh = std::size_t(seq) * l.kv_heads + h;
    const auto at = [&](std::size_t offset) { return dev + offset; };
    s.emplace_back("c" + head,
                   bytes_of(reinterpret_cast<const float*>(at(l.token_scores)) + sh * l.max_tokens, length));
    if constexpr (!Pipeline::dense) {
      const int windows = nosa::window_count(length, t.layer.config().selection);
      s.emplace_back("Kc" + head,
                     bytes_of(reinterpret_cast<const T*>(at(l.compressed_keys)) + sh * l.max_windows * D,
                              std::size_t(windows) * D));
      s.emplace_back(
          "cc" + head,
          bytes_of(reinterpret_cast<const float*>(at(l.compressed_scores)) + sh * l.max_windows, windows));
      s.emplace_back("key ring" + head,
                     bytes_of(reinterpret_cast<const T*>(at(l.key_ring)) + sh * l.window * D,
                              std::size_t(l.window) * D));
      const auto chosen = t.layer.selection(seq, h);
      s.emplace_back("selection" + head, bytes_of(chosen.data(), chosen.size()));
    }
    const int misses = t.layer.step_misses(seq, h);
    s.emplace_back("step misses" + head, bytes_of(&misses, 1));
    if constexpr (offloads) {
      const auto map = t.layer.slots(seq, h);
      s.emplace_back("slot map" + head, bytes_of(map.data(), map.size()));
      for (int slot = 0; slot < l.slots; ++slot) {
        const int m = map[std::size_t(slot)];
        // A quantized format keeps the tail in its tail buffer: its slot holds nothing yet.
        const int rows = m < 0 ? 0 : m < complete ? bs : quantized ? 0 : partial;
        const std::size_t first = (sh * l.slots + slot) * l.block_elements();
        const std::string name = " of slot " + std::to_string(slot) + head;
        s.emplace_back("K" + name,
                       bytes_of(reinterpret_cast<const V*>(at(l.slot_keys)) + first, std::size_t(rows) * D));
        s.emplace_back("V" + name, bytes_of(reinterpret_cast<const V*>(at(l.slot_values)) + first,
                                            std::size_t(rows) * D));
        if (quantized && rows > 0) {
          const float scales[2] = {
              reinterpret_cast<const float*>(at(l.slot_key_scales))[sh * l.slots + slot],
              reinterpret_cast<const float*>(at(l.slot_value_scales))[sh * l.slots + slot]};
          s.emplace_back("scales" + name, bytes_of(scales, 2));
        }
      }
    }
    // Complete blocks in the pool; a partial tail where the store keeps it.
    for (int m = 0; m < complete + (partial > 0 && !offloads && !quantized); ++m) {
      const int rows = m < complete ? bs : partial;
      const std::string name = " of block " + std::to_string(m) + head;
      s.emplace_back("page K" + name, bytes_of(t.page_block(seq, h, m, false), std::size_t(rows) * D));
      s.emplace_back("page V" + name, bytes_of(t.page_block(seq, h, m, true), std::size_t(rows) * D));
      if constexpr (quantized) {
        const float scales[2] = {t.page_scale(seq, h, m, false), t.page_scale(seq, h, m, true)};
        s.emplace_back("page scales" + name, bytes_of(scales, 2));
      }
    }
    if constexpr (quantized) {
      s.emplace_back("tail K" + head, bytes_of(t.tail_block(seq, h, false), std::size_t(partial) * D));
      s.emplace_back("tail V" + head, bytes_of(t.tail_block(seq, h, true), std::size_t(partial) * D));
    }
  }
  return s;
}

template <class Pipeline>
void require_same_state(const test_layer<Pipeline>& a, const test_layer<Pipeline>& b, int seq) {
  const auto sa = sequence_state(a, seq), sb = sequence_state(b, seq);
  REQUIRE(sa.size() == sb.size());
  for (std::size_t i = 0; i < sa.size(); ++i) {
    INFO("sequence " << seq << ": " << sa[i].first);
    REQUIRE(sa[i].first == sb[i].first);
    REQUIRE(sa[i].second == sb[i].second);
  }
}

/// An empty prompt: admits a sequence that the prefill then fills.
template <class T>
nosa::prompt_args<T> no_prompt(int hkv, int d) {
  nosa::prompt_args<T> p;
  p.k = nosa::make_contiguous<3>(static_cast<const T*>(nullptr), {0, hkv, d});
  p.v = p.k;
  p.c = nosa::make_contiguous<2>(static_cast<const float*>(nullptr), {0, hkv});
  return p;
}

/// Runs `spec`: prefills every prompt chunk by chunk (one ragged call per round, sequences listed in reverse
/// order, finished ones with an empty chunk) and checks each output row and, for NOSA^S, each row's
/// selection against the reference; then checks the state against a layer that admitted the same prompts
/// with `add_sequence`, and decodes both side by side, requiring identical outputs, selections, misses and
/// slot maps.
template <class Pipeline, class Prefill, class Out = float>
void check_prefill(const prefill_spec& spec) {
  using T = typename Pipeline::element_type;
  constexpr int D = Pipeline::head_dim;
  constexpr bool sparse = Prefill::selects_per_token;
  nosa::layer_config cfg = spec.config;
  const int batch = static_cast<int>(spec.prompts.size());
  const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, group = cfg.group_size();
  const int rows_cap = batch * spec.chunk;  // every sequence's chunk in one call
  cfg.limits.max_prefill_rows = rows_cap;
  const nosa_ref::config rcfg = nosa_test::reference_config<Pipeline>(cfg);

  test_layer<Pipeline> t, twin;
  REQUIRE(t.create(cfg) == status::success);
  REQUIRE(twin.create(cfg) == status::success);

  std::vector<sequence_tokens<T>> tokens;
  std::vector<std::vector<nosa_ref::history>> hist(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    // Heavy-tailed K and V give FP8 blocks scales that differ block to block (as in the FP8 tests).
    constexpr float spread = Pipeline::store::kv_format::quantized ? 1.0f : 0.0f;
    token_source<T> src(spec.seed * 7919u + std::uint64_t(b), nosa_test::score_kind::gaussian, spread);
    const int prompt = spec.prompts[std::size_t(b)];
    tokens.emplace_back(src, prompt + spec.steps, hq, hkv, D);
    hist[std::size_t(b)].assign(std::size_t(hkv), nosa_ref::history(rcfg));
    for (int i = 0; i < prompt; ++i) {
      for (int h = 0; h < hkv; ++h) {
        const auto kd = to_double(tokens.back().k_row(i) + h * D, D),
                   vd = to_double(tokens.back().v_row(i) + h * D, D);
        hist[std::size_t(b)][std::size_t(h)].append(kd.data(), vd.data(), tokens.back().c_row(i)[h]);
      }
    }
    REQUIRE(t.layer.add_sequence(b, no_prompt<T>(hkv, D)) == status::success);
  }

  // Packed buffers of a fixed shape, as a captured graph would have them; rows no chunk uses keep a sentinel.
  std::vector<T> q(std::size_t(rows_cap) * hq * D), k(std::size_t(rows_cap) * hkv * D), v(k.size());
  std::vector<float> c(std::size_t(rows_cap) * hkv);
  std::vector<Out> o(q.size());
  std::vector<std::int32_t> seqs(static_cast<std::size_t>(batch)),
      offsets(static_cast<std::size_t>(batch) + 1);
  const Out sentinel = nosa::from_float<Out>(1234.0f);
  std::vector<int> done(static_cast<std::size_t>(batch), 0);
  std::uint64_t selections = 0, near_ties = 0;
  double max_error = 0.0;
  const auto remaining = [&] {
    for (int b = 0; b < batch; ++b) {
      if (done[std::size_t(b)] < spec.prompts[std::size_t(b)]) return true;
    }
    return false;
  };
  while (remaining()) {
    std::fill(o.begin(), o.end(), sentinel);
    int row = 0;
    for (int i = 0; i < batch; ++i) {
      const int b = batch - 1 - i;
      const int n = std::min(spec.chunk, spec.prompts[std::size_t(b)] - done[std::size_t(b)]);
      seqs[std::size_t(i)] = b;
      offsets[std::size_t(i)] = row;
      if (n > 0) REQUIRE(t.layer.reserve(b, n) == status::success);
      const sequence_tokens<T>& s = tokens[std::size_t(b)];
      for (int j = 0; j < n; ++j, ++row) {
        const int token = done[std::size_t(b)] + j;
        std::copy_n(s.q_row(token), hq * D, q.data() + std::size_t(row) * hq * D);
        std::copy_n(s.k_row(token), hkv * D, k.data() + std::size_t(row) * hkv * D);
        std::copy_n(s.v_row(token), hkv * D, v.data() + std::size_t(row) * hkv * D);
        std::copy_n(s.c_row(token), hkv, c.data() + std::size_t(row) * hkv);
      }
    }
    offsets[std::size_t(batch)] = row;
    nosa::prefill_args<T, Out> args;
    args.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {batch});
    args.row_offsets =
        nosa::make_contiguous<1>(static_cast<const std::int32_t*>(offsets.data()), {batch + 1});
    args.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {rows_cap, hq, D});
    args.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {rows_cap, hkv, D});
    args.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {rows_cap, hkv, D});
    args.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {rows_cap, hkv});
    args.o = nosa::make_contiguous<3>(o.data(), {rows_cap, hq, D});
    REQUIRE(t.layer.template prefill<Prefill>(args) == status::success);

    for (int i = 0; i < batch; ++i) {
      const int b = seqs[std::size_t(i)];
      for (int r = offsets[std::size_t(i)]; r < offsets[std::size_t(i) + 1]; ++r) {
        const int token = done[std::size_t(b)] + (r - offsets[std::size_t(i)]);
        for (int h = 0; h < hkv; ++h) {
          const nosa_ref::history& hs = hist[std::size_t(b)][std::size_t(h)];
          const auto qd = to_double(q.data() + (std::size_t(r) * hq + std::size_t(h) * group) * D, group * D);
          const auto got = t.layer.prefill_selection(r, h);
          std::vector<int> blocks(got.begin(), got.end());
          std::sort(blocks.begin(), blocks.end());
          if constexpr (sparse) {
            const nosa_ref::selection ref = nosa_ref::prefill_selection(rcfg, hs, token, qd.data());
            const auto cmp = nosa_ref::compare_selection(blocks, ref);
            ++selections;
            if (!cmp.equal) {
              INFO("sequence " << b << " token " << token << " head " << h << ": " << cmp.message);
              REQUIRE(cmp.equivalent_up_to_near_ties);
              ++near_ties;
            }
          } else {
            REQUIRE(blocks.empty());
            blocks = nosa_ref::blocks_through(token, rcfg);
          }
          // The output over exactly the blocks the row attended.
          std::vector<double> expect(std::size_t(group) * D);
          nosa_ref::prefill_attend(rcfg, hs, token, qd.data(), blocks, expect.data());
          for (int g = 0; g < group; ++g) {
            for (int d = 0; d < D; ++d) {
              const double e = expect[std::size_t(g) * D + d];
              const double x = nosa::to_float(o[(std::size_t(r) * hq + std::size_t(h) * group + g) * D + d]);
              const double err = std::abs(x - e) / (nosa_test::output_atol<Out>() +
                                                    nosa_test::output_rtol<Out>() * std::abs(e));
              max_error = std::max(max_error, err);
              if (err > 1.0) {
                INFO("sequence " << b << " token " << token << " q head " << h * group + g << " d " << d
                                 << " got " << x << " expected " << e);
                REQUIRE(err <= 1.0);
              }
            }
          }
        }
      }
    }
    for (std::size_t i = std::size_t(row) * hq * D; i < o.size(); ++i)
      REQUIRE(nosa::to_float(o[i]) == nosa::to_float(sentinel));
    for (int i = 0; i < batch; ++i) {
      const int b = seqs[std::size_t(i)];
      done[std::size_t(b)] += offsets[std::size_t(i) + 1] - offsets[std::size_t(i)];
      REQUIRE(t.layer.length(b) == done[std::size_t(b)]);
    }
  }
  CHECK(near_ties * 100 <= selections);
  MESSAGE("rows " << std::accumulate(spec.prompts.begin(), spec.prompts.end(), 0) << ", selections "
                  << selections << ", near-ties " << near_ties << ", max error/tol " << max_error);

  // The state of admission with the same tokens and the last prompt query.
  for (int b = 0; b < batch; ++b) {
    REQUIRE(twin.layer.add_sequence(b, tokens[std::size_t(b)].prompt(spec.prompts[std::size_t(b)])) ==
            status::success);
    require_same_state(t, twin, b);
  }
  const nosa::counters ct = t.layer.total_counters(), cw = twin.layer.total_counters();
  CHECK(ct.bytes_d2h == cw.bytes_d2h);
  // Each chunk ends with the selection of its last query loaded: one chunk a prompt loads what admission
  // does.
  if (*std::max_element(spec.prompts.begin(), spec.prompts.end()) <= spec.chunk)
    CHECK(ct.bytes_h2d == cw.bytes_h2d);

  // The decode that follows is the same.
  std::vector<std::int32_t> all(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) all[std::size_t(b)] = b;
  std::vector<T> sq(std::size_t(batch) * hq * D), sk(std::size_t(batch) * hkv * D), sv(sk.size());
  std::vector<float> sc(std::size_t(batch) * hkv), oa(sq.size()), ob(sq.size());
  for (int step = 0; step < spec.steps; ++step) {
    for (int b = 0; b < batch; ++b) {
      const sequence_tokens<T>& s = tokens[std::size_t(b)];
      const int token = spec.prompts[std::size_t(b)] + step;
      std::copy_n(s.q_row(token), hq * D, sq.data() + std::size_t(b) * hq * D);
      std::copy_n(s.k_row(token), hkv * D, sk.data() + std::size_t(b) * hkv * D);
      std::copy_n(s.v_row(token), hkv * D, sv.data() + std::size_t(b) * hkv * D);
      std::copy_n(s.c_row(token), hkv, sc.data() + std::size_t(b) * hkv);
    }
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(all.data()), {batch});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(sq.data()), {batch, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(sk.data()), {batch, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(sv.data()), {batch, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(sc.data()), {batch, hkv});
    a.o = nosa::make_contiguous<3>(oa.data(), {batch, hq, D});
    REQUIRE(t.layer.reserve(1) == status::success);
    REQUIRE(t.layer.step(a) == status::success);
    a.o = nosa::make_contiguous<3>(ob.data(), {batch, hq, D});
    REQUIRE(twin.layer.reserve(1) == status::success);
    REQUIRE(twin.layer.step(a) == status::success);
    INFO("decode step " << step);
    REQUIRE(std::memcmp(oa.data(), ob.data(), oa.size() * sizeof(float)) == 0);
    const nosa::counters lt = t.layer.last_step_counters(), lw = twin.layer.last_step_counters();
    CHECK(lt.misses == lw.misses);
    CHECK(lt.bytes_h2d == lw.bytes_h2d);
    CHECK(lt.bytes_d2h == lw.bytes_d2h);
    for (int b = 0; b < batch; ++b) require_same_state(t, twin, b);
  }
}

/// Ragged prompts, none a multiple of the block size but one, longer than k blocks; chunks that divide none.
prefill_spec ragged_spec(std::uint64_t seed, int chunk = 40) {
  prefill_spec s;
  s.prompts = {300, 37, 211, 64, 0};
  s.config = small_config(int(s.prompts.size()), 300 + 40);
  s.chunk = chunk;
  s.seed = seed;
  return s;
}

template <bias_mode Bias>
using nosa_offload = combo<float, nosa::eviction_score_pooling, nosa::offload_store, Bias>;

}  // namespace

TEST_CASE("dense prefill against the reference with each bias mode, fp32") {
  check_prefill<nosa_offload<bias_mode::after_scale>, nosa::dense_prefill>(ragged_spec(1));
  check_prefill<nosa_offload<bias_mode::before_scale>, nosa::dense_prefill>(ragged_spec(2, 7));
  check_prefill<nosa_offload<bias_mode::none>, nosa::dense_prefill>(ragged_spec(3));
}

TEST_CASE("sparse prefill (NOSA^S) against the reference's per-token selection with each bias mode, fp32") {
  check_prefill<nosa_offload<bias_mode::after_scale>, nosa::sparse_prefill>(ragged_spec(4));
  check_prefill<nosa_offload<bias_mode::before_scale>, nosa::sparse_prefill>(ragged_spec(5, 7));
  check_prefill<nosa_offload<bias_mode::none>, nosa::sparse_prefill>(
      ragged_spec(6, 333));  // one chunk a prompt
}

TEST_CASE("16-bit storage, output in the storage type") {
  using B16 = combo<bf16, nosa::eviction_score_pooling, nosa::offload_store, bias_mode::after_scale>;
  using F16 = combo<fp16, nosa::eviction_score_pooling, nosa::resident_store, bias_mode::before_scale>;
  check_prefill<B16, nosa::dense_prefill, bf16>(ragged_spec(11));
  check_prefill<B16, nosa::sparse_prefill, bf16>(ragged_spec(12, 19));
  check_prefill<F16, nosa::sparse_prefill, fp16>(ragged_spec(13));
}

TEST_CASE("InfLLMv2, a slot cache beyond k, a transfer budget for the decode that follows, GQA group 3") {
  using P = combo<bf16, nosa::no_query_agnostic, nosa::offload_store, bias_mode::none>;
  prefill_spec s = ragged_spec(21, 23);
  s.config.limits.cache_slots = 5;
  s.config.selection.max_new_blocks = 2;
  check_prefill<P, nosa::sparse_prefill>(s);
  s = ragged_spec(22, 50);
  s.config = small_config(int(s.prompts.size()), 340, /*hq=*/6, /*hkv=*/2);
  s.config.selection.max_new_blocks = 1;
  check_prefill<nosa_offload<bias_mode::after_scale>, nosa::sparse_prefill>(s);
}

TEST_CASE("FP8 KV cache: earlier blocks attended as stored, the query's own block exact") {
  using O = nosa::pipeline<bf16, 64, nosa::eviction_score_pooling, nosa::fp8_offload_store>;
  using R = nosa::pipeline<bf16, 64, nosa::eviction_score_pooling, nosa::fp8_resident_store>;
  check_prefill<O, nosa::sparse_prefill>(ragged_spec(31));
  check_prefill<R, nosa::dense_prefill>(ragged_spec(32, 17));
}

TEST_CASE("full attention: dense prefill with the bias") {
  check_prefill<nosa::full_attention_pipeline<float, 64, bias_mode::after_scale>, nosa::dense_prefill>(
      ragged_spec(41));
}

TEST_CASE("bad prefill calls return their status and change nothing") {
  using P = nosa_offload<bias_mode::after_scale>;
  using T = float;
  constexpr int D = P::head_dim;
  nosa::layer_config cfg = small_config(3, 40);  // 4 blocks of 16: 64 tokens a sequence
  cfg.limits.max_prefill_rows = 32;
  const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads;
  token_source<T> src(5, nosa_test::score_kind::gaussian);
  const sequence_tokens<T> tokens(src, 64, hq, hkv, D);

  // Two layers through the same calls, one of them also through every bad call: they must end byte-identical.
  test_layer<P> t, twin;
  for (test_layer<P>* x : {&t, &twin}) {
    REQUIRE(x->create(cfg) == status::success);
    REQUIRE(x->layer.add_sequence(0, tokens.prompt(40)) == status::success);
    REQUIRE(x->layer.add_sequence(1, no_prompt<T>(hkv, D)) == status::success);
    REQUIRE(x->layer.reserve(0, 24) == status::success);  // every block: 64 tokens
    REQUIRE(x->layer.reserve(1, 16) == status::success);  // block 0
  }
  const int rows = 33;  // one more than the capacity, for the capacity check
  std::vector<T> q(std::size_t(rows) * hq * D), k(std::size_t(rows) * hkv * D), v(k.size());
  std::vector<float> c(std::size_t(rows) * hkv), o(q.size());
  for (int r = 0; r < rows; ++r) {
    std::copy_n(tokens.q_row(20 + r % 40), hq * D, q.data() + std::size_t(r) * hq * D);
    std::copy_n(tokens.k_row(20 + r % 40), hkv * D, k.data() + std::size_t(r) * hkv * D);
    std::copy_n(tokens.v_row(20 + r % 40), hkv * D, v.data() + std::size_t(r) * hkv * D);
    std::copy_n(tokens.c_row(20 + r % 40), hkv, c.data() + std::size_t(r) * hkv);
  }
  std::int32_t seqs[2] = {1, 0}, offsets[3] = {0, 16, 28};  // 16 rows for sequence 1, 12 for sequence 0
  const auto valid = [&](int n = 32) {
    nosa::prefill_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs), {2});
    a.row_offsets = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(offsets), {3});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {n, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {n, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {n, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {n, hkv});
    a.o = nosa::make_contiguous<3>(o.data(), {n, hq, D});
    return a;
  };

  const auto rejects = [&](const nosa::prefill_args<T, float>& a, status expected, const char* what) {
    INFO(what);
    const auto before = t.snapshot();
    CHECK(t.layer.template prefill<nosa::sparse_prefill>(a) == expected);
    CHECK(t.layer.step_status() == expected);
    CHECK(t.snapshot() == before);
  };
  std::int32_t other[3] = {};
  const auto with_offsets = [&](std::int32_t a0, std::int32_t a1, std::int32_t a2) {
    other[0] = a0;
    other[1] = a1;
    other[2] = a2;
    nosa::prefill_args<T, float> a = valid();
    a.row_offsets = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(other), {3});
    return a;
  };
  std::int32_t listed[2] = {};
  const auto with_sequences = [&](std::int32_t s0, std::int32_t s1) {
    listed[0] = s0;
    listed[1] = s1;
    nosa::prefill_args<T, float> a = valid();
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(listed), {2});
    return a;
  };

  {
    nosa::prefill_args<T, float> a = valid();
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {32, hq - 1, D});
    rejects(a, status::shape_mismatch, "q with a query head too few");
    a = valid();
    a.o = nosa::make_contiguous<3>(o.data(), {31, hq, D});
    rejects(a, status::shape_mismatch, "o with fewer rows than q");
    a = valid();
    a.row_offsets = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(offsets), {2});
    rejects(a, status::shape_mismatch, "row_offsets without the end of the last chunk");
    a = valid();
    a.c = {};
    rejects(a, status::shape_mismatch, "no eviction scores for NOSA");
    a = valid();
    a.k.data = nullptr;
    rejects(a, status::null_pointer, "null keys");
    a = valid();
    a.v.strides[2] = 2;
    rejects(a, status::bad_layout, "strided values");
  }
  rejects(valid(33), status::shape_mismatch, "more rows than max_prefill_rows");
  rejects(with_offsets(0, 20, 16), status::invalid_argument, "decreasing offsets");
  rejects(with_offsets(-1, 16, 28), status::invalid_argument, "a negative offset");
  rejects(with_offsets(0, 16, 33), status::invalid_argument, "an offset beyond the rows");
  rejects(with_sequences(1, 2), status::unknown_sequence, "a sequence slot that is not live");
  rejects(with_sequences(1, 7), status::unknown_sequence, "a sequence slot out of range");
  rejects(with_sequences(1, 1), status::duplicate_sequence, "a sequence listed twice");
  rejects(with_offsets(0, 17, 28), status::not_reserved, "a chunk that reaches an unreserved block");
  rejects(with_offsets(0, 0, 25), status::sequence_full, "a chunk beyond the sequence's capacity");

  // The valid call, then a decode step: the layer that saw every bad call is the twin, byte for byte.
  for (test_layer<P>* x : {&t, &twin}) {
    REQUIRE(x->layer.template prefill<nosa::sparse_prefill>(valid()) == status::success);
    REQUIRE(x->layer.length(0) == 52);
    REQUIRE(x->layer.length(1) == 16);
    REQUIRE(x->layer.reserve(1) == status::success);
    nosa::step_args<T, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs), {2});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {2, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {2, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {2, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {2, hkv});
    a.o = nosa::make_contiguous<3>(o.data(), {2, hq, D});
    REQUIRE(x->layer.step(a) == status::success);
  }
  CHECK(t.snapshot() == twin.snapshot());
}
