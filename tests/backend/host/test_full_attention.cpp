// Full attention (`full_attention_pipeline`) on the host backend against a dense softmax over every token,
// computed here in double precision: ragged prompts, steps across block boundaries, a sequence replaced
// mid-run, the bias, and the memory the pipeline does not need.
#include <nosa/nosa.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using nosa::bf16;
using nosa::status;

/// Every token of one sequence, as the layer stores it (rounded to the storage type).
struct token_history {
  std::vector<std::vector<double>> k, v;  // [H_kv][t * D + d]
  std::vector<std::vector<double>> c;     // [H_kv][t]
};

/// Dense reference: softmax over every token of (seq, KV head h) for one query head.
template <nosa::bias_mode Bias>
std::vector<double> dense_reference(const token_history& hist, int h, const std::vector<double>& q, int D) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const std::size_t n = hist.c[static_cast<std::size_t>(h)].size();
  std::vector<double> logit(n);
  double top = -INFINITY;
  for (std::size_t t = 0; t < n; ++t) {
    double dot = 0.0;
    for (int d = 0; d < D; ++d) dot += q[static_cast<std::size_t>(d)] * hist.k[static_cast<std::size_t>(h)][t * D + d];
    const double c = hist.c[static_cast<std::size_t>(h)][t];
    logit[t] = Bias == nosa::bias_mode::after_scale    ? dot * scale + c
               : Bias == nosa::bias_mode::before_scale ? (dot + c) * scale
                                                       : dot * scale;
    top = std::max(top, logit[t]);
  }
  std::vector<double> out(static_cast<std::size_t>(D), 0.0);
  double sum = 0.0;
  for (std::size_t t = 0; t < n; ++t) {
    const double p = std::exp(logit[t] - top);
    sum += p;
    for (int d = 0; d < D; ++d) out[static_cast<std::size_t>(d)] += p * hist.v[static_cast<std::size_t>(h)][t * D + d];
  }
  for (double& x : out) x /= sum;
  return out;
}

template <class T, nosa::bias_mode Bias, int D>
void run_full_attention(int block_size, int hq, int hkv, std::vector<int> prompts, int steps, std::uint64_t seed) {
  using P = nosa::full_attention_pipeline<T, D, Bias>;
  using layer_t = nosa::decode_layer<P, nosa::host_backend>;
  static_assert(P::dense && !P::store::offloads);
  const int batch = static_cast<int>(prompts.size());
  nosa::layer_config cfg;
  cfg.num_q_heads = hq;
  cfg.num_kv_heads = hkv;
  cfg.selection.block_size = block_size;
  cfg.selection.top_k = 4;  // ignored by full attention, but still a valid configuration
  cfg.selection.top_k_query_aware = 2;
  cfg.selection.n_local = 2;
  int longest = 0;
  for (int p : prompts) longest = std::max(longest, p);
  cfg.limits.max_sequences = batch;
  cfg.limits.max_blocks_per_sequence = (longest + steps + 1 + block_size - 1) / block_size + 1;
  cfg.limits.pool_pages = batch * cfg.limits.max_blocks_per_sequence + 2;

  nosa::owning_layer<layer_t> layer;
  REQUIRE(layer.create(cfg) == status::success);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto element = [&] { return nosa::from_float<T>(normal(rng)); };

  std::vector<token_history> hist(static_cast<std::size_t>(batch));
  const auto admit = [&](int b, int len) {
    token_history& th = hist[static_cast<std::size_t>(b)];
    th = token_history{};
    th.k.assign(static_cast<std::size_t>(hkv), {});
    th.v.assign(static_cast<std::size_t>(hkv), {});
    th.c.assign(static_cast<std::size_t>(hkv), {});
    std::vector<T> k(std::size_t(len) * hkv * D), v(k.size());
    std::vector<float> c(std::size_t(len) * hkv);
    for (int t = 0; t < len; ++t) {
      for (int h = 0; h < hkv; ++h) {
        for (int d = 0; d < D; ++d) {
          const std::size_t at = (std::size_t(t) * hkv + h) * D + d;
          k[at] = element();
          v[at] = element();
          th.k[static_cast<std::size_t>(h)].push_back(nosa::to_float(k[at]));
          th.v[static_cast<std::size_t>(h)].push_back(nosa::to_float(v[at]));
        }
        c[std::size_t(t) * hkv + h] = normal(rng);
        th.c[static_cast<std::size_t>(h)].push_back(P::uses_eviction_scores ? c[std::size_t(t) * hkv + h] : 0.0);
      }
    }
    nosa::prompt_args<T> prompt;
    prompt.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {len, hkv, D});
    prompt.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {len, hkv, D});
    if (P::uses_eviction_scores) prompt.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {len, hkv});
    REQUIRE(layer->add_sequence(b, prompt) == status::success);
  };
  for (int b = 0; b < batch; ++b) admit(b, prompts[static_cast<std::size_t>(b)]);

  double worst = 0.0;
  for (int step = 0; step < steps; ++step) {
    if (step == steps / 2) {  // continuous batching: a new sequence takes slot 0
      REQUIRE(layer->remove_sequence(0) == status::success);
      admit(0, 3 * block_size + 1);
    }
    REQUIRE(layer->reserve(1) == status::success);
    std::vector<std::int32_t> seqs(static_cast<std::size_t>(batch));
    std::vector<T> q(std::size_t(batch) * hq * D), k(std::size_t(batch) * hkv * D), v(k.size());
    std::vector<float> c(std::size_t(batch) * hkv), o(q.size());
    for (int b = 0; b < batch; ++b) seqs[static_cast<std::size_t>(b)] = batch - 1 - b;  // rows out of slot order
    for (auto& x : q) x = element();
    for (auto& x : k) x = element();
    for (auto& x : v) x = element();
    for (auto& x : c) x = normal(rng);
    nosa::step_args<T, float> args;
    args.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {batch});
    args.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {batch, hq, D});
    args.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {batch, hkv, D});
    args.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {batch, hkv, D});
    if (P::uses_eviction_scores) args.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {batch, hkv});
    args.o = nosa::make_contiguous<3>(o.data(), {batch, hq, D});
    REQUIRE(layer->step(args) == status::success);

    for (int b = 0; b < batch; ++b) {
      const int seq = seqs[static_cast<std::size_t>(b)];
      token_history& th = hist[static_cast<std::size_t>(seq)];
      for (int h = 0; h < hkv; ++h) {
        for (int d = 0; d < D; ++d) {
          th.k[static_cast<std::size_t>(h)].push_back(nosa::to_float(k[(std::size_t(b) * hkv + h) * D + d]));
          th.v[static_cast<std::size_t>(h)].push_back(nosa::to_float(v[(std::size_t(b) * hkv + h) * D + d]));
        }
        th.c[static_cast<std::size_t>(h)].push_back(P::uses_eviction_scores ? c[std::size_t(b) * hkv + h] : 0.0);
        CHECK(layer->selection(seq, h).empty());
      }
      CHECK(layer->length(seq) == static_cast<int>(th.c[0].size()));
      const int group = hq / hkv;
      for (int hqi = 0; hqi < hq; ++hqi) {
        std::vector<double> qd(static_cast<std::size_t>(D));
        for (int d = 0; d < D; ++d) qd[static_cast<std::size_t>(d)] = nosa::to_float(q[(std::size_t(b) * hq + hqi) * D + d]);
        const std::vector<double> ref = dense_reference<Bias>(th, hqi / group, qd, D);
        for (int d = 0; d < D; ++d) {
          const double got = o[(std::size_t(b) * hq + hqi) * D + d];
          const double want = ref[static_cast<std::size_t>(d)];
          const double err = std::abs(got - want) / (2e-5 + 1e-4 * std::abs(want));
          worst = std::max(worst, err);
        }
      }
    }
    const nosa::counters last = layer->last_step_counters();
    CHECK(last.misses == 0);
    CHECK(last.bytes_h2d == 0);
  }
  INFO("worst error as a fraction of the tolerance: " << worst);
  CHECK(worst <= 1.0);
}

}  // namespace

TEST_CASE("full attention equals a dense softmax over every token") {
  run_full_attention<float, nosa::bias_mode::none, 64>(16, 8, 2, {1, 40, 95, 16}, 40, 1);
  run_full_attention<bf16, nosa::bias_mode::none, 128>(32, 4, 4, {0, 33, 130}, 70, 2);
  run_full_attention<float, nosa::bias_mode::after_scale, 64>(16, 3, 1, {17, 64}, 30, 3);
}

TEST_CASE("full attention needs no compressed state and no selection scratch") {
  nosa::layer_config cfg;
  cfg.num_q_heads = 32;
  cfg.num_kv_heads = 8;
  cfg.limits.max_sequences = 4;
  cfg.limits.max_blocks_per_sequence = 64;
  cfg.limits.pool_pages = 256;
  nosa::arena_sizes full{}, sparse{};
  using full_layer = nosa::decode_layer<nosa::full_attention_pipeline<bf16, 128>, nosa::host_backend>;
  using sparse_layer =
      nosa::decode_layer<nosa::nosa_pipeline<bf16, 128, nosa::resident_store>, nosa::host_backend>;
  REQUIRE(full_layer::required_bytes(cfg, full) == status::success);
  REQUIRE(sparse_layer::required_bytes(cfg, sparse) == status::success);
  // The pool: pages x K and V x heads x block x D x 2 bytes; the full layer adds little beyond it.
  const std::size_t pool = std::size_t(256) * 2 * 8 * 64 * 128 * 2;
  CHECK(full.device >= pool);
  CHECK(full.device < pool + pool / 8);
  CHECK(full.device < sparse.device);
}
