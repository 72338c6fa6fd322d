// The library's prefill on the CUDA backend against the host backend's on the same inputs: ragged prompts
// that are not block multiples, chunks that do not divide them, dense (NOSA^F) and sparse (NOSA^S), bf16 and
// fp16, two bias modes, GQA groups 2 and 3, the offload and the resident store, full attention. Every output
// row within the host's fp32 tolerance, every per-row selection equal, the state after each call equal
// (lengths, selections, slot maps, misses, counters), and the decode steps that follow equal (they read the
// pages, tails, compressed keys and scores the prefill wrote); one chunk captured in a CUDA graph and
// replayed; bad calls that report their status and change nothing.
#include "../host/small_config.hpp"
#include "gpu.hpp"

#include <nosa/cuda.cuh>
#include <nosa/nosa.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using nosa::bf16;
using nosa::bias_mode;
using nosa::fp16;
using nosa::status;

/// `count` elements of managed memory, readable by both backends' layers.
template <class T>
class managed {
 public:
  explicit managed(std::size_t count) : n_(count) {
    void* p = nullptr;
    NOSA_CUDA_REQUIRE(cudaMallocManaged(&p, std::max<std::size_t>(count, 1) * sizeof(T)));
    p_ = static_cast<T*>(p);
  }
  ~managed() { cudaFree(p_); }
  managed(const managed&) = delete;
  managed& operator=(const managed&) = delete;
  T* data() const { return p_; }
  T& operator[](std::size_t i) const { return p_[i]; }
  std::size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// The host tests' small layer (blocks of 16, windows of 8 with stride 4, k = 8) with room for the prompts,
/// the decode after them and `rows` prefill rows.
nosa::layer_config prefill_config(int batch, int max_tokens, int rows, int hq, int hkv) {
  nosa::layer_config c = nosa_test::small_layer_config(hq, hkv, batch, (max_tokens + 15) / 16 + 1);
  c.limits.pool_pages += 4;
  c.limits.max_prefill_rows = rows;
  return c;
}

struct prefill_case {
  std::vector<int> prompts;
  int chunk = 24;
  int steps = 20;
  int hq = 4, hkv = 2;
  std::uint64_t seed = 1;
  bool graph = false;  ///< capture the second round's call in a CUDA graph and replay it
};

/// |x - y| within the host's tolerance for fp32 outputs, plus two units of a 16-bit output's rounding.
template <class Out>
bool close(double x, double y) {
  double tol = 2e-5 + 1e-4 * std::abs(y);
  if constexpr (!std::is_same_v<Out, float>)
    tol += 2.0 * std::abs(y) * (std::is_same_v<Out, bf16> ? 1.0 / 128 : 1.0 / 1024);
  return std::abs(x - y) <= tol;
}

std::vector<int> sorted(std::span<const std::int32_t> s) {
  std::vector<int> v(s.begin(), s.end());
  std::sort(v.begin(), v.end());
  return v;
}

template <class P, class Prefill, class Out = typename P::element_type>
void check_prefill_cuda(const prefill_case& pc) {
  using T = typename P::element_type;
  constexpr int D = P::head_dim;
  const int batch = static_cast<int>(pc.prompts.size());
  const int hq = pc.hq, hkv = pc.hkv, group = hq / hkv;
  const int rows_cap = pc.chunk * batch + 3;  // a few rows no chunk uses
  int longest = 0;
  for (int p : pc.prompts) longest = std::max(longest, p);
  const nosa::layer_config cfg = prefill_config(batch, longest + pc.steps + 1, rows_cap, hq, hkv);
  nosa::owning_layer<nosa::decode_layer<P, nosa::host_backend>> host;
  nosa::owning_layer<nosa::decode_layer<P, nosa::cuda_backend>> gpu;
  REQUIRE(host.create(cfg) == status::success);
  REQUIRE(gpu.create(cfg) == status::success);
  nosa_cuda_test::stream stream;

  // Every token of every sequence, prompt then decode, rounded to T.
  std::mt19937_64 rng(pc.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto element = [&] { return nosa::from_float<T>(normal(rng)); };
  std::vector<std::vector<T>> tq(batch), tk(batch), tv(batch);
  std::vector<std::vector<float>> tc(batch);
  for (int b = 0; b < batch; ++b) {
    const int n = pc.prompts[b] + pc.steps;
    for (int i = 0; i < n * hq * D; ++i) tq[b].push_back(element());
    for (int i = 0; i < n * hkv * D; ++i) tk[b].push_back(element());
    for (int i = 0; i < n * hkv * D; ++i) tv[b].push_back(element());
    for (int i = 0; i < n * hkv; ++i) tc[b].push_back(0.5f * normal(rng));
  }

  managed<T> q(std::size_t(rows_cap) * hq * D), k(std::size_t(rows_cap) * hkv * D), v(k.size());
  managed<float> c(std::size_t(rows_cap) * hkv);
  managed<Out> o_gpu(q.size());
  std::vector<Out> o_host(q.size());
  managed<std::int32_t> seqs(batch), offsets(batch + 1);
  nosa::prompt_args<T> empty;
  empty.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {0, hkv, D});
  empty.v = empty.k;
  empty.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {0, hkv});
  for (int b = 0; b < batch; ++b) {
    REQUIRE(host->add_sequence(b, empty) == status::success);
    REQUIRE(gpu->add_sequence(b, empty, stream) == status::success);
  }

  const auto args_for = [&](auto* out) {
    nosa::prefill_args<T, Out> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {batch});
    a.row_offsets = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(offsets.data()), {batch + 1});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {rows_cap, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {rows_cap, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {rows_cap, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {rows_cap, hkv});
    a.o = nosa::make_contiguous<3>(out, {rows_cap, hq, D});
    return a;
  };
  const auto check_state = [&] {
    for (int b = 0; b < batch; ++b) {
      REQUIRE(gpu->length(b, stream) == host->length(b));
      for (int h = 0; h < hkv; ++h) {
        INFO("sequence " << b << " head " << h);
        CHECK(sorted(gpu->selection(b, h, stream)) == sorted(host->selection(b, h)));
        const auto hs = host->slots(b, h);
        const std::vector<int> host_slots(hs.begin(), hs.end());
        const auto gs = gpu->slots(b, h, stream);
        CHECK(std::vector<int>(gs.begin(), gs.end()) == host_slots);
        CHECK(gpu->step_misses(b, h, stream) == host->step_misses(b, h));
      }
    }
    const nosa::counters a = host->total_counters(), g = gpu->total_counters(stream);
    CHECK(g.bytes_d2h == a.bytes_d2h);
    CHECK(g.bytes_h2d == a.bytes_h2d);
    CHECK(g.steps == a.steps);
  };

  std::vector<int> done(batch, 0);
  int round = 0;
  const auto remaining = [&] {
    for (int b = 0; b < batch; ++b) {
      if (done[b] < pc.prompts[b]) return true;
    }
    return false;
  };
  while (remaining()) {
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(stream));
    int row = 0;
    std::vector<int> taken(batch, 0);
    for (int i = 0; i < batch; ++i) {
      const int b = batch - 1 - i;  // reverse order; finished sequences get an empty chunk
      const int n = std::min(pc.chunk - (i % 2) * 5, pc.prompts[b] - done[b]);
      seqs[i] = b;
      offsets[i] = row;
      taken[b] = n;
      if (n > 0) {
        REQUIRE(host->reserve(b, n) == status::success);
        REQUIRE(gpu->reserve(b, n, stream) == status::success);
      }
      for (int j = 0; j < n; ++j, ++row) {
        const int t = done[b] + j;
        std::copy_n(tq[b].data() + std::size_t(t) * hq * D, hq * D, q.data() + std::size_t(row) * hq * D);
        std::copy_n(tk[b].data() + std::size_t(t) * hkv * D, hkv * D, k.data() + std::size_t(row) * hkv * D);
        std::copy_n(tv[b].data() + std::size_t(t) * hkv * D, hkv * D, v.data() + std::size_t(row) * hkv * D);
        std::copy_n(tc[b].data() + std::size_t(t) * hkv, hkv, c.data() + std::size_t(row) * hkv);
      }
    }
    offsets[batch] = row;
    REQUIRE(host->template prefill<Prefill>(args_for(o_host.data())) == status::success);
    if (pc.graph && round == 1) {
      // Captured once and replayed: the call enqueues kernels only.
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      NOSA_CUDA_REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      const status captured = gpu->template prefill<Prefill>(args_for(o_gpu.data()), stream);
      NOSA_CUDA_REQUIRE(cudaStreamEndCapture(stream, &graph));
      REQUIRE(captured == status::success);
      NOSA_CUDA_REQUIRE(cudaGraphInstantiate(&exec, graph, 0));
      NOSA_CUDA_REQUIRE(cudaGraphLaunch(exec, stream));
      NOSA_CUDA_REQUIRE(cudaStreamSynchronize(stream));
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
    } else {
      REQUIRE(gpu->template prefill<Prefill>(args_for(o_gpu.data()), stream) == status::success);
    }
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(stream));
    REQUIRE(gpu->step_status(stream) == status::success);
    for (int r = 0; r < row; ++r) {
      for (int h = 0; h < hkv; ++h) {
        INFO("round " << round << " row " << r << " head " << h);
        CHECK(gpu->prefill_selection(r, h, stream).size() == host->prefill_selection(r, h).size());
        CHECK(sorted(gpu->prefill_selection(r, h, stream)) == sorted(host->prefill_selection(r, h)));
      }
      for (int i = 0; i < hq * D; ++i) {
        const double x = nosa::to_float(o_gpu[std::size_t(r) * hq * D + i]);
        const double y = nosa::to_float(o_host[std::size_t(r) * hq * D + i]);
        if (!close<Out>(x, y)) {
          INFO("round " << round << " row " << r << " head " << i / D << " d " << i % D << ": " << x << " vs "
                        << y);
          REQUIRE(close<Out>(x, y));
        }
      }
    }
    for (int b = 0; b < batch; ++b) done[b] += taken[b];
    check_state();
    ++round;
  }

  // The decode that follows.
  std::vector<Out> step_host(std::size_t(batch) * hq * D);
  for (int step = 0; step < pc.steps; ++step) {
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(stream));
    REQUIRE(host->reserve(1) == status::success);
    REQUIRE(gpu->reserve(1, stream) == status::success);
    for (int b = 0; b < batch; ++b) {
      const int t = pc.prompts[b] + step;
      seqs[b] = b;
      std::copy_n(tq[b].data() + std::size_t(t) * hq * D, hq * D, q.data() + std::size_t(b) * hq * D);
      std::copy_n(tk[b].data() + std::size_t(t) * hkv * D, hkv * D, k.data() + std::size_t(b) * hkv * D);
      std::copy_n(tv[b].data() + std::size_t(t) * hkv * D, hkv * D, v.data() + std::size_t(b) * hkv * D);
      std::copy_n(tc[b].data() + std::size_t(t) * hkv, hkv, c.data() + std::size_t(b) * hkv);
    }
    const auto step_args = [&](Out* out) {
      nosa::step_args<T, Out> a;
      a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {batch});
      a.q = nosa::make_contiguous<3>(static_cast<const T*>(q.data()), {batch, hq, D});
      a.k = nosa::make_contiguous<3>(static_cast<const T*>(k.data()), {batch, hkv, D});
      a.v = nosa::make_contiguous<3>(static_cast<const T*>(v.data()), {batch, hkv, D});
      a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {batch, hkv});
      a.o = nosa::make_contiguous<3>(out, {batch, hq, D});
      return a;
    };
    REQUIRE(host->step(step_args(step_host.data())) == status::success);
    REQUIRE(gpu->step(step_args(o_gpu.data()), stream) == status::success);
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(stream));
    REQUIRE(gpu->step_status(stream) == status::success);
    for (std::size_t i = 0; i < step_host.size(); ++i) {
      const double x = nosa::to_float(o_gpu[i]), y = nosa::to_float(step_host[i]);
      if (!close<Out>(x, y)) {
        INFO("decode step " << step << " element " << i << ": " << x << " vs " << y);
        REQUIRE(close<Out>(x, y));
      }
    }
    check_state();
  }
  (void)group;
}

template <class T, bias_mode Bias, class Store = nosa::offload_store>
using nosa_pipeline =
    nosa::pipeline<T, 64, nosa::eviction_score_pooling, Store, nosa::sparse_attention<Bias>>;

}  // namespace

TEST_CASE("dense prefill on tensor cores against the host backend, bf16 and fp16, offload and resident") {
  NOSA_REQUIRE_GPU();
  check_prefill_cuda<nosa_pipeline<bf16, bias_mode::after_scale>, nosa::dense_prefill>(
      {{37, 100, 5}, 24, 20, 4, 2, 1});
  check_prefill_cuda<nosa_pipeline<fp16, bias_mode::before_scale, nosa::resident_store>, nosa::dense_prefill,
                     float>({{70, 19, 129}, 32, 16, 6, 2, 2});
  check_prefill_cuda<nosa::pipeline<bf16, 128>, nosa::dense_prefill>({{150, 45}, 40, 12, 6, 2, 3});
  check_prefill_cuda<nosa::full_attention_pipeline<bf16, 64, bias_mode::after_scale>, nosa::dense_prefill>(
      {{90, 33}, 28, 10, 4, 2, 4});
}

TEST_CASE("sparse prefill (NOSA^S) against the host backend: per-row selections and outputs") {
  NOSA_REQUIRE_GPU();
  check_prefill_cuda<nosa_pipeline<bf16, bias_mode::after_scale>, nosa::sparse_prefill>(
      {{37, 100, 5}, 24, 20, 4, 2, 5});
  check_prefill_cuda<nosa_pipeline<fp16, bias_mode::none, nosa::resident_store>, nosa::sparse_prefill, float>(
      {{70, 19, 129}, 32, 16, 6, 2, 6});
}

TEST_CASE("one prefill chunk captured in a CUDA graph and replayed") {
  NOSA_REQUIRE_GPU();
  prefill_case pc{{80, 50}, 24, 8, 4, 2, 7};
  pc.graph = true;
  check_prefill_cuda<nosa_pipeline<bf16, bias_mode::after_scale>, nosa::dense_prefill>(pc);
  check_prefill_cuda<nosa_pipeline<bf16, bias_mode::after_scale>, nosa::sparse_prefill>(pc);
}

TEST_CASE("bad prefill calls report their status and change nothing; unsupported pipelines say so") {
  NOSA_REQUIRE_GPU();
  using P = nosa_pipeline<bf16, bias_mode::after_scale>;
  constexpr int D = 64, hq = 4, hkv = 2, rows = 24;
  const nosa::layer_config cfg = prefill_config(2, 64, rows, hq, hkv);
  nosa::owning_layer<nosa::decode_layer<P, nosa::cuda_backend>> gpu;
  REQUIRE(gpu.create(cfg) == status::success);
  nosa_cuda_test::stream stream;
  managed<bf16> q(rows * hq * D), k(rows * hkv * D), v(rows * hkv * D), o(rows * hq * D);
  managed<float> c(rows * hkv);
  managed<std::int32_t> seqs(2), offsets(3);
  nosa::prompt_args<bf16> empty;
  empty.k = nosa::make_contiguous<3>(static_cast<const bf16*>(k.data()), {0, hkv, D});
  empty.v = empty.k;
  empty.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {0, hkv});
  REQUIRE(gpu->add_sequence(0, empty, stream) == status::success);
  REQUIRE(gpu->add_sequence(1, empty, stream) == status::success);
  REQUIRE(gpu->reserve(0, 4, stream) == status::success);
  nosa::prefill_args<bf16> a;
  a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {2});
  a.row_offsets = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(offsets.data()), {3});
  a.q = nosa::make_contiguous<3>(static_cast<const bf16*>(q.data()), {rows, hq, D});
  a.k = nosa::make_contiguous<3>(static_cast<const bf16*>(k.data()), {rows, hkv, D});
  a.v = nosa::make_contiguous<3>(static_cast<const bf16*>(v.data()), {rows, hkv, D});
  a.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {rows, hkv});
  a.o = nosa::make_contiguous<3>(o.data(), {rows, hq, D});
  const auto run = [&](int s0, int s1, int o0, int o1, int o2) {
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(stream));
    seqs[0] = s0, seqs[1] = s1, offsets[0] = o0, offsets[1] = o1, offsets[2] = o2;
    REQUIRE(gpu->prefill<nosa::sparse_prefill>(a, stream) == status::success);
    return gpu->step_status(stream);
  };
  CHECK(run(0, 0, 0, 2, 4) == status::duplicate_sequence);
  CHECK(run(0, 5, 0, 2, 4) == status::unknown_sequence);
  CHECK(run(0, 1, 0, 5, 4) == status::invalid_argument);
  CHECK(run(0, 1, 0, 2, rows + 1) == status::invalid_argument);
  // Admission reserves the block of a sequence's next token; 18 tokens reach sequence 1's second block.
  CHECK(run(0, 1, 0, 2, 20) == status::not_reserved);
  CHECK(gpu->length(0, stream) == 0);
  CHECK(gpu->length(1, stream) == 0);
  CHECK(run(0, 1, 0, 4, 4) == status::success);
  CHECK(gpu->length(0, stream) == 4);
  // Views are checked at once.
  auto wide = a;
  wide.q.extents[0] = rows + 1;
  CHECK(gpu->prefill(wide, stream) == status::shape_mismatch);
  // FP8 blocks have no prefill on the CUDA backend yet.
  using F = nosa::pipeline<bf16, 64, nosa::eviction_score_pooling, nosa::fp8_offload_store>;
  nosa::owning_layer<nosa::decode_layer<F, nosa::cuda_backend>> fp8;
  REQUIRE(fp8.create(cfg) == status::success);
  CHECK(fp8->prefill(a, stream) == status::not_supported);
}
