#pragma once
/// \file
/// The contract language of the library: every policy is a small trivially copyable struct of
/// `static constexpr` knobs and static host-device functions, checked against one of these concepts right
/// after its definition and again, with a readable message, where a pipeline is assembled.

#include <nosa/core/numeric.hpp>

#include <concepts>
#include <type_traits>

namespace nosa {

/// How the eviction-score bias enters the attention logit (spec §5).
enum class bias_mode : unsigned char {
  after_scale,   ///< softmax(q.k / sqrt(D) + c): the semantics the model was trained with (default)
  before_scale,  ///< softmax((q.k + c) / sqrt(D)): what the released NOSI decode kernel computes
  none,          ///< softmax(q.k / sqrt(D)): plain sparse attention (InfLLMv2)
};

/// Query-aware block scorer: turns the dot product of a query head with a compressed key into a logit,
/// and pools window scores into a block score.
template <class P>
concept query_aware_scorer_policy = std::is_trivially_copyable_v<P> && requires(float a, float b) {
  { P::window_logit(a, b) } -> std::same_as<float>;
  { P::pool(a, b) } -> std::same_as<float>;
  { P::pool_identity } -> std::convertible_to<float>;
};

/// Query-agnostic scorer: pools per-window eviction scores into block scores, or is switched off
/// (`enabled == false`, the InfLLMv2 variant).
template <class P>
concept query_agnostic_scorer_policy = std::is_trivially_copyable_v<P> && requires(float a, float b) {
  { P::enabled } -> std::convertible_to<bool>;
  { P::pool(a, b) } -> std::same_as<float>;
  { P::pool_identity } -> std::convertible_to<float>;
};

/// Block selector: a strict total order on (score, block) pairs that every backend uses for its top-k.
template <class P>
concept selector_policy = std::is_trivially_copyable_v<P> && requires(float s, int i) {
  { P::canonical(s) } -> std::same_as<float>;
  { P::ranks_before(s, i, s, i) } -> std::same_as<bool>;
};

/// KV format: how the complete blocks of K and V are stored. `value_type<E>` is what one value of a complete
/// block is stored as when the engine's element type is `E`. A format that is not `quantized` keeps the
/// element type itself; a quantized one stores each block of one KV head, K or V, as codes plus one fp32
/// scale: `multiplier(amax)` and `scale(amax)` from the block's largest magnitude, `encode(x, multiplier)`
/// for each value, and `decode(code, scale)` for the value attention reads.
template <class F>
concept kv_format_policy =
    std::is_trivially_copyable_v<F> && requires {
      { F::quantized } -> std::convertible_to<bool>;
      typename F::template value_type<float>;
    } && (!F::quantized || requires(float x, typename F::template value_type<float> code) {
      { F::multiplier(x) } -> std::same_as<float>;
      { F::scale(x) } -> std::same_as<float>;
      { F::encode(x, x) } -> std::same_as<typename F::template value_type<float>>;
      { F::decode(code, x) } -> std::same_as<float>;
    });

/// KV store: where blocks live and how complete blocks are stored. `offloads` selects a paged host pool plus
/// a GPU slot cache of `top_k + spare_slots` slots; otherwise every block stays in device memory.
/// `kv_format` is the format of complete blocks in the pool and the slot cache.
template <class P>
concept store_policy = std::is_trivially_copyable_v<P> && requires {
  { P::offloads } -> std::convertible_to<bool>;
  { P::spare_slots } -> std::convertible_to<int>;
  typename P::kv_format;
} && kv_format_policy<typename P::kv_format>;

/// Sparse decode attention: the logit of one key given the raw dot product, the token's eviction score and
/// the softmax scale.
template <class P>
concept attention_policy = std::is_trivially_copyable_v<P> && requires(float dot, float c, float scale) {
  { P::bias } -> std::convertible_to<bias_mode>;
  { P::logit(dot, c, scale) } -> std::same_as<float>;
};

/// Prefill policy: which earlier tokens each query of a prompt chunk attends. `selects_per_token` false
/// attends every token up to the query's own (NOSA^F); true attends the blocks of the query's own selection
/// (NOSA^S, spec §6).
template <class P>
concept prefill_policy = std::is_trivially_copyable_v<P> && requires {
  { P::selects_per_token } -> std::convertible_to<bool>;
};

/// A complete decode pipeline: storage element, head dimension and one policy per stage.
template <class P>
concept pipeline_policy = requires {
  typename P::element_type;
  typename P::query_aware;
  typename P::query_agnostic;
  typename P::selector;
  typename P::store;
  typename P::attention;
  { P::head_dim } -> std::convertible_to<int>;
} && storage_element<typename P::element_type> && query_aware_scorer_policy<typename P::query_aware> &&
  query_agnostic_scorer_policy<typename P::query_agnostic> && selector_policy<typename P::selector> &&
  store_policy<typename P::store> && attention_policy<typename P::attention>;

}  // namespace nosa
