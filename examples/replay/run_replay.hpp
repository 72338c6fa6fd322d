#pragma once
/// \file
/// The part of `nosa-replay` that runs the library: options, the loaded inputs as plain pointers, the
/// outputs, and `run_replay`. The 108 pipelines (3 storage elements x 3 head dims x 3 bias modes x
/// 2 variants x 2 stores) are instantiated in nine translation units, one per (element, head dim), under
/// `instances/`: each stays quick to compile and a parallel build spreads them over the cores.

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

/// Everything the command line chooses. Defaults are the paper's.
struct options {
  std::string in_dir;                  ///< input directory (`--in`)
  std::string out_dir;                 ///< output directory (`--out`), created if missing
  nosa::selection_params selection{};  ///< block, window, stride, topk, topk-qa, init, local, budget
  nosa::bias_mode bias = nosa::bias_mode::after_scale;  ///< how c enters the attention logit
  variant_kind variant = variant_kind::nosa;
  nosa::dtype element = nosa::dtype::fp32;  ///< storage type of q, K, V inside the library
  store_kind store = store_kind::offload;
  std::string backend = "host";
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
  nosa::counters totals{};             ///< counters of the whole run, prompt ingestion included
};

/// Outcome of a replay: the first library call that failed, if any.
struct replay_status {
  nosa::status status = nosa::status::success;
  std::string_view call;  ///< the failing call, e.g. "add_sequence"; empty on success
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

}  // namespace replay
