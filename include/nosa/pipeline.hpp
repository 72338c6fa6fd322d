#pragma once
/// \file
/// Assembles the stage policies into a decode pipeline and declares the per-layer executor, `decode_layer`,
/// whose implementation is chosen by the backend tag alone.
///
/// One layer, two phases:
///  - plan calls (`add_sequence`, `remove_sequence`, `reserve`) change the shape of the state between
///    steps: they admit and retire sequences and reserve pool pages ahead of the blocks that will complete;
///  - `step` runs one decode step of one layer for a batch of live sequences, and `prefill` a chunk of
///    prompt tokens of each sequence of a batch. Both read every variable quantity from state memory,
///    allocate nothing and never wait.

#include <nosa/attention/prefill.hpp>
#include <nosa/attention/sparse_attention.hpp>
#include <nosa/core/backend.hpp>
#include <nosa/core/concepts.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>
#include <nosa/scorer/query_agnostic.hpp>
#include <nosa/scorer/query_aware.hpp>
#include <nosa/selector/forced_topk.hpp>
#include <nosa/store/policies.hpp>

#include <cstddef>
#include <cstdint>

namespace nosa {

/// A complete decode pipeline, fixed at compile time. Defaults give NOSA with offloading and the trained
/// bias semantics.
/// \tparam Element storage type of q, K, V (`float`, `fp16`, `bf16`); arithmetic is fp32
/// \tparam HeadDim D, one of the compiled head dimensions (any positive value works on the host backend)
template <storage_element Element, int HeadDim, query_agnostic_scorer_policy QueryAgnostic = eviction_score_pooling,
          store_policy Store = offload_store, attention_policy Attention = sparse_attention<bias_mode::after_scale>,
          query_aware_scorer_policy QueryAware = group_softmax_scorer, selector_policy Selector = forced_topk_selector>
struct pipeline {
  static_assert(HeadDim > 0, "head dimension must be positive");
  using element_type = Element;
  using query_aware = QueryAware;
  using query_agnostic = QueryAgnostic;
  using selector = Selector;
  using store = Store;
  using attention = Attention;
  static constexpr int head_dim = HeadDim;
  /// True when attention reads every block: no scoring, selection or compressed state exists.
  static constexpr bool dense = attends_all_blocks<Attention>;
  static_assert(!dense || !Store::offloads, "full attention keeps every block in device memory: use resident_store");
  /// True when the per-token eviction scores `c` are read at all (selection or bias).
  static constexpr bool uses_eviction_scores = QueryAgnostic::enabled || Attention::bias != bias_mode::none;
  /// How complete blocks of K and V are stored (the store's knob): the element type, or FP8 (spec §6b).
  using kv_format = typename Store::kv_format;
};
static_assert(pipeline_policy<pipeline<bf16, 128>>);

/// NOSA with NOSI-style offloading (the paper's method).
template <storage_element Element, int HeadDim, store_policy Store = offload_store>
using nosa_pipeline = pipeline<Element, HeadDim, eviction_score_pooling, Store>;

/// InfLLMv2: query-aware selection only, no eviction-score bias.
template <storage_element Element, int HeadDim, store_policy Store = offload_store>
using infllmv2_pipeline = pipeline<Element, HeadDim, no_query_agnostic, Store, sparse_attention<bias_mode::none>>;

/// Full attention over a KV cache kept whole in device memory (the FullAttn baseline). The selection
/// parameters other than the block size are ignored. `Store` must keep blocks resident; `fp8_resident_store`
/// keeps complete blocks in FP8.
template <storage_element Element, int HeadDim, bias_mode Bias = bias_mode::none,
          store_policy Store = resident_store>
using full_attention_pipeline = pipeline<Element, HeadDim, no_query_agnostic, Store, full_attention<Bias>>;

/// The new token of every sequence of a batch, for one layer. Row `b` belongs to sequence `sequences[b]`.
template <storage_element T, class Out = T>
struct step_args {
  tensor_view<const std::int32_t, 1> sequences;  ///< [B] sequence slot ids, each live and listed once
  tensor_view<const T, 3> q;                     ///< [B][H_q][D] post-RoPE queries
  tensor_view<const T, 3> k;                     ///< [B][H_kv][D] post-RoPE keys of the new token
  tensor_view<const T, 3> v;                     ///< [B][H_kv][D] values of the new token
  tensor_view<const float, 2> c;                 ///< [B][H_kv] eviction scores; may be empty when unused
  tensor_view<Out, 3> o;                         ///< [B][H_q][D] attention output (written)
};

/// A prompt to ingest when a sequence joins (NOSA^F: the engine ran dense prefill and hands over K, V, c).
template <storage_element T>
struct prompt_args {
  tensor_view<const T, 3> k;          ///< [P][H_kv][D] post-RoPE keys, P >= 0
  tensor_view<const T, 3> v;          ///< [P][H_kv][D] values
  tensor_view<const float, 2> c;      ///< [P][H_kv] eviction scores; may be empty when unused
  tensor_view<const T, 2> last_query; ///< [H_q][D] optional query of the last prompt token for the initial
                                      ///< selection; without it the query-aware part is left empty
};

/// A ragged batch of prompt chunks for one layer (`decode_layer::prefill`). Chunk `b` holds the rows
/// `[row_offsets[b], row_offsets[b + 1])` of the packed arrays, the next tokens of sequence `sequences[b]` in
/// order; a chunk may be empty. `N`, the rows of the packed arrays, is a shape (fixed for a captured graph):
/// at most `capacity::max_prefill_rows`, of which the chunks may use fewer.
template <storage_element T, class Out = T>
struct prefill_args {
  tensor_view<const std::int32_t, 1> sequences;    ///< [B] sequence slot ids, each live and listed once
  tensor_view<const std::int32_t, 1> row_offsets;  ///< [B + 1] first row of each chunk, then the end of the
                                                   ///< last: non-decreasing, from >= 0 to <= N
  tensor_view<const T, 3> q;                       ///< [N][H_q][D] post-RoPE queries of the chunks' tokens
  tensor_view<const T, 3> k;                       ///< [N][H_kv][D] post-RoPE keys
  tensor_view<const T, 3> v;                       ///< [N][H_kv][D] values
  tensor_view<const float, 2> c;                   ///< [N][H_kv] eviction scores; may be empty when unused
  tensor_view<Out, 3> o;  ///< [N][H_q][D] attention output of each chunk row (written;
                          ///< rows outside every chunk are left as they are)
};

/// A prompt prefix that a new sequence shares with a live one (prompts with a common beginning, such as a
/// system prompt, or many samples of one prompt). The first `blocks` blocks of the new sequence reference
/// the pages of the same blocks of `source` (reference-counted) instead of new pages, so the pool holds them
/// once. Each shared block must be complete in both sequences and hold the same tokens; the prompt views
/// must still hold every token, since the compressed state and the slot cache are per sequence.
struct shared_prefix {
  int source = -1;  ///< live sequence whose pages are shared
  int blocks = 0;   ///< complete blocks to share, from block 0
};

/// Traffic and residency counters. Accumulated in state memory during steps; reading them never forces a
/// synchronisation of the step.
struct counters {
  std::uint64_t steps = 0;       ///< decode steps run (per layer)
  std::uint64_t hits = 0;        ///< selected blocks already resident, summed over (sequence, KV head)
  std::uint64_t misses = 0;      ///< selected blocks loaded from the pool
  std::uint64_t bytes_h2d = 0;   ///< bytes gathered host -> device (K and V; with FP8, codes and scales)
  std::uint64_t bytes_d2h = 0;   ///< bytes written back device -> host (K and V; with FP8, codes and scales)
};

/// Sizes of the two caller-owned arenas a layer needs. The device arena holds every per-step structure
/// (and, for the resident store, the pool); the host arena holds the pool of the offload store and the
/// page bookkeeping of the plan calls. Base addresses must be 256-byte aligned.
struct arena_sizes {
  std::size_t device = 0;
  std::size_t host = 0;
};

/// Alignment required of arena base addresses (and used for every array inside them).
inline constexpr std::size_t arena_alignment = 256;

/// One layer's decode state and executor. Specialised per backend, e.g. `decode_layer<P, host_backend>`.
template <pipeline_policy Pipeline, class Backend>
class decode_layer;

}  // namespace nosa
