// Configuration validation and status values.
#include <nosa/core/dispatch.hpp>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/core/tensor_view.hpp>

#include <doctest/doctest.h>

#include <cstdint>

TEST_CASE("selection parameters: k_qa <= k and k >= forced blocks") {
  nosa::selection_params p{};
  CHECK(nosa::validate(p) == nosa::status::success);
  p.top_k_query_aware = 65;
  CHECK(nosa::validate(p) == nosa::status::invalid_config);
  p = {};
  p.top_k = 17;  // 18 forced blocks with the defaults
  p.top_k_query_aware = 10;
  CHECK(nosa::validate(p) == nosa::status::invalid_config);
  p.top_k = 18;
  CHECK(nosa::validate(p) == nosa::status::success);
  p = {};
  p.block_size = 0;
  CHECK(nosa::validate(p) == nosa::status::invalid_config);
  p = {};
  p.max_new_blocks = -2;
  CHECK(nosa::validate(p) == nosa::status::invalid_config);
  p.max_new_blocks = 0;
  CHECK(nosa::validate(p) == nosa::status::success);
}

TEST_CASE("layer configuration: heads and capacities") {
  nosa::layer_config c{};
  CHECK(nosa::validate(c) == nosa::status::success);
  c.num_q_heads = 33;
  CHECK(nosa::validate(c) == nosa::status::invalid_argument);
  c.num_q_heads = 6;
  c.num_kv_heads = 3;  // group of 2: non-power-of-two layouts are fine
  CHECK(nosa::validate(c) == nosa::status::success);
  c.limits.pool_pages = 0;
  CHECK(nosa::validate(c) == nosa::status::invalid_argument);
}

TEST_CASE("every status has a name") {
  for (int s = 0; s <= static_cast<int>(nosa::status::backend_error); ++s) {
    CHECK(nosa::to_string(static_cast<nosa::status>(s)) != "unknown status");
  }
}

TEST_CASE("check_view reports shape, null, alignment and layout problems") {
  alignas(16) float buf[64] = {};
  auto v = nosa::make_contiguous<2>(static_cast<const float*>(buf), {4, 16});
  CHECK(nosa::check_view(v, {4, 16}) == nosa::status::success);
  CHECK(nosa::check_view(v, {4, 8}) == nosa::status::shape_mismatch);
  auto null_view = v;
  null_view.data = nullptr;
  CHECK(nosa::check_view(null_view, {4, 16}) == nosa::status::null_pointer);
  null_view.extents[0] = 0;
  CHECK(nosa::check_view(null_view, {0, 16}) == nosa::status::success);  // nothing to read
  auto odd = v;
  odd.data = reinterpret_cast<const float*>(reinterpret_cast<const char*>(buf) + 2);
  CHECK(nosa::check_view(odd, {4, 16}) == nosa::status::misaligned_pointer);
  auto strided = nosa::make_strided<2>(static_cast<const float*>(buf), {4, 16}, {16, 2});
  CHECK(nosa::check_view(strided, {4, 16}) == nosa::status::bad_layout);
  auto negative = nosa::make_strided<2>(static_cast<const float*>(buf + 48), {4, 16}, {-16, 1});
  CHECK(nosa::check_view(negative, {4, 16}) == nosa::status::bad_layout);
  auto padded = nosa::make_strided<2>(static_cast<const float*>(buf), {3, 16}, {20, 1});  // row padding is fine
  CHECK(nosa::check_view(padded, {3, 16}) == nosa::status::success);
  CHECK(padded(2, 3) == buf[43]);
}

TEST_CASE("dispatch turns run-time values into template arguments") {
  int seen = 0;
  CHECK(nosa::dispatch_value<64, 128, 256>(128, [&](auto d) {
          seen = decltype(d)::value;
          return nosa::status::success;
        }) == nosa::status::success);
  CHECK(seen == 128);
  CHECK(nosa::dispatch_value<64, 128, 256>(96, [&](auto) { return nosa::status::success; }) ==
        nosa::status::not_supported);
  CHECK(nosa::dispatch_element<float, nosa::bf16>(nosa::dtype::fp16, [](auto) { return nosa::status::success; }) ==
        nosa::status::not_supported);
  CHECK(nosa::dispatch_element<float, nosa::bf16>(nosa::dtype::bf16, [](auto tag) {
          return std::is_same_v<typename decltype(tag)::type, nosa::bf16> ? nosa::status::success
                                                                          : nosa::status::backend_error;
        }) == nosa::status::success);
}

TEST_CASE("a tensor-parallel rank's shard of the heads: contiguous KV heads with their query heads") {
  nosa::layer_config c{};
  c.num_q_heads = 32;
  c.num_kv_heads = 8;
  c.limits.max_sequences = 4;
  c.limits.max_blocks_per_sequence = 100;
  c.limits.pool_pages = 400;
  c.limits.cache_slots = 6;
  for (const int ranks : {1, 2, 4, 8}) {
    int next_kv = 0, next_q = 0;
    for (int rank = 0; rank < ranks; ++rank) {
      nosa::head_shard s{};
      REQUIRE(nosa::shard_heads(c, ranks, rank, s) == nosa::status::success);
      // The shards tile the heads in rank order, each with the whole layer's group.
      CHECK(s.first_kv_head == next_kv);
      CHECK(s.first_q_head == next_q);
      CHECK(s.config.num_kv_heads == 8 / ranks);
      CHECK(s.config.num_q_heads == 32 / ranks);
      CHECK(s.config.group_size() == c.group_size());
      CHECK(s.first_q_head == s.first_kv_head * c.group_size());
      CHECK(nosa::validate(s.config) == nosa::status::success);
      // Selection and capacities are the layer's.
      CHECK(s.config.selection.top_k == c.selection.top_k);
      CHECK(s.config.limits.max_sequences == c.limits.max_sequences);
      CHECK(s.config.limits.max_blocks_per_sequence == c.limits.max_blocks_per_sequence);
      CHECK(s.config.limits.pool_pages == c.limits.pool_pages);
      CHECK(s.config.limits.cache_slots == c.limits.cache_slots);
      next_kv += s.config.num_kv_heads;
      next_q += s.config.num_q_heads;
    }
    CHECK(next_kv == c.num_kv_heads);
    CHECK(next_q == c.num_q_heads);
  }
}

TEST_CASE("a head shard is refused, output untouched, when the ranks do not divide the KV heads or the rank is out of range") {
  nosa::layer_config c{};
  c.num_q_heads = 24;
  c.num_kv_heads = 6;
  nosa::head_shard s{};
  s.first_kv_head = -7;
  CHECK(nosa::shard_heads(c, 4, 0, s) == nosa::status::invalid_argument);  // 4 does not divide 6
  CHECK(nosa::shard_heads(c, 3, 3, s) == nosa::status::invalid_argument);
  CHECK(nosa::shard_heads(c, 3, -1, s) == nosa::status::invalid_argument);
  CHECK(nosa::shard_heads(c, 0, 0, s) == nosa::status::invalid_argument);
  c.selection.top_k_query_aware = c.selection.top_k + 1;  // an invalid layer: its own status
  CHECK(nosa::shard_heads(c, 3, 0, s) == nosa::validate(c));
  CHECK(s.first_kv_head == -7);
  c.selection.top_k_query_aware = 33;
  REQUIRE(nosa::shard_heads(c, 3, 2, s) == nosa::status::success);
  CHECK(s.first_kv_head == 4);
  CHECK(s.first_q_head == 16);
  CHECK(s.config.num_q_heads == 8);
  // Usable at compile time, like `validate`.
  static_assert([] {
    nosa::layer_config l{};
    l.num_q_heads = 64;
    l.num_kv_heads = 8;
    nosa::head_shard h{};
    return nosa::shard_heads(l, 4, 3, h) == nosa::status::success && h.first_kv_head == 6 && h.first_q_head == 48;
  }());
}
