#pragma once
/// \file
/// `layer_impl<P, Backend>`: the `layer_base` of one pipeline on one backend. It turns the caller's array
/// descriptions into tensor views (checking what a view cannot express: presence, memory, dtype, rank),
/// runs the library call and explains a failed status. It copies no array and allocates nothing after
/// `create`; what a step costs beyond the library's own step is these checks.
///
/// `backend_glue<Backend>` supplies what differs between backends: the stream type, which memory the
/// backend reads, and the current-device scope of the CUDA backend (host_glue.hpp, cuda_glue.cuh).

#include "layer.hpp"

#include <nosa/backend/host/arena.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>
#include <nosa/pipeline.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>

namespace nosa_python {

template <class Backend>
struct backend_glue;

namespace detail {

template <class T>
constexpr element_kind element_of() noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return element_kind::f32;
  } else if constexpr (std::is_same_v<T, nosa::fp16>) {
    return element_kind::f16;
  } else if constexpr (std::is_same_v<T, nosa::bf16>) {
    return element_kind::bf16;
  } else {
    static_assert(std::is_same_v<T, std::int32_t>);
    return element_kind::i32;
  }
}

constexpr std::string_view element_name(element_kind e) noexcept {
  switch (e) {
    case element_kind::f32: return "float32";
    case element_kind::f16: return "float16";
    case element_kind::bf16: return "bfloat16";
    case element_kind::i32: return "int32";
    case element_kind::other: return "?";
  }
  return "?";
}

inline std::string shape_string(const std::int64_t* extents, int rank) {
  std::string s = "(";
  for (int d = 0; d < rank; ++d) s += (d ? ", " : "") + std::to_string(extents[d]);
  return s + (rank == 1 ? ",)" : ")");
}

/// Checks `a` against what the layer needs and, when it passes, points `out` at its data. `expected`
/// holds the extents; `dims` names them for messages ("[B, H_q, D]").
template <class Backend, class T, int Rank>
problem view_of(const array_ref& a, std::string_view name, std::string_view dims,
                const std::int64_t (&expected)[Rank], int device, nosa::tensor_view<T, Rank>& out) {
  using element = std::remove_const_t<T>;
  const std::string arg(name);
  if (!a.present) return fail(nosa::status::invalid_argument, arg + " is required");
  if (problem p = backend_glue<Backend>::check_memory(a, name, device); p.failed()) return p;
  if (a.element != element_of<element>()) {
    return fail(nosa::status::invalid_argument, arg + " has dtype " + a.dtype_name + "; expected " +
                                                    std::string(element_name(element_of<element>())));
  }
  if (a.rank != Rank) {
    return fail(nosa::status::shape_mismatch, arg + " has " + std::to_string(a.rank) +
                                                  " dimensions; expected " + std::to_string(Rank) + " " +
                                                  std::string(dims));
  }
  nosa::tensor_view<T, Rank> v;
  v.data = static_cast<T*>(a.data);
  for (int d = 0; d < Rank; ++d) {
    v.extents[d] = a.shape[d];
    v.strides[d] = a.strides[d];
  }
  switch (const nosa::status s = nosa::check_view(v, expected)) {
    case nosa::status::success: out = v; return {};
    case nosa::status::shape_mismatch:
      return fail(s, arg + " has shape " + shape_string(a.shape, Rank) + "; expected " + std::string(dims) +
                         " = " + shape_string(expected, Rank));
    case nosa::status::bad_layout:
      return fail(s, arg + " has strides " + shape_string(a.strides, Rank) +
                         " (in elements); the last must be 1 and none negative");
    case nosa::status::null_pointer: return fail(s, arg + " has no data");
    case nosa::status::misaligned_pointer:
      return fail(s, arg + "'s data is not aligned to its " +
                         std::string(element_name(element_of<element>())) + " elements");
    default: return fail(s, arg + " was rejected");
  }
}

/// Runs `expr` (a `problem`) and returns it from the enclosing function when it failed.
#define NOSA_PYTHON_TRY(expr)                                                                                \
  do {                                                                                                       \
    if (::nosa_python::problem nosa_python_p_ = (expr); nosa_python_p_.failed()) {                           \
      return nosa_python_p_;                                                                                 \
    }                                                                                                        \
  } while (0)

/// Why `create` refused `config`: the library's status names the class of problem, this names the value.
inline std::string explain_config(nosa::status s, const nosa::layer_config& c, std::string_view backend,
                                  int max_group, int max_top_k) {
  const nosa::selection_params& p = c.selection;
  switch (s) {
    case nosa::status::invalid_config:
      if (p.block_size <= 0 || p.window <= 0 || p.stride <= 0)
        return "block, window and stride must be positive";
      if (p.top_k <= 0 || p.top_k_query_aware < 0 || p.n_init < 0 || p.n_local < 0) {
        return "topk must be positive and topk_qa, init and local non-negative";
      }
      if (p.top_k_query_aware > p.top_k) {
        return "topk_qa (" + std::to_string(p.top_k_query_aware) + ") exceeds topk (" +
               std::to_string(p.top_k) + ")";
      }
      if (p.top_k < p.forced_blocks()) {
        return "topk (" + std::to_string(p.top_k) +
               ") is below the forced blocks init + local + 1 = " + std::to_string(p.forced_blocks());
      }
      return "budget must be None or >= 0";
    case nosa::status::invalid_argument:
      return "num_q_heads must be a positive multiple of num_kv_heads; max_sequences, "
             "max_blocks_per_sequence and "
             "pool_pages positive; cache_slots in [0, 2^20]; max_blocks_per_sequence * block at most 2^30 "
             "tokens";
    case nosa::status::not_supported:
      return std::string("the ") + std::string(backend) + " backend supports GQA groups up to " +
             std::to_string(max_group) + (max_top_k > 0 ? ", topk up to " + std::to_string(max_top_k) : "") +
             (backend == "CUDA" ? ", blocks that are a multiple of 8 tokens and topk + 1 + cache_slots <= 288"
                                : "");
    case nosa::status::insufficient_memory: return "allocating the layer's memory failed";
    default: return "the backend failed to create the layer";
  }
}

}  // namespace detail

/// One pipeline `P` on `Backend`, owning its memory.
template <class P, class Backend>
class layer_impl final : public layer_base {
  using layer_type = nosa::decode_layer<P, Backend>;
  using glue = backend_glue<Backend>;
  using element = typename P::element_type;
  static constexpr int head_dim = P::head_dim;
  static constexpr bool offloads = P::store::offloads;
  /// Largest `k` of the backend, or 0 where it sets none.
  static constexpr int max_top_k = [] {
    if constexpr (requires { layer_type::max_top_k; }) {
      return layer_type::max_top_k;
    } else {
      return 0;
    }
  }();

 public:
  /// Allocates the layer's memory and creates it.
  static problem create(const layer_spec& spec, std::unique_ptr<layer_base>& out) {
    std::unique_ptr<layer_impl> impl(new (std::nothrow) layer_impl(spec));
    if (!impl) return fail(nosa::status::insufficient_memory, "allocating the layer object failed");
    typename glue::device_scope scope(spec.device);
    if (problem p = scope.result(); p.failed()) return p;
    if (const nosa::status s = impl->layer_.create(spec.config); !nosa::ok(s)) {
      return fail(s, detail::explain_config(s, spec.config, glue::name, layer_type::max_group, max_top_k));
    }
    out = std::move(impl);
    return {};
  }

  problem add_sequence(int seq, const array_ref& k, const array_ref& v, const array_ref& c,
                       const array_ref& last_query, std::uintptr_t stream) override {
    const std::int64_t hq = config().num_q_heads, hkv = config().num_kv_heads;
    const std::int64_t length = k.present && k.rank >= 1 ? k.shape[0] : 0;
    nosa::prompt_args<element> prompt;
    NOSA_PYTHON_TRY(view(k, "k", "[P, H_kv, D]", {length, hkv, head_dim}, prompt.k));
    NOSA_PYTHON_TRY(view(v, "v", "[P, H_kv, D]", {length, hkv, head_dim}, prompt.v));
    NOSA_PYTHON_TRY(scores(c, "[P, H_kv]", {length, hkv}, prompt.c));
    if (last_query.present) {
      NOSA_PYTHON_TRY(view(last_query, "last_query", "[H_q, D]", {hq, head_dim}, prompt.last_query));
    }
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    if (const nosa::status s = layer_->add_sequence(seq, prompt, glue::stream(stream)); !nosa::ok(s)) {
      return fail(s, explain_plan(s, seq, static_cast<int>(length)));
    }
    return {};
  }

  problem remove_sequence(int seq, std::uintptr_t stream) override {
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    if (const nosa::status s = layer_->remove_sequence(seq, glue::stream(stream)); !nosa::ok(s)) {
      return fail(s, explain_plan(s, seq, 0));
    }
    return {};
  }

  problem reserve(int seq, int tokens, std::uintptr_t stream) override {
    if (tokens < 0) return fail(nosa::status::invalid_argument, "tokens must be >= 0");
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    const nosa::status s = seq < 0 ? layer_->reserve(tokens, glue::stream(stream))
                                   : layer_->reserve(seq, tokens, glue::stream(stream));
    if (!nosa::ok(s)) return fail(s, explain_plan(s, seq, tokens));
    return {};
  }

  problem step(const array_ref& sequences, const array_ref& q, const array_ref& k, const array_ref& v,
               const array_ref& c, const array_ref& o, std::uintptr_t stream) override {
    const std::int64_t hq = config().num_q_heads, hkv = config().num_kv_heads;
    const std::int64_t batch = sequences.present && sequences.rank == 1 ? sequences.shape[0] : -1;
    nosa::step_args<element, float> a;
    if (sequences.present && sequences.rank != 1) {
      return fail(nosa::status::shape_mismatch,
                  "sequences has " + std::to_string(sequences.rank) + " dimensions; expected 1 [B]");
    }
    NOSA_PYTHON_TRY(view(sequences, "sequences", "[B]", {batch}, a.sequences));
    NOSA_PYTHON_TRY(view(q, "q", "[B, H_q, D]", {batch, hq, head_dim}, a.q));
    NOSA_PYTHON_TRY(view(k, "k", "[B, H_kv, D]", {batch, hkv, head_dim}, a.k));
    NOSA_PYTHON_TRY(view(v, "v", "[B, H_kv, D]", {batch, hkv, head_dim}, a.v));
    NOSA_PYTHON_TRY(scores(c, "[B, H_kv]", {batch, hkv}, a.c));
    NOSA_PYTHON_TRY(view(o, "out", "[B, H_q, D]", {batch, hq, head_dim}, a.o));
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    if (const nosa::status s = layer_->step(a, glue::stream(stream)); !nosa::ok(s)) {
      return fail(s, explain_step(s, a.sequences));
    }
    return {};
  }

  problem step_status(std::uintptr_t stream) override {
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    if (const nosa::status s = layer_->step_status(glue::stream(stream)); !nosa::ok(s)) {
      return fail(s, "the last step failed and changed nothing: " + std::string(nosa::to_string(s)));
    }
    return {};
  }

  problem selection(int seq, std::int32_t* out, std::uintptr_t stream) override {
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    NOSA_PYTHON_TRY(live(seq, stream));
    const int width = selection_width();
    for (int h = 0; h < config().num_kv_heads; ++h) {
      std::int32_t* row = out + static_cast<std::ptrdiff_t>(h) * width;
      std::fill(row, row + width, -1);
      if constexpr (!P::dense) {
        const auto got = layer_->selection(seq, h, glue::stream(stream));
        const std::size_t n = std::min(got.size(), static_cast<std::size_t>(width));
        std::copy_n(got.begin(), n, row);
        std::sort(row, row + n);
      }
    }
    return {};
  }

  problem step_misses(int seq, std::int32_t* out, std::uintptr_t stream) override {
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    NOSA_PYTHON_TRY(live(seq, stream));
    for (int h = 0; h < config().num_kv_heads; ++h)
      out[h] = layer_->step_misses(seq, h, glue::stream(stream));
    return {};
  }

  problem slots(int seq, std::int32_t* out, std::uintptr_t stream) override {
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    NOSA_PYTHON_TRY(live(seq, stream));
    const int width = slot_count();
    for (int h = 0; h < config().num_kv_heads; ++h) {
      const auto got = layer_->slots(seq, h, glue::stream(stream));
      std::int32_t* row = out + static_cast<std::ptrdiff_t>(h) * width;
      std::fill(row, row + width, -1);
      std::copy_n(got.begin(), std::min(got.size(), static_cast<std::size_t>(width)), row);
    }
    return {};
  }

  problem counters(bool last_step, nosa::counters& out, std::uintptr_t stream) override {
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    out = last_step ? layer_->last_step_counters(glue::stream(stream))
                    : layer_->total_counters(glue::stream(stream));
    return {};
  }

  problem length(int seq, int& out, std::uintptr_t stream) override {
    typename glue::device_scope scope(device_);
    NOSA_PYTHON_TRY(scope.result());
    out = layer_->is_live(seq, glue::stream(stream)) ? layer_->length(seq, glue::stream(stream)) : -1;
    return {};
  }

  int free_pages() const override { return layer_->free_page_count(); }
  int kv_heads() const override { return config().num_kv_heads; }
  int selection_width() const override { return P::dense ? 0 : config().selection.top_k; }
  int slot_count() const override { return offloads ? layer_->layout().slots : 0; }

 private:
  explicit layer_impl(const layer_spec& spec) : device_(spec.device) {}

  const nosa::layer_config& config() const { return layer_->config(); }

  template <class T, int Rank>
  problem view(const array_ref& a, std::string_view name, std::string_view dims,
               const std::int64_t (&expected)[Rank], nosa::tensor_view<T, Rank>& out) const {
    return detail::view_of<Backend>(a, name, dims, expected, device_, out);
  }

  /// The eviction scores: required when the pipeline reads them, checked when given anyway.
  template <int Rank>
  problem scores(const array_ref& c, std::string_view dims, const std::int64_t (&expected)[Rank],
                 nosa::tensor_view<const float, Rank>& out) const {
    if (!c.present) {
      if constexpr (P::uses_eviction_scores) {
        return fail(nosa::status::invalid_argument,
                    "c is required: this pipeline reads eviction scores (the nosa variant, or a bias)");
      } else {
        return {};
      }
    }
    return view(c, "c", dims, expected, out);
  }

  problem live(int seq, std::uintptr_t stream) const {
    if (!layer_->is_live(seq, glue::stream(stream))) {
      return fail(nosa::status::unknown_sequence, "slot " + std::to_string(seq) + " holds no live sequence");
    }
    return {};
  }

  std::string explain_plan(nosa::status s, int seq, int count) const {
    const nosa::layer_config& c = config();
    switch (s) {
      case nosa::status::unknown_sequence:
        return seq < 0 || seq >= c.limits.max_sequences
                   ? "slot " + std::to_string(seq) +
                         " is outside [0, max_sequences = " + std::to_string(c.limits.max_sequences) + ")"
                   : "slot " + std::to_string(seq) + " holds no live sequence";
      case nosa::status::sequence_exists:
        return "slot " + std::to_string(seq) + " already holds a live sequence";
      case nosa::status::sequence_full:
        return "a sequence would exceed max_blocks_per_sequence * block = " + std::to_string(c.max_tokens()) +
               " tokens (" + std::to_string(count) + " asked)";
      case nosa::status::host_pool_full:
        return "the pool has " + std::to_string(layer_->free_page_count()) + " free pages of " +
               std::to_string(c.limits.pool_pages) + ", too few for the request; nothing was reserved";
      case nosa::status::backend_error: return "the CUDA runtime reported an error";
      default: return std::string(nosa::to_string(s));
    }
  }

  std::string explain_step(nosa::status s, const nosa::tensor_view<const std::int32_t, 1>& sequences) const {
    std::string why(nosa::to_string(s));
    if constexpr (glue::host_readable_steps) {
      // The host backend reads the ids on the host, so the message can name the row.
      const std::int64_t batch = sequences.extents[0];
      const int slots = config().limits.max_sequences;
      for (std::int64_t b = 0; b < batch; ++b) {
        const int seq = sequences(b);
        const bool in_range = seq >= 0 && seq < slots;
        if (s == nosa::status::unknown_sequence && (!in_range || !layer_->is_live(seq))) {
          return "row " + std::to_string(b) + " names slot " + std::to_string(seq) +
                 ", which holds no live sequence";
        }
        if (s == nosa::status::duplicate_sequence) {
          for (std::int64_t a = 0; a < b; ++a) {
            if (sequences(a) == seq) {
              return "rows " + std::to_string(a) + " and " + std::to_string(b) + " both name slot " +
                     std::to_string(seq);
            }
          }
        }
      }
    }
    if (s == nosa::status::not_reserved) return why + ": call reserve() before the step";
    if (s == nosa::status::sequence_full)
      return why + ": a sequence reached max_blocks_per_sequence * block tokens";
    return why;
  }

  int device_ = 0;
  nosa::owning_layer<layer_type> layer_;
};

}  // namespace nosa_python
