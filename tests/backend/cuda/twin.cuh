#pragma once
// Drives a host-backend layer and a CUDA-backend layer side by side on identical inputs and checks, after
// every plan call and every step, that the CUDA layer did what the host layer did:
//
//  - the block scores: Se bit for bit (both backends sum the same values in the same order), Sq within
//    fp32 rounding (`score_rtol`);
//  - the selection of every (sequence, KV head), as a set and in rank order. The CUDA selection must also be
//    exactly what the sequential selector (`nosa::select_blocks`) makes of the CUDA layer's own scores, so the
//    GPU top-k, budget and ranking are checked bit for bit whatever the scores. A CUDA selection that differs
//    from the host's is accepted only as an fp32 near-tie: it is reported with the scores involved, counted,
//    and must stay rare (under 1% of selections). The two layers are then resynchronised by copying the host
//    layer's state into the CUDA layer's arenas (both backends use one state layout), so a run goes on
//    checking after a near-tie;
//  - misses per (sequence, KV head), slot maps, lengths, free pages, the step's and the total counters;
//  - the outputs, within `output_tolerance`;
//  - every persistent state array, byte for byte: lengths, block tables, token scores, compressed keys and
//    scores, key rings, selections, slot maps, slot caches, marks, counters and the whole page pool (with a
//    quantized KV format: its codes, every scale and the tail buffers, so quantisation is bit-exact).
//
// Failed calls must return the same status on both backends (the CUDA layer reports state-dependent step
// errors through `step_status()`) and leave both layers' state byte-identical to before.

#include <nosa/cuda.cuh>

#include "gpu.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace nosa_cuda_test {

using nosa::status;

// ---------------------------------------------------------------------------------------------------------
// Tolerances.
// ---------------------------------------------------------------------------------------------------------

// Outputs, CUDA against host. Both backends compute every output in fp32 from identical (storage-rounded)
// inputs; they differ only in the order of the sums (warp reductions, attention split over CTAs and merged
// by log-sum-exp, against sequential loops) and in expf against std::exp. For outputs that are convex
// combinations of values of magnitude ~1 that puts the difference at a few fp32 ulps of the terms, ~1e-6.
// The bound below is the one docs/design.md sets for the host backend against the double-precision
// reference (each backend meets it on its own): rtol 1e-4, atol 2e-5, at least 20 times the expected
// difference, while a wrong block, row, bias or scale moves outputs by O(0.01-1).
inline constexpr double output_rtol = 1e-4;
inline constexpr double output_atol = 2e-5;
// Where a test's values are large and cancel (outputs ~1 from values of magnitude ~1,000), the difference
// scales with the values, not with the output: both backends round every p-weighted term, and the CUDA
// attention's products carry P split in two 16-bit parts (about 2^-17 relative each). The error of a sum of
// such terms is bounded by their rounding times sum p |v| <= max |v|; over thousands of terms the roundings
// largely cancel, and the differences observed are about 2^-22 max |v| (the FP8 extreme blocks: 3.2e-4
// and 9.7e-4 at |v| up to about 4,000). A test that feeds such values adds `value_rtol * max |v|` (2^-19,
// about 8 times that; a wrong block, row or scale of such values moves an output by far more).
inline constexpr double value_rtol = 1.0 / (1 << 19);

// Block scores Sq, CUDA against host, relative. Sq sums softmax probabilities of fp32 dot products; the
// backends' dot products differ by about sqrt(D) ulps of the terms, which moves a probability by ~1e-6
// relative. 3e-5 (about 250 fp32 ulps) leaves a wide margin; a scoring bug (wrong window, head, scale,
// pooling) is off by orders of magnitude more.
inline constexpr double score_rtol = 3e-5;

/// One unit in the last place of a storage type at `magnitude` (0 for fp32, whose rounding the fp32
/// tolerance already covers). Subnormal fp16 and bf16 values have the spacing of the smallest normal binade.
template <class T>
double storage_ulp(double magnitude) {
  if constexpr (std::is_same_v<T, float>) {
    return 0.0;
  } else {
    constexpr int mantissa_bits = std::is_same_v<T, nosa::bf16> ? 7 : 10;
    constexpr int min_exponent = std::is_same_v<T, nosa::bf16> ? -126 : -14;
    int e = 0;
    std::frexp(magnitude, &e);  // magnitude = f * 2^e, f in [0.5, 1)
    int exponent = e - 1;
    if (magnitude == 0.0 || exponent < min_exponent) exponent = min_exponent;
    return std::ldexp(1.0, exponent - mantissa_bits);
  }
}

/// Largest allowed |gpu - host| for one output element stored as `Out`. For 16-bit outputs both sides round
/// fp32 values that agree within the fp32 tolerance; rounding to nearest is monotonic, so the rounded values
/// differ by at most that tolerance plus one ulp of the storage type (never more: two ulps apart would need
/// the fp32 values to straddle a whole ulp).
template <class Out>
double output_tolerance(double host, double gpu) {
  return output_atol + output_rtol * std::abs(host) + storage_ulp<Out>(std::max(std::abs(host), std::abs(gpu)));
}

/// Sq of one block on the two backends agrees within fp32 rounding.
inline bool scores_agree(float a, float b) {
  if (a == b) return true;  // equal values, equal infinities
  if (!std::isfinite(a) || !std::isfinite(b)) return false;
  return std::abs(double(a) - double(b)) <= score_rtol * std::max(std::abs(double(a)), std::abs(double(b)));
}

/// Two blocks' host scores are close enough that the two backends' roundings may order them differently.
inline bool near_tie(float a, float b) {
  if (a == b) return true;
  if (!std::isfinite(a) || !std::isfinite(b)) return false;
  return std::abs(double(a) - double(b)) <= 2 * score_rtol * std::max(std::abs(double(a)), std::abs(double(b)));
}

// ---------------------------------------------------------------------------------------------------------
// Random inputs.
// ---------------------------------------------------------------------------------------------------------

/// Normally distributed inputs, rounded to the storage type before either backend sees them. Eviction
/// scores come from a continuous distribution too, so that no two windows' scores tie by construction.
struct random_source {
  std::mt19937_64 rng;
  std::normal_distribution<float> normal{0.0f, 1.0f};

  explicit random_source(std::uint64_t seed) : rng(seed) {}
  template <class T>
  T element() {
    return nosa::from_float<T>(normal(rng));
  }
  template <class T>
  void fill(std::vector<T>& v) {
    for (auto& x : v) x = element<T>();
  }
  int below(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); }
  double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng); }
};

/// A prompt of `length` tokens (the K, V and c a dense prefill would hand over).
template <class T>
struct prompt {
  int length = 0;
  std::vector<T> k, v;         ///< [P][H_kv][D]
  std::vector<float> c;        ///< [P][H_kv]; empty when the pipeline does not read eviction scores
  std::vector<T> last_query;   ///< [H_q][D] or empty
};

/// The new token of every sequence of one step.
template <class T>
struct batch {
  std::vector<std::int32_t> seqs;
  std::vector<T> q, k, v;  ///< [B][H_q][D], [B][H_kv][D], [B][H_kv][D]
  std::vector<float> c;    ///< [B][H_kv]; empty when the pipeline does not read eviction scores
  int size() const { return static_cast<int>(seqs.size()); }
};

template <class P>
prompt<typename P::element_type> random_prompt(random_source& r, const nosa::layer_config& cfg, int length,
                                               bool with_query) {
  using T = typename P::element_type;
  constexpr int D = P::head_dim;
  prompt<T> p;
  p.length = length;
  p.k.resize(std::size_t(length) * cfg.num_kv_heads * D);
  p.v.resize(p.k.size());
  r.fill(p.k);
  r.fill(p.v);
  if (P::uses_eviction_scores) {
    p.c.resize(std::size_t(length) * cfg.num_kv_heads);
    r.fill(p.c);
  }
  if (with_query) {
    p.last_query.resize(std::size_t(cfg.num_q_heads) * D);
    r.fill(p.last_query);
  }
  return p;
}

template <class P>
batch<typename P::element_type> random_batch(random_source& r, const nosa::layer_config& cfg,
                                             std::vector<std::int32_t> seqs) {
  using T = typename P::element_type;
  constexpr int D = P::head_dim;
  batch<T> b;
  b.seqs = std::move(seqs);
  const std::size_t rows = b.seqs.size();
  b.q.resize(rows * cfg.num_q_heads * D);
  b.k.resize(rows * cfg.num_kv_heads * D);
  b.v.resize(b.k.size());
  r.fill(b.q);
  r.fill(b.k);
  r.fill(b.v);
  if (P::uses_eviction_scores) {
    b.c.resize(rows * cfg.num_kv_heads);
    r.fill(b.c);
  }
  return b;
}

inline std::string show(const std::vector<std::int32_t>& v) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? " " : "") << v[i];
  os << ']';
  return os.str();
}

template <class X>
std::vector<X> copy_of(std::span<const X> s) {
  return std::vector<X>(s.begin(), s.end());
}

inline bool same_counters(const nosa::counters& a, const nosa::counters& b) {
  return a.steps == b.steps && a.hits == b.hits && a.misses == b.misses && a.bytes_h2d == b.bytes_h2d &&
         a.bytes_d2h == b.bytes_d2h;
}

inline std::string show(const nosa::counters& c) {
  std::ostringstream os;
  os << "{steps " << c.steps << ", hits " << c.hits << ", misses " << c.misses << ", h2d " << c.bytes_h2d
     << ", d2h " << c.bytes_d2h << '}';
  return os.str();
}

// ---------------------------------------------------------------------------------------------------------
// The two layers, with their arenas held by the test so the raw state can be read and compared.
// ---------------------------------------------------------------------------------------------------------

template <class P>
struct host_side {
  using layer_type = nosa::decode_layer<P, nosa::host_backend>;
  nosa::host_arena device, host;
  layer_type layer;

  status create(const nosa::layer_config& config) {
    nosa::arena_sizes sizes;
    NOSA_TRY(layer_type::required_bytes(config, sizes));
    NOSA_TRY(device.allocate(sizes.device));
    NOSA_TRY(host.allocate(sizes.host));
    return layer_type::create(config, device.span(), host.span(), layer);
  }
  const std::byte* dev() const { return device.span().data(); }
  const std::byte* hst() const { return host.span().data(); }

  /// Both arenas; the step status word (the one word a failed step writes) is left out.
  std::vector<std::byte> snapshot() const {
    std::vector<std::byte> s(device.size() + host.size());
    std::memcpy(s.data(), dev(), device.size());
    if (host.size()) std::memcpy(s.data() + device.size(), hst(), host.size());
    std::memset(s.data() + layer.layout().step_status, 0, sizeof(std::int32_t));
    return s;
  }
};

template <class P>
struct gpu_side {
  using layer_type = nosa::decode_layer<P, nosa::cuda_backend>;
  nosa::cuda_device_arena device;
  nosa::cuda_pinned_arena host;
  layer_type layer;

  status create(const nosa::layer_config& config, cudaStream_t s) {
    nosa::arena_sizes sizes;
    NOSA_TRY(layer_type::required_bytes(config, sizes));
    NOSA_TRY(device.allocate(sizes.device));
    NOSA_TRY(host.allocate(sizes.host));
    return layer_type::create(config, device.span(), host.span(), layer, s);
  }
  const std::byte* hst() const { return host.span().data(); }

  /// The device arena, copied after the work queued on `s`.
  std::vector<std::byte> device_copy(cudaStream_t s) const {
    std::vector<std::byte> d(device.size());
    NOSA_CUDA_REQUIRE(cudaMemcpyAsync(d.data(), device.span().data(), d.size(), cudaMemcpyDeviceToHost, s));
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(s));
    return d;
  }

  /// Both arenas. Left out: the step status word (written by a failed step, checked through step_status())
  /// and the host arena's transient areas from `staging` to its end (plan-call staging and the buffers the
  /// inspection calls return spans into), which every plan or inspection call may overwrite.
  std::vector<std::byte> snapshot(cudaStream_t s) const {
    std::vector<std::byte> d = device_copy(s);
    const nosa::state_layout& l = layer.layout();
    std::memset(d.data() + l.step_status, 0, sizeof(std::int32_t));
    const std::size_t at = d.size();
    d.resize(at + host.size());
    if (host.size()) std::memcpy(d.data() + at, hst(), host.size());
    std::memset(d.data() + at + l.staging, 0, host.size() - l.staging);
    return d;
  }

  /// Makes this layer's state a copy of the host layer's (the two backends share one state layout).
  void overwrite_from(const host_side<P>& h, cudaStream_t s) {
    REQUIRE(h.device.size() == device.size());
    REQUIRE(h.host.size() == host.size());
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(s));
    NOSA_CUDA_REQUIRE(
        cudaMemcpyAsync(device.span().data(), h.dev(), device.size(), cudaMemcpyHostToDevice, s));
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(s));
    if (host.size()) std::memcpy(host.span().data(), h.hst(), host.size());
  }
};

/// A transfer stream and the two events of an overlapped step (`nosa::cuda_overlap`), owned.
class overlap_resources {
 public:
  overlap_resources() {
    NOSA_CUDA_REQUIRE(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    NOSA_CUDA_REQUIRE(cudaEventCreateWithFlags(&join_, cudaEventDisableTiming));
  }
  ~overlap_resources() {
    if (fork_ != nullptr) cudaEventDestroy(fork_);
    if (join_ != nullptr) cudaEventDestroy(join_);
  }
  overlap_resources(const overlap_resources&) = delete;
  overlap_resources& operator=(const overlap_resources&) = delete;
  nosa::cuda_overlap get() const noexcept { return {transfer_.get(), fork_, join_}; }

 private:
  stream transfer_;
  cudaEvent_t fork_ = nullptr;
  cudaEvent_t join_ = nullptr;
};

/// One persistent state array: where it lives and how many bytes of it both backends must agree on.
struct region {
  const char* name;
  bool device;  ///< device arena (else host arena)
  std::size_t offset, bytes;
};

/// Every state array whose whole content is defined by the sequence of calls (scratch areas of either
/// backend are left out; the selections are compared up to their counts separately, since the entries past
/// a count are leftovers that the backends need not agree on).
inline std::vector<region> persistent_regions(const nosa::state_layout& l) {
  const std::size_t S = l.sequences, SH = S * l.kv_heads, D = l.head_dim, E = l.element_size;
  const std::size_t MB = l.max_blocks, MT = l.max_tokens, MW = l.max_windows, NS = l.slots, P = l.pages;
  const std::size_t i32 = sizeof(std::int32_t), f32 = sizeof(float), cnt = sizeof(nosa::counters);
  std::vector<region> r = {
      {"seq_length", true, l.seq_length, S * i32},
      {"seq_live", true, l.seq_live, S * i32},
      {"block_table", true, l.block_table, S * MB * i32},
      {"token_scores", true, l.token_scores, SH * MT * f32},
      {"selection_count", true, l.selection_count, SH * i32},
      {"step_misses", true, l.step_misses, SH * i32},
      {"batch_mark", true, l.batch_mark, S * i32},
      {"step_status", true, l.step_status, i32},
      {"totals", true, l.totals, cnt},
      {"last_step", true, l.last_step, cnt},
      {"page_refs", false, l.page_refs, P * i32},
      {"free_pages", false, l.free_pages, P * i32},
      {"free_count", false, l.free_count, i32},
  };
  if (!l.dense) {  // full attention has no compressed state
    r.push_back({"compressed_keys", true, l.compressed_keys, SH * MW * D * E});
    r.push_back({"compressed_scores", true, l.compressed_scores, SH * MW * f32});
    r.push_back({"key_ring", true, l.key_ring, SH * std::size_t(l.window) * D * E});
    r.push_back({"block_mark", true, l.block_mark, SH * MB * i32});
  }
  // Stored blocks hold elements, or the codes of a quantized format (FP8) with their scales beside them.
  const std::size_t V = l.value_size, pool = P * l.page_elements() * V,
                    pool_scales = P * 2 * l.kv_heads * f32;
  if (l.offloads) {
    r.push_back({"slot_map", true, l.slot_map, SH * NS * i32});
    r.push_back({"block_slot", true, l.block_slot, SH * MB * i32});
    r.push_back({"slot_stamp", true, l.slot_stamp, SH * NS * i32});
    r.push_back({"slot_keys", true, l.slot_keys, SH * NS * l.block_elements() * V});
    r.push_back({"slot_values", true, l.slot_values, SH * NS * l.block_elements() * V});
    r.push_back({"host_pool", false, l.host_pool, pool});
    if (l.quantized) {
      r.push_back({"slot_key_scales", true, l.slot_key_scales, SH * NS * f32});
      r.push_back({"slot_value_scales", true, l.slot_value_scales, SH * NS * f32});
      r.push_back({"host_pool_scales", false, l.host_pool_scales, pool_scales});
    }
  } else {
    r.push_back({"device_pool", true, l.device_pool, pool});
    if (l.quantized) r.push_back({"device_pool_scales", true, l.device_pool_scales, pool_scales});
  }
  if (l.quantized) {
    r.push_back({"tail_keys", true, l.tail_keys, SH * l.block_elements() * E});
    r.push_back({"tail_values", true, l.tail_values, SH * l.block_elements() * E});
  }
  return r;
}

/// Empty when both layers' persistent state is identical; otherwise where the first difference is.
inline std::string compare_state(const nosa::state_layout& l, const std::byte* host_dev, const std::byte* host_hst,
                                 const std::byte* gpu_dev, const std::byte* gpu_hst) {
  std::ostringstream os;
  for (const region& r : persistent_regions(l)) {
    const std::byte* a = (r.device ? host_dev : host_hst) + r.offset;
    const std::byte* b = (r.device ? gpu_dev : gpu_hst) + r.offset;
    if (std::memcmp(a, b, r.bytes) == 0) continue;
    std::size_t i = 0;
    while (a[i] == b[i]) ++i;
    os << "state array " << r.name << " differs first at byte " << i << " of " << r.bytes << " (host "
       << int(a[i]) << ", cuda " << int(b[i]) << ")";
    return os.str();
  }
  const auto* counts = reinterpret_cast<const std::int32_t*>(host_dev + l.selection_count);
  const auto* ha = reinterpret_cast<const std::int32_t*>(host_dev + l.selection);
  const auto* ga = reinterpret_cast<const std::int32_t*>(gpu_dev + l.selection);
  for (std::size_t sh = 0; sh < std::size_t(l.sequences) * l.kv_heads; ++sh) {
    const std::size_t at = sh * l.top_k;
    if (std::memcmp(ha + at, ga + at, sizeof(std::int32_t) * std::size_t(counts[sh])) != 0) {
      os << "state array selection differs for (sequence, head) row " << sh;
      return os.str();
    }
  }
  return {};
}

/// What a run saw.
struct run_stats {
  std::uint64_t steps = 0;
  std::uint64_t selections = 0;  ///< (sequence, KV head) selections compared, admissions included
  std::uint64_t near_ties = 0;   ///< selections that differed by an fp32 near-tie (then resynchronised)
  std::uint64_t misses = 0;
  double max_output_error = 0.0;  ///< max |cuda - host| / tolerance over all outputs
  double max_score_error = 0.0;   ///< max relative |Sq cuda - Sq host|
};

// ---------------------------------------------------------------------------------------------------------
// The twin driver.
// ---------------------------------------------------------------------------------------------------------

template <class P>
class twin {
 public:
  using T = typename P::element_type;
  static constexpr int D = P::head_dim;
  static constexpr bool offloads = P::store::offloads;
  static constexpr bool agnostic = P::query_agnostic::enabled;

  host_side<P> host;
  gpu_side<P> gpu;
  nosa::layer_config cfg;
  cudaStream_t s;
  run_stats stats;
  std::string context;  ///< prefixed to every report (which run, which step)
  double value_bound = 0.0;  ///< the largest |v| fed, where a test's values are large and cancel (`value_rtol`)
  const nosa::cuda_overlap* overlap = nullptr;  ///< when set, CUDA steps overlap the gather with attention

  twin(const nosa::layer_config& config, cudaStream_t stream, int max_batch = 0) : cfg(config), s(stream) {
    REQUIRE(host.create(cfg) == status::success);
    REQUIRE(gpu.create(cfg, s) == status::success);
    capacity_ = std::max(max_batch, cfg.limits.max_sequences + 4);
    const std::size_t rows = std::size_t(capacity_);
    d_seqs_ = device_buffer<std::int32_t>(rows);
    d_q_ = device_buffer<T>(rows * cfg.num_q_heads * D);
    d_k_ = device_buffer<T>(rows * cfg.num_kv_heads * D);
    d_v_ = device_buffer<T>(rows * cfg.num_kv_heads * D);
    d_c_ = device_buffer<float>(rows * cfg.num_kv_heads);
    d_of_ = device_buffer<float>(rows * cfg.num_q_heads * D);
    d_ot_ = device_buffer<T>(rows * cfg.num_q_heads * D);
    p_seqs_ = pinned_buffer<std::int32_t>(d_seqs_.size());
    p_q_ = pinned_buffer<T>(d_q_.size());
    p_k_ = pinned_buffer<T>(d_k_.size());
    p_v_ = pinned_buffer<T>(d_v_.size());
    p_c_ = pinned_buffer<float>(d_c_.size());
    check_state("after creation");
  }

  const nosa::state_layout& layout() const { return host.layer.layout(); }

  // --- plan calls -----------------------------------------------------------------------------------------

  /// Runs a plan call on both layers; both must return `expect`. A failed call must change neither layer.
  template <class HostCall, class GpuCall>
  status plan(const std::string& what, status expect, HostCall&& on_host, GpuCall&& on_gpu) {
    std::vector<std::byte> host_before, gpu_before;
    if (expect != status::success) {
      host_before = host.snapshot();
      gpu_before = gpu.snapshot(s);
    }
    const status hs = on_host(host.layer);
    const status gs = on_gpu(gpu.layer);
    INFO(context << what);
    REQUIRE(hs == expect);
    REQUIRE(gs == expect);
    if (expect != status::success) {
      CHECK(host.snapshot() == host_before);
      CHECK(gpu.snapshot(s) == gpu_before);
    }
    return gs;
  }

  /// Admits sequence `seq` with prompt `p` on both layers and checks the initial selection and state.
  status admit(int seq, const prompt<T>& p, status expect = status::success, nosa::shared_prefix share = {}) {
    const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, len = p.length;
    nosa::prompt_args<T> hp;
    hp.k = nosa::make_contiguous<3>(p.k.data(), {len, hkv, D});
    hp.v = nosa::make_contiguous<3>(p.v.data(), {len, hkv, D});
    if (P::uses_eviction_scores) hp.c = nosa::make_contiguous<2>(p.c.data(), {len, hkv});
    if (!p.last_query.empty()) hp.last_query = nosa::make_contiguous<2>(p.last_query.data(), {hq, D});

    device_buffer<T> dk(p.k.size()), dv(p.v.size()), dq(p.last_query.size());
    device_buffer<float> dc(p.c.size());
    dk.upload(p.k.data(), p.k.size(), s);
    dv.upload(p.v.data(), p.v.size(), s);
    dq.upload(p.last_query.data(), p.last_query.size(), s);
    dc.upload(p.c.data(), p.c.size(), s);
    nosa::prompt_args<T> gp;
    gp.k = nosa::make_contiguous<3>(static_cast<const T*>(dk.data()), {len, hkv, D});
    gp.v = nosa::make_contiguous<3>(static_cast<const T*>(dv.data()), {len, hkv, D});
    if (P::uses_eviction_scores) gp.c = nosa::make_contiguous<2>(static_cast<const float*>(dc.data()), {len, hkv});
    if (!p.last_query.empty()) gp.last_query = nosa::make_contiguous<2>(static_cast<const T*>(dq.data()), {hq, D});

    std::ostringstream what;
    what << "admission of sequence " << seq << " with a " << len << "-token prompt"
         << (p.last_query.empty() ? "" : " and its last query");
    if (share.blocks != 0) what << ", sharing " << share.blocks << " blocks of sequence " << share.source;
    const status r = plan(
        what.str(), expect, [&](auto& l) { return l.add_sequence(seq, hp, share); },
        [&](auto& l) { return l.add_sequence(seq, gp, share, s); });
    if (ok(r)) check_admission(seq, !p.last_query.empty(), what.str());
    return r;
  }

  status remove(int seq, status expect = status::success) {
    const status r = plan(
        "removal of sequence " + std::to_string(seq), expect, [&](auto& l) { return l.remove_sequence(seq); },
        [&](auto& l) { return l.remove_sequence(seq, s); });
    if (ok(r)) {
      CHECK_FALSE(gpu.layer.is_live(seq, s));
      CHECK(gpu.layer.selection(seq, 0, s).empty());
      check_state("after removing sequence " + std::to_string(seq));
    }
    return r;
  }

  status reserve(int tokens_ahead, status expect = status::success) {
    const status r = plan(
        "reserve(" + std::to_string(tokens_ahead) + ")", expect, [&](auto& l) { return l.reserve(tokens_ahead); },
        [&](auto& l) { return l.reserve(tokens_ahead, s); });
    CHECK(gpu.layer.free_page_count() == host.layer.free_page_count());
    return r;
  }

  status reserve(int seq, int tokens_ahead, status expect = status::success) {
    const status r = plan(
        "reserve(" + std::to_string(seq) + ", " + std::to_string(tokens_ahead) + ")", expect,
        [&](auto& l) { return l.reserve(seq, tokens_ahead); }, [&](auto& l) { return l.reserve(seq, tokens_ahead, s); });
    CHECK(gpu.layer.free_page_count() == host.layer.free_page_count());
    return r;
  }

  // --- steps ----------------------------------------------------------------------------------------------

  /// Views of the twin's fixed device input and output buffers for a batch of `rows` (what a graph captures).
  template <class Out>
  nosa::step_args<T, Out> device_args(int rows) const {
    nosa::step_args<T, Out> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(d_seqs_.data()), {rows});
    a.q = nosa::make_contiguous<3>(static_cast<const T*>(d_q_.data()), {rows, cfg.num_q_heads, D});
    a.k = nosa::make_contiguous<3>(static_cast<const T*>(d_k_.data()), {rows, cfg.num_kv_heads, D});
    a.v = nosa::make_contiguous<3>(static_cast<const T*>(d_v_.data()), {rows, cfg.num_kv_heads, D});
    if (P::uses_eviction_scores) {
      a.c = nosa::make_contiguous<2>(static_cast<const float*>(d_c_.data()), {rows, cfg.num_kv_heads});
    }
    a.o = nosa::make_contiguous<3>(device_output<Out>(), {rows, cfg.num_q_heads, D});
    return a;
  }

  /// The same step on both layers; the CUDA layer through `step()` on the twin's device buffers.
  template <class Out>
  status step(const batch<T>& in, status expect = status::success) {
    return step_with<Out>(
        in,
        [&] {
          return overlap != nullptr ? gpu.layer.step(device_args<Out>(in.size()), s, *overlap)
                                    : gpu.layer.step(device_args<Out>(in.size()), s);
        },
        expect);
  }

  /// The same step on both layers. The inputs are copied into the twin's device buffers first, then
  /// `launch()` enqueues the CUDA step on the twin's stream (a `step()` call, or a graph captured from one)
  /// and returns the status the enqueueing gave.
  template <class Out, class Launch>
  status step_with(const batch<T>& in, Launch&& launch, status expect = status::success) {
    const int rows = in.size(), hq = cfg.num_q_heads, hkv = cfg.num_kv_heads;
    REQUIRE(rows <= capacity_);
    const Out sentinel = nosa::from_float<Out>(777.0f);
    std::vector<Out> host_o(std::size_t(rows) * hq * D, sentinel), gpu_o(host_o.size(), sentinel);
    const std::vector<residency> before = residency_before(in);
    std::vector<std::byte> host_before, gpu_before;
    if (expect != status::success) {
      host_before = host.snapshot();
      gpu_before = gpu.snapshot(s);
    }
    const status gpu_status_before = gpu.layer.step_status(s);

    nosa::step_args<T, Out> ha;
    ha.sequences = nosa::make_contiguous<1>(in.seqs.data(), {rows});
    ha.q = nosa::make_contiguous<3>(in.q.data(), {rows, hq, D});
    ha.k = nosa::make_contiguous<3>(in.k.data(), {rows, hkv, D});
    ha.v = nosa::make_contiguous<3>(in.v.data(), {rows, hkv, D});
    if (P::uses_eviction_scores) ha.c = nosa::make_contiguous<2>(in.c.data(), {rows, hkv});
    ha.o = nosa::make_contiguous<3>(host_o.data(), {rows, hq, D});
    const status hs = host.layer.step(ha);

    upload(in);
    device_output_buffer<Out>().upload(gpu_o.data(), gpu_o.size(), s);
    const status immediate = launch();
    const status gs = ok(immediate) ? gpu.layer.step_status(s) : immediate;
    device_output_buffer<Out>().download(gpu_o.data(), gpu_o.size(), s);

    INFO(context << "step " << stats.steps << " of a batch " << show(in.seqs));
    REQUIRE(hs == expect);
    REQUIRE(gs == expect);
    if (!ok(expect)) {
      // Nothing changed on either side, no output was written, and the CUDA layer's step status holds the
      // error if (and only if) the device found it.
      CHECK(host.snapshot() == host_before);
      CHECK(gpu.snapshot(s) == gpu_before);
      CHECK(std::memcmp(gpu_o.data(), host_o.data(), gpu_o.size() * sizeof(Out)) == 0);
      CHECK(gpu.layer.step_status(s) == (ok(immediate) ? expect : gpu_status_before));
      return gs;
    }
    ++stats.steps;
    check_step(in, before, host_o, gpu_o);
    return gs;
  }

  /// Compares the full persistent state now; resynchronisation is never needed here (callers check it
  /// right after a call that both sides ran without divergence).
  void check_state(const std::string& when) {
    const auto gdev = gpu.device_copy(s);
    const std::string diff = compare_state(layout(), host.dev(), host.hst(), gdev.data(), gpu.hst());
    INFO(context << when << ": " << diff);
    REQUIRE(diff.empty());
    REQUIRE(same_counters(gpu.layer.total_counters(s), host.layer.total_counters()));
    REQUIRE(gpu.layer.free_page_count() == host.layer.free_page_count());
  }

 private:
  /// Slot map and block-to-slot map of one (sequence, KV head) as the selection of a step sees them: the
  /// previous step's, plus the slot the new token's block claims when it starts one.
  struct residency {
    std::vector<std::int32_t> map, where;
  };

  int capacity_ = 0;
  device_buffer<std::int32_t> d_seqs_;
  device_buffer<T> d_q_, d_k_, d_v_;
  device_buffer<float> d_c_;
  pinned_buffer<std::int32_t> p_seqs_;
  pinned_buffer<T> p_q_, p_k_, p_v_;
  pinned_buffer<float> p_c_;
  device_buffer<float> d_of_;
  device_buffer<T> d_ot_;

  template <class Out>
  Out* device_output() const {
    static_assert(std::is_same_v<Out, float> || std::is_same_v<Out, T>, "outputs are fp32 or the storage type");
    if constexpr (std::is_same_v<Out, float>) {
      return d_of_.data();
    } else {
      return d_ot_.data();
    }
  }
  template <class Out>
  device_buffer<Out>& device_output_buffer() {
    if constexpr (std::is_same_v<Out, float>) {
      return d_of_;
    } else {
      return d_ot_;
    }
  }

 public:
  /// Puts a batch's inputs in the fixed device buffers, through pinned staging as an engine would.
  void upload(const batch<T>& in) {
    // The previous step's copies out of the staging buffers are complete: every step ends synchronised.
    NOSA_CUDA_REQUIRE(cudaStreamSynchronize(s));
    stage(d_seqs_, p_seqs_, in.seqs);
    stage(d_q_, p_q_, in.q);
    stage(d_k_, p_k_, in.k);
    stage(d_v_, p_v_, in.v);
    stage(d_c_, p_c_, in.c);
  }

 private:
  template <class X>
  void stage(device_buffer<X>& dst, pinned_buffer<X>& staging, const std::vector<X>& src) {
    REQUIRE(src.size() <= staging.size());
    if (src.empty()) return;
    std::memcpy(staging.data(), src.data(), src.size() * sizeof(X));
    dst.upload(staging.data(), src.size(), s);
  }

  template <class X>
  const X* host_array(std::size_t offset) const {
    return reinterpret_cast<const X*>(host.dev() + offset);
  }

  std::size_t sh(int seq, int h) const { return std::size_t(seq) * cfg.num_kv_heads + h; }

  std::vector<residency> residency_before(const batch<T>& in) const {
    std::vector<residency> r;
    if constexpr (offloads) {
      const nosa::state_layout& l = layout();
      const int hkv = cfg.num_kv_heads, bs = cfg.selection.block_size;
      for (int b = 0; b < in.size(); ++b) {
        const int seq = in.seqs[std::size_t(b)];
        const bool live = host.layer.is_live(seq);
        const int t = live ? host.layer.length(seq) : 0;
        for (int h = 0; h < hkv; ++h) {
          residency x;
          if (live) {
            const std::int32_t* map = host_array<std::int32_t>(l.slot_map) + sh(seq, h) * l.slots;
            const std::int32_t* where = host_array<std::int32_t>(l.block_slot) + sh(seq, h) * l.max_blocks;
            x.map.assign(map, map + l.slots);
            x.where.assign(where, where + l.max_blocks);
            if (t % bs == 0 && t / bs < l.max_blocks) {
              // The new tail's slot: the lowest free one, else (with a cache) the least recently selected
              // block outside the current selection leaves.
              int slot = 0;
              while (slot < l.slots && x.map[std::size_t(slot)] >= 0) ++slot;
              if (slot == l.slots && l.cache_slots > 0) {
                const std::vector<std::int32_t> chosen = copy_of(host.layer.selection(seq, h));
                const std::int32_t* stamp = host_array<std::int32_t>(l.slot_stamp) + sh(seq, h) * l.slots;
                int best = -1;
                for (int j = 0; j < l.slots; ++j) {
                  const int held = x.map[std::size_t(j)];
                  if (std::find(chosen.begin(), chosen.end(), held) != chosen.end()) continue;
                  if (best < 0 || stamp[j] < stamp[best]) best = j;
                }
                slot = best;
                x.where[std::size_t(x.map[std::size_t(slot)])] = -1;
              }
              if (slot < l.slots) {
                x.map[std::size_t(slot)] = t / bs;
                x.where[std::size_t(t / bs)] = slot;
              }
            }
          }
          r.push_back(std::move(x));
        }
      }
    }
    return r;
  }

  /// What the sequential selector makes of the given scores and residency.
  std::vector<std::int32_t> reselect(int n_blocks, bool have_query, const float* sq, const float* se,
                                     const residency* res, bool with_budget) const {
    std::vector<float> q(sq, sq + n_blocks), e(se, se + n_blocks);
    std::vector<std::int32_t> order(std::size_t(std::max(n_blocks, 1))), mark(order.size(), 0);
    std::vector<std::int32_t> out(std::size_t(cfg.selection.top_k));
    const nosa::selection_workspace ws{q.data(), e.data(), order.data(), mark.data()};
    nosa::residency r{};
    if (offloads && with_budget && res != nullptr) r = {res->map.data(), res->where.data(), layout().slots};
    const int n = nosa::select_blocks<typename P::selector, agnostic>(cfg.selection, n_blocks, have_query, ws, r,
                                                                      out.data());
    out.resize(std::size_t(n));
    return out;
  }

  /// Checks one (sequence, KV head)'s scores and selection. Returns false when the CUDA selection differs
  /// from the host's by an fp32 near-tie (reported and counted; the caller resynchronises).
  bool check_selection(int seq, int h, bool have_query, const residency* res, bool with_budget,
                       const std::vector<std::byte>& gdev, const std::string& where) {
    if constexpr (P::dense) {  // full attention: no scores, no selection, on either backend
      ++stats.selections;
      REQUIRE(host.layer.selection(seq, h).empty());
      REQUIRE(gpu.layer.selection(seq, h, s).empty());
      return true;
    }
    const nosa::state_layout& l = layout();
    const int length = host.layer.length(seq);
    const int n_blocks = nosa::block_count(length, cfg.selection);
    const std::size_t base = sh(seq, h) * l.max_blocks;
    const float* hsq = host_array<float>(l.query_scores) + base;
    const float* hse = host_array<float>(l.agnostic_scores) + base;
    const float* gsq = reinterpret_cast<const float*>(gdev.data() + l.query_scores) + base;
    const float* gse = reinterpret_cast<const float*>(gdev.data() + l.agnostic_scores) + base;
    ++stats.selections;

    // Scores of the blocks that can be chosen (forced blocks carry +inf on the host after selection).
    for (int m = 0; m < n_blocks; ++m) {
      if (nosa::is_forced_block(m, n_blocks - 1, cfg.selection)) continue;
      if (agnostic && !(gse[m] == hse[m])) {
        FAIL(context << where << ", head " << h << ": Se of block " << m << " is " << gse[m] << " on CUDA, "
                     << hse[m] << " on the host (the two sum the same values in the same order)");
      }
      if (have_query) {
        if (!scores_agree(gsq[m], hsq[m])) {
          FAIL(context << where << ", head " << h << ": Sq of block " << m << " is " << gsq[m] << " on CUDA, "
                       << hsq[m] << " on the host");
        }
        if (std::isfinite(hsq[m]) && hsq[m] != 0.0f) {
          stats.max_score_error =
              std::max(stats.max_score_error, std::abs(double(gsq[m]) - double(hsq[m])) / std::abs(double(hsq[m])));
        }
      }
    }

    const std::vector<std::int32_t> hsel = copy_of(host.layer.selection(seq, h));
    const std::vector<std::int32_t> gsel = copy_of(gpu.layer.selection(seq, h, s));
    {
      // The GPU's top-k, budget and ranking are exact: its selection is what the sequential selector makes
      // of the GPU's own scores.
      const std::vector<std::int32_t> expected = reselect(n_blocks, have_query, gsq, gse, res, with_budget);
      INFO(context << where << ", head " << h << ": cuda " << show(gsel) << ", sequential selector on the cuda scores "
                   << show(expected));
      REQUIRE(gsel == expected);
    }
    if (gsel == hsel) return true;

    // A near-tie: the first rank where the two differ holds two blocks whose host scores are within the
    // two backends' rounding of each other. (With a hard budget the drops and replacements move ranks
    // around, so only the exactness check above applies there.)
    std::size_t i = 0;
    while (i < hsel.size() && i < gsel.size() && hsel[i] == gsel[i]) ++i;
    std::ostringstream os;
    os << context << where << ", head " << h << ": fp32 near-tie, host " << show(hsel) << ", cuda " << show(gsel);
    bool near = false;
    if (i < hsel.size() && i < gsel.size()) {
      const int a = hsel[i], b = gsel[i];
      os << "; first difference at rank " << i << ": host block " << a << " (Sq " << hsq[a] << ", Se " << hse[a]
         << "; cuda Sq " << gsq[a] << ") against cuda block " << b << " (Sq " << hsq[b] << ", Se " << hse[b]
         << "; cuda Sq " << gsq[b] << ")";
      near = near_tie(hsq[a], hsq[b]) || (agnostic && near_tie(hse[a], hse[b]));
    }
    const bool budget = offloads && with_budget && cfg.selection.max_new_blocks != nosa::no_budget;
    if (!budget) {
      INFO(os.str());
      REQUIRE(near);
    }
    MESSAGE(os.str());
    ++stats.near_ties;
    return false;
  }

  void check_admission(int seq, bool have_query, const std::string& what) {
    const auto gdev = gpu.device_copy(s);
    REQUIRE(gpu.layer.is_live(seq, s));
    REQUIRE(gpu.layer.length(seq, s) == host.layer.length(seq));
    bool diverged = false;
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      if (!check_selection(seq, h, have_query, nullptr, false, gdev, what)) {
        diverged = true;
        continue;
      }
      REQUIRE(gpu.layer.step_misses(seq, h, s) == 0);
      REQUIRE(host.layer.step_misses(seq, h) == 0);
      if constexpr (offloads) REQUIRE(copy_of(gpu.layer.slots(seq, h, s)) == copy_of(host.layer.slots(seq, h)));
    }
    if (diverged) {
      gpu.overwrite_from(host, s);
    } else {
      check_state("after " + what);
    }
  }

  template <class Out>
  void check_step(const batch<T>& in, const std::vector<residency>& before, const std::vector<Out>& host_o,
                  const std::vector<Out>& gpu_o) {
    const int hkv = cfg.num_kv_heads, hq = cfg.num_q_heads, group = cfg.group_size();
    const auto gdev = gpu.device_copy(s);
    bool diverged = false;
    for (int b = 0; b < in.size(); ++b) {
      const int seq = in.seqs[std::size_t(b)];
      const std::string where = "step " + std::to_string(stats.steps - 1) + ", sequence " + std::to_string(seq);
      {
        INFO(context << where);
        REQUIRE(gpu.layer.length(seq, s) == host.layer.length(seq));
      }
      for (int h = 0; h < hkv; ++h) {
        const residency* res = offloads ? &before[std::size_t(b) * hkv + h] : nullptr;
        if (!check_selection(seq, h, true, res, true, gdev, where)) {
          diverged = true;
          continue;
        }
        INFO(context << where << ", head " << h);
        const int misses = host.layer.step_misses(seq, h);
        REQUIRE(gpu.layer.step_misses(seq, h, s) == misses);
        stats.misses += std::uint64_t(misses);
        if (offloads && cfg.selection.max_new_blocks != nosa::no_budget) {
          REQUIRE(misses <= cfg.selection.max_new_blocks);
        }
        if constexpr (offloads) REQUIRE(copy_of(gpu.layer.slots(seq, h, s)) == copy_of(host.layer.slots(seq, h)));
        for (int g = 0; g < group; ++g) {
          for (int d = 0; d < D; ++d) {
            const std::size_t at = (std::size_t(b) * hq + std::size_t(h) * group + g) * D + d;
            const double x = nosa::to_float(gpu_o[at]), e = nosa::to_float(host_o[at]);
            const double tolerance = output_tolerance<Out>(e, x) + value_rtol * value_bound;
            const double err = std::abs(x - e) / tolerance;
            stats.max_output_error = std::max(stats.max_output_error, err);
            if (!(err <= 1.0)) {
              FAIL(context << where << ", query head " << h * group + g << ", d " << d << ": cuda " << x
                           << ", host " << e << " (tolerance " << tolerance << ")");
            }
          }
        }
      }
    }
    if (diverged) {
      gpu.overwrite_from(host, s);
      return;
    }
    INFO(context << "step " << stats.steps - 1);
    const nosa::counters hl = host.layer.last_step_counters(), gl = gpu.layer.last_step_counters(s);
    INFO("last step counters: host " << show(hl) << ", cuda " << show(gl));
    REQUIRE(same_counters(gl, hl));
    const std::string diff = compare_state(layout(), host.dev(), host.hst(), gdev.data(), gpu.hst());
    INFO(diff);
    REQUIRE(diff.empty());
    REQUIRE(same_counters(gpu.layer.total_counters(s), host.layer.total_counters()));
    REQUIRE(gpu.layer.free_page_count() == host.layer.free_page_count());
  }
};

// ---------------------------------------------------------------------------------------------------------
// Randomised differential runs.
// ---------------------------------------------------------------------------------------------------------

/// A configuration with `top_k` 12, `k_qa` 7, one sink and three local blocks; windows of half a block
/// (at most 32 tokens) with a stride of half a window.
inline nosa::layer_config make_config(int block, int hq, int hkv, int sequences, int max_tokens,
                                      int budget = nosa::no_budget) {
  nosa::layer_config c;
  c.selection.block_size = block;
  c.selection.window = std::min(block / 2, 32);
  c.selection.stride = c.selection.window / 2;
  c.selection.top_k = 12;
  c.selection.top_k_query_aware = 7;
  c.selection.n_init = 1;
  c.selection.n_local = 3;
  c.selection.max_new_blocks = budget;
  c.num_q_heads = hq;
  c.num_kv_heads = hkv;
  c.limits.max_sequences = sequences;
  c.limits.max_blocks_per_sequence = (max_tokens + block - 1) / block + 1;
  c.limits.pool_pages = sequences * c.limits.max_blocks_per_sequence;
  return c;
}

/// One randomised run of continuous batching.
struct run_spec {
  nosa::layer_config config{};
  std::vector<int> prompts;           ///< prompt length per sequence slot; -1 leaves the slot empty at first
  std::vector<bool> prompt_queries;   ///< per slot: admit with the prompt's last query
  int steps = 200;
  std::uint64_t seed = 1;
  int replace_at = -1;                ///< step at which `replace_slot` leaves and a new sequence takes its slot
  int replace_slot = 0;
  int replace_prompt = 0;
  bool replace_query = true;
  int admit_at = -1;                  ///< step at which the empty slot `admit_slot` is filled
  int admit_slot = -1;
  int admit_prompt = 0;
  bool admit_query = false;
  int empty_batch_at = -1;            ///< a step with no sequence at all
  double sit_out = 0.15;              ///< chance that one live sequence sits a step out
  bool overlap = false;               ///< CUDA steps overlap the gather with attention (cuda_overlap)
};

/// Five slots: a short prompt, one above k blocks, one that crosses k blocks during the run, a tiny one, and
/// an empty slot filled a third of the way in; the first sequence is replaced two thirds of the way in by one
/// whose prompt is above k blocks. The prompts are ragged and none of the first ones is a multiple of the
/// block size; the mid-run admission is exactly three blocks (no partial tail block: its first step starts a
/// new one). Some admissions carry the prompt's last query, some do not.
inline run_spec ragged_spec(const nosa::layer_config& base, std::uint64_t seed, int steps) {
  run_spec r;
  const int bs = base.selection.block_size, k = base.selection.top_k;
  r.prompts = {37, k * bs + bs + 13, k * bs - steps / 2 - 3, 5, -1};
  r.prompt_queries = {true, true, false, true, false};
  r.steps = steps;
  r.seed = seed;
  r.admit_at = steps / 3;
  r.admit_slot = 4;
  r.admit_prompt = 3 * bs;
  r.replace_at = (2 * steps) / 3;
  r.replace_slot = 0;
  r.replace_prompt = (k + 2) * bs + 21;
  r.replace_query = true;
  r.empty_batch_at = steps / 2;
  const int longest = std::max(r.prompts[1], r.replace_prompt) + steps + bs;
  r.config = base;
  r.config.limits.max_sequences = 5;
  r.config.limits.max_blocks_per_sequence = (longest + bs - 1) / bs + 1;
  r.config.limits.pool_pages = 5 * r.config.limits.max_blocks_per_sequence;
  return r;
}

/// `base.limits.max_sequences` live sequences with ragged prompts, from a few tokens to `k + 6` blocks: with
/// many KV heads, more (sequence, KV head) rows than the device holds CTAs of any stage's kernels at once.
inline run_spec many_rows_spec(const nosa::layer_config& base, std::uint64_t seed, int steps) {
  run_spec r;
  const int sequences = base.limits.max_sequences;
  const int bs = base.selection.block_size, k = base.selection.top_k;
  for (int i = 0; i < sequences; ++i) {
    r.prompts.push_back(3 + (i * 97 + 13) % ((k + 6) * bs));
    r.prompt_queries.push_back(i % 3 != 0);
  }
  r.steps = steps;
  r.seed = seed;
  r.sit_out = 0.3;
  const int longest = (k + 6) * bs + steps + bs;
  r.config = base;
  r.config.limits.max_sequences = sequences;
  r.config.limits.max_blocks_per_sequence = (longest + bs - 1) / bs + 1;
  r.config.limits.pool_pages = sequences * r.config.limits.max_blocks_per_sequence;
  return r;
}

/// Runs `spec` on both backends and checks every admission, removal, reservation and step.
template <class P, class Out = float>
run_stats run_differential(const run_spec& spec, const std::string& name) {
  stream st;
  twin<P> t(spec.config, st);
  overlap_resources overlap;
  const nosa::cuda_overlap streams = overlap.get();
  if (spec.overlap) t.overlap = &streams;
  std::ostringstream ctx;
  ctx << name << (spec.overlap ? ", overlapped" : "") << " (D " << P::head_dim << ", G " << spec.config.group_size() << ", block "
      << spec.config.selection.block_size << ", budget " << spec.config.selection.max_new_blocks << "): ";
  t.context = ctx.str();
  random_source rng(spec.seed);
  const nosa::layer_config& cfg = spec.config;
  for (std::size_t slot = 0; slot < spec.prompts.size(); ++slot) {
    if (spec.prompts[slot] < 0) continue;
    REQUIRE(t.admit(int(slot), random_prompt<P>(rng, cfg, spec.prompts[slot], spec.prompt_queries[slot])) ==
            status::success);
  }
  for (int step = 0; step < spec.steps; ++step) {
    if (step == spec.replace_at) {
      REQUIRE(t.remove(spec.replace_slot) == status::success);
      REQUIRE(t.admit(spec.replace_slot, random_prompt<P>(rng, cfg, spec.replace_prompt, spec.replace_query)) ==
              status::success);
    }
    if (step == spec.admit_at) {
      REQUIRE(t.admit(spec.admit_slot, random_prompt<P>(rng, cfg, spec.admit_prompt, spec.admit_query)) ==
              status::success);
    }
    std::vector<std::int32_t> seqs;
    if (step != spec.empty_batch_at) {
      for (int seq = 0; seq < cfg.limits.max_sequences; ++seq) {
        if (t.host.layer.is_live(seq)) seqs.push_back(seq);
      }
      std::shuffle(seqs.begin(), seqs.end(), rng.rng);
      if (seqs.size() > 1 && rng.uniform() < spec.sit_out) seqs.pop_back();
    }
    REQUIRE(t.reserve(1) == status::success);
    REQUIRE(t.template step<Out>(random_batch<P>(rng, cfg, std::move(seqs))) == status::success);
  }
  const run_stats& r = t.stats;
  MESSAGE(t.context << r.steps << " steps, " << r.selections << " selections, " << r.near_ties
                    << " near-ties, " << r.misses << " misses, max output error / tolerance "
                    << r.max_output_error << ", max relative Sq difference " << r.max_score_error);
  CHECK(r.near_ties * 100 < r.selections);
  return r;
}

/// Sequences that share a prompt prefix: bad shares change nothing; a second sequence on the same prompt
/// shares its complete blocks, a third the first 6; they decode (the first one leaving half-way) like the
/// host backend, and every page returns to the pool at the end.
template <class P>
void run_shared_prefix(std::uint64_t seed) {
  const nosa::layer_config cfg = make_config(32, 8, 2, 4, 40 * 32);
  stream st;
  twin<P> t(cfg, st);
  t.context = "shared prefix: ";
  random_source rng(seed);
  const int bs = cfg.selection.block_size, len = 14 * bs + 9;
  const auto p = random_prompt<P>(rng, cfg, len, true);
  REQUIRE(t.admit(0, p) == status::success);
  const int free_before = t.gpu.layer.free_page_count();
  // Bad shares change nothing: a source that is not live, the sequence itself, more blocks than are complete.
  REQUIRE(t.admit(1, p, status::unknown_sequence, {2, 3}) == status::unknown_sequence);
  REQUIRE(t.admit(1, p, status::unknown_sequence, {1, 3}) == status::unknown_sequence);
  REQUIRE(t.admit(1, p, status::invalid_argument, {0, 15}) == status::invalid_argument);
  REQUIRE(t.admit(1, p, status::invalid_argument, {0, -1}) == status::invalid_argument);
  // Two sequences on the same prompt: the 14 complete blocks are shared, only the tail's page is new.
  REQUIRE(t.admit(1, p, status::success, {0, 14}) == status::success);
  CHECK(t.gpu.layer.free_page_count() == free_before - 1);
  // A third that shares only the first 6 blocks of the same prompt.
  REQUIRE(t.admit(2, p, status::success, {1, 6}) == status::success);
  CHECK(t.gpu.layer.free_page_count() == free_before - 1 - 9);
  const int steps = scaled(3 * bs, 10);
  for (int step = 0; step < steps; ++step) {
    if (step == steps / 2) REQUIRE(t.remove(0) == status::success);  // the shared pages stay referenced
    std::vector<std::int32_t> seqs;
    for (int seq = 0; seq < 3; ++seq) {
      if (t.host.layer.is_live(seq)) seqs.push_back(seq);
    }
    REQUIRE(t.reserve(1) == status::success);
    REQUIRE(t.template step<float>(random_batch<P>(rng, cfg, std::move(seqs))) == status::success);
  }
  REQUIRE(t.remove(1) == status::success);
  REQUIRE(t.remove(2) == status::success);
  CHECK(t.gpu.layer.free_page_count() == cfg.limits.pool_pages);
}

// ---------------------------------------------------------------------------------------------------------
// A captured step, replayed.
// ---------------------------------------------------------------------------------------------------------

/// Owns a captured graph and its executable instance.
struct captured_graph {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  captured_graph() = default;
  captured_graph(const captured_graph&) = delete;
  captured_graph& operator=(const captured_graph&) = delete;
  ~captured_graph() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    if (graph != nullptr) cudaGraphDestroy(graph);
  }
};

/// Captures one step of four ragged sequences (none a multiple of the block size; with `overlapped` the
/// gather is forked to a second stream inside the capture) once, and replays it for `steps` steps while the
/// sequences grow across many block and window boundaries, every replay compared with the host backend
/// stepping the same inputs. Every page the run needs is reserved up front: no plan call runs in between.
template <class P>
run_stats replay_captured_step(int steps, bool overlapped, const std::string& context) {
  using T = typename P::element_type;
  const std::vector<int> prompts = {37, 250, 5, 100};
  const int longest = 250 + steps;

  nosa::layer_config cfg = make_config(32, 4, 2, 4, longest);
  cfg.selection.top_k = 8;
  cfg.selection.top_k_query_aware = 5;
  cfg.selection.n_local = 2;

  stream st;
  twin<P> t(cfg, st);
  t.context = context;
  overlap_resources overlap;
  random_source rng(501);
  for (int seq = 0; seq < 4; ++seq) {
    REQUIRE(t.admit(seq, random_prompt<P>(rng, cfg, prompts[std::size_t(seq)], seq % 2 == 0)) ==
            status::success);
  }
  REQUIRE(t.reserve(steps) == status::success);

  // One step over the twin's fixed device buffers, rows in a fixed order that is not the slot order.
  const std::vector<std::int32_t> order = {2, 0, 3, 1};
  captured_graph g;
  NOSA_CUDA_REQUIRE(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
  const status enqueued = overlapped ? t.gpu.layer.step(t.template device_args<T>(4), st, overlap.get())
                                     : t.gpu.layer.step(t.template device_args<T>(4), st);
  NOSA_CUDA_REQUIRE(cudaStreamEndCapture(st, &g.graph));
  REQUIRE(enqueued == status::success);
  NOSA_CUDA_REQUIRE(cudaGraphInstantiate(&g.exec, g.graph, 0));

  for (int step = 0; step < steps; ++step) {
    const status r = t.template step_with<T>(random_batch<P>(rng, cfg, order), [&] {
      NOSA_CUDA_REQUIRE(cudaGraphLaunch(g.exec, st));
      return status::success;
    });
    REQUIRE(r == status::success);
  }
  for (int seq = 0; seq < 4; ++seq) CHECK(t.gpu.layer.length(seq, st) == prompts[std::size_t(seq)] + steps);
  const run_stats& r = t.stats;
  MESSAGE(t.context << r.steps << " replays, " << r.selections << " selections, " << r.near_ties
                    << " near-ties, " << r.misses << " misses, max output error / tolerance "
                    << r.max_output_error);
  CHECK(r.near_ties * 100 < r.selections);
  CHECK(r.steps == std::uint64_t(steps));
  return r;
}

}  // namespace nosa_cuda_test
