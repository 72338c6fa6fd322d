#pragma once
/// \file
/// A model of one (sequence, KV head)'s slot cache in the offload store, for sizing it: fed the selections
/// of a run, it counts the blocks a slot cache of a given size would have loaded. The store's selections do
/// not depend on what is resident unless a hard transfer budget is set, so the selections recorded in one
/// calibration run (for example a few dozen steps read back with `decode_layer::selection`) predict the
/// misses per step of every `limits.cache_slots`: what an engine weighs against the HBM each extra slot costs
/// when it chooses the slot-cache size and the batch. With a budget the model still replays a layer of its
/// own size exactly.
///
/// The model follows the store's rules step for step (both backends implement them; docs/cuda.md, "A slot
/// cache beyond k"): `k + 1 + cache_slots` slots; a new tail block takes the lowest free slot, else the slot
/// of the block selected longest ago outside the previous selection; a selection's blocks that are not
/// resident are loaded in rank order into the lowest free slot, else into the slot of the block selected
/// longest ago outside the selection; without a cache, blocks that leave the selection free their slots at
/// once; every slot of the selection is stamped with the step's position; ties go to the lower slot.
///
/// Host-only planning code: it allocates when constructed, never in `step`.

#include <nosa/core/params.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace nosa {

class slot_cache_model {
 public:
  /// A cache of `top_k + 1 + cache_slots` slots for blocks of `sel.block_size` tokens.
  slot_cache_model(const selection_params& sel, int cache_slots)
      : block_size_(sel.block_size),
        cache_(cache_slots > 0),
        block_(std::size_t(sel.top_k) + 1 + std::size_t(cache_slots > 0 ? cache_slots : 0), -1),
        stamp_(block_.size(), 0) {}

  /// Slots per (sequence, KV head).
  int slots() const noexcept { return static_cast<int>(block_.size()); }

  /// The admission of a prompt of `length` tokens whose initial selection is `selection` (rank order):
  /// a partial tail takes a slot, then the selection is loaded. Returns the blocks loaded.
  int admit(int length, std::span<const std::int32_t> selection) {
    for (std::size_t s = 0; s < block_.size(); ++s) block_[s] = -1, stamp_[s] = 0;
    previous_.clear();
    if (length % block_size_ != 0) claim(length / block_size_, length);
    return load(selection, length);
  }

  /// One decode step at token position `t` (the sequence held `t` tokens before it) whose selection is
  /// `selection` (rank order). Returns the blocks the step loads.
  int step(int t, std::span<const std::int32_t> selection) {
    if (t % block_size_ == 0) claim(t / block_size_, t);
    return load(selection, t);
  }

  /// Block held by each slot (-1 when free), as the store's slot map.
  std::span<const int> slot_map() const noexcept { return block_; }

 private:
  int block_size_;
  bool cache_;
  std::vector<int> block_;     // [slots] block held, -1 if free
  std::vector<int> stamp_;     // [slots] position at which the block was last selected
  std::vector<int> previous_;  // the last selection

  static bool contains(std::span<const int> set, int block) noexcept {
    for (const int b : set) {
      if (b == block) return true;
    }
    return false;
  }
  int find(int block) const noexcept {
    for (std::size_t s = 0; s < block_.size(); ++s) {
      if (block_[s] == block) return static_cast<int>(s);
    }
    return -1;
  }
  /// The lowest free slot, else the slot of the block selected longest ago among those not in `keep`.
  int victim(std::span<const int> keep) const noexcept {
    int best = -1;
    for (std::size_t s = 0; s < block_.size(); ++s) {
      if (block_[s] < 0) return static_cast<int>(s);
      if (!contains(keep, block_[s]) && (best < 0 || stamp_[s] < stamp_[std::size_t(best)])) best = static_cast<int>(s);
    }
    return best;
  }
  void claim(int block, int clock) {
    const int s = victim(previous_);
    block_[std::size_t(s)] = block;
    if (cache_) stamp_[std::size_t(s)] = clock;
  }
  int load(std::span<const std::int32_t> selection, int clock) {
    std::vector<int> chosen(selection.begin(), selection.end());
    if (!cache_) {
      for (int& b : block_) {
        if (b >= 0 && !contains(chosen, b)) b = -1;
      }
    }
    int misses = 0;
    for (const int b : chosen) {
      if (find(b) >= 0) continue;
      block_[std::size_t(victim(chosen))] = b;
      ++misses;
    }
    if (cache_) {
      for (const int b : chosen) stamp_[std::size_t(find(b))] = clock;
    }
    previous_ = std::move(chosen);
    return misses;
  }
};

}  // namespace nosa
