#pragma once
/// \file
/// The host executor of a decode layer: every stage of spec §6 as plain, sequential C++ over the two
/// arenas. Its "device" arena is ordinary memory, but the two tiers, the slot cache, the diff, the gather
/// and the write-back all exist as they will on a GPU, so the CUDA backend is a change of executor.

#include <nosa/attention/prefill.hpp>
#include <nosa/attention/sparse_attention.hpp>
#include <nosa/core/backend.hpp>
#include <nosa/core/math.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/selector/select_blocks.hpp>
#include <nosa/store/kv_format.hpp>
#include <nosa/store/layout.hpp>
#include <nosa/store/page_pool.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>

namespace nosa {

/// One layer's decode state and its host executor.
///
/// Usage: `required_bytes` → allocate two arenas (256-byte aligned) → `create` → plan calls and steps.
/// The object only refers to the arenas; it is cheap to copy, and copies share the state.
template <pipeline_policy P>
class decode_layer<P, host_backend> {
 public:
  using pipeline_type = P;
  using element_type = typename P::element_type;
  using backend_type = host_backend;
  static constexpr int head_dim = P::head_dim;
  /// Largest GQA group (H_q / H_kv) the host executor supports.
  static constexpr int max_group = 64;

  decode_layer() = default;

  /// Sizes of the device and host arenas a layer with this configuration needs.
  /// The host executor keeps a GQA group's queries on its stack: groups above `max_group` (64) give
  /// `not_supported`.
  [[nodiscard]] static status required_bytes(const layer_config& config, arena_sizes& out) noexcept {
    NOSA_TRY(validate(config));
    if (config.group_size() > max_group) return status::not_supported;
    const state_layout s = make_state_layout<P>(config);
    out = {s.device_bytes, s.host_bytes};
    return status::success;
  }

  /// Builds a layer over caller-owned arenas and initialises its state (no sequences, all pages free).
  [[nodiscard]] static status create(const layer_config& config, std::span<std::byte> device_arena,
                                     std::span<std::byte> host_arena, decode_layer& out) noexcept {
    NOSA_TRY(validate(config));
    if (config.group_size() > max_group) return status::not_supported;
    const state_layout s = make_state_layout<P>(config);
    if (device_arena.size() < s.device_bytes || host_arena.size() < s.host_bytes) return status::insufficient_memory;
    if ((s.device_bytes > 0 && device_arena.data() == nullptr) || (s.host_bytes > 0 && host_arena.data() == nullptr)) {
      return status::null_pointer;
    }
    if (reinterpret_cast<std::uintptr_t>(device_arena.data()) % arena_alignment != 0 ||
        reinterpret_cast<std::uintptr_t>(host_arena.data()) % arena_alignment != 0) {
      return status::misaligned_pointer;
    }
    // Validated: `out` is written in place. (Built in a local and copied, the layer's arena pointers were
    // lost to GCC 12's field-sensitive points-to analysis at -O3, which then read page counts stale.)
    out.config_ = config;
    out.layout_ = s;
    out.device_ = device_arena.data();
    out.host_ = host_arena.data();
    out.initialise();
    return status::success;
  }

  /// The configuration the layer was created with.
  const layer_config& config() const noexcept { return config_; }

  // ---------------------------------------------------------------------------------------------------
  // Plan calls: change the shape of the state between steps.
  // ---------------------------------------------------------------------------------------------------

  /// Admits a sequence into slot `seq` with a prompt of P >= 0 tokens: stores the complete blocks in the
  /// pool (quantised, with a quantized KV format), keeps the tail in the element type, builds the compressed
  /// state from the keys as given, computes the initial selection and loads it into the slot cache. Reserves
  /// the page of the block that the next token will start or continue.
  [[nodiscard]] status add_sequence(int seq, const prompt_args<element_type>& prompt,
                                    host_backend::stream_type stream = {}) noexcept {
    return add_sequence(seq, prompt, shared_prefix{}, stream);
  }

  /// `add_sequence` whose first `share.blocks` blocks reference the pages of the live sequence
  /// `share.source` (see `shared_prefix`): those blocks take no new page and are not written to the pool.
  [[nodiscard]] status add_sequence(int seq, const prompt_args<element_type>& prompt, const shared_prefix& share,
                                    host_backend::stream_type = {}) noexcept {
    if (seq < 0 || seq >= layout_.sequences) return status::unknown_sequence;
    if (live_flags()[seq]) return status::sequence_exists;
    const int hkv = config_.num_kv_heads;
    const std::int64_t len = prompt.k.extents[0];
    if (len < 0) return status::shape_mismatch;
    NOSA_TRY(check_view(prompt.k, {len, hkv, head_dim}));
    NOSA_TRY(check_view(prompt.v, {len, hkv, head_dim}));
    if (P::uses_eviction_scores || !prompt.c.empty()) NOSA_TRY(check_view(prompt.c, {len, hkv}));
    if (!prompt.last_query.empty()) NOSA_TRY(check_view(prompt.last_query, {config_.num_q_heads, head_dim}));
    if (len > layout_.max_tokens) return status::sequence_full;
    const int length = static_cast<int>(len);
    const bool source_ok = share.source >= 0 && share.source < layout_.sequences && live_flags()[share.source];
    NOSA_TRY(page_pool::check_shared(share, seq, length, source_ok, source_ok ? lengths()[share.source] : 0,
                                     config_.selection));
    const int reserve_through = std::min(length + 1, layout_.max_tokens);
    const int blocks_needed = block_count(reserve_through, config_.selection);
    if (blocks_needed - share.blocks > free_page_count()) return status::host_pool_full;

    // Validated: from here on nothing fails.
    std::int32_t* table = block_table(seq);
    for (int m = 0; m < share.blocks; ++m) {
      table[m] = block_table(share.source)[m];
      pages().add_ref(table[m]);
    }
    for (int m = share.blocks; m < blocks_needed; ++m) table[m] = pages().pop();
    live_flags()[seq] = 1;
    lengths()[seq] = length;
    const selection_params& sel = config_.selection;
    // The offload store keeps a partial tail in a slot, a quantized format in its tail buffer; the resident
    // store in the element type writes it to its page like the complete blocks.
    const int pool_blocks = offloads || quantized ? length / sel.block_size : block_count(length, sel);
    counters& tot = *total_counters_ptr();
    for (int h = 0; h < hkv; ++h) {
      float* c_state = token_scores(seq, h);
      for (int t = 0; t < length; ++t) c_state[t] = prompt.c.empty() ? 0.0f : prompt.c(t, h);
      if constexpr (!P::dense) {
        for (int t = std::max(0, length - sel.window); t < length; ++t) {
          copy_row(&prompt.k(t, h, 0), key_ring(seq, h) + std::size_t(t % sel.window) * head_dim);
        }
      }
      // Compressed keys and scores of every complete window, summed in token order.
      const int n_windows = P::dense ? 0 : window_count(length, sel);
      for (int w = 0; w < n_windows; ++w) {
        float sum[head_dim] = {};
        float csum = 0.0f;
        for (int i = 0; i < sel.window; ++i) {
          const int t = w * sel.stride + i;
          for (int d = 0; d < head_dim; ++d) sum[d] += to_float(prompt.k(t, h, d));
          csum += c_state[t];
        }
        store_compressed_key(seq, h, w, sum);
        compressed_scores(seq, h)[w] = csum / static_cast<float>(sel.window);
      }
      // Blocks to the pool, a quantized format's complete ones quantised here; shared blocks are there.
      for (int m = share.blocks; m < pool_blocks; ++m) {
        const int first = m * sel.block_size;
        const int rows = std::min(sel.block_size, length - first);
        if constexpr (quantized) {
          *page_scale(table[m], h, kv_half::keys) =
              quantize_block([&](int r) { return &prompt.k(first + r, h, 0); }, page_keys(table[m], h));
          *page_scale(table[m], h, kv_half::values) =
              quantize_block([&](int r) { return &prompt.v(first + r, h, 0); }, page_values(table[m], h));
          if (offloads) tot.bytes_d2h += 2 * block_bytes();
        } else {
          element_type* pk = page_keys(table[m], h);
          element_type* pv = page_values(table[m], h);
          for (int r = 0; r < rows; ++r) {
            copy_row(&prompt.k(first + r, h, 0), pk + std::size_t(r) * head_dim);
            copy_row(&prompt.v(first + r, h, 0), pv + std::size_t(r) * head_dim);
          }
          if (offloads) tot.bytes_d2h += 2 * std::uint64_t(rows) * head_dim * sizeof(element_type);
        }
      }
      restart_slots(seq, h, length);
      if ((offloads || quantized) && length % sel.block_size != 0) {
        const int tail = length / sel.block_size;
        for (int t = tail * sel.block_size; t < length; ++t) {
          const std::size_t r = std::size_t(t - tail * sel.block_size) * head_dim;
          copy_row(&prompt.k(t, h, 0), tail_keys_of(seq, h, tail) + r);
          copy_row(&prompt.v(t, h, 0), tail_values_of(seq, h, tail) + r);
        }
      }
      const bool have_query = !prompt.last_query.empty();
      float q[max_group][head_dim];
      if (have_query) group_queries([&](int i) { return &prompt.last_query(i, 0); }, h, q);
      initial_selection(seq, h, length, have_query ? q : nullptr);
    }
    return status::success;
  }

  /// Retires the sequence in slot `seq`, returning its pages to the pool. Other sequences are untouched.
  [[nodiscard]] status remove_sequence(int seq, host_backend::stream_type = {}) noexcept {
    if (seq < 0 || seq >= layout_.sequences || !live_flags()[seq]) return status::unknown_sequence;
    std::int32_t* table = block_table(seq);
    for (int m = 0; m < layout_.max_blocks; ++m) {
      if (table[m] >= 0) pages().release(table[m]);
      table[m] = -1;
    }
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      if constexpr (offloads) {
        std::fill_n(slot_map(seq, h), layout_.slots, -1);
        std::fill_n(block_slot(seq, h), layout_.max_blocks, -1);
      }
      selection_counts()[seq * config_.num_kv_heads + h] = 0;
      step_miss_counts()[seq * config_.num_kv_heads + h] = 0;
    }
    lengths()[seq] = 0;
    live_flags()[seq] = 0;
    return status::success;
  }

  /// Reserves pages so that every live sequence can run `tokens_ahead` more steps without a plan call.
  /// All or nothing: on `host_pool_full` or `sequence_full` no page is reserved.
  [[nodiscard]] status reserve(int tokens_ahead, host_backend::stream_type = {}) noexcept {
    return pages().reserve(plan_rows(), 0, layout_.sequences, tokens_ahead, layout_.max_tokens, config_.selection);
  }

  /// Reserves pages so that sequence `seq` can run `tokens_ahead` more steps. All or nothing.
  [[nodiscard]] status reserve(int seq, int tokens_ahead, host_backend::stream_type = {}) noexcept {
    if (seq < 0 || seq >= layout_.sequences || !live_flags()[seq]) return status::unknown_sequence;
    return pages().reserve(plan_rows(), seq, seq + 1, tokens_ahead, layout_.max_tokens, config_.selection);
  }

  // ---------------------------------------------------------------------------------------------------
  // The step.
  // ---------------------------------------------------------------------------------------------------

  /// One decode step of this layer for a batch of live sequences: append, compress, score, select, diff,
  /// gather, attend, write back. Either the whole batch advances by one token or, on any error, nothing
  /// changes.
  template <storage_element Out>
  [[nodiscard]] status step(const step_args<element_type, Out>& args, host_backend::stream_type = {}) noexcept {
    const status checked = validate_step(args);
    *dev<std::int32_t>(layout_.step_status) = static_cast<std::int32_t>(checked);
    NOSA_TRY(checked);
    const std::int64_t batch = args.sequences.extents[0];
    const selection_params& sel = config_.selection;
    const int hkv = config_.num_kv_heads;
    const int group = config_.group_size();
    counters step_count{};
    step_count.steps = 1;

    for (std::int64_t b = 0; b < batch; ++b) {
      const int seq = args.sequences(b);
      const int t = lengths()[seq];  // position of the new token
      const int length = t + 1;
      for (int h = 0; h < hkv; ++h) {
        append(seq, h, t, &args.k(b, h, 0), &args.v(b, h, 0), args.c.empty() ? 0.0f : args.c(b, h));
        float q[max_group][head_dim];
        group_queries([&](int i) { return &args.q(b, i, 0); }, h, q);
        if constexpr (P::dense) {
          step_count.hits += block_count(length, sel);
          for (int g = 0; g < group; ++g) {
            attend(seq, h, length, nullptr, block_count(length, sel), /*from_pool=*/false, q[g],
                   &args.o(b, h * group + g, 0));
          }
        } else {
          score_blocks(seq, h, length, q);
          const int n = select(seq, h, length, /*have_query=*/true, /*with_budget=*/true);
          selection_counts()[seq * hkv + h] = n;
          int misses = 0;
          if constexpr (offloads) {
            const load_result loaded = load_selection(seq, h);
            misses = loaded.misses;
            step_count.hits += loaded.hits;
            step_count.misses += loaded.misses;
            step_count.bytes_h2d += loaded.misses * 2 * block_bytes();
          } else {
            step_count.hits += n;
          }
          step_miss_counts()[seq * hkv + h] = misses;
          for (int g = 0; g < group; ++g) {
            attend(seq, h, length, selection_ptr(seq, h), n, /*from_pool=*/false, q[g],
                   &args.o(b, h * group + g, 0));
          }
        }
        step_count.bytes_d2h += store_completed_block(seq, h, t);
      }
      lengths()[seq] = length;
    }

    *last_step_counters_ptr() = step_count;
    counters& tot = *total_counters_ptr();
    tot.steps += step_count.steps;
    tot.hits += step_count.hits;
    tot.misses += step_count.misses;
    tot.bytes_h2d += step_count.bytes_h2d;
    tot.bytes_d2h += step_count.bytes_d2h;
    return status::success;
  }

  /// Prefill of a ragged batch of prompt chunks (`prefill_args`): each chunk's tokens are appended to its
  /// sequence in order, each query attending causally, with the pipeline's bias, every earlier token of
  /// the sequence and of the chunk (`dense_prefill`) or the blocks of its own selection (`sparse_prefill`,
  /// NOSA^S). K, V and c go into the store as decode steps would put them (pages, compressed keys and
  /// scores, tail), so no ingest follows. Afterwards each sequence of a non-empty chunk is in exactly the
  /// state `add_sequence` gives for all its tokens so far with the chunk's last query as `last_query`: the
  /// slot cache starts over with the tail and that query's selection. A chunk may follow `add_sequence`
  /// (with an empty prompt to prefill a whole prompt), another chunk or decode steps.
  ///
  /// Preconditions, checked: each chunk's pages reserved by a plan call (`reserve(seq, rows)`), rows no
  /// more than `capacity::max_prefill_rows`. Either every chunk is appended or, on any error, nothing
  /// changes. Traffic (write-backs, the loads of the final selection) is added to the total counters; the
  /// last-step counters are those of the last decode step.
  /// \tparam Prefill `dense_prefill` or `sparse_prefill`; full attention has `dense_prefill` only
  template <prefill_policy Prefill = dense_prefill, storage_element Out>
  [[nodiscard]] status prefill(const prefill_args<element_type, Out>& args,
                               host_backend::stream_type = {}) noexcept {
    static_assert(
        !Prefill::selects_per_token || !P::dense,
        "sparse_prefill attends each query's selection; full attention selects nothing: use dense_prefill");
    const status checked = validate_prefill(args);
    *dev<std::int32_t>(layout_.step_status) = static_cast<std::int32_t>(checked);
    NOSA_TRY(checked);
    const std::int64_t batch = args.sequences.extents[0];
    const int hkv = config_.num_kv_heads;
    const int group = config_.group_size();
    counters& tot = *total_counters_ptr();
    if constexpr (!P::dense) {
      std::fill_n(dev<std::int32_t>(layout_.row_selection_count), std::size_t(layout_.prefill_rows) * hkv, 0);
    }

    for (std::int64_t b = 0; b < batch; ++b) {
      const int seq = args.sequences(b);
      const std::int64_t first = args.row_offsets(b), last = args.row_offsets(b + 1);
      if (first == last) continue;
      const int start = lengths()[seq];  // position of the chunk's first token
      const int length = start + static_cast<int>(last - first);
      lengths()[seq] = length;
      for (int h = 0; h < hkv; ++h) {
        float q[max_group][head_dim];
        for (std::int64_t r = first; r < last; ++r) {
          const int t = start + static_cast<int>(r - first);
          append(seq, h, t, &args.k(r, h, 0), &args.v(r, h, 0), args.c.empty() ? 0.0f : args.c(r, h));
          group_queries([&](int i) { return &args.q(r, i, 0); }, h, q);
          const std::int32_t* blocks = nullptr;  // dense: every block up to t's, in index order
          int n = t / config_.selection.block_size + 1;
          if constexpr (Prefill::selects_per_token) {
            // The selection a decode step at position t would make, without the transfer budget.
            score_blocks(seq, h, t + 1, q);
            n = select(seq, h, t + 1, /*have_query=*/true, /*with_budget=*/false);
            selection_counts()[sh(seq, h)] = n;
            blocks = selection_ptr(seq, h);
          }
          if constexpr (Prefill::selects_per_token) record_row_selection(r, h, blocks, n);
          for (int g = 0; g < group; ++g) {
            attend(seq, h, t + 1, blocks, n, /*from_pool=*/true, q[g], &args.o(r, h * group + g, 0));
          }
          tot.bytes_d2h += store_completed_block(seq, h, t);
        }
        // As admission leaves a sequence: q holds the chunk's last query.
        restart_slots(seq, h, length);
        initial_selection(seq, h, length, q);
      }
    }
    return status::success;
  }

  // ---------------------------------------------------------------------------------------------------
  // Inspection (reads state memory; on the host backend this never waits).
  // ---------------------------------------------------------------------------------------------------

  /// Status of the most recent step or prefill (`success` before the first). The CUDA backend finds some
  /// errors (unknown, duplicate, full or unreserved sequences) only while the step runs and reports them
  /// here; the host backend also returns them from `step` and `prefill`.
  status step_status(host_backend::stream_type = {}) const noexcept { return static_cast<status>(*dev<std::int32_t>(layout_.step_status)); }
  /// Counters accumulated over every step and plan call (bytes) since creation.
  counters total_counters(host_backend::stream_type = {}) const noexcept { return *total_counters_ptr(); }
  /// Counters of the most recent step.
  counters last_step_counters(host_backend::stream_type = {}) const noexcept { return *last_step_counters_ptr(); }
  /// True when slot `seq` holds a live sequence.
  bool is_live(int seq, host_backend::stream_type = {}) const noexcept { return seq >= 0 && seq < layout_.sequences && live_flags()[seq] != 0; }
  /// Tokens of sequence `seq` (0 for a free slot).
  int length(int seq, host_backend::stream_type = {}) const noexcept { return is_live(seq) ? lengths()[seq] : 0; }
  /// Pages not referenced by any sequence.
  int free_page_count() const noexcept { return pages().free_count(); }
  /// The current selection of (seq, head), in rank order (empty for a free slot, and always empty for full
  /// attention, which reads every block).
  std::span<const std::int32_t> selection(int seq, int head, host_backend::stream_type = {}) const noexcept {
    if (P::dense || !is_live(seq) || head < 0 || head >= config_.num_kv_heads) return {};
    const std::size_t i = std::size_t(seq) * config_.num_kv_heads + head;
    return {selection_ptr(seq, head), static_cast<std::size_t>(selection_counts()[i])};
  }
  /// Blocks loaded for (seq, head) by the last step that included the sequence.
  int step_misses(int seq, int head, host_backend::stream_type = {}) const noexcept {
    if (!is_live(seq) || head < 0 || head >= config_.num_kv_heads) return 0;
    return step_miss_counts()[seq * config_.num_kv_heads + head];
  }
  /// The blocks packed row `row` of the most recent prefill attended for KV head `head`: under
  /// `sparse_prefill` its selection in rank order; empty under `dense_prefill` (every block up to the
  /// row's), for rows outside that call's chunks, and for full attention.
  std::span<const std::int32_t> prefill_selection(int row, int head,
                                                  host_backend::stream_type = {}) const noexcept {
    if (P::dense || row < 0 || row >= layout_.prefill_rows || head < 0 || head >= config_.num_kv_heads)
      return {};
    const std::size_t i = std::size_t(row) * config_.num_kv_heads + head;
    return {dev<std::int32_t>(layout_.row_selection) + i * layout_.top_k,
            static_cast<std::size_t>(dev<std::int32_t>(layout_.row_selection_count)[i])};
  }
  /// Block (-1 if free) held by each slot of (seq, head); empty for the resident store.
  std::span<const std::int32_t> slots(int seq, int head, host_backend::stream_type = {}) const noexcept {
    if constexpr (!offloads) {
      return {};
    } else {
      if (!is_live(seq) || head < 0 || head >= config_.num_kv_heads) return {};
      return {slot_map(seq, head), static_cast<std::size_t>(layout_.slots)};
    }
  }
  /// The state layout (offsets and extents), for tools that inspect the arenas.
  const state_layout& layout() const noexcept { return layout_; }

 private:
  static constexpr bool offloads = P::store::offloads;
  static constexpr bool query_agnostic = P::query_agnostic::enabled;
  using attention = typename P::attention;
  using kv_format = typename P::store::kv_format;
  /// Complete blocks are stored as codes plus a scale; the tail block stays in the element type.
  static constexpr bool quantized = kv_format::quantized;
  /// One value of a stored (complete) block: the element type, or the format's code.
  using value_type = typename kv_format::template value_type<element_type>;

  /// Which half of a page, K or V (the page layout is `[2][H_kv][b_s][D]`).
  enum class kv_half : int { keys = 0, values = 1 };

  /// One block of one KV head as attention reads it: K and V rows of `T` (the element type, or the codes
  /// of a quantized format with their scales).
  template <class T>
  struct block_view {
    const T* keys;   // [b_s][D]
    const T* values; // [b_s][D]
    float key_scale = 1.0f;
    float value_scale = 1.0f;
  };

  struct load_result {
    std::uint64_t hits = 0;
    std::uint64_t misses = 0;
  };

  layer_config config_{};
  state_layout layout_{};
  std::byte* device_ = nullptr;
  std::byte* host_ = nullptr;

  // --- typed access to the arenas ---------------------------------------------------------------------
  template <class T>
  T* dev(std::size_t offset) const noexcept {
    return reinterpret_cast<T*>(device_ + offset);
  }
  template <class T>
  T* hst(std::size_t offset) const noexcept {
    return reinterpret_cast<T*>(host_ + offset);
  }
  std::size_t sh(int seq, int h) const noexcept { return std::size_t(seq) * config_.num_kv_heads + h; }

  std::int32_t* lengths() const noexcept { return dev<std::int32_t>(layout_.seq_length); }
  std::int32_t* live_flags() const noexcept { return dev<std::int32_t>(layout_.seq_live); }
  std::int32_t* block_table(int seq) const noexcept {
    return dev<std::int32_t>(layout_.block_table) + std::size_t(seq) * layout_.max_blocks;
  }
  float* token_scores(int seq, int h) const noexcept {
    return dev<float>(layout_.token_scores) + sh(seq, h) * layout_.max_tokens;
  }
  element_type* compressed_keys(int seq, int h) const noexcept {
    return dev<element_type>(layout_.compressed_keys) + sh(seq, h) * layout_.max_windows * head_dim;
  }
  float* compressed_scores(int seq, int h) const noexcept {
    return dev<float>(layout_.compressed_scores) + sh(seq, h) * layout_.max_windows;
  }
  element_type* key_ring(int seq, int h) const noexcept {
    return dev<element_type>(layout_.key_ring) + sh(seq, h) * layout_.window * head_dim;
  }
  std::int32_t* selection_ptr(int seq, int h) const noexcept {
    return dev<std::int32_t>(layout_.selection) + sh(seq, h) * layout_.top_k;
  }
  std::int32_t* selection_counts() const noexcept { return dev<std::int32_t>(layout_.selection_count); }
  std::int32_t* step_miss_counts() const noexcept { return dev<std::int32_t>(layout_.step_misses); }
  std::int32_t* slot_map(int seq, int h) const noexcept {
    return dev<std::int32_t>(layout_.slot_map) + sh(seq, h) * layout_.slots;
  }
  std::int32_t* block_slot(int seq, int h) const noexcept {
    return dev<std::int32_t>(layout_.block_slot) + sh(seq, h) * layout_.max_blocks;
  }
  std::int32_t* slot_stamps(int seq, int h) const noexcept {
    return dev<std::int32_t>(layout_.slot_stamp) + sh(seq, h) * layout_.slots;
  }
  std::int32_t* block_marks(int seq, int h) const noexcept {
    return dev<std::int32_t>(layout_.block_mark) + sh(seq, h) * layout_.max_blocks;
  }
  value_type* slot_keys(int seq, int h, int slot) const noexcept {
    return dev<value_type>(layout_.slot_keys) + (sh(seq, h) * layout_.slots + slot) * layout_.block_elements();
  }
  value_type* slot_values(int seq, int h, int slot) const noexcept {
    return dev<value_type>(layout_.slot_values) + (sh(seq, h) * layout_.slots + slot) * layout_.block_elements();
  }
  /// Quantized format: the scale of slot `slot`'s K or V.
  float* slot_scale(int seq, int h, int slot, kv_half half) const noexcept {
    const std::size_t at = half == kv_half::keys ? layout_.slot_key_scales : layout_.slot_value_scales;
    return dev<float>(at) + sh(seq, h) * layout_.slots + slot;
  }
  /// Quantized format: the current block of (seq, h) in the element type, K and V.
  element_type* tail_keys(int seq, int h) const noexcept {
    return dev<element_type>(layout_.tail_keys) + sh(seq, h) * layout_.block_elements();
  }
  element_type* tail_values(int seq, int h) const noexcept {
    return dev<element_type>(layout_.tail_values) + sh(seq, h) * layout_.block_elements();
  }
  value_type* pool() const noexcept {
    return offloads ? hst<value_type>(layout_.host_pool) : dev<value_type>(layout_.device_pool);
  }
  value_type* page_keys(int page, int h) const noexcept {
    return pool() + std::size_t(page) * layout_.page_elements() + std::size_t(h) * layout_.block_elements();
  }
  value_type* page_values(int page, int h) const noexcept {
    return pool() + std::size_t(page) * layout_.page_elements() +
           std::size_t(config_.num_kv_heads + h) * layout_.block_elements();
  }
  /// Quantized format: the scale of page `page`'s K or V of head h (`[P][2][H_kv]`, beside the pool).
  float* page_scale(int page, int h, kv_half half) const noexcept {
    float* scales = offloads ? hst<float>(layout_.host_pool_scales) : dev<float>(layout_.device_pool_scales);
    return scales + (std::size_t(page) * 2 + static_cast<int>(half)) * config_.num_kv_heads + h;
  }
  counters* total_counters_ptr() const noexcept { return dev<counters>(layout_.totals); }
  counters* last_step_counters_ptr() const noexcept { return dev<counters>(layout_.last_step); }
  page_pool pages() const noexcept { return page_pool(layout_, host_); }
  page_pool::sequence_rows plan_rows() const noexcept {
    return {live_flags(), lengths(), block_table(0), layout_.max_blocks};
  }
  /// Bytes of one block-head of K or V as counted when it moves: its values plus a quantized format's scale.
  std::uint64_t block_bytes() const noexcept { return layout_.block_bytes(); }
  /// Bytes of the values alone of one stored block-head of K or V.
  std::size_t block_value_bytes() const noexcept { return layout_.block_elements() * sizeof(value_type); }

  /// Keys (or values) of stored block m of (seq, h), wherever the store keeps it.
  value_type* block_keys(int seq, int h, int m) const noexcept {
    if constexpr (offloads) {
      return slot_keys(seq, h, block_slot(seq, h)[m]);
    } else {
      return page_keys(block_table(seq)[m], h);
    }
  }
  value_type* block_values(int seq, int h, int m) const noexcept {
    if constexpr (offloads) {
      return slot_values(seq, h, block_slot(seq, h)[m]);
    } else {
      return page_values(block_table(seq)[m], h);
    }
  }
  /// Where the rows of the current block `m` of (seq, h) are written: its tail buffer with a quantized
  /// format, else the block itself (its slot or its page).
  element_type* tail_keys_of(int seq, int h, int m) const noexcept {
    if constexpr (quantized) {
      return tail_keys(seq, h);
    } else {
      return block_keys(seq, h, m);
    }
  }
  element_type* tail_values_of(int seq, int h, int m) const noexcept {
    if constexpr (quantized) {
      return tail_values(seq, h);
    } else {
      return block_values(seq, h, m);
    }
  }
  /// Stored block m of (seq, h) as a step's attention reads it: from its slot (offload store) or its page.
  block_view<value_type> stored_block(int seq, int h, int m) const noexcept {
    if constexpr (!offloads) {
      return pool_block(seq, h, m);
    } else {
      const int slot = block_slot(seq, h)[m];
      block_view<value_type> b{slot_keys(seq, h, slot), slot_values(seq, h, slot)};
      if constexpr (quantized) {
        b.key_scale = *slot_scale(seq, h, slot, kv_half::keys);
        b.value_scale = *slot_scale(seq, h, slot, kv_half::values);
      }
      return b;
    }
  }
  /// Complete block m of (seq, h) as stored in its page.
  block_view<value_type> pool_block(int seq, int h, int m) const noexcept {
    const int page = block_table(seq)[m];
    block_view<value_type> b{page_keys(page, h), page_values(page, h)};
    if constexpr (quantized) {
      b.key_scale = *page_scale(page, h, kv_half::keys);
      b.value_scale = *page_scale(page, h, kv_half::values);
    }
    return b;
  }
  /// One value as attention reads it: the element converted to fp32, or a code times its block's scale.
  template <class T>
  static float read_value(T x, float scale) noexcept {
    if constexpr (std::is_same_v<T, element_type>) {
      return to_float(x);
    } else {
      return kv_format::decode(x, scale);
    }
  }

  static void copy_row(const element_type* src, element_type* dst) noexcept {
    std::memcpy(dst, src, sizeof(element_type) * head_dim);
  }

  // --- state initialisation and page bookkeeping ------------------------------------------------------
  void initialise() noexcept {
    std::memset(device_, 0, layout_.device_bytes);
    std::fill_n(dev<std::int32_t>(layout_.block_table), std::size_t(layout_.sequences) * layout_.max_blocks, -1);
    if constexpr (offloads) {
      const std::size_t sh_total = std::size_t(layout_.sequences) * layout_.kv_heads;
      std::fill_n(dev<std::int32_t>(layout_.slot_map), sh_total * layout_.slots, -1);
      std::fill_n(dev<std::int32_t>(layout_.block_slot), sh_total * layout_.max_blocks, -1);
    }
    pages().reset();
  }

  // --- validation ---------------------------------------------------------------------------------
  /// The views of a step or a prefill of `rows` token rows: q and o `[rows][H_q][D]`, k and v
  /// `[rows][H_kv][D]`, c `[rows][H_kv]` (when used).
  template <class Args>
  status check_token_views(const Args& args, std::int64_t rows) const noexcept {
    const int hq = config_.num_q_heads, hkv = config_.num_kv_heads;
    NOSA_TRY(check_view(args.q, {rows, hq, head_dim}));
    NOSA_TRY(check_view(args.k, {rows, hkv, head_dim}));
    NOSA_TRY(check_view(args.v, {rows, hkv, head_dim}));
    if (P::uses_eviction_scores || !args.c.empty()) NOSA_TRY(check_view(args.c, {rows, hkv}));
    return check_view(args.o, {rows, hq, head_dim});
  }

  /// The state checks of a batch, in the order every backend makes them: each sequence live and listed
  /// once, with room for the `tokens(b)` tokens row b appends and a page for each block they reach.
  template <class Tokens>
  status check_batch(const tensor_view<const std::int32_t, 1>& sequences, Tokens&& tokens) const noexcept {
    const std::int64_t batch = sequences.extents[0];
    const int block = config_.selection.block_size;
    std::int32_t* marks = dev<std::int32_t>(layout_.batch_mark);
    status result = status::success;
    std::int64_t checked = 0;
    for (; checked < batch && ok(result); ++checked) {
      const std::int32_t seq = sequences(checked);
      if (seq < 0 || seq >= layout_.sequences || !live_flags()[seq]) {
        result = status::unknown_sequence;
      } else if (marks[seq]) {
        result = status::duplicate_sequence;
      } else {
        marks[seq] = 1;
        const std::int64_t t = lengths()[seq], n = tokens(checked);
        if (t + n > layout_.max_tokens) {
          result = status::sequence_full;
        } else if (n > 0) {
          for (std::int64_t m = t / block; m <= (t + n - 1) / block && ok(result); ++m) {
            if (block_table(seq)[m] < 0) result = status::not_reserved;
          }
        }
      }
    }
    for (std::int64_t b = 0; b < checked; ++b) {
      const std::int32_t seq = sequences(b);
      if (seq >= 0 && seq < layout_.sequences) marks[seq] = 0;
    }
    return result;
  }

  template <storage_element Out>
  status validate_step(const step_args<element_type, Out>& args) const noexcept {
    const std::int64_t batch = args.sequences.extents[0];
    if (batch < 0) return status::shape_mismatch;
    NOSA_TRY(check_view(args.sequences, {batch}));
    NOSA_TRY(check_token_views(args, batch));
    return check_batch(args.sequences, [](std::int64_t) { return std::int64_t{1}; });
  }

  /// Views first (rows within `max_prefill_rows`), then the chunk offsets, then the state checks.
  template <storage_element Out>
  status validate_prefill(const prefill_args<element_type, Out>& args) const noexcept {
    const std::int64_t batch = args.sequences.extents[0], rows = args.q.extents[0];
    if (batch < 0 || rows < 0) return status::shape_mismatch;
    NOSA_TRY(check_view(args.sequences, {batch}));
    NOSA_TRY(check_view(args.row_offsets, {batch + 1}));
    NOSA_TRY(check_token_views(args, rows));
    if (rows > layout_.prefill_rows) return status::shape_mismatch;
    for (std::int64_t b = 0; b <= batch; ++b) {
      const std::int64_t at = args.row_offsets(b);
      if (at < (b == 0 ? 0 : args.row_offsets(b - 1)) || at > rows) return status::invalid_argument;
    }
    return check_batch(args.sequences, [&](std::int64_t b) {
      return std::int64_t{args.row_offsets(b + 1)} - args.row_offsets(b);
    });
  }

  // --- stages -------------------------------------------------------------------------------------

  /// Claims a slot of (seq, h) for `block` (a new tail). Without a cache the spare slot guarantees a free
  /// one; with a cache, a block outside the current selection may have to leave (`victim_slot`).
  int claim_free_slot(int seq, int h, int block) noexcept {
    std::int32_t* map = slot_map(seq, h);
    std::int32_t* mark = block_marks(seq, h);
    const std::int32_t* chosen = selection_ptr(seq, h);
    const int n = selection_counts()[sh(seq, h)];
    for (int i = 0; i < n; ++i) mark[chosen[i]] = 1;
    const int slot = victim_slot(seq, h);
    for (int i = 0; i < n; ++i) mark[chosen[i]] = 0;
    if (map[slot] >= 0) block_slot(seq, h)[map[slot]] = -1;
    map[slot] = block;
    block_slot(seq, h)[block] = slot;
    if (layout_.cache_slots > 0) slot_stamps(seq, h)[slot] = length_clock(seq);
    return slot;
  }

  /// The slot a block that is not resident goes to: the lowest free slot, else (with a cache) the slot of
  /// the least recently selected block that is not marked, the lower slot on a tie.
  int victim_slot(int seq, int h) const noexcept {
    const std::int32_t* map = slot_map(seq, h);
    const std::int32_t* mark = block_marks(seq, h);
    const std::int32_t* stamp = slot_stamps(seq, h);
    int best = -1;
    for (int slot = 0; slot < layout_.slots; ++slot) {
      if (map[slot] < 0) return slot;
      if (!mark[map[slot]] && (best < 0 || stamp[slot] < stamp[best])) best = slot;
    }
    return best;
  }

  /// A clock for the slot stamps: the sequence's length, which every step advances.
  std::int32_t length_clock(int seq) const noexcept { return lengths()[seq]; }

  /// The queries of KV head h's group in fp32; `row(i)` points at query head i's D values.
  template <class Row>
  void group_queries(Row&& row, int h, float (&q)[max_group][head_dim]) const noexcept {
    const int group = config_.group_size();
    for (int g = 0; g < group; ++g) {
      const element_type* x = row(h * group + g);
      for (int d = 0; d < head_dim; ++d) q[g][d] = to_float(x[d]);
    }
  }

  /// Starts the slot cache of (seq, h) over as admission leaves it for a sequence of `length` tokens:
  /// nothing resident but a partial tail, which takes the first slot. Offload store, element format: rows
  /// of the tail already in another slot (a prefill) move there.
  void restart_slots(int seq, int h, int length) noexcept {
    if constexpr (offloads) {
      const int tail = length / config_.selection.block_size;
      const bool partial = length % config_.selection.block_size != 0;
      const int old = partial ? block_slot(seq, h)[tail] : -1;
      std::fill_n(slot_map(seq, h), layout_.slots, -1);
      std::fill_n(block_slot(seq, h), layout_.max_blocks, -1);
      if (!partial) return;
      const int slot = claim_free_slot(seq, h, tail);
      if (!quantized && old >= 0 && old != slot) {
        std::memcpy(slot_keys(seq, h, slot), slot_keys(seq, h, old), block_value_bytes());
        std::memcpy(slot_values(seq, h, slot), slot_values(seq, h, old), block_value_bytes());
      }
    }
  }

  /// The selection admission makes for a sequence of `length` tokens, for the group's queries `q` (null:
  /// none, the query-aware part is then empty) and without a budget, loaded into the slot cache.
  void initial_selection(int seq, int h, int length, const float (*q)[head_dim]) noexcept {
    selection_counts()[sh(seq, h)] = 0;
    step_miss_counts()[sh(seq, h)] = 0;
    if constexpr (!P::dense) {
      score_blocks(seq, h, length, q);
      selection_counts()[sh(seq, h)] = select(seq, h, length, q != nullptr, /*with_budget=*/false);
      if constexpr (offloads) {
        const load_result loaded = load_selection(seq, h);
        total_counters_ptr()->bytes_h2d += loaded.misses * 2 * block_bytes();
      }
    }
  }

  /// Sparse prefill: keeps the n blocks packed row `row` attended for KV head h, for inspection.
  void record_row_selection(std::int64_t row, int h, const std::int32_t* blocks, int n) noexcept {
    const std::size_t i = std::size_t(row) * config_.num_kv_heads + h;
    std::copy_n(blocks, n, dev<std::int32_t>(layout_.row_selection) + i * layout_.top_k);
    dev<std::int32_t>(layout_.row_selection_count)[i] = n;
  }

  /// Stores for good the block that the token at `t` completed, if it did and the store keeps the tail
  /// apart (offload store, quantized format): it was attended in the element type up to now. Returns the
  /// bytes written back to the host pool.
  std::uint64_t store_completed_block(int seq, int h, int t) noexcept {
    if (!(offloads || quantized) || (t + 1) % config_.selection.block_size != 0) return 0;
    write_back(seq, h, t / config_.selection.block_size);
    return offloads ? 2 * block_bytes() : 0;
  }

  /// Append: the token at position t goes to the tail, the key ring and the score history; a window that
  /// the token completes yields a compressed key and a compressed score (summed in token order).
  void append(int seq, int h, int t, const element_type* k, const element_type* v, float c) noexcept {
    const selection_params& sel = config_.selection;
    const int block = t / sel.block_size;
    const std::size_t row = std::size_t(t % sel.block_size) * head_dim;
    if constexpr (offloads) {
      if (t % sel.block_size == 0) claim_free_slot(seq, h, block);
    }
    copy_row(k, tail_keys_of(seq, h, block) + row);
    copy_row(v, tail_values_of(seq, h, block) + row);
    float* c_state = token_scores(seq, h);
    c_state[t] = c;
    if constexpr (P::dense) return;  // no compressed state
    element_type* ring = key_ring(seq, h);
    copy_row(k, ring + std::size_t(t % sel.window) * head_dim);
    const int w = window_completed_at(t, sel);
    if (w < 0) return;
    float sum[head_dim] = {};
    float csum = 0.0f;
    for (int i = 0; i < sel.window; ++i) {
      const int token = w * sel.stride + i;
      const element_type* kr = ring + std::size_t(token % sel.window) * head_dim;
      for (int d = 0; d < head_dim; ++d) sum[d] += to_float(kr[d]);
      csum += c_state[token];
    }
    store_compressed_key(seq, h, w, sum);
    compressed_scores(seq, h)[w] = csum / static_cast<float>(sel.window);
  }

  /// Kc of window w: the window's fp32 key sum divided by its length, rounded once to the element type.
  void store_compressed_key(int seq, int h, int w, const float* sum) noexcept {
    element_type* kc = compressed_keys(seq, h) + std::size_t(w) * head_dim;
    for (int d = 0; d < head_dim; ++d) {
      kc[d] = from_float<element_type>(sum[d] / static_cast<float>(config_.selection.window));
    }
  }

  /// Score: Sq and Se of every block of (seq, h) for a sequence of `length` tokens. `q` holds the group's
  /// queries in fp32, or is null when there is no query (Sq is then left at the pooling identity).
  void score_blocks(int seq, int h, int length, const float (*q)[head_dim]) noexcept {
    using scorer = typename P::query_aware;
    using agnostic = typename P::query_agnostic;
    const selection_params& sel = config_.selection;
    const int n_blocks = block_count(length, sel);
    const int n_windows = window_count(length, sel);
    float* sq = dev<float>(layout_.query_scores) + sh(seq, h) * layout_.max_blocks;
    float* se = dev<float>(layout_.agnostic_scores) + sh(seq, h) * layout_.max_blocks;
    float* prob = dev<float>(layout_.window_scores) + sh(seq, h) * layout_.max_windows;
    float* logits = dev<float>(layout_.window_logits) + sh(seq, h) * layout_.group * layout_.max_windows;
    const element_type* kc = compressed_keys(seq, h);
    const float* cc = compressed_scores(seq, h);
    if (q != nullptr) {
      const float scale = softmax_scale(head_dim);
      std::fill_n(prob, n_windows, 0.0f);
      for (int g = 0; g < config_.group_size(); ++g) {
        // Softmax over the windows for one query head, each logit computed once.
        float max_logit = negative_infinity;
        for (int w = 0; w < n_windows; ++w) {
          float d = 0.0f;
          const element_type* key = kc + std::size_t(w) * head_dim;
          for (int j = 0; j < head_dim; ++j) d += q[g][j] * to_float(key[j]);
          logits[w] = scorer::window_logit(d, scale);
          max_logit = max_keep_left(max_logit, logits[w]);
        }
        float denom = 0.0f;
        for (int w = 0; w < n_windows; ++w) {
          logits[w] = std::exp(logits[w] - max_logit);
          denom += logits[w];
        }
        for (int w = 0; w < n_windows; ++w) prob[w] += logits[w] / denom;
      }
    }
    for (int m = 0; m < n_blocks; ++m) {
      const window_range r = windows_overlapping_block(m, n_windows, sel);
      float bq = scorer::pool_identity;
      float be = agnostic::pool_identity;
      for (int w = r.first; w < r.last; ++w) {
        if (q != nullptr) bq = scorer::pool(bq, prob[w]);
        be = agnostic::pool(be, cc[w]);
      }
      sq[m] = bq;
      se[m] = be;
    }
  }

  /// Select: writes the ranked selection of (seq, h) to state and returns its size.
  int select(int seq, int h, int length, bool have_query, bool with_budget) noexcept {
    const std::size_t base = sh(seq, h) * layout_.max_blocks;
    const selection_workspace ws{dev<float>(layout_.query_scores) + base, dev<float>(layout_.agnostic_scores) + base,
                                 dev<std::int32_t>(layout_.block_order) + base,
                                 dev<std::int32_t>(layout_.block_mark) + base};
    residency resident{};
    if constexpr (offloads) {
      if (with_budget) resident = {slot_map(seq, h), block_slot(seq, h), layout_.slots};
    }
    return select_blocks<typename P::selector, query_agnostic>(config_.selection, block_count(length, config_.selection),
                                                             have_query, ws, resident, selection_ptr(seq, h));
  }

  /// Diff + gather: frees the slots whose blocks left the selection (hits never move), then loads every
  /// selected block that is not resident into a free slot.
  load_result load_selection(int seq, int h) noexcept {
    const std::int32_t* chosen = selection_ptr(seq, h);
    const int n = selection_counts()[sh(seq, h)];
    std::int32_t* mark = block_marks(seq, h);
    std::int32_t* map = slot_map(seq, h);
    std::int32_t* where = block_slot(seq, h);
    const bool cache = layout_.cache_slots > 0;
    for (int i = 0; i < n; ++i) mark[chosen[i]] = 1;
    if (!cache) {
      // Dropped blocks leave at once.
      for (int slot = 0; slot < layout_.slots; ++slot) {
        if (map[slot] >= 0 && !mark[map[slot]]) {
          where[map[slot]] = -1;
          map[slot] = -1;
        }
      }
    }
    load_result r;
    for (int i = 0; i < n; ++i) {
      const int b = chosen[i];
      if (where[b] >= 0) {
        ++r.hits;
        continue;
      }
      // The lowest free slot; with a cache, else the least recently selected block outside the selection.
      const int slot = victim_slot(seq, h);
      if (map[slot] >= 0) where[map[slot]] = -1;
      map[slot] = b;
      where[b] = slot;
      const int page = block_table(seq)[b];
      std::memcpy(slot_keys(seq, h, slot), page_keys(page, h), block_value_bytes());
      std::memcpy(slot_values(seq, h, slot), page_values(page, h), block_value_bytes());
      if constexpr (quantized) {
        *slot_scale(seq, h, slot, kv_half::keys) = *page_scale(page, h, kv_half::keys);
        *slot_scale(seq, h, slot, kv_half::values) = *page_scale(page, h, kv_half::values);
      }
      ++r.misses;
    }
    const std::int32_t clock = length_clock(seq);
    for (int i = 0; i < n; ++i) {
      mark[chosen[i]] = 0;
      if (cache) slot_stamps(seq, h)[where[chosen[i]]] = clock;
    }
    return r;
  }

  /// Attend: softmax over the tokens j < `length` of `n` blocks with the policy's bias, one block at a
  /// time, each block's partial softmax merged into the running one by log-sum-exp. `blocks` lists them in
  /// merge order (a selection in rank order), or is null for blocks 0 .. n-1 in index order (full
  /// attention, dense prefill). The current block is read in the element type where append wrote it;
  /// every other block from the slot cache (a step) or, `from_pool`, from its page (a prefill, whose
  /// blocks need not be resident), with a quantized format as its codes times its scale.
  template <storage_element Out>
  void attend(int seq, int h, int length, const std::int32_t* blocks, int n, bool from_pool, const float* q,
              Out* o) noexcept {
    const selection_params& sel = config_.selection;
    const int tail = (length - 1) / sel.block_size;
    softmax_partial total;
    float acc[head_dim] = {};
    for (int i = 0; i < n; ++i) {
      const int m = blocks == nullptr ? i : blocks[i];
      const int first = m * sel.block_size;
      const int rows = std::min(sel.block_size, length - first);
      softmax_partial part;
      float block_acc[head_dim] = {};
      if (m == tail) {
        const block_view<element_type> current{tail_keys_of(seq, h, m), tail_values_of(seq, h, m)};
        attend_block(current, seq, h, first, rows, q, part, block_acc);
      } else {
        attend_block(from_pool ? pool_block(seq, h, m) : stored_block(seq, h, m), seq, h, first, rows, q,
                     part, block_acc);
      }
      float total_scale = 0.0f, part_scale = 0.0f;
      const float merged_max = total.merge_factors(part, total_scale, part_scale);
      total.sum = total.sum * total_scale + part.sum * part_scale;
      total.max = merged_max;
      for (int j = 0; j < head_dim; ++j) acc[j] = acc[j] * total_scale + block_acc[j] * part_scale;
    }
    const float inv = total.sum > 0.0f ? 1.0f / total.sum : 0.0f;
    for (int j = 0; j < head_dim; ++j) o[j] = from_float<Out>(acc[j] * inv);
  }

  /// The partial softmax of one block's first `rows` tokens (positions from `first`) and its weighted V sum.
  template <class T>
  void attend_block(const block_view<T>& block, int seq, int h, int first, int rows, const float* q,
                    softmax_partial& part, float* block_acc) noexcept {
    const float scale = softmax_scale(head_dim);
    const float* c_state = token_scores(seq, h);
    float* logits = dev<float>(layout_.logit_scratch);
    for (int r = 0; r < rows; ++r) {
      float d = 0.0f;
      const T* key = block.keys + std::size_t(r) * head_dim;
      for (int j = 0; j < head_dim; ++j) d += q[j] * read_value(key[j], block.key_scale);
      logits[r] = attention::logit(d, c_state[first + r], scale);
      part.max = max_keep_left(part.max, logits[r]);
    }
    for (int r = 0; r < rows; ++r) {
      const float p = part.max == negative_infinity ? 0.0f : std::exp(logits[r] - part.max);
      part.sum += p;
      for (int j = 0; j < head_dim; ++j) {
        block_acc[j] += p * read_value(block.values[std::size_t(r) * head_dim + j], block.value_scale);
      }
    }
  }

  /// Quantises one complete block of one KV head, K or V (`b_s` rows of D values, row r at `row(r)`), into
  /// `codes` and returns its scale: the only place a block is quantised (spec §6b).
  template <class Row>
  float quantize_block(Row&& row, value_type* codes) const noexcept {
    const int rows = config_.selection.block_size;
    float amax = 0.0f;
    for (int r = 0; r < rows; ++r) {
      const element_type* x = row(r);
      for (int d = 0; d < head_dim; ++d) amax = max_keep_left(amax, std::fabs(to_float(x[d])));
    }
    const float multiplier = kv_format::multiplier(amax);
    for (int r = 0; r < rows; ++r) {
      const element_type* x = row(r);
      for (int d = 0; d < head_dim; ++d) {
        codes[std::size_t(r) * head_dim + d] = kv_format::encode(to_float(x[d]), multiplier);
      }
    }
    return kv_format::scale(amax);
  }

  /// Write-back of block `block`, which the step's token completed. Offload store: the block goes from its
  /// slot to its reserved page and stays resident. Quantized format: the block is quantised from its tail
  /// buffer, once, into its slot (then copied to its page) or, resident store, into its page.
  void write_back(int seq, int h, int block) noexcept {
    const int page = block_table(seq)[block];
    if constexpr (quantized) {
      const element_type* tk = tail_keys(seq, h);
      const element_type* tv = tail_values(seq, h);
      const auto key_row = [&](int r) { return tk + std::size_t(r) * head_dim; };
      const auto value_row = [&](int r) { return tv + std::size_t(r) * head_dim; };
      if constexpr (!offloads) {
        *page_scale(page, h, kv_half::keys) = quantize_block(key_row, page_keys(page, h));
        *page_scale(page, h, kv_half::values) = quantize_block(value_row, page_values(page, h));
        return;
      } else {
        const int slot = block_slot(seq, h)[block];
        *slot_scale(seq, h, slot, kv_half::keys) = quantize_block(key_row, slot_keys(seq, h, slot));
        *slot_scale(seq, h, slot, kv_half::values) = quantize_block(value_row, slot_values(seq, h, slot));
        *page_scale(page, h, kv_half::keys) = *slot_scale(seq, h, slot, kv_half::keys);
        *page_scale(page, h, kv_half::values) = *slot_scale(seq, h, slot, kv_half::values);
      }
    }
    std::memcpy(page_keys(page, h), block_keys(seq, h, block), block_value_bytes());
    std::memcpy(page_values(page, h), block_values(seq, h, block), block_value_bytes());
  }
};

}  // namespace nosa
