// The CUDA decode step of one layer on the GPU, stage by stage and whole, in bf16 with D = 128, the paper's
// selection (b_s 64, k 64, l_c 32, s_c 16) and H_q = 32 query heads over H_kv = 2 (group 16) or 8 (group 4)
// KV heads. Every figure comes with a ceiling measured in the same process:
//
//   - PCIe host to device: one large cudaMemcpyAsync from pinned memory (256 MiB, best of several);
//   - HBM: a large device-to-device copy (2 GiB, bytes read plus bytes written) and a read-only kernel that
//     sums 2 GiB with 16-byte loads.
//
// Benchmark families (named axes in each name; `docs/performance.md` explains every counter):
//
//   ceiling/h2d_copy, ceiling/d2h_copy, ceiling/hbm_copy, ceiling/hbm_read
//       the copies and the read kernel themselves (the H2D copy at several sizes);
//   gather
//       set-difference + gather (the diff runs in select_kernel, then gather_kernel, the offload store) at a
//       forced miss rate: before each timed launch a small kernel evicts the chosen share of every (sequence,
//       KV head)'s selected blocks from its slot cache, so the diff finds exactly those blocks missing and the
//       gather loads them from the pinned host pool; the diff's time is the selection with it less the same
//       selection without it; also timed: one contiguous copy of the same bytes;
//   attention/{resident,offload,full}
//       the attention kernel + merge_kernel over the full selection (k blocks per (sequence, KV head)), or
//       over every block of the cache for full attention;
//   step/{resident,offload,full}
//       the whole step captured once in a CUDA graph and replayed, then the same step launched kernel by
//       kernel with events between the kernels (time per stage; their sum against the replay).
//
// Timing: CUDA events around the timed region (Google Benchmark's manual time), one region per benchmark
// iteration. Ahead of each region a 256 MiB memset evicts the region's data from the 60 MB L2 (as PyTorch's
// SDPA is timed by bench/sdpa_peer.py), and a short spin kernel gives the host time to enqueue the whole
// region before the GPU reaches it, so host launch latency stays out of the figures. Derived counters use
// the median iteration time of the run.
//
// Before timing, each benchmark checks its own configuration: it re-admits the first and the last sequence
// of the timed batch, runs one step of the whole batch through the same launches it times (the stage kernels,
// or the captured graph) and compares those rows' selections and outputs with the host backend given the same
// prompts and inputs; the gather benchmark also checks that the blocks it loaded equal their pages in the
// host pool. A mismatch skips the benchmark with an error, so a fast wrong kernel is never reported.
//
// Without a usable GPU the program says so and exits 0, so that a CI build is unaffected; with
// NOSA_BENCH_REQUIRE_GPU=1 (scripts/perf.sh sets it) it fails instead. NOSA_BENCH_ITERATIONS sets the
// iterations of the stage benchmarks (default 100; the step benchmarks run half as many graph replays).
#include <nosa/cuda.cuh>

#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using nosa::bf16;
namespace nd = nosa::detail;

constexpr int head_dim = 128;
constexpr int q_heads = 32;
using offload_pipeline = nosa::nosa_pipeline<bf16, head_dim, nosa::offload_store>;
using resident_pipeline = nosa::nosa_pipeline<bf16, head_dim, nosa::resident_store>;
using full_pipeline = nosa::full_attention_pipeline<bf16, head_dim>;  // the dense baseline
using out_type = bf16;  // the attention output an engine would feed the next projection

// Tokens each sequence may grow by beyond its prompt during a run; a sequence that would outgrow them is
// re-admitted with its prompt.
constexpr int headroom_tokens = 4096;
// Sequence `s` takes its prompt from token `s * prompt_stride` of one shared random buffer.
constexpr int prompt_stride = 37;
// Nanoseconds of the spin kernel that precedes every timed region.
constexpr unsigned long long spin_ns = 100000;
// Bytes of the H2D ceiling copy (and the largest staging buffer).
constexpr std::size_t h2d_ceiling_bytes = std::size_t{256} << 20;
// Bytes of the HBM ceiling buffers (each of two).
constexpr std::size_t hbm_ceiling_bytes = std::size_t{2} << 30;

// Output tolerance, CUDA against host, as in the CUDA test suite (tests/backend/cuda/twin.cuh): both backends
// compute in fp32 from the same inputs and differ only in summation order; outputs are stored as bf16.
constexpr double output_rtol = 1e-4;
constexpr double output_atol = 2e-5;
constexpr double score_rtol = 3e-5;  // Sq, CUDA against host

// ---------------------------------------------------------------------------------------------------------
// Errors: every failure throws; each benchmark turns it into SkipWithError.
// ---------------------------------------------------------------------------------------------------------

struct bench_failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& what) { throw bench_failure(what); }

void cuda_check(cudaError_t e, const char* expr, int line) {
  if (e != cudaSuccess) {
    fail(std::string(expr) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") at line " +
         std::to_string(line));
  }
}
void status_check(nosa::status s, const char* expr, int line) {
  if (!nosa::ok(s)) {
    fail(std::string(expr) + " returned " + std::string(nosa::to_string(s)) + " at line " +
         std::to_string(line));
  }
}
#define BENCH_CUDA(expr) cuda_check((expr), #expr, __LINE__)
#define BENCH_NOSA(expr) status_check((expr), #expr, __LINE__)
#define BENCH_LAUNCHED() cuda_check(cudaGetLastError(), "kernel launch", __LINE__)

// ---------------------------------------------------------------------------------------------------------
// Small owners of CUDA objects.
// ---------------------------------------------------------------------------------------------------------

template <class T>
class device_array {
 public:
  device_array() = default;
  explicit device_array(std::size_t n) : n_(n) {
    if (n > 0) {
      void* p = nullptr;
      BENCH_CUDA(cudaMalloc(&p, n * sizeof(T)));
      p_ = static_cast<T*>(p);
    }
  }
  ~device_array() {
    if (p_ != nullptr) cudaFree(p_);
  }
  device_array(device_array&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_array& operator=(device_array&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  T* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

template <class T>
class pinned_array {
 public:
  pinned_array() = default;
  explicit pinned_array(std::size_t n) : n_(n) {
    if (n > 0) {
      void* p = nullptr;
      BENCH_CUDA(cudaMallocHost(&p, n * sizeof(T)));
      p_ = static_cast<T*>(p);
    }
  }
  ~pinned_array() {
    if (p_ != nullptr) cudaFreeHost(p_);
  }
  pinned_array(const pinned_array&) = delete;
  pinned_array& operator=(const pinned_array&) = delete;
  T* data() const noexcept { return p_; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

class stream_handle {
 public:
  stream_handle() { BENCH_CUDA(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~stream_handle() {
    if (s_ != nullptr) {
      cudaStreamSynchronize(s_);
      cudaStreamDestroy(s_);
    }
  }
  stream_handle(const stream_handle&) = delete;
  stream_handle& operator=(const stream_handle&) = delete;
  cudaStream_t get() const noexcept { return s_; }
  void sync() const { BENCH_CUDA(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

class event_set {
 public:
  explicit event_set(int n) : e_(static_cast<std::size_t>(n), nullptr) {
    for (auto& e : e_) BENCH_CUDA(cudaEventCreate(&e));
  }
  ~event_set() {
    for (auto e : e_) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }
  event_set(const event_set&) = delete;
  event_set& operator=(const event_set&) = delete;
  void record(int i, cudaStream_t s) { BENCH_CUDA(cudaEventRecord(e_[std::size_t(i)], s)); }
  void wait(int i) { BENCH_CUDA(cudaEventSynchronize(e_[std::size_t(i)])); }
  /// Milliseconds from event a to event b.
  double ms(int a, int b) const {
    float t = 0.0f;
    BENCH_CUDA(cudaEventElapsedTime(&t, e_[std::size_t(a)], e_[std::size_t(b)]));
    return t;
  }

 private:
  std::vector<cudaEvent_t> e_;
};

struct graph_exec {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  graph_exec() = default;
  graph_exec(const graph_exec&) = delete;
  graph_exec& operator=(const graph_exec&) = delete;
  ~graph_exec() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
};

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  const std::size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(mid), v.end());
  double m = v[mid];
  if (v.size() % 2 == 0) m = 0.5 * (m + *std::max_element(v.begin(), v.begin() + std::ptrdiff_t(mid)));
  return m;
}

// ---------------------------------------------------------------------------------------------------------
// Kernels of the benchmark itself: random data, the spin that precedes a timed region, the HBM read
// ceiling and the eviction that forces a miss rate.
// ---------------------------------------------------------------------------------------------------------

NOSA_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Roughly standard normal (sum of four uniforms, rescaled), from one hash.
__device__ inline float normalish(std::uint64_t key) {
  const std::uint64_t r = mix64(key);
  float s = 0.0f;
  for (int i = 0; i < 4; ++i) s += static_cast<float>((r >> (16 * i)) & 0xffffu) * (1.0f / 65536.0f);
  return (s - 2.0f) * 1.7320508f;
}

/// out[i] = normal draw, or with `keep` > 0: keep * out[i] + noise * draw (a query that drifts).
template <class T>
__global__ void fill_kernel(T* out, std::size_t n, std::uint64_t seed, float keep, float noise) {
  const std::uint64_t base = mix64(seed);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const float draw = normalish(base ^ (i * 0x9e3779b97f4a7c15ull));
    const float old = keep > 0.0f ? nosa::to_float(out[i]) : 0.0f;
    out[i] = nosa::from_float<T>(keep * old + noise * draw);
  }
}

template <class T>
void fill_random(T* p, std::size_t n, std::uint64_t seed, cudaStream_t s, float keep = 0.0f,
                 float noise = 1.0f) {
  if (n == 0) return;
  const std::size_t blocks = std::min<std::size_t>((n + 255) / 256, 8192);
  fill_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, s>>>(p, n, seed, keep, noise);
  BENCH_LAUNCHED();
}

__device__ inline unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void spin_kernel(unsigned long long ns) {
  const unsigned long long start = global_ns();
  while (global_ns() - start < ns) {
  }
}

std::unique_ptr<device_array<std::byte>> g_device;  // h2d_ceiling_bytes

/// What precedes every timed region: a memset of 256 MiB, so that the region's data comes from HBM and not
/// from the 60 MB L2 (a small batch's whole state would fit there), then a spin kernel, so that the host has
/// enqueued the whole region before the GPU reaches it.
void spin(cudaStream_t s) {
  if (g_device) BENCH_CUDA(cudaMemsetAsync(g_device->data(), 0, h2d_ceiling_bytes, s));
  spin_kernel<<<1, 32, 0, s>>>(spin_ns);
  BENCH_LAUNCHED();
}

/// Reads n 16-byte words, four loads in flight per thread; writes only if the sum hits a magic value (so the
/// loads cannot be dropped).
__global__ void __launch_bounds__(512)
    read_kernel(const uint4* __restrict__ p, std::size_t n, unsigned* sink) {
  unsigned acc = 0;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
    acc +=
        (a.x ^ a.y ^ a.z ^ a.w) + (b.x ^ b.y ^ b.z ^ b.w) + (c.x ^ c.y ^ c.z ^ c.w) + (d.x ^ d.y ^ d.z ^ d.w);
  }
  for (; i < n; i += stride) {
    const uint4 a = p[i];
    acc += a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

/// One thread per (batch row, KV head): frees the slots of the `count` lowest-ranked selected blocks that are
/// not forced (the tail and the other forced blocks stay), so that a diff at the same length finds exactly
/// those blocks missing. `total` misses are spread over the rows, the first rows taking one more.
template <class E, int D>
__global__ void evict_kernel(nd::cuda_state<E, D> s, const std::int32_t* seqs, int rows, long long total) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int b = r / s.kv_heads, h = r % s.kv_heads;
  const int seq = seqs[b];
  long long count = total / rows + (r < total % rows ? 1 : 0);
  const int n = s.selection_count[s.sh(seq, h)];
  const int current = nosa::block_count(s.lengths[seq], s.sel) - 1;
  const std::int32_t* chosen = s.selection_of(seq, h);
  std::int32_t* map = s.slot_map_of(seq, h);
  std::int32_t* where = s.block_slot_of(seq, h);
  for (int i = n - 1; i >= 0 && count > 0; --i) {
    const int blk = chosen[i];
    if (nosa::is_forced_block(blk, current, s.sel)) continue;
    const int slot = where[blk];
    if (slot < 0) continue;
    map[slot] = -1;
    where[blk] = -1;
    --count;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Process-wide state: the ceilings, staging buffers for the copies, one stream, and the one large resource
// (a layer, or the HBM buffers) that is alive at a time.
// ---------------------------------------------------------------------------------------------------------

struct ceilings_t {
  double h2d_gbps = 0, h2d_median_gbps = 0, d2h_gbps = 0, hbm_copy_gbps = 0, hbm_read_gbps = 0;
};
ceilings_t g_ceiling;
int g_sms = 1;
int g_stage_iterations = 100;
std::unique_ptr<stream_handle> g_stream;
std::unique_ptr<pinned_array<std::byte>> g_pinned;  // h2d_ceiling_bytes

struct resource {
  virtual ~resource() = default;
};
std::unique_ptr<resource> g_current;
std::map<std::string, std::string> g_errors;  // benchmark or layer key -> why it cannot run
std::map<std::string, int> g_validated;       // benchmark key -> near-ties seen by its check

void release_current() {
  g_current.reset();
  cudaDeviceSynchronize();
}

/// The resource of type R with key `key`, building it (after releasing the current one) if needed.
template <class R, class Make>
R& current(const std::string& key, Make&& make) {
  if (auto* r = dynamic_cast<R*>(g_current.get()); r != nullptr && r->key == key) return *r;
  if (auto it = g_errors.find(key); it != g_errors.end()) fail(it->second);
  release_current();
  try {
    std::unique_ptr<R> fresh = make();
    R& ref = *fresh;
    g_current = std::move(fresh);
    return ref;
  } catch (const std::exception& e) {
    g_errors[key] = std::string("setting up ") + key + ": " + e.what();
    release_current();
    fail(g_errors[key]);
  }
}

struct hbm_buffers final : resource {
  std::string key = "hbm buffers";
  device_array<uint4> src, dst;
  device_array<unsigned> sink;
  int read_blocks = 0;
  hbm_buffers() : src(hbm_ceiling_bytes / sizeof(uint4)), dst(hbm_ceiling_bytes / sizeof(uint4)), sink(1) {
    // Random contents: never measure on zeros.
    fill_words(reinterpret_cast<std::uint32_t*>(src.data()), hbm_ceiling_bytes / 4);
    int per_sm = 0;
    BENCH_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, read_kernel, 512, 0));
    read_blocks = std::max(1, per_sm) * g_sms;
    g_stream->sync();
  }
  static void fill_words(std::uint32_t* p, std::size_t n);
  void copy(cudaStream_t s) {
    BENCH_CUDA(cudaMemcpyAsync(dst.data(), src.data(), hbm_ceiling_bytes, cudaMemcpyDeviceToDevice, s));
  }
  void read(cudaStream_t s) {
    read_kernel<<<read_blocks, 512, 0, s>>>(src.data(), hbm_ceiling_bytes / sizeof(uint4), sink.data());
    BENCH_LAUNCHED();
  }
};

__global__ void words_kernel(std::uint32_t* p, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    p[i] = static_cast<std::uint32_t>(mix64(i));
  }
}
void hbm_buffers::fill_words(std::uint32_t* p, std::size_t n) {
  words_kernel<<<4096, 256, 0, g_stream->get()>>>(p, n);
  BENCH_LAUNCHED();
}

/// Times `reps` runs of `enqueue` (each preceded by the spin) on stream `s`; milliseconds per run.
template <class Enqueue>
std::vector<double> time_runs(cudaStream_t s, int reps, Enqueue&& enqueue) {
  event_set ev(2);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    spin(s);
    ev.record(0, s);
    enqueue();
    ev.record(1, s);
    ev.wait(1);
    t.push_back(ev.ms(0, 1));
  }
  return t;
}

double h2d_copy_us(std::size_t bytes, cudaStream_t s, int reps = 15) {
  if (bytes == 0) return 0.0;
  if (bytes > h2d_ceiling_bytes) {
    fail("copy of " + std::to_string(bytes) + " bytes exceeds the staging buffer");
  }
  const auto t = time_runs(s, reps, [&] {
    BENCH_CUDA(cudaMemcpyAsync(g_device->data(), g_pinned->data(), bytes, cudaMemcpyHostToDevice, s));
  });
  return median(t) * 1e3;
}

std::string gbps_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

/// Measures the ceilings once, before any benchmark: best (and median) of several runs after a warm-up.
void measure_ceilings() {
  cudaStream_t s = g_stream->get();
  // Never copy zeros.
  for (std::size_t i = 0; i < h2d_ceiling_bytes; i += 4096) g_pinned->data()[i] = std::byte(i / 4096 % 251);
  hbm_buffers::fill_words(reinterpret_cast<std::uint32_t*>(g_device->data()), h2d_ceiling_bytes / 4);
  const auto transfer = [&](cudaMemcpyKind kind) {
    void* dst = kind == cudaMemcpyHostToDevice ? static_cast<void*>(g_device->data())
                                               : static_cast<void*>(g_pinned->data());
    const void* src = kind == cudaMemcpyHostToDevice ? static_cast<const void*>(g_pinned->data())
                                                     : static_cast<const void*>(g_device->data());
    const auto t =
        time_runs(s, 9, [&] { BENCH_CUDA(cudaMemcpyAsync(dst, src, h2d_ceiling_bytes, kind, s)); });
    std::vector<double> gbps;
    for (double ms : t) gbps.push_back(double(h2d_ceiling_bytes) / (ms * 1e-3) / 1e9);
    const std::vector<double> timed(gbps.begin() + 2, gbps.end());  // the first two warm up
    return std::make_pair(*std::max_element(timed.begin(), timed.end()), median(timed));
  };
  const auto h2d = transfer(cudaMemcpyHostToDevice);
  g_ceiling.h2d_gbps = h2d.first;
  g_ceiling.h2d_median_gbps = h2d.second;
  g_ceiling.d2h_gbps = transfer(cudaMemcpyDeviceToHost).first;

  auto& hbm = current<hbm_buffers>("hbm buffers", [] { return std::make_unique<hbm_buffers>(); });
  const auto best = [](const std::vector<double>& ms, double bytes) {
    double b = 0;
    for (std::size_t i = 2; i < ms.size(); ++i) b = std::max(b, bytes / (ms[i] * 1e-3) / 1e9);
    return b;
  };
  g_ceiling.hbm_copy_gbps = best(time_runs(s, 9, [&] { hbm.copy(s); }), 2.0 * double(hbm_ceiling_bytes));
  g_ceiling.hbm_read_gbps = best(time_runs(s, 9, [&] { hbm.read(s); }), double(hbm_ceiling_bytes));
  release_current();
}

// ---------------------------------------------------------------------------------------------------------
// A layer under test: a CUDA layer full of sequences, the inputs of a step, and a host-backend layer of two
// sequences to check against.
// ---------------------------------------------------------------------------------------------------------

struct layer_spec {
  bool offload = true;
  int context = 32768;
  int hkv = 2;
  int sequences = 64;  // sequences admitted (the largest batch any benchmark of this layer uses)
  bool dense = false;  // full attention over every block (resident)

  int group() const { return q_heads / hkv; }
  std::string store() const { return dense ? "full" : (offload ? "offload" : "resident"); }
  std::string key() const {
    return store() + " layer, context " + std::to_string(context) +
           ", hkv " + std::to_string(hkv) + ", " + std::to_string(sequences) + " sequences";
  }
};

nosa::layer_config make_config(const layer_spec& spec, int sequences) {
  nosa::layer_config c;  // the paper's selection parameters
  c.num_q_heads = q_heads;
  c.num_kv_heads = spec.hkv;
  c.limits.max_sequences = sequences;
  c.limits.max_blocks_per_sequence = (spec.context + headroom_tokens) / c.selection.block_size + 1;
  c.limits.pool_pages = sequences * c.limits.max_blocks_per_sequence;
  return c;
}

std::vector<int> checked_sequences(int batch) {
  return batch == 1 ? std::vector<int>{0} : std::vector<int>{0, batch - 1};
}

bool near_tie(float a, float b) {
  if (a == b) return true;
  if (!std::isfinite(a) || !std::isfinite(b)) return false;
  return std::abs(double(a) - double(b)) <=
         2 * score_rtol * std::max(std::abs(double(a)), std::abs(double(b)));
}

double bf16_ulp(double magnitude) {
  int e = 0;
  std::frexp(magnitude, &e);
  int exponent = e - 1;
  if (magnitude == 0.0 || exponent < -126) exponent = -126;
  return std::ldexp(1.0, exponent - 7);
}

bool is_nan(bf16 x) { return (x.bits & 0x7f80u) == 0x7f80u && (x.bits & 0x007fu) != 0; }

template <class P>
class bench_layer final : public resource {
 public:
  using layer_type = nosa::decode_layer<P, nosa::cuda_backend>;
  using host_layer_type = nosa::decode_layer<P, nosa::host_backend>;
  static constexpr bool offloads = P::store::offloads;
  static constexpr int D = P::head_dim;

  std::string key;

  explicit bench_layer(const layer_spec& spec)
      : key(spec.key()), spec_(spec), cfg_(make_config(spec, spec.sequences)), prompt_len_(spec.context - 3) {
    const cudaStream_t s = st();
    nosa::arena_sizes sizes;
    BENCH_NOSA(layer_type::required_bytes(cfg_, sizes));
    BENCH_NOSA(device_.allocate(sizes.device));
    BENCH_NOSA(host_.allocate(sizes.host));
    BENCH_NOSA(layer_type::create(cfg_, device_.span(), host_.span(), layer_, s));

    const int S = spec.sequences, hkv = spec.hkv;
    const std::size_t tokens = std::size_t(prompt_len_) + std::size_t(S) * prompt_stride;
    const std::uint64_t seed = mix64(std::hash<std::string>{}(key));
    pk_ = device_array<bf16>(tokens * hkv * D);
    pv_ = device_array<bf16>(tokens * hkv * D);
    pc_ = device_array<float>(tokens * hkv);
    plq_ = device_array<bf16>(std::size_t(S) * q_heads * D);
    fill_random(pk_.data(), pk_.size(), seed + 1, s);
    fill_random(pv_.data(), pv_.size(), seed + 2, s);
    fill_random(pc_.data(), pc_.size(), seed + 3, s);
    fill_random(plq_.data(), plq_.size(), seed + 4, s);

    seqs_ = device_array<std::int32_t>(std::size_t(S));
    std::vector<std::int32_t> ids(static_cast<std::size_t>(S));
    for (int i = 0; i < S; ++i) ids[std::size_t(i)] = i;
    BENCH_CUDA(cudaMemcpyAsync(seqs_.data(), ids.data(), ids.size() * sizeof(std::int32_t),
                               cudaMemcpyHostToDevice, s));
    q_ = device_array<bf16>(std::size_t(S) * q_heads * D);
    k_ = device_array<bf16>(std::size_t(S) * hkv * D);
    v_ = device_array<bf16>(std::size_t(S) * hkv * D);
    c_ = device_array<float>(std::size_t(S) * hkv);
    o_ = device_array<out_type>(std::size_t(S) * q_heads * D);
    lengths_backup_ = device_array<std::int32_t>(std::size_t(S));
    new_inputs(S, seed + 5, false);  // every row holds data before any benchmark lets a query drift
    stream_.sync();
    for (int seq = 0; seq < S; ++seq) BENCH_NOSA(layer_.add_sequence(seq, prompt(seq), s));
  }

  const layer_spec& spec() const { return spec_; }
  const layer_type& layer() const { return layer_; }
  cudaStream_t st() const { return stream_.get(); }
  const std::int32_t* seq_ids() const { return seqs_.data(); }
  int max_tokens() const { return layer_.layout().max_tokens; }
  /// Room for a copy of every sequence's length.
  std::int32_t* lengths_backup() const { return lengths_backup_.data(); }

  nosa::prompt_args<bf16> prompt(int seq) const {
    const std::int64_t L = prompt_len_, hkv = spec_.hkv, d = D;
    const std::size_t first = std::size_t(seq) * prompt_stride;
    nosa::prompt_args<bf16> a;
    a.k = nosa::make_contiguous<3>(static_cast<const bf16*>(pk_.data() + first * hkv * D), {L, hkv, d});
    a.v = nosa::make_contiguous<3>(static_cast<const bf16*>(pv_.data() + first * hkv * D), {L, hkv, d});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(pc_.data() + first * hkv), {L, hkv});
    a.last_query = nosa::make_contiguous<2>(
        static_cast<const bf16*>(plq_.data() + std::size_t(seq) * q_heads * D), {q_heads, d});
    return a;
  }

  /// The step arguments of a batch of rows 0..batch-1, row b holding sequence b.
  nosa::step_args<bf16, out_type> args(int batch) const {
    const std::int64_t B = batch, hkv = spec_.hkv, d = D, hq = q_heads;
    nosa::step_args<bf16, out_type> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs_.data()), {B});
    a.q = nosa::make_contiguous<3>(static_cast<const bf16*>(q_.data()), {B, hq, d});
    a.k = nosa::make_contiguous<3>(static_cast<const bf16*>(k_.data()), {B, hkv, d});
    a.v = nosa::make_contiguous<3>(static_cast<const bf16*>(v_.data()), {B, hkv, d});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(c_.data()), {B, hkv});
    a.o = nosa::make_contiguous<3>(o_.data(), {B, hq, d});
    return a;
  }
  nd::sequence_source source(int batch) const { return {args(batch).sequences, -1}; }

  /// New inputs for a batch: fresh k, v, c; q fresh, or drifting from the last one (so that the selection
  /// moves a little from step to step, as a decode's does).
  void new_inputs(int batch, std::uint64_t seed, bool drift) {
    const cudaStream_t s = st();
    const std::size_t B = std::size_t(batch);
    if (drift) {
      fill_random(q_.data(), B * q_heads * D, seed, s, 0.9f, 0.3f);
    } else {
      fill_random(q_.data(), B * q_heads * D, seed, s);
    }
    fill_random(k_.data(), B * spec_.hkv * D, seed + 11, s);
    fill_random(v_.data(), B * spec_.hkv * D, seed + 12, s);
    fill_random(c_.data(), B * spec_.hkv, seed + 13, s);
  }

  /// Enqueues one step through decode_layer::enqueue_step (the launches `step` makes), with events 0..7
  /// around the stages when `ev` is given: 0 | begin | 1 | append_score | 2 | select (with the offload store's
  /// diff) | 3 | diff (launches nothing) | 4 | gather (offload store) | 5 | attention | 6 | merge | 7.
  void launch_step_kernels(int batch, event_set* ev) {
    const cudaStream_t s = st();
    using stage = typename nosa::decode_layer<P, nosa::cuda_backend>::step_stage;
    if (ev != nullptr) ev->record(0, s);
    BENCH_NOSA(layer_.enqueue_step(args(batch), s, [&](stage x) {
      if (ev != nullptr) ev->record(static_cast<int>(x) + 1, s);
    }));
    BENCH_LAUNCHED();
  }

  /// One step of `batch` rows captured through decode_layer::step; `overlapped`: the gather on a second
  /// stream, forked and joined inside the graph (cuda_overlap).
  std::unique_ptr<graph_exec> capture_step(int batch, bool overlapped = false) {
    auto g = std::make_unique<graph_exec>();
    if (overlapped && transfer_ == nullptr) {
      transfer_ = std::make_unique<stream_handle>();
      BENCH_CUDA(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
      BENCH_CUDA(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
    }
    BENCH_CUDA(cudaStreamBeginCapture(st(), cudaStreamCaptureModeThreadLocal));
    const nosa::status enqueued =
        overlapped ? layer_.step(args(batch), st(), nosa::cuda_overlap{transfer_->get(), fork_, join_})
                   : layer_.step(args(batch), st());
    const cudaError_t ended = cudaStreamEndCapture(st(), &g->graph);
    BENCH_NOSA(enqueued);
    BENCH_CUDA(ended);
    BENCH_CUDA(cudaGraphInstantiate(&g->exec, g->graph, 0));
    return g;
  }

  void expect_step_success() {
    const nosa::status s = layer_.step_status(st());
    if (!nosa::ok(s)) {
      fail("the step's state checks failed on the device: " + std::string(nosa::to_string(s)));
    }
  }

  template <class T>
  std::vector<std::remove_const_t<T>> download(T* src, std::size_t n) {
    std::vector<std::remove_const_t<T>> out(n);
    if (n > 0) BENCH_CUDA(cudaMemcpyAsync(out.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost, st()));
    stream_.sync();
    return out;
  }

  /// Re-admits every sequence that could not run `steps` more steps, then reserves pages for that many.
  void ensure_room(int steps) {
    const auto lengths = download(layer_.kernel_state().lengths, std::size_t(spec_.sequences));
    for (int seq = 0; seq < spec_.sequences; ++seq) {
      if (lengths[std::size_t(seq)] + steps + 1 > max_tokens()) readmit(seq);
    }
    BENCH_NOSA(layer_.reserve(steps, st()));
  }

  void readmit(int seq) {
    if (layer_.is_live(seq, st())) BENCH_NOSA(layer_.remove_sequence(seq, st()));
    BENCH_NOSA(layer_.add_sequence(seq, prompt(seq), st()));
  }

  /// Bytes of K and V that attention reads for rows 0..batch-1 over the current selections, when the
  /// sequences hold `extra` more tokens than their lengths (1 for the attention of the next step).
  double selected_kv_bytes(int batch, int extra) {
    const auto& s = layer_.kernel_state();
    const std::size_t rows = std::size_t(batch) * spec_.hkv;
    const auto lengths = download(s.lengths, std::size_t(batch));
    if constexpr (P::dense) {  // every token of every row
      double tokens = 0;
      for (const int length : lengths) tokens += double(length + extra) * spec_.hkv;
      return tokens * D * 2 * sizeof(bf16);
    }
    const auto counts = download(s.selection_count, rows);
    const auto chosen = download(s.selection, rows * std::size_t(s.top_k));
    const int bs = s.sel.block_size;
    double bytes = 0;
    for (std::size_t r = 0; r < rows; ++r) {
      const int length = lengths[r / std::size_t(spec_.hkv)] + extra;
      for (int i = 0; i < counts[r]; ++i) {
        const int m = chosen[r * std::size_t(s.top_k) + std::size_t(i)];
        const int tokens = std::clamp(length - m * bs, 0, bs);
        bytes += double(tokens) * D * 2 * sizeof(bf16);
      }
    }
    return bytes;
  }

  /// Bytes of compressed keys the scoring of the next step reads for rows 0..batch-1 (every complete window
  /// of a sequence one token longer than its length).
  double compressed_key_bytes(int batch) {
    if constexpr (P::dense) {
      return 0.0;
    } else {
      const auto& s = layer_.kernel_state();
      const auto lengths = download(s.lengths, std::size_t(batch));
      double windows = 0;
      for (const int length : lengths) windows += double(nosa::window_count(length + 1, s.sel)) * spec_.hkv;
      return windows * D * sizeof(bf16);
    }
  }

  /// Blocks the last diff marked missing, summed over rows 0..batch-1.
  long long batch_misses(int batch) {
    const auto m = download(layer_.kernel_state().step_misses, std::size_t(batch) * spec_.hkv);
    long long total = 0;
    for (int x : m) total += x;
    return total;
  }

  /// Every complete selected block of `seq` holds in its slot exactly what its page in the host pool holds.
  void check_slots_hold_pool(int seq) {
    if constexpr (offloads) {
      const auto& s = layer_.kernel_state();
      const nosa::state_layout& l = layer_.layout();
      const int length = layer_.length(seq, st());
      const auto table = download(s.table(seq), std::size_t(l.max_blocks));
      const std::size_t block = l.block_elements();
      const auto* pool = reinterpret_cast<const bf16*>(host_.span().data() + l.host_pool);
      for (int h = 0; h < spec_.hkv; ++h) {
        const std::vector<std::int32_t> chosen = copy(layer_.selection(seq, h, st()));
        const auto where = download(s.block_slot_of(seq, h), std::size_t(l.max_blocks));
        for (const int m : chosen) {
          if ((m + 1) * l.block_size > length) continue;  // the tail lives only in its slot
          const int slot = where[std::size_t(m)];
          const int page = table[std::size_t(m)];
          if (slot < 0 || page < 0) fail("selected block " + std::to_string(m) + " has no slot or page");
          const auto k = download(s.slot_k(seq, h, slot), block);
          const auto v = download(s.slot_v(seq, h, slot), block);
          const bf16* pk = pool + std::size_t(page) * l.page_elements() + std::size_t(h) * block;
          const bf16* pv = pool + std::size_t(page) * l.page_elements() + std::size_t(spec_.hkv + h) * block;
          if (std::memcmp(k.data(), pk, block * sizeof(bf16)) != 0 ||
              std::memcmp(v.data(), pv, block * sizeof(bf16)) != 0) {
            fail("sequence " + std::to_string(seq) + ", head " + std::to_string(h) + ": slot " +
                 std::to_string(slot) + " of block " + std::to_string(m) + " differs from its page " +
                 std::to_string(page) + " in the host pool");
          }
        }
      }
    } else {
      (void)seq;
    }
  }

  /// Checks the configuration of a benchmark once (see the file comment); returns the near-ties it saw.
  template <class Launch>
  int validate_once(const std::string& bench, int batch, Launch&& launch) {
    if (auto it = g_validated.find(bench); it != g_validated.end()) return it->second;
    const int ties = validate(batch, mix64(std::hash<std::string>{}(bench)), launch);
    g_validated[bench] = ties;
    return ties;
  }

 private:
  struct host_reference {
    nosa::host_arena device, host;
    host_layer_type layer;
  };

  struct host_prompt {
    std::vector<bf16> k, v, last_query;
    std::vector<float> c;
  };

  stream_handle stream_;
  layer_spec spec_;
  nosa::layer_config cfg_;
  int prompt_len_;
  nosa::cuda_device_arena device_;
  nosa::cuda_pinned_arena host_;
  layer_type layer_;
  device_array<bf16> pk_, pv_, plq_;
  device_array<float> pc_;
  device_array<std::int32_t> seqs_;
  device_array<bf16> q_, k_, v_;
  device_array<float> c_;
  device_array<out_type> o_;
  device_array<std::int32_t> lengths_backup_;
  std::unique_ptr<host_reference> ref_;
  std::unique_ptr<stream_handle> transfer_;  // overlapped steps: the gather's stream and its two events
  cudaEvent_t fork_ = nullptr, join_ = nullptr;

 public:
  ~bench_layer() override {
    if (fork_ != nullptr) cudaEventDestroy(fork_);
    if (join_ != nullptr) cudaEventDestroy(join_);
  }

 private:

  static std::vector<std::int32_t> copy(std::span<const std::int32_t> s) { return {s.begin(), s.end()}; }

  host_reference& reference() {
    if (!ref_) {
      auto r = std::make_unique<host_reference>();
      const nosa::layer_config c = make_config(spec_, 2);
      nosa::arena_sizes sizes;
      BENCH_NOSA(host_layer_type::required_bytes(c, sizes));
      BENCH_NOSA(r->device.allocate(sizes.device));
      BENCH_NOSA(r->host.allocate(sizes.host));
      BENCH_NOSA(host_layer_type::create(c, r->device.span(), r->host.span(), r->layer));
      ref_ = std::move(r);
    }
    return *ref_;
  }

  host_prompt download_prompt(int seq) {
    const nosa::prompt_args<bf16> p = prompt(seq);
    const std::size_t kv = std::size_t(prompt_len_) * spec_.hkv * D;
    host_prompt h;
    h.k = download(p.k.data, kv);
    h.v = download(p.v.data, kv);
    h.c = download(p.c.data, std::size_t(prompt_len_) * spec_.hkv);
    h.last_query = download(p.last_query.data, std::size_t(q_heads) * D);
    return h;
  }

  template <class Launch>
  int validate(int batch, std::uint64_t seed, Launch& launch) {
    const int hkv = spec_.hkv, group = spec_.group();
    const std::int64_t L = prompt_len_, d = D;
    const std::vector<int> checked = checked_sequences(batch);
    const int n = static_cast<int>(checked.size());
    host_reference& ref = reference();

    ensure_room(1);
    for (int i = 0; i < n; ++i) {
      const int seq = checked[std::size_t(i)];
      readmit(seq);
      if (ref.layer.is_live(i)) BENCH_NOSA(ref.layer.remove_sequence(i));
      const host_prompt hp = download_prompt(seq);
      nosa::prompt_args<bf16> a;
      a.k = nosa::make_contiguous<3>(hp.k.data(), {L, std::int64_t(hkv), d});
      a.v = nosa::make_contiguous<3>(hp.v.data(), {L, std::int64_t(hkv), d});
      a.c = nosa::make_contiguous<2>(hp.c.data(), {L, std::int64_t(hkv)});
      a.last_query = nosa::make_contiguous<2>(hp.last_query.data(), {std::int64_t(q_heads), d});
      BENCH_NOSA(ref.layer.add_sequence(i, a));
    }
    BENCH_NOSA(layer_.reserve(1, st()));
    BENCH_NOSA(ref.layer.reserve(1));

    // The same inputs on both sides: rows `checked` of the device batch are rows 0.. of the host batch.
    new_inputs(batch, seed, false);
    const std::size_t qn = std::size_t(q_heads) * D, kvn = std::size_t(hkv) * D;
    std::vector<bf16> hq, hk, hv;
    std::vector<float> hc;
    for (const int b : checked) {
      const auto q = download(q_.data() + std::size_t(b) * qn, qn);
      const auto k = download(k_.data() + std::size_t(b) * kvn, kvn);
      const auto v = download(v_.data() + std::size_t(b) * kvn, kvn);
      const auto c = download(c_.data() + std::size_t(b) * hkv, std::size_t(hkv));
      hq.insert(hq.end(), q.begin(), q.end());
      hk.insert(hk.end(), k.begin(), k.end());
      hv.insert(hv.end(), v.begin(), v.end());
      hc.insert(hc.end(), c.begin(), c.end());
    }
    std::vector<std::int32_t> hseqs(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) hseqs[std::size_t(i)] = i;
    std::vector<out_type> ho(std::size_t(n) * qn);
    nosa::step_args<bf16, out_type> ha;
    const std::int64_t N = n;
    ha.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(hseqs.data()), {N});
    ha.q = nosa::make_contiguous<3>(static_cast<const bf16*>(hq.data()), {N, std::int64_t(q_heads), d});
    ha.k = nosa::make_contiguous<3>(static_cast<const bf16*>(hk.data()), {N, std::int64_t(hkv), d});
    ha.v = nosa::make_contiguous<3>(static_cast<const bf16*>(hv.data()), {N, std::int64_t(hkv), d});
    ha.c = nosa::make_contiguous<2>(static_cast<const float*>(hc.data()), {N, std::int64_t(hkv)});
    ha.o = nosa::make_contiguous<3>(ho.data(), {N, std::int64_t(q_heads), d});
    BENCH_NOSA(ref.layer.step(ha));

    // Poison the whole output, run the step, and require every element written.
    BENCH_CUDA(cudaMemsetAsync(o_.data(), 0xff, std::size_t(batch) * qn * sizeof(out_type), st()));
    launch();
    BENCH_LAUNCHED();
    expect_step_success();
    const auto go = download(o_.data(), std::size_t(batch) * qn);
    for (std::size_t i = 0; i < go.size(); ++i) {
      if (is_nan(go[i])) {
        fail("output element " + std::to_string(i) + " of the batch was not written (or is NaN)");
      }
    }

    const nosa::state_layout& hl = ref.layer.layout();
    int ties = 0;
    for (int i = 0; i < n; ++i) {
      const int seq = checked[std::size_t(i)];
      for (int h = 0; h < hkv; ++h) {
        const std::string where = "batch " + std::to_string(batch) + ", sequence " + std::to_string(seq) +
                                  ", head " + std::to_string(h);
        const std::vector<std::int32_t> gsel = copy(layer_.selection(seq, h, st()));
        const std::vector<std::int32_t> hsel = copy(ref.layer.selection(i, h));
        if (gsel != hsel) {
          // Accepted only as an fp32 near-tie of the host's scores at the first rank where they differ.
          const std::size_t base = (std::size_t(i) * hkv + std::size_t(h)) * std::size_t(hl.max_blocks);
          const float* sq = reinterpret_cast<const float*>(ref.device.span().data() + hl.query_scores) + base;
          const float* se =
              reinterpret_cast<const float*>(ref.device.span().data() + hl.agnostic_scores) + base;
          std::size_t r = 0;
          while (r < gsel.size() && r < hsel.size() && gsel[r] == hsel[r]) ++r;
          const bool tie = r < gsel.size() && r < hsel.size() &&
                           (near_tie(sq[hsel[r]], sq[gsel[r]]) || near_tie(se[hsel[r]], se[gsel[r]]));
          if (!tie) {
            fail(where + ": the CUDA selection differs from the host's at rank " + std::to_string(r) + " (" +
                 std::to_string(gsel.size()) + " and " + std::to_string(hsel.size()) + " blocks)");
          }
          ++ties;
          continue;
        }
        if constexpr (offloads) {
          const int gm = layer_.step_misses(seq, h, st()), hm = ref.layer.step_misses(i, h);
          if (gm != hm) {
            fail(where + ": " + std::to_string(gm) + " misses on CUDA, " + std::to_string(hm) +
                 " on the host");
          }
        }
        for (int g = 0; g < group; ++g) {
          for (int x = 0; x < D; ++x) {
            const std::size_t head = std::size_t(h) * group + std::size_t(g);
            const double gv = nosa::to_float(go[(std::size_t(seq) * q_heads + head) * D + std::size_t(x)]);
            const double hv2 = nosa::to_float(ho[(std::size_t(i) * q_heads + head) * D + std::size_t(x)]);
            const double tol =
                output_atol + output_rtol * std::abs(hv2) + bf16_ulp(std::max(std::abs(hv2), std::abs(gv)));
            if (!(std::abs(gv - hv2) <= tol)) {
              fail(where + ", query head " + std::to_string(head) + ", d " + std::to_string(x) + ": CUDA " +
                   std::to_string(gv) + ", host " + std::to_string(hv2));
            }
          }
        }
      }
    }
    return ties;
  }
};

template <class P>
bench_layer<P>& get_layer(const layer_spec& spec) {
  return current<bench_layer<P>>(spec.key(), [&] { return std::make_unique<bench_layer<P>>(spec); });
}

// ---------------------------------------------------------------------------------------------------------
// Benchmarks.
// ---------------------------------------------------------------------------------------------------------

/// Runs `body`, turning a failure into SkipWithError (remembered, so later repetitions skip at once).
template <class Body>
void guarded(benchmark::State& state, const std::string& key, Body&& body) {
  if (auto it = g_errors.find(key); it != g_errors.end()) {
    state.SkipWithError(it->second.c_str());
    return;
  }
  try {
    body();
  } catch (const std::exception& e) {
    g_errors[key] = e.what();
    cudaGetLastError();
    state.SkipWithError(g_errors[key].c_str());
  }
}

void set(benchmark::State& state, const char* name, double value) {
  state.counters[name] = benchmark::Counter(value);
}

void bench_h2d(benchmark::State& state, const std::string& key, std::size_t bytes, bool to_device) {
  guarded(state, key, [&] {
    release_current();
    const cudaStream_t s = g_stream->get();
    void* dst = to_device ? static_cast<void*>(g_device->data()) : static_cast<void*>(g_pinned->data());
    const void* src =
        to_device ? static_cast<const void*>(g_pinned->data()) : static_cast<const void*>(g_device->data());
    const cudaMemcpyKind kind = to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
    time_runs(s, 2, [&] { BENCH_CUDA(cudaMemcpyAsync(dst, src, bytes, kind, s)); });
    std::vector<double> t;
    for (auto _ : state) {
      const double ms = time_runs(s, 1, [&] { BENCH_CUDA(cudaMemcpyAsync(dst, src, bytes, kind, s)); })[0];
      state.SetIterationTime(ms * 1e-3);
      t.push_back(ms);
    }
    const double us = median(t) * 1e3;
    const double gbps = double(bytes) / (us * 1e-6) / 1e9;
    const double ceiling = to_device ? g_ceiling.h2d_gbps : g_ceiling.d2h_gbps;
    set(state, "bytes", double(bytes));
    set(state, "median_us", us);
    set(state, "GBps", gbps);
    set(state, "ceiling_GBps", ceiling);
    set(state, "ratio", gbps / ceiling);
  });
}

void bench_hbm(benchmark::State& state, const std::string& key, bool read_only) {
  guarded(state, key, [&] {
    auto& hbm = current<hbm_buffers>("hbm buffers", [] { return std::make_unique<hbm_buffers>(); });
    const cudaStream_t s = g_stream->get();
    const auto run = [&] { read_only ? hbm.read(s) : hbm.copy(s); };
    time_runs(s, 2, run);
    std::vector<double> t;
    for (auto _ : state) {
      const double ms = time_runs(s, 1, run)[0];
      state.SetIterationTime(ms * 1e-3);
      t.push_back(ms);
    }
    const double bytes = (read_only ? 1.0 : 2.0) * double(hbm_ceiling_bytes);
    const double us = median(t) * 1e3;
    const double gbps = bytes / (us * 1e-6) / 1e9;
    const double ceiling = read_only ? g_ceiling.hbm_read_gbps : g_ceiling.hbm_copy_gbps;
    set(state, "bytes", bytes);
    set(state, "median_us", us);
    set(state, "GBps", gbps);
    set(state, "ceiling_GBps", ceiling);
    set(state, "ratio", gbps / ceiling);
  });
}

/// Set-difference + gather of the offload store with `miss_pct` percent of the selected blocks missing.
void bench_gather(benchmark::State& state, const std::string& key, const layer_spec& spec, int batch,
                  int miss_pct) {
  guarded(state, key, [&] {
    using P = offload_pipeline;
    auto& L = get_layer<P>(spec);
    const int ties = L.validate_once(key, batch, [&] { L.launch_step_kernels(batch, nullptr); });
    const cudaStream_t s = L.st();
    const auto& st = L.layer().kernel_state();
    const int rows = batch * spec.hkv, k = st.top_k;
    const long long total = std::llround(miss_pct / 100.0 * rows * k);
    if (total > static_cast<long long>(rows) * (k - st.sel.forced_blocks())) {
      fail("a miss rate of " + std::to_string(miss_pct) + "% exceeds the blocks that are not forced");
    }
    const nd::sequence_source seqs = L.source(batch);
    // The diff runs in the selection kernel: its cost is the selection with the diff less the same
    // selection without it (timed first, on the same evicted state, which it leaves unchanged).
    const auto enqueue = [&](event_set* ev) {
      evict_kernel<<<(rows + 127) / 128, 128, 0, s>>>(st, L.seq_ids(), rows, total);
      if (ev != nullptr) {
        ev->record(3, s);
        nd::launch_select<P>(st, seqs, rows, 0, true, true, false, nd::count_mode::step, s);
        ev->record(4, s);
      }
      if (ev != nullptr) ev->record(0, s);
      nd::launch_select<P>(st, seqs, rows, 0, true, true, true, nd::count_mode::step, s);
      if (ev != nullptr) ev->record(1, s);
      nd::launch_gather(st, seqs, rows, false, s);
      if (ev != nullptr) ev->record(2, s);
      BENCH_LAUNCHED();
    };
    // Check the forced configuration once before timing: the diff finds exactly the evicted blocks, and the
    // gather puts each block's bytes from its page into its slot.
    enqueue(nullptr);
    BENCH_CUDA(cudaStreamSynchronize(s));
    if (const long long found = L.batch_misses(batch); found != total) {
      fail("the diff found " + std::to_string(found) + " missing blocks, " + std::to_string(total) +
           " were evicted");
    }
    for (const int seq : checked_sequences(batch)) L.check_slots_hold_pool(seq);

    const double bytes = double(total) * 2.0 * double(st.block_bytes());
    const double copy_us = h2d_copy_us(static_cast<std::size_t>(bytes), s);
    for (int i = 0; i < 3; ++i) enqueue(nullptr);
    event_set ev(5);
    std::vector<double> t, t_select_diff, t_select, t_gather;
    for (auto _ : state) {
      spin(s);
      enqueue(&ev);
      ev.wait(2);
      t_select_diff.push_back(ev.ms(0, 1));
      t_select.push_back(ev.ms(3, 4));
      t_gather.push_back(ev.ms(1, 2));
      t.push_back(std::max(0.0, t_select_diff.back() - t_select.back()) + t_gather.back());  // diff + gather
      state.SetIterationTime(t.back() * 1e-3);
    }
    if (const long long found = L.batch_misses(batch); found != total) {
      fail("after timing, the diff found " + std::to_string(found) + " missing blocks, not " +
           std::to_string(total));
    }
    const double us = median(t) * 1e3, gather_us = median(t_gather) * 1e3;
    const double gbps = us > 0 ? bytes / (us * 1e-6) / 1e9 : 0.0;
    const double gather_gbps = gather_us > 0 ? bytes / (gather_us * 1e-6) / 1e9 : 0.0;
    set(state, "misses", double(total));
    set(state, "bytes_h2d", bytes);
    set(state, "median_us", us);
    set(state, "select_diff_us", median(t_select_diff) * 1e3);
    set(state, "select_us", median(t_select) * 1e3);
    set(state, "diff_us", std::max(0.0, median(t_select_diff) - median(t_select)) * 1e3);
    set(state, "gather_us", gather_us);
    set(state, "GBps", gbps);
    set(state, "ceiling_GBps", g_ceiling.h2d_gbps);
    set(state, "ratio", gbps / g_ceiling.h2d_gbps);
    set(state, "gather_GBps", gather_gbps);
    set(state, "copy_same_bytes_us", copy_us);
    set(state, "ratio_same_bytes", bytes > 0 && us > 0 ? copy_us / us : 0.0);
    set(state, "ctas", double(rows) * nd::gather_ctas_per_row(rows, k));
    set(state, "near_ties", ties);
  });
}

/// attention_kernel + merge_kernel over the full selections of a batch.
template <class P>
void bench_attention(benchmark::State& state, const std::string& key, const layer_spec& spec, int batch) {
  guarded(state, key, [&] {
    auto& L = get_layer<P>(spec);
    const int ties = L.validate_once(key, batch, [&] { L.launch_step_kernels(batch, nullptr); });
    const cudaStream_t s = L.st();
    const auto& st = L.layer().kernel_state();
    const auto a = L.args(batch);
    const int rows = batch * spec.hkv;
    const int splits = L.layer().attention_splits(rows);
    const double kv_bytes = L.selected_kv_bytes(batch, 1);
    const double scratch_bytes = 2.0 * rows * splits * spec.group() * (head_dim + 2) * sizeof(float);
    // merge_kernel advances the lengths; each run puts them back (outside the timed region).
    const std::size_t len_bytes = std::size_t(spec.sequences) * sizeof(std::int32_t);
    BENCH_CUDA(cudaMemcpyAsync(L.lengths_backup(), st.lengths, len_bytes, cudaMemcpyDeviceToDevice, s));
    using stage = typename nosa::decode_layer<P, nosa::cuda_backend>::step_stage;
    auto layer = L.layer();  // a copy shares the state
    const auto enqueue = [&](event_set* ev) {
      if (ev != nullptr) ev->record(0, s);
      BENCH_NOSA(layer.enqueue_step(
          a, s,
          [&](stage x) {
            if (ev != nullptr) ev->record(x == stage::attention ? 1 : 2, s);
          },
          stage::attention, stage::merge));
      BENCH_LAUNCHED();
      BENCH_CUDA(cudaMemcpyAsync(st.lengths, L.lengths_backup(), len_bytes, cudaMemcpyDeviceToDevice, s));
    };
    for (int i = 0; i < 3; ++i) enqueue(nullptr);
    event_set ev(3);
    std::vector<double> t, t_att, t_merge;
    for (auto _ : state) {
      spin(s);
      enqueue(&ev);
      ev.wait(2);
      t.push_back(ev.ms(0, 2));
      t_att.push_back(ev.ms(0, 1));
      t_merge.push_back(ev.ms(1, 2));
      state.SetIterationTime(t.back() * 1e-3);
    }
    BENCH_CUDA(cudaStreamSynchronize(s));
    L.expect_step_success();
    const double us = median(t) * 1e3;
    const double gbps = kv_bytes / (us * 1e-6) / 1e9;
    set(state, "rows", rows);
    set(state, "splits", splits);
    set(state, "kv_bytes", kv_bytes);
    set(state, "scratch_bytes", scratch_bytes);
    set(state, "median_us", us);
    set(state, "attention_us", median(t_att) * 1e3);
    set(state, "merge_us", median(t_merge) * 1e3);
    set(state, "GBps", gbps);
    set(state, "ceiling_GBps", g_ceiling.hbm_read_gbps);
    set(state, "ratio", gbps / g_ceiling.hbm_read_gbps);
    set(state, "near_ties", ties);
  });
}

/// The whole step: graph replays (the timed figure), then as many kernel-by-kernel steps for the stage times.
template <class P>
void bench_step(benchmark::State& state, const std::string& key, const layer_spec& spec, int batch) {
  guarded(state, key, [&] {
    auto& L = get_layer<P>(spec);
    const cudaStream_t s = L.st();
    const std::unique_ptr<graph_exec> g = L.capture_step(batch);
    const int ties = L.validate_once(key, batch, [&] { BENCH_CUDA(cudaGraphLaunch(g->exec, s)); });
    const int n = static_cast<int>(state.max_iterations);
    L.ensure_room(4 * n + 8);  // timed, kernel by kernel, overlapped, steady, warm-up
    std::uint64_t seed = mix64(std::hash<std::string>{}(key)) + 1000;
    for (int i = 0; i < 3; ++i) {
      L.new_inputs(batch, seed++, true);
      BENCH_CUDA(cudaGraphLaunch(g->exec, s));
    }
    BENCH_CUDA(cudaStreamSynchronize(s));
    L.expect_step_success();

    const nosa::counters before = L.layer().total_counters(s);
    event_set ev(8);
    // One replay of `graph` on fresh, drifting inputs; milliseconds.
    const auto replay = [&](const graph_exec& graph) {
      L.new_inputs(batch, seed++, true);
      spin(s);
      ev.record(0, s);
      BENCH_CUDA(cudaGraphLaunch(graph.exec, s));
      ev.record(1, s);
      ev.wait(1);
      return ev.ms(0, 1);
    };
    std::vector<double> t;
    for (auto _ : state) {
      t.push_back(replay(*g));
      state.SetIterationTime(t.back() * 1e-3);
    }
    L.expect_step_success();
    const nosa::counters after = L.layer().total_counters(s);
    const double kv_bytes = L.selected_kv_bytes(batch, 0);
    const double kc_bytes = L.compressed_key_bytes(batch);

    // The same steps kernel by kernel, events between the kernels.
    constexpr int stages = 7;
    std::vector<std::vector<double>> stage(stages);
    std::vector<double> sum;
    for (int i = 0; i < n; ++i) {
      L.new_inputs(batch, seed++, true);
      spin(s);
      L.launch_step_kernels(batch, &ev);
      ev.wait(stages);
      for (int x = 0; x < stages; ++x) stage[std::size_t(x)].push_back(ev.ms(x, x + 1));
      sum.push_back(ev.ms(0, stages));
    }
    L.expect_step_success();

    // Offload store: the same steps with the gather overlapped with attention over the resident blocks. The
    // exposed transfer time is what the overlapped step takes beyond the step without its gather.
    std::vector<double> t_overlap;
    if constexpr (P::store::offloads) {
      const std::unique_ptr<graph_exec> go = L.capture_step(batch, true);
      for (int i = 0; i < n; ++i) t_overlap.push_back(replay(*go));
      L.expect_step_success();
    }
    const nosa::counters last = L.layer().total_counters(s);
    // Offload store: the same graph replayed on unchanged inputs (the query does not move, so the selection
    // barely does): the step when (almost) every selected block is already in its slot.
    std::vector<double> t_steady;
    nosa::counters steady_before{}, steady_after{};
    if constexpr (P::store::offloads) {
      steady_before = L.layer().total_counters(s);
      for (int i = 0; i < n; ++i) {
        spin(s);
        ev.record(0, s);
        BENCH_CUDA(cudaGraphLaunch(g->exec, s));
        ev.record(1, s);
        ev.wait(1);
        t_steady.push_back(ev.ms(0, 1));
      }
      L.expect_step_success();
      steady_after = L.layer().total_counters(s);
    }

    const double steps = double(t.size());
    const double us = median(t) * 1e3, kernels_us = median(sum) * 1e3;
    const char* names[stages] = {"begin_us", "append_score_us", "select_us", "diff_us",
                                 "gather_us", "attention_us",   "merge_us"};
    double stage_us[stages];
    for (int x = 0; x < stages; ++x) {
      stage_us[x] = median(stage[std::size_t(x)]) * 1e3;
      set(state, names[x], stage_us[x]);
    }
    set(state, "select_diff_us", stage_us[2] + stage_us[3]);
    const double other = stage_us[0] + stage_us[1] + stage_us[2] + stage_us[3];
    const double attention = stage_us[5] + stage_us[6];
    const double h2d = steps > 0 ? double(after.bytes_h2d - before.bytes_h2d) / steps : 0.0;
    set(state, "median_us", us);
    set(state, "step_ms", us * 1e-3);
    set(state, "kernels_us", kernels_us);
    set(state, "graph_over_kernels", kernels_us > 0 ? us / kernels_us : 0.0);
    set(state, "score_select_us", stage_us[1] + stage_us[2] + stage_us[3]);
    set(state, "other_share", kernels_us > 0 ? other / kernels_us : 0.0);
    set(state, "kv_bytes", kv_bytes);
    set(state, "attention_GBps", attention > 0 ? kv_bytes / (attention * 1e-6) / 1e9 : 0.0);
    set(state, "attention_ratio",
        attention > 0 ? kv_bytes / (attention * 1e-6) / 1e9 / g_ceiling.hbm_read_gbps : 0.0);
    // Scoring (append + logits + pooling, the append_score stage) against the compressed keys it reads.
    set(state, "score_bytes", kc_bytes);
    set(state, "score_GBps", stage_us[1] > 0 ? kc_bytes / (stage_us[1] * 1e-6) / 1e9 : 0.0);
    set(state, "score_ratio", stage_us[1] > 0 ? kc_bytes / (stage_us[1] * 1e-6) / 1e9 / g_ceiling.hbm_read_gbps : 0.0);
    set(state, "misses_per_step", steps > 0 ? double(after.misses - before.misses) / steps : 0.0);
    set(state, "h2d_bytes_per_step", h2d);
    set(state, "d2h_bytes_per_step", steps > 0 ? double(after.bytes_d2h - before.bytes_d2h) / steps : 0.0);
    set(state, "gather_GBps", stage_us[4] > 0 ? h2d / (stage_us[4] * 1e-6) / 1e9 : 0.0);
    const double selected = double(last.hits - before.hits + last.misses - before.misses);
    set(state, "hit_rate", selected > 0 ? double(last.hits - before.hits) / selected : 0.0);
    if (!t_overlap.empty()) {
      const double overlap_us = median(t_overlap) * 1e3;
      const double exposed = std::max(0.0, overlap_us - (us - stage_us[4]));
      set(state, "overlap_us", overlap_us);
      set(state, "exposed_transfer_us", exposed);
      set(state, "exposed_share", stage_us[4] > 0 ? exposed / stage_us[4] : 0.0);
    }
    if (!t_steady.empty()) {
      set(state, "steady_us", median(t_steady) * 1e3);
      set(state, "steady_misses_per_step",
          double(steady_after.misses - steady_before.misses) / double(t_steady.size()));
    }
    set(state, "near_ties", ties);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Registration: the layers in the order they are built, each benchmark of a layer next to the others.
// ---------------------------------------------------------------------------------------------------------

using body_fn = std::function<void(benchmark::State&, const std::string&)>;

void add(const std::string& family, const std::vector<std::string>& names,
         const std::vector<std::int64_t>& values, int iterations, body_fn body) {
  std::string key = family;
  for (std::size_t i = 0; i < names.size(); ++i) key += "/" + names[i] + ":" + std::to_string(values[i]);
  benchmark::RegisterBenchmark(family.c_str(), [key, body](benchmark::State& st) { body(st, key); })
      ->ArgNames(names)
      ->Args(values)
      ->Iterations(iterations)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}

const std::vector<std::string> layer_axes = {"batch", "context", "hkv", "group", "k"};
std::vector<std::int64_t> layer_values(const layer_spec& spec, int batch) {
  return {batch, spec.context, spec.hkv, spec.group(), 64};
}

template <class P>
void add_attention(const layer_spec& spec, const std::vector<int>& batches) {
  const std::string family = "attention/" + spec.store();
  for (const int b : batches) {
    add(family, layer_axes, layer_values(spec, b), g_stage_iterations,
        [spec, b](benchmark::State& st, const std::string& key) { bench_attention<P>(st, key, spec, b); });
  }
}

template <class P>
void add_step(const layer_spec& spec, const std::vector<int>& batches) {
  const std::string family = "step/" + spec.store();
  for (const int b : batches) {
    add(family, layer_axes, layer_values(spec, b), std::max(1, g_stage_iterations / 2),
        [spec, b](benchmark::State& st, const std::string& key) { bench_step<P>(st, key, spec, b); });
  }
}

void add_gather(const layer_spec& spec, int batch, const std::vector<int>& miss_pcts) {
  std::vector<std::string> axes = layer_axes;
  axes.push_back("miss_pct");
  for (const int m : miss_pcts) {
    std::vector<std::int64_t> values = layer_values(spec, batch);
    values.push_back(m);
    add("gather", axes, values, g_stage_iterations,
        [spec, batch, m](benchmark::State& st, const std::string& key) {
          bench_gather(st, key, spec, batch, m);
        });
  }
}

void register_benchmarks() {
  const int ci = std::max(10, g_stage_iterations / 4);
  for (std::int64_t bytes = 64 << 10; bytes <= std::int64_t(h2d_ceiling_bytes); bytes *= 4) {
    add("ceiling/h2d_copy", {"bytes"}, {bytes}, ci, [bytes](benchmark::State& st, const std::string& key) {
      bench_h2d(st, key, std::size_t(bytes), true);
    });
  }
  add("ceiling/d2h_copy", {"bytes"}, {std::int64_t(h2d_ceiling_bytes)}, ci,
      [](benchmark::State& st, const std::string& key) { bench_h2d(st, key, h2d_ceiling_bytes, false); });
  add("ceiling/hbm_copy", {"bytes"}, {std::int64_t(hbm_ceiling_bytes)}, ci,
      [](benchmark::State& st, const std::string& key) { bench_hbm(st, key, false); });
  add("ceiling/hbm_read", {"bytes"}, {std::int64_t(hbm_ceiling_bytes)}, ci,
      [](benchmark::State& st, const std::string& key) { bench_hbm(st, key, true); });

  // Offload store, 32K context, H_kv 2: gather, attention over the slot cache, whole step.
  const layer_spec o32{true, 32768, 2, 256};
  add_gather(o32, 16, {0, 10, 25});
  add_gather(o32, 64, {0, 10, 25});
  add_gather(o32, 128, {6, 10});
  add_gather(o32, 256, {10});
  add_attention<offload_pipeline>(o32, {1, 4, 16, 32, 64, 128, 256});
  add_step<offload_pipeline>(o32, {1, 4, 16, 64});

  // Offload store, H_kv 8 (group 4).
  const layer_spec o32h8{true, 32768, 8, 32};
  add_gather(o32h8, 16, {10, 25});
  add_gather(o32h8, 32, {10, 25});
  add_step<offload_pipeline>(o32h8, {16, 32});

  // Offload store at 128K and 8K context.
  const layer_spec o128{true, 131072, 2, 64};
  add_gather(o128, 16, {10});
  add_gather(o128, 64, {10});
  add_step<offload_pipeline>(o128, {1, 4, 16, 64});
  const layer_spec o8{true, 8192, 2, 64};
  add_step<offload_pipeline>(o8, {1, 4, 16, 64});

  // Resident store.
  const layer_spec r8{false, 8192, 2, 64};
  add_step<resident_pipeline>(r8, {1, 4, 16, 64});
  const layer_spec r32{false, 32768, 2, 256};
  add_attention<resident_pipeline>(r32, {1, 4, 16, 32, 64, 128, 256});
  add_step<resident_pipeline>(r32, {1, 4, 16, 64});
  const layer_spec r32h8{false, 32768, 8, 64};
  add_attention<resident_pipeline>(r32h8, {1, 8, 16, 32, 64});
  add_step<resident_pipeline>(r32h8, {16, 64});
  const layer_spec r128{false, 131072, 2, 256};
  add_attention<resident_pipeline>(r128, {1, 4, 16, 32, 64, 128, 256});
  add_step<resident_pipeline>(r128, {1, 4, 16, 64});

  // Full attention over the whole cache (the dense baseline and the M <= k case).
  const layer_spec f32{false, 32768, 2, 64, true};
  add_attention<full_pipeline>(f32, {1, 4, 16, 32, 64});
  add_step<full_pipeline>(f32, {1, 4, 16, 64});
  const layer_spec f32h8{false, 32768, 8, 16, true};
  add_attention<full_pipeline>(f32h8, {1, 8, 16});
  add_step<full_pipeline>(f32h8, {1, 16});
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

/// Why no CUDA device can be used, or an empty string.
std::string gpu_absence_reason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("cudaGetDeviceCount: ") + cudaGetErrorString(e);
  }
  if (count == 0) return "cudaGetDeviceCount found no device";
  return {};
}

void add_device_context() {
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  int runtime = 0, driver = 0;
  BENCH_CUDA(cudaRuntimeGetVersion(&runtime));
  BENCH_CUDA(cudaDriverGetVersion(&driver));
  BENCH_CUDA(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
  benchmark::AddCustomContext("gpu", prop.name);
  benchmark::AddCustomContext("gpu_compute_capability",
                              std::to_string(prop.major) + "." + std::to_string(prop.minor));
  benchmark::AddCustomContext("gpu_sms", std::to_string(g_sms));
  benchmark::AddCustomContext("gpu_memory_gib", gbps_text(double(prop.totalGlobalMem) / double(1ull << 30)));
  benchmark::AddCustomContext("cuda_runtime", std::to_string(runtime));
  benchmark::AddCustomContext("cuda_driver", std::to_string(driver));
  benchmark::AddCustomContext("nosa_version", NOSA_VERSION_STRING);
  benchmark::AddCustomContext("element", "bf16");
  benchmark::AddCustomContext("head_dim", std::to_string(head_dim));
  benchmark::AddCustomContext("q_heads", std::to_string(q_heads));
  benchmark::AddCustomContext("selection", "block 64, k 64, k_qa 33, window 32, stride 16, 1 sink, 16 local");
}

}  // namespace

int main(int argc, char** argv) {
  bool listing = false;
  for (int i = 1; i < argc; ++i)
    listing = listing || std::strncmp(argv[i], "--benchmark_list_tests", 22) == 0;
  if (const char* it = std::getenv("NOSA_BENCH_ITERATIONS"); it != nullptr && std::atoi(it) > 0) {
    g_stage_iterations = std::atoi(it);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_benchmarks();
  if (listing) {
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
  }

  if (const std::string why = gpu_absence_reason(); !why.empty()) {
    if (env_flag("NOSA_BENCH_REQUIRE_GPU")) {
      std::fprintf(stderr, "bench_cuda_step: no usable CUDA device (%s), and NOSA_BENCH_REQUIRE_GPU is set\n",
                   why.c_str());
      return 1;
    }
    std::printf("bench_cuda_step: no usable CUDA device (%s): nothing to measure, exiting.\n", why.c_str());
    return 0;
  }

  int rc = 0;
  try {
    BENCH_CUDA(cudaSetDevice(0));
    add_device_context();
    g_stream = std::make_unique<stream_handle>();
    g_pinned = std::make_unique<pinned_array<std::byte>>(h2d_ceiling_bytes);
    g_device = std::make_unique<device_array<std::byte>>(h2d_ceiling_bytes);
    measure_ceilings();
    benchmark::AddCustomContext("ceiling_h2d_GBps", gbps_text(g_ceiling.h2d_gbps));
    benchmark::AddCustomContext("ceiling_h2d_median_GBps", gbps_text(g_ceiling.h2d_median_gbps));
    benchmark::AddCustomContext("ceiling_d2h_GBps", gbps_text(g_ceiling.d2h_gbps));
    benchmark::AddCustomContext("ceiling_hbm_copy_GBps", gbps_text(g_ceiling.hbm_copy_gbps));
    benchmark::AddCustomContext("ceiling_hbm_read_GBps", gbps_text(g_ceiling.hbm_read_gbps));
    std::printf(
        "ceilings: H2D %.1f GB/s (median %.1f), D2H %.1f GB/s, HBM copy %.0f GB/s, HBM read %.0f GB/s\n",
        g_ceiling.h2d_gbps, g_ceiling.h2d_median_gbps, g_ceiling.d2h_gbps, g_ceiling.hbm_copy_gbps,
        g_ceiling.hbm_read_gbps);
    std::fflush(stdout);
    benchmark::RunSpecifiedBenchmarks();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_step: %s\n", e.what());
    rc = 1;
  }
  release_current();
  g_device.reset();
  g_pinned.reset();
  g_stream.reset();
  benchmark::Shutdown();
  if (!g_errors.empty()) {
    std::fprintf(stderr, "bench_cuda_step: %zu benchmark(s) or layer(s) could not run:\n", g_errors.size());
    for (const auto& [key, why] : g_errors) std::fprintf(stderr, "  %s: %s\n", key.c_str(), why.c_str());
  }
  return rc;
}
