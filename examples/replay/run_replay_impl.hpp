#pragma once
/// \file
/// Definition of `run_replay<Element, HeadDim>` and of the replay loop both backends share: turns the
/// remaining run-time choices into a pipeline type and replays the recorded prompts and steps through one
/// decode layer. Included only by the translation units that instantiate it (`instances/` for the host
/// backend; `cuda/run_replay_cuda.cuh`, which adds the CUDA memory, for the CUDA backend).

#include "run_replay.hpp"

#include <nosa/backend/host/arena.hpp>
#include <nosa/backend/host/decode_layer.hpp>
#include <nosa/core/dispatch.hpp>
#include <nosa/core/tensor_view.hpp>
#include <nosa/scorer/query_agnostic.hpp>
#include <nosa/store/policies.hpp>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace replay {

namespace detail {

/// Where the replay keeps what it hands to the layer, per backend:
///  - `input<T>(src, count)`: `count` values of `src` as `T` (rounded to nearest even when `T` is fp16 or
///    bf16), made once before the first step so the steps never convert or allocate; `data()`, `status()`;
///  - `output(o)`: where the steps write the attention output of every step; `data()`, `status()`, and
///    `copy_back()`, which leaves it in `o`;
///  - `explain_create(s)`: a backend-specific reason for a `create` failure, or empty.
/// The host backend reads the loaded inputs in place and writes `o` directly; the CUDA backend
/// (`cuda/run_replay_cuda.cuh`) copies them to device memory.
template <class Backend>
struct replay_memory;

template <>
struct replay_memory<nosa::host_backend> {
  template <class T>
  class input {
   public:
    template <class Source>
    input(const Source* src, std::size_t count) {
      if constexpr (std::same_as<T, Source>) {
        data_ = src;
      } else {
        copy_.resize(count);
        std::transform(src, src + count, copy_.begin(), [](Source x) { return T(x); });
        data_ = copy_.data();
      }
    }
    replay_status status() const noexcept { return {}; }
    const T* data() const noexcept { return data_; }

   private:
    std::vector<T> copy_;
    const T* data_ = nullptr;
  };

  class output {
   public:
    explicit output(std::vector<float>& o) noexcept : data_(o.data()) {}
    replay_status status() const noexcept { return {}; }
    float* data() const noexcept { return data_; }
    replay_status copy_back() noexcept { return {}; }

   private:
    float* data_;
  };

  static std::string_view explain_create(nosa::status) noexcept { return {}; }
};

/// The capacities docs/replay.md documents: room for the longest prompt plus every step, one block of
/// slack, and enough pages for every sequence to reach that length. Values beyond `int` are clamped, which
/// the layer's own validation then rejects.
inline nosa::capacity replay_capacity(const options& opt, const replay_inputs& in) {
  const std::int64_t block = opt.selection.block_size;
  // A non-positive block size is left for the layer to reject as an invalid configuration.
  const std::int64_t blocks = block > 0 ? (in.prompt_rows + in.steps + block - 1) / block + 1 : 1;
  const auto clamp = [](std::int64_t n) {
    return static_cast<int>(std::min<std::int64_t>(n, std::numeric_limits<int>::max()));
  };
  nosa::capacity c;
  c.max_sequences = clamp(in.batch);
  c.max_blocks_per_sequence = clamp(blocks);
  c.pool_pages = clamp(in.batch * blocks);
  // A prefill call carries up to `chunk` rows of every sequence.
  if (opt.prefill != prefill_kind::none)
    c.max_prefill_rows = clamp(in.batch * std::min<std::int64_t>(opt.chunk, in.prompt_rows));
  return c;
}

/// Runs the prompts through the layer's prefill (host backend), with `Prefill` attention: every sequence
/// has joined empty; each round prefills the next `opt.chunk` rows of every sequence that has rows left, in
/// one ragged call through packed buffers of a fixed shape, and copies each row's output to `prompt_o`.
/// `prompt_k`, `prompt_v`, `prompt_c`: the prompt arrays in the storage element. Allocates only before
/// the first call.
template <class Prefill, class Layer, class Element>
replay_status prefill_prompts(Layer& layer, const options& opt, const replay_inputs& in,
                              const Element* prompt_k, const Element* prompt_v, const float* prompt_c,
                              replay_outputs& out) {
  const std::int64_t B = in.batch, P = in.prompt_rows, hq = in.q_heads, hkv = in.kv_heads, D = in.head_dim;
  const std::int64_t rows = layer->config().limits.max_prefill_rows;
  const typename replay_memory<nosa::host_backend>::template input<Element> prompt_q(
      in.prompt_q, std::size_t(B * P * hq * D));
  std::vector<Element> q(std::size_t(rows * hq * D)), k(std::size_t(rows * hkv * D)), v(k.size());
  std::vector<float> c(std::size_t(rows * hkv)), o(q.size());
  std::vector<std::int32_t> sequences(static_cast<std::size_t>(B)),
      offsets(static_cast<std::size_t>(B) + 1, 0);
  std::vector<std::int64_t> done(static_cast<std::size_t>(B), 0);
  out.prompt_o.assign(std::size_t(B * P * hq * D), 0.0f);
  const auto rows_of = [&](std::size_t row, std::int64_t width) { return row * std::size_t(width); };
  for (;;) {
    std::int64_t chunks = 0, row = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = std::min<std::int64_t>(opt.chunk, in.prompt_len[b] - done[std::size_t(b)]);
      if (n <= 0) continue;
      if (const nosa::status s = layer->reserve(static_cast<int>(b), static_cast<int>(n)); !nosa::ok(s)) {
        return {s, "reserve"};
      }
      const std::size_t from = std::size_t(b * P + done[std::size_t(b)]);
      std::copy_n(prompt_q.data() + rows_of(from, hq * D), n * hq * D,
                  q.begin() + std::ptrdiff_t(row * hq * D));
      std::copy_n(prompt_k + rows_of(from, hkv * D), n * hkv * D, k.begin() + std::ptrdiff_t(row * hkv * D));
      std::copy_n(prompt_v + rows_of(from, hkv * D), n * hkv * D, v.begin() + std::ptrdiff_t(row * hkv * D));
      std::copy_n(prompt_c + rows_of(from, hkv), n * hkv, c.begin() + std::ptrdiff_t(row * hkv));
      sequences[std::size_t(chunks)] = static_cast<std::int32_t>(b);
      row += n;
      offsets[std::size_t(++chunks)] = static_cast<std::int32_t>(row);
    }
    if (chunks == 0) return {};
    nosa::prefill_args<Element, float> args;
    args.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(sequences.data()), {chunks});
    args.row_offsets =
        nosa::make_contiguous<1>(static_cast<const std::int32_t*>(offsets.data()), {chunks + 1});
    args.q = nosa::make_contiguous<3>(static_cast<const Element*>(q.data()), {rows, hq, D});
    args.k = nosa::make_contiguous<3>(static_cast<const Element*>(k.data()), {rows, hkv, D});
    args.v = nosa::make_contiguous<3>(static_cast<const Element*>(v.data()), {rows, hkv, D});
    args.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {rows, hkv});
    args.o = nosa::make_contiguous<3>(o.data(), {rows, hq, D});
    if (const nosa::status s = layer->template prefill<Prefill>(args); !nosa::ok(s)) return {s, "prefill"};
    for (std::int64_t i = 0; i < chunks; ++i) {
      const std::int64_t b = sequences[std::size_t(i)],
                         n = offsets[std::size_t(i) + 1] - offsets[std::size_t(i)];
      std::copy_n(o.begin() + std::ptrdiff_t(offsets[std::size_t(i)] * hq * D), n * hq * D,
                  out.prompt_o.begin() + std::ptrdiff_t((b * P + done[std::size_t(b)]) * hq * D));
      done[std::size_t(b)] += n;
    }
  }
}

/// Replays everything through one layer of pipeline `Pipeline` on `Backend`. Every call uses the backend's
/// default stream, so the same code serves both backends: on CUDA the plan calls and the inspection
/// synchronise, and the step only enqueues, which is why its state checks are read with `step_status()`.
/// Allocates only before the first step.
template <class Pipeline, class Backend>
replay_status run_pipeline(const options& opt, const replay_inputs& in, replay_outputs& out) {
  using element = typename Pipeline::element_type;
  using layer_type = nosa::decode_layer<Pipeline, Backend>;
  using memory = replay_memory<Backend>;
  using element_input = typename memory::template input<element>;
  using float_input = typename memory::template input<float>;
  using id_input = typename memory::template input<std::int32_t>;
  const std::int64_t T = in.steps, B = in.batch, P = in.prompt_rows;
  const std::int64_t hq = in.q_heads, hkv = in.kv_heads, D = in.head_dim;
  const std::int64_t top_k = opt.selection.top_k;

  nosa::layer_config config;
  config.selection = opt.selection;
  config.num_q_heads = static_cast<int>(hq);
  config.num_kv_heads = static_cast<int>(hkv);
  config.limits = replay_capacity(opt, in);

  nosa::owning_layer<layer_type> layer;
  if (const nosa::status s = layer.create(config); !nosa::ok(s)) {
    return {s, "create", memory::explain_create(s)};
  }

  std::vector<std::int32_t> ids(std::size_t(B), 0);
  std::iota(ids.begin(), ids.end(), 0);
  const element_input prompt_k(in.prompt_k, std::size_t(B * P * hkv * D));
  const element_input prompt_v(in.prompt_v, std::size_t(B * P * hkv * D));
  const float_input prompt_c(in.prompt_c, std::size_t(B * P * hkv));
  const element_input q(in.q, std::size_t(T * B * hq * D));
  const element_input k(in.k, std::size_t(T * B * hkv * D));
  const element_input v(in.v, std::size_t(T * B * hkv * D));
  const float_input c(in.c, std::size_t(T * B * hkv));
  const id_input sequences(ids.data(), ids.size());
  out.o.assign(std::size_t(T * B * hq * D), 0.0f);
  out.selected.assign(std::size_t(T * B * hkv * top_k), -1);
  out.misses.assign(std::size_t(T * B * hkv), 0);
  typename memory::output o(out.o);
  for (const replay_status& s : {prompt_k.status(), prompt_v.status(), prompt_c.status(), q.status(),
                                 k.status(), v.status(), c.status(), sequences.status(), o.status()}) {
    if (!nosa::ok(s.status)) return s;
  }

  // Sequence b's prompt is the first prompt_len[b] rows of its [P][H_kv][D] slab, viewed in place; with a
  // prefill every sequence joins empty and the prefill appends the rows.
  const bool prefill = opt.prefill != prefill_kind::none;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = prefill ? 0 : in.prompt_len[b];
    nosa::prompt_args<element> prompt;
    prompt.k = nosa::make_contiguous<3>(prompt_k.data() + b * P * hkv * D, {len, hkv, D});
    prompt.v = nosa::make_contiguous<3>(prompt_v.data() + b * P * hkv * D, {len, hkv, D});
    prompt.c = nosa::make_contiguous<2>(prompt_c.data() + b * P * hkv, {len, hkv});
    if (const nosa::status s = layer->add_sequence(static_cast<int>(b), prompt); !nosa::ok(s)) {
      return {s, "add_sequence"};
    }
  }
  if (prefill) {
    // parse_options refuses a prefill on any other backend.
    if constexpr (!std::same_as<Backend, nosa::host_backend>) {
      return {nosa::status::not_supported, "prefill"};
    } else {
      const replay_status s =
          opt.prefill == prefill_kind::sparse
              ? prefill_prompts<nosa::sparse_prefill>(layer, opt, in, prompt_k.data(), prompt_v.data(),
                                                      prompt_c.data(), out)
              : prefill_prompts<nosa::dense_prefill>(layer, opt, in, prompt_k.data(), prompt_v.data(),
                                                     prompt_c.data(), out);
      if (!nosa::ok(s.status)) return s;
    }
  }

  for (std::int64_t t = 0; t < T; ++t) {
    if (const nosa::status s = layer->reserve(1); !nosa::ok(s)) return {s, "reserve"};
    nosa::step_args<element, float> args;
    args.sequences = nosa::make_contiguous<1>(sequences.data(), {B});
    args.q = nosa::make_contiguous<3>(q.data() + t * B * hq * D, {B, hq, D});
    args.k = nosa::make_contiguous<3>(k.data() + t * B * hkv * D, {B, hkv, D});
    args.v = nosa::make_contiguous<3>(v.data() + t * B * hkv * D, {B, hkv, D});
    args.c = nosa::make_contiguous<2>(c.data() + t * B * hkv, {B, hkv});
    args.o = nosa::make_contiguous<3>(o.data() + t * B * hq * D, {B, hq, D});
    if (const nosa::status s = layer->step(args); !nosa::ok(s)) return {s, "step"};
    if (const nosa::status s = layer->step_status(); !nosa::ok(s)) return {s, "step"};

    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < hkv; ++h) {
        const std::size_t row = std::size_t((t * B + b) * hkv + h);
        // The layer keeps its selection in rank order; the file lists it as a set, so engines can compare
        // it with their own top-k whatever their tie order.
        const auto chosen = layer->selection(static_cast<int>(b), static_cast<int>(h));
        std::int32_t* dst = out.selected.data() + row * std::size_t(top_k);
        std::copy(chosen.begin(), chosen.end(), dst);
        std::sort(dst, dst + chosen.size());
        out.misses[row] = layer->step_misses(static_cast<int>(b), static_cast<int>(h));
      }
    }
  }
  out.totals = layer->total_counters();
  return o.copy_back();
}

template <variant_kind Variant>
using query_agnostic_of =
    std::conditional_t<Variant == variant_kind::nosa, nosa::eviction_score_pooling, nosa::no_query_agnostic>;

template <store_kind Store, kv_format_kind Format>
using store_of = std::conditional_t<
    Format == kv_format_kind::fp8,
    std::conditional_t<Store == store_kind::offload, nosa::fp8_offload_store, nosa::fp8_resident_store>,
    std::conditional_t<Store == store_kind::offload, nosa::offload_store, nosa::resident_store>>;

/// Runs the pipeline of `opt` whose variant, bias and KV format are fixed here (the store is dispatched).
template <nosa::storage_element Element, int HeadDim, variant_kind Variant, nosa::bias_mode Bias,
          kv_format_kind Format>
nosa::status run_store(const options& opt, const replay_inputs& in, replay_outputs& out, replay_status& result) {
  return nosa::dispatch_value<store_kind::offload, store_kind::resident>(opt.store, [&](auto store) {
    using store_type = store_of<decltype(store)::value, Format>;
    using pipeline =
        nosa::pipeline<Element, HeadDim, query_agnostic_of<Variant>, store_type, nosa::sparse_attention<Bias>>;
    result = run_pipeline<pipeline, nosa::host_backend>(opt, in, out);
    return result.status;
  });
}

}  // namespace detail

template <nosa::storage_element Element, int HeadDim>
replay_status run_replay(const options& opt, const replay_inputs& in, replay_outputs& out) {
  using nosa::bias_mode;
  replay_status result;
  const nosa::status dispatched =
      nosa::dispatch_value<variant_kind::nosa, variant_kind::infllmv2>(opt.variant, [&](auto variant) {
        constexpr variant_kind v = decltype(variant)::value;
        if (opt.kv_format == kv_format_kind::fp8) {
          // FP8 is compiled with the variant's standard bias only (parse_options refuses the others).
          if (opt.bias != standard_bias(v)) return nosa::status::not_supported;
          return detail::run_store<Element, HeadDim, v, standard_bias(v), kv_format_kind::fp8>(opt, in, out, result);
        }
        return nosa::dispatch_value<bias_mode::after_scale, bias_mode::before_scale, bias_mode::none>(
            opt.bias, [&](auto bias) {
              constexpr bias_mode b = decltype(bias)::value;
              return detail::run_store<Element, HeadDim, v, b, kv_format_kind::element>(opt, in, out, result);
            });
      });
  // A value outside the compiled lists never reached a pipeline.
  if (!nosa::ok(dispatched) && nosa::ok(result.status)) result = {dispatched, "dispatch"};
  return result;
}

}  // namespace replay
