// The host backend's decode step: time per step of one layer and the bytes its store moves, for NOSA and
// InfLLMv2 on the same synthetic batch. The host backend is the reference executor, so these figures are
// CPU timings, not a statement about GPU speed; they track regressions of the reference path.
#include <nosa/nosa.hpp>

#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

namespace {

template <class Pipeline>
void host_decode_step(benchmark::State& state) {
  using T = typename Pipeline::element_type;
  constexpr int d = Pipeline::head_dim;
  const int batch = static_cast<int>(state.range(0));
  const int context = static_cast<int>(state.range(1));
  const int hq = 8, hkv = 2;
  nosa::layer_config cfg;  // the paper's selection defaults
  cfg.num_q_heads = hq;
  cfg.num_kv_heads = hkv;
  cfg.limits.max_sequences = batch;
  cfg.limits.max_blocks_per_sequence = context / 64 + 64;
  cfg.limits.pool_pages = batch * cfg.limits.max_blocks_per_sequence;

  nosa::owning_layer<nosa::decode_layer<Pipeline, nosa::host_backend>> layer;
  if (!nosa::ok(layer.create(cfg))) {
    state.SkipWithError("create failed");
    return;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<T> pk(std::size_t(context) * hkv * d), pv(pk.size());
  std::vector<float> pc(std::size_t(context) * hkv);
  for (auto& x : pk) x = nosa::from_float<T>(normal(rng));
  for (auto& x : pv) x = nosa::from_float<T>(normal(rng));
  for (auto& x : pc) x = normal(rng);
  nosa::prompt_args<T> prompt;
  prompt.k = nosa::make_contiguous<3>(static_cast<const T*>(pk.data()), {context, hkv, d});
  prompt.v = nosa::make_contiguous<3>(static_cast<const T*>(pv.data()), {context, hkv, d});
  prompt.c = nosa::make_contiguous<2>(static_cast<const float*>(pc.data()), {context, hkv});
  std::vector<std::int32_t> seqs(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    seqs[std::size_t(b)] = b;
    if (!nosa::ok(layer->add_sequence(b, prompt))) {
      state.SkipWithError("add_sequence failed");
      return;
    }
  }
  std::vector<T> q(std::size_t(batch) * hq * d), k(std::size_t(batch) * hkv * d), v(k.size());
  std::vector<float> c(std::size_t(batch) * hkv), o(q.size());
  for (auto& x : q) x = nosa::from_float<T>(normal(rng));
  for (auto& x : k) x = nosa::from_float<T>(normal(rng));
  for (auto& x : v) x = nosa::from_float<T>(normal(rng));
  nosa::step_args<T, float> args;
  args.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {batch});
  args.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {batch, hq, d});
  args.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {batch, hkv, d});
  args.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {batch, hkv, d});
  args.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {batch, hkv});
  args.o = nosa::make_contiguous<3>(o.data(), {batch, hq, d});

  const nosa::counters before = layer->total_counters();
  for (auto _ : state) {
    if (!nosa::ok(layer->reserve(1)) || !nosa::ok(layer->step(args))) {
      state.SkipWithError("step failed");
      return;
    }
    // Queries drift so the query-aware picks change from step to step.
    for (auto& x : q) x = nosa::from_float<T>(0.9f * nosa::to_float(x) + 0.3f * normal(rng));
    benchmark::DoNotOptimize(o.data());
  }
  const nosa::counters after = layer->total_counters();
  const double steps = static_cast<double>(state.iterations());
  state.counters["tokens_per_s"] = benchmark::Counter(steps * batch, benchmark::Counter::kIsRate);
  state.counters["misses_per_step"] = static_cast<double>(after.misses - before.misses) / steps;
  state.counters["h2d_bytes_per_step"] = static_cast<double>(after.bytes_h2d - before.bytes_h2d) / steps;
}

using nosa_offload = nosa::nosa_pipeline<nosa::bf16, 128>;
using infllmv2_offload = nosa::infllmv2_pipeline<nosa::bf16, 128>;
using nosa_resident = nosa::nosa_pipeline<nosa::bf16, 128, nosa::resident_store>;

BENCHMARK_TEMPLATE(host_decode_step, nosa_offload)->ArgNames({"batch", "context"})->Args({1, 8192})->Args({4, 16384});
BENCHMARK_TEMPLATE(host_decode_step, infllmv2_offload)->ArgNames({"batch", "context"})->Args({1, 8192})->Args({4, 16384});
BENCHMARK_TEMPLATE(host_decode_step, nosa_resident)->ArgNames({"batch", "context"})->Args({1, 8192})->Args({4, 16384});

}  // namespace

BENCHMARK_MAIN();
