#pragma once
/// \file
/// Where the KV blocks live.
///
/// Both stores keep K and V in a paged pool addressed through a per-sequence block table. One page holds one
/// block of every KV head of a layer, laid out `[2 (K, V)][H_kv][b_s][D]`, so the K (or V) of one block of
/// one head is a contiguous `b_s * D` run: the unit the gather moves.

#include <nosa/core/concepts.hpp>

namespace nosa {

/// NOSI-style offloading: the pool lives in host memory; each (sequence, KV head) has a slot cache of
/// `top_k + spare_slots` blocks in device memory plus a slot map. The tail (current) block lives in a slot;
/// the spare slot lets a completed block stay resident while a new tail starts. A step diffs the new
/// selection against the slot map (hits never move), gathers the misses into freed slots and writes a
/// completed tail back to its reserved page.
struct offload_store {
  static constexpr bool offloads = true;
  static constexpr int spare_slots = 1;
};
static_assert(store_policy<offload_store>);

/// Everything in device memory: the pool itself is the device tier and attention reads pages in place. No
/// transfers; the small-batch path and a correctness baseline for the offload store.
struct resident_store {
  static constexpr bool offloads = false;
  static constexpr int spare_slots = 0;
};
static_assert(store_policy<resident_store>);

}  // namespace nosa
