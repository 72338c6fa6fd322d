#pragma once
/// \file
/// Where the KV blocks live, and in which format complete blocks are kept.
///
/// Both stores keep K and V in a paged pool addressed through a per-sequence block table. One page holds one
/// block of every KV head of a layer, laid out `[2 (K, V)][H_kv][b_s][D]`, so the K (or V) of one block of
/// one head is a contiguous `b_s * D` run: the unit the gather moves. With a quantized KV format
/// (`fp8_e4m3_kv`) those runs hold codes, the fp32 scale of each run sits in a `[P][2][H_kv]` array beside
/// the pool, and the tail block stays in the element type in a buffer of its own (`store/layout.hpp`).

#include <nosa/core/concepts.hpp>
#include <nosa/store/kv_format.hpp>

namespace nosa {

/// NOSI-style offloading: the pool lives in host memory; each (sequence, KV head) has a slot cache of
/// `top_k + spare_slots` blocks in device memory plus a slot map. The tail (current) block lives in a slot;
/// the spare slot lets a completed block stay resident while a new tail starts. A step diffs the new
/// selection against the slot map (hits never move), gathers the misses into freed slots and writes a
/// completed tail back to its reserved page. `Format` is how complete blocks are stored in the pool and
/// the slots; with a quantized format the write-back quantises the completed block into its slot and
/// copies it to its page.
template <kv_format_policy Format = element_kv>
struct basic_offload_store {
  static constexpr bool offloads = true;
  static constexpr int spare_slots = 1;
  using kv_format = Format;
};

/// Everything in device memory: the pool itself is the device tier and attention reads pages in place. No
/// transfers; the small-batch path and a correctness baseline for the offload store. With a quantized
/// `Format` the tail block is kept in the element type and quantised into its page when it completes.
template <kv_format_policy Format = element_kv>
struct basic_resident_store {
  static constexpr bool offloads = false;
  static constexpr int spare_slots = 0;
  using kv_format = Format;
};

/// The offload store with complete blocks in the element type.
using offload_store = basic_offload_store<element_kv>;
static_assert(store_policy<offload_store>);
/// The resident store with complete blocks in the element type.
using resident_store = basic_resident_store<element_kv>;
static_assert(store_policy<resident_store>);
/// The offload store with complete blocks in FP8 E4M3 (spec §6b): half the bytes of every miss, write-back
/// and slot of a bf16 or fp16 cache, plus 4 bytes of scale per block-head.
using fp8_offload_store = basic_offload_store<fp8_e4m3_kv>;
static_assert(store_policy<fp8_offload_store>);
/// The resident store with complete blocks in FP8 E4M3 (spec §6b).
using fp8_resident_store = basic_resident_store<fp8_e4m3_kv>;
static_assert(store_policy<fp8_resident_store>);

}  // namespace nosa
