#pragma once
/// \file
/// The bounded set of pipelines the Python package compiles, and the fold that picks one for a run-time
/// choice of (variant, store, bias, dtype, head dim). The lists below are the whole set; docs/python.md
/// repeats them.
///
/// - host backend: every variant, store and bias mode (nosa and infllmv2 with offload or resident store
///   and any bias; full attention, resident, with any bias), 15 pipelines
/// - CUDA backend: the library's named pipelines: `nosa_pipeline` (after_scale) and `infllmv2_pipeline`
///   (no bias), each with either store, and `full_attention_pipeline` (no bias), 5 pipelines
///
/// each for storage types fp32, fp16 and bf16 and head dims 64, 128 and 256: 135 host pipelines and 45 CUDA
/// pipelines. One translation unit per (backend, storage type, head dim) instantiates them, so a parallel
/// build spreads them over the cores.

#include "layer.hpp"

#include <nosa/core/dispatch.hpp>
#include <nosa/pipeline.hpp>

#include <memory>
#include <string>
#include <vector>

namespace nosa_python {

/// A list of pipeline types.
template <class... P>
struct pipeline_list {};

template <nosa::storage_element E, int D, class QueryAgnostic, class Store, nosa::bias_mode Bias>
using sparse_pipeline = nosa::pipeline<E, D, QueryAgnostic, Store, nosa::sparse_attention<Bias>>;

/// Every pipeline the host backend compiles for storage type `E` and head dim `D`.
template <nosa::storage_element E, int D>
using host_pipelines = pipeline_list<
    sparse_pipeline<E, D, nosa::eviction_score_pooling, nosa::offload_store, nosa::bias_mode::after_scale>,
    sparse_pipeline<E, D, nosa::eviction_score_pooling, nosa::offload_store, nosa::bias_mode::before_scale>,
    sparse_pipeline<E, D, nosa::eviction_score_pooling, nosa::offload_store, nosa::bias_mode::none>,
    sparse_pipeline<E, D, nosa::eviction_score_pooling, nosa::resident_store, nosa::bias_mode::after_scale>,
    sparse_pipeline<E, D, nosa::eviction_score_pooling, nosa::resident_store, nosa::bias_mode::before_scale>,
    sparse_pipeline<E, D, nosa::eviction_score_pooling, nosa::resident_store, nosa::bias_mode::none>,
    sparse_pipeline<E, D, nosa::no_query_agnostic, nosa::offload_store, nosa::bias_mode::after_scale>,
    sparse_pipeline<E, D, nosa::no_query_agnostic, nosa::offload_store, nosa::bias_mode::before_scale>,
    sparse_pipeline<E, D, nosa::no_query_agnostic, nosa::offload_store, nosa::bias_mode::none>,
    sparse_pipeline<E, D, nosa::no_query_agnostic, nosa::resident_store, nosa::bias_mode::after_scale>,
    sparse_pipeline<E, D, nosa::no_query_agnostic, nosa::resident_store, nosa::bias_mode::before_scale>,
    sparse_pipeline<E, D, nosa::no_query_agnostic, nosa::resident_store, nosa::bias_mode::none>,
    nosa::full_attention_pipeline<E, D, nosa::bias_mode::none>,
    nosa::full_attention_pipeline<E, D, nosa::bias_mode::after_scale>,
    nosa::full_attention_pipeline<E, D, nosa::bias_mode::before_scale>>;

/// Every pipeline the CUDA backend compiles for storage type `E` and head dim `D`: each variant with the
/// bias it is trained with, which keeps the CUDA build to a third of the host's.
template <nosa::storage_element E, int D>
using cuda_pipelines =
    pipeline_list<nosa::nosa_pipeline<E, D, nosa::offload_store>,
                  nosa::nosa_pipeline<E, D, nosa::resident_store>,
                  nosa::infllmv2_pipeline<E, D, nosa::offload_store>,
                  nosa::infllmv2_pipeline<E, D, nosa::resident_store>, nosa::full_attention_pipeline<E, D>>;

/// The storage types and head dims both backends compile, as one fold each.
template <class F>
[[nodiscard]] nosa::status dispatch_storage(nosa::dtype d, F&& f) {
  return nosa::dispatch_element<float, nosa::fp16, nosa::bf16>(d, std::forward<F>(f));
}
template <class F>
[[nodiscard]] nosa::status dispatch_head_dim(int head_dim, F&& f) {
  return nosa::dispatch_value<64, 128, 256>(head_dim, std::forward<F>(f));
}

template <class P>
constexpr variant_kind variant_of() noexcept {
  if constexpr (P::dense) {
    return variant_kind::full;
  } else {
    return P::query_agnostic::enabled ? variant_kind::nosa : variant_kind::infllmv2;
  }
}

template <class P>
constexpr bool matches(const layer_spec& spec) noexcept {
  return variant_of<P>() == spec.variant &&
         (P::store::offloads ? store_kind::offload : store_kind::resident) == spec.store &&
         P::attention::bias == spec.bias;
}

/// "variant/store/bias, ..." of a list, for the message that names what a build offers.
template <class... P>
std::string describe(pipeline_list<P...>) {
  std::string s;
  ((s += (s.empty() ? "" : ", ") + std::string(to_string(variant_of<P>())) + "/" +
         std::string(to_string(P::store::offloads ? store_kind::offload : store_kind::resident)) + "/" +
         std::string(bias_name(P::attention::bias))),
   ...);
  return s;
}

/// The (variant, store, bias) of each pipeline of a list, in list order.
struct pipeline_choice {
  variant_kind variant;
  store_kind store;
  nosa::bias_mode bias;
};
template <class... P>
std::vector<pipeline_choice> choices(pipeline_list<P...>) {
  return {pipeline_choice{variant_of<P>(), P::store::offloads ? store_kind::offload : store_kind::resident,
                          P::attention::bias}...};
}

/// Calls `make.template operator()<P>()` for the pipeline `P` of the list that `spec` chooses; a choice
/// outside the list is `not_supported`, with the list in the detail.
template <class Make, class... P>
problem make_matching(pipeline_list<P...> list, const layer_spec& spec, std::string_view backend,
                      Make&& make) {
  problem result;
  const bool found = ((matches<P>(spec) ? (result = make.template operator()<P>(), true) : false) || ...);
  if (!found) {
    return fail(nosa::status::not_supported,
                std::string(backend) + " backend has no pipeline " + std::string(to_string(spec.variant)) +
                    "/" + std::string(to_string(spec.store)) + "/" + std::string(bias_name(spec.bias)) +
                    " (variant/store/bias); it compiles " + describe(list));
  }
  return result;
}

/// Builds a host layer of storage type `E` and head dim `D` (defined once per pair in a generated source).
template <nosa::storage_element E, int D>
problem make_host_layer_for(const layer_spec& spec, std::unique_ptr<layer_base>& out);

/// Builds a CUDA layer of storage type `E` and head dim `D` (defined once per pair in a generated CUDA
/// source).
template <nosa::storage_element E, int D>
problem make_cuda_layer_for(const layer_spec& spec, std::unique_ptr<layer_base>& out);

/// Runs `make(type_tag<E>, integral_constant<int, D>)` for the storage type and head dim of `spec`, or
/// explains which values the package compiles.
template <class Make>
problem dispatch_layer(const layer_spec& spec, Make&& make) {
  problem result;
  const nosa::status s = dispatch_storage(spec.element, [&](auto element) {
    return dispatch_head_dim(spec.head_dim, [&](auto dim) {
      result = make(element, dim);
      return nosa::status::success;
    });
  });
  if (s == nosa::status::not_supported) {
    return fail(s, "head_dim " + std::to_string(spec.head_dim) +
                       " is not compiled; the package compiles 64, 128 "
                       "and 256");
  }
  return result;
}

}  // namespace nosa_python
