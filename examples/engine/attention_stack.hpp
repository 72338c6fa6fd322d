#pragma once
/// \file
/// The attention of every layer of the model for one method, behind a small virtual interface, so the model
/// code is compiled once and the method is a run-time choice. Each method is a nosa pipeline fixed at compile
/// time; `attention_stack_of<Layer, Out>` holds one `decode_layer` per model layer, each in its own arenas.
/// The same template serves both backends: `Stream` is the backend's stream type.

#include <nosa/backend/host/arena.hpp>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string_view>
#include <type_traits>
#include <vector>

namespace nosa_engine {

/// The attention methods the engine runs. The `_fp8` methods are their namesakes with complete KV blocks
/// stored in FP8 E4M3 and one fp32 scale per (block, KV head) for K and for V (spec §6b): half the bytes of
/// every miss and every slot, or of the resident cache.
enum class method : unsigned char {
  full,              ///< dense attention over every block, whole KV cache in device memory
  infllmv2_offload,  ///< InfLLMv2 selection (query-aware only, no bias), KV cache offloaded to host memory
  nosa_offload,      ///< NOSA, KV cache offloaded to host memory (the paper's system)
  nosa_resident,     ///< NOSA with the whole KV cache in device memory
  full_fp8,          ///< `full` with the FP8 resident store
  infllmv2_offload_fp8,  ///< `infllmv2_offload` with the FP8 offload store
  nosa_offload_fp8,      ///< `nosa_offload` with the FP8 offload store
};

inline constexpr method all_methods[] = {
    method::full,     method::infllmv2_offload,     method::nosa_offload,    method::nosa_resident,
    method::full_fp8, method::infllmv2_offload_fp8, method::nosa_offload_fp8};

/// The methods' command-line names, for messages.
inline constexpr std::string_view method_names =
    "full, infllmv2-offload, nosa-offload, nosa-resident, full-fp8, infllmv2-offload-fp8, nosa-offload-fp8";

/// The command-line name of `m`.
constexpr std::string_view method_name(method m) noexcept {
  switch (m) {
  case method::full:
    return "full";
  case method::infllmv2_offload:
    return "infllmv2-offload";
  case method::nosa_offload:
    return "nosa-offload";
  case method::nosa_resident:
    return "nosa-resident";
  case method::full_fp8:
    return "full-fp8";
  case method::infllmv2_offload_fp8:
    return "infllmv2-offload-fp8";
  case method::nosa_offload_fp8:
    return "nosa-offload-fp8";
  }
  return "?";
}

/// The method called `name`, or nothing.
inline std::optional<method> find_method(std::string_view name) noexcept {
  for (const method m : all_methods) {
    if (method_name(m) == name) return m;
  }
  return std::nullopt;
}

/// True when the method adds the eviction scores `c` to the logits (NOSA's trained semantics); the dense
/// prefill uses the same attention as the decode steps.
constexpr bool uses_bias(method m) noexcept {
  return m == method::nosa_offload || m == method::nosa_resident || m == method::nosa_offload_fp8;
}

/// True for full attention: every block attended, nothing selected.
constexpr bool attends_every_block(method m) noexcept { return m == method::full || m == method::full_fp8; }

/// True when the method keeps the KV cache in host memory.
constexpr bool offloads(method m) noexcept {
  return m == method::infllmv2_offload || m == method::nosa_offload || m == method::infllmv2_offload_fp8 ||
         m == method::nosa_offload_fp8;
}

/// True when the method stores complete KV blocks in FP8 (its prefill, selection and bias are those of the
/// method of the same name without `-fp8`).
constexpr bool stores_fp8(method m) noexcept {
  return m == method::full_fp8 || m == method::infllmv2_offload_fp8 || m == method::nosa_offload_fp8;
}

/// True when the CUDA step of the method can gather beside attention (`nosa::cuda_overlap`): the offloading
/// methods with blocks in bf16. The library runs the FP8 store's overlapped step as a plain step.
constexpr bool overlaps_gather(method m) noexcept { return offloads(m) && !stores_fp8(m); }

/// Calls `f.template operator()<Pipeline>()` with the pipeline of method `m` at head dim D: the one place
/// where a method becomes a pipeline type.
template <int D, class F>
decltype(auto) with_pipeline(method m, F&& f) {
  switch (m) {
  case method::full:
    return f.template operator()<nosa::full_attention_pipeline<nosa::bf16, D>>();
  case method::infllmv2_offload:
    return f.template operator()<nosa::infllmv2_pipeline<nosa::bf16, D, nosa::offload_store>>();
  case method::nosa_offload:
    return f.template operator()<nosa::nosa_pipeline<nosa::bf16, D, nosa::offload_store>>();
  case method::full_fp8:
    return f.template operator()<
        nosa::full_attention_pipeline<nosa::bf16, D, nosa::bias_mode::none, nosa::fp8_resident_store>>();
  case method::infllmv2_offload_fp8:
    return f.template operator()<nosa::infllmv2_pipeline<nosa::bf16, D, nosa::fp8_offload_store>>();
  case method::nosa_offload_fp8:
    return f.template operator()<nosa::nosa_pipeline<nosa::bf16, D, nosa::fp8_offload_store>>();
  case method::nosa_resident:
    break;
  }
  return f.template operator()<nosa::nosa_pipeline<nosa::bf16, D, nosa::resident_store>>();
}

/// Complete prompt blocks that a sequence shares with the first sequence of its prompt, or 0. Only the
/// offloading methods share: their pages are host memory, which sharing relieves (the study's large batches
/// of one prompt fit the host that way). The resident methods keep one copy of the prompt per sequence, as
/// independent prompts would need in HBM, so that their batch limit stays that of a real workload.
inline int shared_prompt_blocks(method m, bool share_prompts, int prompt_tokens, int block_size) {
  return share_prompts && offloads(m) ? prompt_tokens / block_size : 0;
}

/// The layer configuration of every layer: capacity for `sequences` sequences of up to `max_tokens` tokens,
/// `distinct_prompts` of whose prompts are stored once when `shared_blocks` > 0 (see
/// `shared_prompt_blocks`), and `cache_slots` slots beyond `k + 1` per (sequence, KV head) (offload store).
inline nosa::layer_config make_layer_config(const nosa::selection_params& selection, int q_heads,
                                            int kv_heads, int sequences, int max_tokens,
                                            int distinct_prompts = 0, int shared_blocks = 0,
                                            int cache_slots = 0) {
  nosa::layer_config c;
  c.selection = selection;
  c.num_q_heads = q_heads;
  c.num_kv_heads = kv_heads;
  c.limits.max_sequences = sequences;
  c.limits.max_blocks_per_sequence = (max_tokens + selection.block_size - 1) / selection.block_size;
  c.limits.pool_pages = sequences * c.limits.max_blocks_per_sequence -
                        (sequences - std::min(sequences, distinct_prompts)) * shared_blocks;
  c.limits.cache_slots = cache_slots;
  return c;
}

/// The step option of a backend that has none (the host): `attention_stack`'s `Hooks` by default.
struct no_hooks {};

/// Per-layer attention of a whole model. Calls take the layer index; plan calls and inspection may
/// synchronise (CUDA), `step` only enqueues. `Hooks` is the backend's way of shaping a step (on the CUDA
/// backend: overlap of the gather with attention, and a callback after each stage); a hooks type provides
/// `enqueue(layer, args, stream)`.
template <class Out, class Stream, class Hooks = no_hooks>
class attention_stack {
 public:
  virtual ~attention_stack() = default;
  virtual int layers() const noexcept = 0;
  /// Admits `seq`; its first `share.blocks` blocks reference the pages of `share.source` (none by default).
  virtual nosa::status add_sequence(int layer, int seq, const nosa::prompt_args<nosa::bf16>& prompt,
                                    const nosa::shared_prefix& share, Stream s) = 0;
  /// Reserves pages in every layer so each live sequence can run `tokens_ahead` more steps.
  virtual nosa::status reserve(int tokens_ahead, Stream s) = 0;
  /// One step of `layer`, shaped by `hooks` when not null.
  virtual nosa::status step(int layer, const nosa::step_args<nosa::bf16, Out>& args, Stream s,
                            const Hooks* hooks) = 0;
  virtual nosa::status step_status(int layer, Stream s) const = 0;
  /// The current selection of (seq, head) in `layer`, in rank order.
  virtual std::vector<std::int32_t> selection(int layer, int seq, int head, Stream s) const = 0;
  virtual nosa::counters total_counters(int layer, Stream s) const = 0;
  /// Arena bytes of all layers together.
  virtual nosa::arena_sizes arena_bytes() const noexcept = 0;
};

/// `attention_stack` over `decode_layer`s of one pipeline and backend (`Layer`), each owning its arenas.
template <class Layer, class Out, class Hooks = no_hooks>
class attention_stack_of final
    : public attention_stack<Out, typename Layer::backend_type::stream_type, Hooks> {
  using stream = typename Layer::backend_type::stream_type;

 public:
  /// Sizes of the arenas of `layers` layers of this configuration.
  static nosa::status required_bytes(const nosa::layer_config& config, int layers,
                                     nosa::arena_sizes& out) noexcept {
    nosa::arena_sizes one;
    NOSA_TRY(Layer::required_bytes(config, one));
    out = {one.device * static_cast<std::size_t>(layers), one.host * static_cast<std::size_t>(layers)};
    return nosa::status::success;
  }

  /// Allocates and creates `layers` layers (on the current CUDA device for the CUDA backend).
  nosa::status create(const nosa::layer_config& config, int layers) {
    NOSA_TRY(required_bytes(config, layers, bytes_));
    layers_ = std::vector<nosa::owning_layer<Layer>>(static_cast<std::size_t>(layers));
    for (auto& l : layers_) NOSA_TRY(l.create(config));
    return nosa::status::success;
  }

  int layers() const noexcept override { return static_cast<int>(layers_.size()); }
  nosa::status add_sequence(int layer, int seq, const nosa::prompt_args<nosa::bf16>& prompt,
                            const nosa::shared_prefix& share, stream s) override {
    return at(layer).add_sequence(seq, prompt, share, s);
  }
  nosa::status reserve(int tokens_ahead, stream s) override {
    for (auto& l : layers_) NOSA_TRY(l->reserve(tokens_ahead, s));
    return nosa::status::success;
  }
  nosa::status step(int layer, const nosa::step_args<nosa::bf16, Out>& args, stream s,
                    const Hooks* hooks) override {
    if constexpr (!std::is_same_v<Hooks, no_hooks>) {
      if (hooks != nullptr) return hooks->enqueue(at(layer), args, s);
    }
    return at(layer).step(args, s);
  }
  nosa::status step_status(int layer, stream s) const override { return at(layer).step_status(s); }
  std::vector<std::int32_t> selection(int layer, int seq, int head, stream s) const override {
    const auto span = at(layer).selection(seq, head, s);
    return {span.begin(), span.end()};
  }
  nosa::counters total_counters(int layer, stream s) const override { return at(layer).total_counters(s); }
  nosa::arena_sizes arena_bytes() const noexcept override { return bytes_; }

 private:
  std::vector<nosa::owning_layer<Layer>> layers_;
  nosa::arena_sizes bytes_;

  Layer& at(int layer) { return *layers_[static_cast<std::size_t>(layer)]; }
  const Layer& at(int layer) const { return *layers_[static_cast<std::size_t>(layer)]; }
};

}  // namespace nosa_engine
