#pragma once
/// \file
/// Host-side bookkeeping of the paged pool, shared by every backend's plan calls: reference counts, a stack
/// of free pages, and the reservation of pages for the blocks a sequence will reach. Lives in the host
/// arena at the offsets of `state_layout`.

#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>
#include <nosa/store/layout.hpp>

#include <cstddef>
#include <cstdint>

namespace nosa {

/// A view of the pool's bookkeeping arrays in a host arena. Cheap to copy.
class page_pool {
 public:
  page_pool() = default;
  page_pool(const state_layout& l, std::byte* host_arena) noexcept
      : refs_(reinterpret_cast<std::int32_t*>(host_arena + l.page_refs)),
        stack_(reinterpret_cast<std::int32_t*>(host_arena + l.free_pages)),
        count_(reinterpret_cast<std::int32_t*>(host_arena + l.free_count)),
        pages_(l.pages) {}

  /// Every page free; pops hand out page 0 first, which keeps tests and traces readable.
  void reset() noexcept {
    for (int i = 0; i < pages_; ++i) {
      refs_[i] = 0;
      stack_[i] = pages_ - 1 - i;
    }
    *count_ = pages_;
  }
  int free_count() const noexcept { return *count_; }
  /// Takes a free page (the caller checked `free_count`).
  std::int32_t pop() noexcept {
    const std::int32_t page = stack_[--*count_];
    refs_[page] = 1;
    return page;
  }
  /// One more reference to a page in use (a block shared by two sequences).
  void add_ref(std::int32_t page) noexcept { ++refs_[page]; }
  /// Drops one reference; the page is free again when none is left.
  void release(std::int32_t page) noexcept {
    if (--refs_[page] == 0) stack_[(*count_)++] = page;
  }

  /// Pages that block-table row `table` still lacks for a sequence of `length` tokens to run `tokens_ahead`
  /// more steps; `sequence_full` when that passes `max_tokens`.
  static status missing(const std::int32_t* table, int length, int tokens_ahead, int max_tokens,
                        const selection_params& sel, int& needed) noexcept {
    const std::int64_t through = std::int64_t(length) + tokens_ahead;
    if (through > max_tokens) return status::sequence_full;
    const int blocks = block_count(static_cast<int>(through), sel);
    needed = 0;
    for (int m = 0; m < blocks; ++m) needed += table[m] < 0;
    return status::success;
  }
  /// Fills the pages `missing` counted (the caller checked that enough are free).
  void fill(std::int32_t* table, int length, int tokens_ahead, const selection_params& sel) noexcept {
    const int blocks = block_count(length + tokens_ahead, sel);
    for (int m = 0; m < blocks; ++m) {
      if (table[m] < 0) table[m] = pop();
    }
  }

  /// Checks a shared prefix for a new sequence of `length` tokens in slot `seq`, given the source's live flag
  /// and length: a live source other than `seq`, and blocks complete in both.
  static status check_shared(const shared_prefix& share, int seq, int length, bool source_live, int source_length,
                             const selection_params& sel) noexcept {
    if (share.blocks == 0) return status::success;
    if (share.blocks < 0) return status::invalid_argument;
    if (!source_live || share.source == seq) return status::unknown_sequence;
    const std::int64_t tokens = std::int64_t(share.blocks) * sel.block_size;
    if (tokens > length || tokens > source_length) return status::invalid_argument;
    return status::success;
  }

  /// The per-sequence state a reservation reads and writes, wherever the backend keeps a host copy of it.
  struct sequence_rows {
    const std::int32_t* live;     ///< [S] live flags
    const std::int32_t* lengths;  ///< [S] tokens of each sequence
    std::int32_t* tables;         ///< [S][max_blocks] block tables, -1 where no page
    int max_blocks;
  };

  /// Reserves pages so that every live sequence in `[first, last)` can run `tokens_ahead` more steps. All
  /// or nothing: on `sequence_full` or `host_pool_full` no page is taken.
  status reserve(const sequence_rows& rows, int first, int last, int tokens_ahead, int max_tokens,
                 const selection_params& sel) noexcept {
    if (tokens_ahead < 0) return status::invalid_argument;
    int needed = 0;
    for (int seq = first; seq < last; ++seq) {
      if (!rows.live[seq]) continue;
      int n = 0;
      NOSA_TRY(missing(table_of(rows, seq), rows.lengths[seq], tokens_ahead, max_tokens, sel, n));
      needed += n;
    }
    if (needed > free_count()) return status::host_pool_full;
    for (int seq = first; seq < last; ++seq) {
      if (rows.live[seq]) fill(table_of(rows, seq), rows.lengths[seq], tokens_ahead, sel);
    }
    return status::success;
  }

 private:
  static std::int32_t* table_of(const sequence_rows& rows, int seq) noexcept {
    return rows.tables + std::size_t(seq) * rows.max_blocks;
  }

  std::int32_t* refs_ = nullptr;
  std::int32_t* stack_ = nullptr;
  std::int32_t* count_ = nullptr;
  int pages_ = 0;
};

}  // namespace nosa
