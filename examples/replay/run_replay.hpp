#pragma once
/// \file
/// The part of `nosa-replay` that runs the library: options, the loaded inputs as plain pointers, the
/// outputs, `run_replay` (host backend) and `run_replay_cuda` (CUDA backend).
///
/// The 144 host pipelines (3 storage elements x 3 head dims x 2 variants x 2 stores, with complete blocks in
/// the element type under each of the 3 bias modes, or in FP8 under the variant's standard bias, see
/// `standard_bias`) are instantiated in nine translation units, one per (element, head dim), under
/// `instances/`: each stays quick to compile and a parallel build spreads them over the cores. A CUDA build
/// adds 36 CUDA pipelines (3 elements x 3 head dims x 2 variants x 2 stores, each variant with its standard
/// bias, blocks in the element type) in nine CUDA sources under `cuda/`, and 16 with blocks in FP8 (bf16 and
/// fp16, D 64 and 128: the shapes of the CUDA backend's FP8 attention) in four more. This header stays plain
/// C++: only those sources include CUDA headers.

#include <nosa/core/numeric.hpp>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace replay {

/// Selection variant: NOSA (query-aware + query-agnostic) or InfLLMv2 (query-aware only).
enum class variant_kind : unsigned char { nosa, infllmv2 };

/// Where the KV blocks live: host pool + slot cache (`offload`), or everything in the device tier.
enum class store_kind : unsigned char { offload, resident };

/// The executor the layer runs on.
enum class backend_kind : unsigned char { host, cuda };

/// How complete blocks of K and V are stored: in the storage type (`--dtype`), or in FP8 E4M3 with one
/// scale per block and KV head (spec §6b).
enum class kv_format_kind : unsigned char { element, fp8 };

/// How the prompts enter the layer: ingested as given (`add_sequence`, the engine ran the prefill), or run
/// through the library's prefill (`decode_layer::prefill`) with dense or sparse (NOSA^S) attention, which
/// needs the prompts' queries.
enum class prefill_kind : unsigned char { none, dense, sparse };

/// True when this build contains the CUDA replay (the sources under `cuda/`, compiled when CMake enables
/// the CUDA language; they define `NOSA_REPLAY_CUDA` for the whole program).
#ifdef NOSA_REPLAY_CUDA
inline constexpr bool cuda_in_build = true;
#else
inline constexpr bool cuda_in_build = false;
#endif

/// The standard bias mode of each variant: that of the library's `nosa_pipeline` (the trained
/// `after_scale`) and `infllmv2_pipeline` (no bias). The CUDA replay and the FP8 KV format are compiled for
/// these only: every bias mode would triple their build time.
constexpr nosa::bias_mode standard_bias(variant_kind v) noexcept {
  return v == variant_kind::nosa ? nosa::bias_mode::after_scale : nosa::bias_mode::none;
}

/// The one bias mode the CUDA replay compiles for each variant (`standard_bias`).
constexpr nosa::bias_mode cuda_bias(variant_kind v) noexcept { return standard_bias(v); }

/// True for the storage elements and head dimensions whose FP8 KV format the CUDA backend runs (bf16 and
/// fp16, D 64 and 128); the CUDA replay compiles its FP8 pipelines for these only.
template <class Element, int HeadDim>
inline constexpr bool cuda_fp8_compiled = nosa::dtype_of<Element> != nosa::dtype::fp32 &&
                                          (HeadDim == 64 || HeadDim == 128);

/// Everything the command line chooses. Defaults are the paper's.
struct options {
  std::string in_dir;                  ///< input directory (`--in`)
  std::string out_dir;                 ///< output directory (`--out`), created if missing
  nosa::selection_params selection{};  ///< block, window, stride, topk, topk-qa, init, local, budget
  nosa::bias_mode bias = nosa::bias_mode::after_scale;  ///< how c enters the attention logit
  variant_kind variant = variant_kind::nosa;
  nosa::dtype element = nosa::dtype::fp32;  ///< storage type of q, K, V inside the library
  store_kind store = store_kind::offload;
  backend_kind backend = backend_kind::host;
  kv_format_kind kv_format = kv_format_kind::element;  ///< complete blocks in the storage type, or FP8
  prefill_kind prefill = prefill_kind::none;           ///< how the prompts enter the layer
  int chunk = 1024;  ///< with a prefill: prompt rows of each sequence per prefill call
};

/// The recorded inputs, validated against each other. Every pointer refers to a contiguous row-major
/// array owned by the caller (the loaded `.npy` files).
struct replay_inputs {
  std::int64_t steps = 0;                    ///< T
  std::int64_t batch = 0;                    ///< B
  std::int64_t prompt_rows = 0;              ///< P, rows per sequence in the prompt arrays
  std::int64_t q_heads = 0;                  ///< H_q
  std::int64_t kv_heads = 0;                 ///< H_kv
  std::int64_t head_dim = 0;                 ///< D
  const float* prompt_k = nullptr;           ///< [B][P][H_kv][D]
  const float* prompt_v = nullptr;           ///< [B][P][H_kv][D]
  const float* prompt_c = nullptr;           ///< [B][P][H_kv]
  const std::int32_t* prompt_len = nullptr;  ///< [B], 0 <= prompt_len[b] <= P
  const float* prompt_q = nullptr;           ///< [B][P][H_q][D] prompt queries; with a prefill only
  const float* q = nullptr;                  ///< [T][B][H_q][D]
  const float* k = nullptr;                  ///< [T][B][H_kv][D]
  const float* v = nullptr;                  ///< [T][B][H_kv][D]
  const float* c = nullptr;                  ///< [T][B][H_kv]
};

/// What a replay produces.
struct replay_outputs {
  std::vector<float> o;                ///< [T][B][H_q][D] attention output
  std::vector<std::int32_t> selected;  ///< [T][B][H_kv][top_k] selected block ids, ascending, padded with -1
  std::vector<std::int32_t> misses;    ///< [T][B][H_kv] blocks loaded by each step
  std::vector<float> prompt_o;  ///< [B][P][H_q][D] prefill output, zeros past each prompt; with a prefill
  nosa::counters totals{};             ///< counters of the whole run, prompt ingestion included
};

/// Outcome of a replay: the first library call that failed, if any.
struct replay_status {
  nosa::status status = nosa::status::success;
  std::string_view call;    ///< the failing call, e.g. "add_sequence"; empty on success
  std::string_view reason;  ///< the problem when it says more than `nosa::to_string(status)`, else empty

  constexpr replay_status() noexcept = default;
  constexpr replay_status(nosa::status s, std::string_view failed_call, std::string_view why = {}) noexcept
      : status(s), call(failed_call), reason(why) {}
};

/// Runs the prompts and the decode steps of `in` through one layer of the pipeline `opt` describes, with
/// storage element `Element` and head dimension `HeadDim` (which must match `opt.element` and
/// `in.head_dim`). Fills `out`; allocates only before the first step.
template <nosa::storage_element Element, int HeadDim>
replay_status run_replay(const options& opt, const replay_inputs& in, replay_outputs& out);

/// Runs `run_replay<Element, HeadDim>` for the element and head dimension chosen at run time; a value
/// outside the compiled lists gives `not_supported` from the call "dispatch".
replay_status run_replay(const options& opt, const replay_inputs& in, replay_outputs& out);

extern template replay_status run_replay<float, 64>(const options&, const replay_inputs&, replay_outputs&);
extern template replay_status run_replay<float, 128>(const options&, const replay_inputs&, replay_outputs&);
extern template replay_status run_replay<float, 256>(const options&, const replay_inputs&, replay_outputs&);
extern template replay_status run_replay<nosa::fp16, 64>(const options&, const replay_inputs&,
                                                         replay_outputs&);
extern template replay_status run_replay<nosa::fp16, 128>(const options&, const replay_inputs&,
                                                          replay_outputs&);
extern template replay_status run_replay<nosa::fp16, 256>(const options&, const replay_inputs&,
                                                          replay_outputs&);
extern template replay_status run_replay<nosa::bf16, 64>(const options&, const replay_inputs&,
                                                         replay_outputs&);
extern template replay_status run_replay<nosa::bf16, 128>(const options&, const replay_inputs&,
                                                          replay_outputs&);
extern template replay_status run_replay<nosa::bf16, 256>(const options&, const replay_inputs&,
                                                          replay_outputs&);

/// As `run_replay`, on the CUDA backend: the inputs are copied to device memory once, the steps run on the
/// default stream, and the outputs are copied back. `opt.bias` must be `cuda_bias(opt.variant)` and
/// `opt.kv_format` must be `Format`, which is `fp8` only where `cuda_fp8_compiled<Element, HeadDim>`. Defined
/// only in CUDA builds (`cuda_in_build`), in the sources under `cuda/`.
template <nosa::storage_element Element, int HeadDim, kv_format_kind Format = kv_format_kind::element>
replay_status run_replay_cuda(const options& opt, const replay_inputs& in, replay_outputs& out);

/// Runs `run_replay_cuda<Element, HeadDim, Format>` for the element, head dimension and KV format chosen at
/// run time; FP8 with a head dimension outside `cuda_fp8_compiled` gives `not_supported`. CUDA builds only.
replay_status run_replay_cuda(const options& opt, const replay_inputs& in, replay_outputs& out);

}  // namespace replay
