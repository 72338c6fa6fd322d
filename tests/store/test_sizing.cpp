// The sizing functions (store/sizing.hpp) against the layout both backends allocate (store/layout.hpp), a
// host layer's counters, and the slot-cache model they build on.
#include <nosa/nosa.hpp>
#include <nosa/store/sizing.hpp>

#include "../backend/host/small_config.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

namespace {

/// The 8B model's attention (H_q 32, H_kv 2, the paper's selection) for `sequences` sequences of up to
/// `blocks` blocks, one pool page per block.
nosa::layer_config model_config(int sequences, int blocks, int cache_slots = 0) {
  nosa::layer_config c;
  c.num_q_heads = 32;
  c.num_kv_heads = 2;
  c.limits = {sequences, blocks, sequences * blocks, cache_slots};
  return c;
}

/// Arrays of a layout, each aligned up to `arena_alignment`: the most the alignment adds.
constexpr std::size_t alignment_slack = 48 * nosa::arena_alignment;

/// A layout of S sequences equals the fixed bytes plus S sequences' bytes, up to alignment, once the
/// split-attention scratch is counted as the layout keeps it (at least `max_attention_parts` partials).
template <class P>
void check_against_layout(const nosa::layer_config& c) {
  CAPTURE(c.limits.max_sequences);
  CAPTURE(c.limits.max_blocks_per_sequence);
  CAPTURE(c.limits.cache_slots);
  const nosa::state_layout s = nosa::make_state_layout<P>(c);
  const nosa::sequence_bytes one = nosa::bytes_per_sequence<P>(c);
  const nosa::arena_sizes fixed = nosa::fixed_bytes<P>(c);
  const std::size_t S = std::size_t(c.limits.max_sequences), rows = S * std::size_t(c.num_kv_heads);
  const std::size_t floor = std::size_t(nosa::max_attention_parts);
  const std::size_t beyond_floor = rows > floor ? rows - floor : 0;  // partials beyond the fixed ones
  const std::size_t partial_row = one.partial_scratch / std::size_t(c.num_kv_heads);
  const std::size_t device =
      fixed.device + S * (one.device() - one.partial_scratch) + beyond_floor * partial_row;
  REQUIRE(s.device_bytes >= device);
  CHECK(s.device_bytes - device < alignment_slack);
  const std::size_t host = fixed.host + S * one.host();
  REQUIRE(s.host_bytes >= host);
  CHECK(s.host_bytes - host < alignment_slack);
  // The parts the layout keeps in contiguous arrays.
  if (s.offloads && !s.quantized) {
    const std::size_t slots = s.query_scores - s.slot_map;  // slot map, block->slot, stamps, K, V
    CHECK(slots >= S * one.slot_cache);
    CHECK(slots - S * one.slot_cache < 5 * nosa::arena_alignment);
  }
  if (!s.dense) {
    const std::size_t keys = (s.selection - s.compressed_keys) - (s.key_ring - s.compressed_scores);
    CHECK(keys >= S * one.compressed_keys);
    CHECK(keys - S * one.compressed_keys < 2 * nosa::arena_alignment);
  }
  // One page per block of every sequence; pages are host memory exactly when the store offloads.
  CHECK(S * (one.host_pages + one.device_pages) == std::size_t(c.limits.pool_pages) * nosa::page_bytes<P>(c));
  CHECK((one.host_pages > 0) == s.offloads);
}

template <class P>
void check_configurations() {
  for (const int sequences : {1, 7, 300, 700}) {
    for (const int blocks : {1, 64, 513, 1537}) {
      for (const int cache : {0, 8, 64}) check_against_layout<P>(model_config(sequences, blocks, cache));
    }
  }
}

}  // namespace

TEST_CASE("bytes per sequence and fixed bytes add up to the layout: nosa-offload, bf16, D 128") {
  check_configurations<nosa::nosa_pipeline<nosa::bf16, 128>>();
}
TEST_CASE("bytes per sequence and fixed bytes add up to the layout: nosa-resident, fp32, D 64") {
  check_configurations<nosa::nosa_pipeline<float, 64, nosa::resident_store>>();
}
TEST_CASE("bytes per sequence and fixed bytes add up to the layout: infllmv2-offload, full attention") {
  check_configurations<nosa::infllmv2_pipeline<nosa::bf16, 128>>();
  check_configurations<nosa::full_attention_pipeline<nosa::bf16, 128>>();
}
TEST_CASE("bytes per sequence and fixed bytes add up to the layout: FP8 offload and resident stores") {
  check_configurations<nosa::nosa_pipeline<nosa::bf16, 128, nosa::fp8_offload_store>>();
  check_configurations<
      nosa::full_attention_pipeline<nosa::fp16, 128, nosa::bias_mode::none, nosa::fp8_resident_store>>();
}

TEST_CASE("a sequence of the 8B model at 96K: the parts the engine weighs") {
  using P = nosa::nosa_pipeline<nosa::bf16, 128>;
  const nosa::layer_config c = model_config(1, 1537);  // 98,304 tokens and the tokens of a decode
  const nosa::sequence_bytes b = nosa::bytes_per_sequence<P>(c);
  // 65 slots of K and V, 16 KiB each, per KV head, and their bookkeeping.
  CHECK(b.slot_cache == 2 * (65 * 2 * 16384 + (2 * 65 + 1537) * 4));
  // Kc of every window in bf16, and the key ring: (1537 * 64 - 32) / 16 + 1 = 6147 windows.
  CHECK(b.compressed_keys == 2 * (6147 + 32) * 128 * 2);
  CHECK(b.scores == 2 * (1537 * 64 + 6147) * 4);
  CHECK(b.host_pages == 1537 * 2 * 2 * 16384);
  CHECK(b.device_pages == 0);
  // Pages shared with another sequence are not its own.
  CHECK(nosa::bytes_per_sequence<P>(c, 1537 - 1536).host_pages == 2 * 2 * 16384);
  CHECK(nosa::page_bytes<P>(c) == 65536);
  CHECK(nosa::miss_bytes<P>(c) == 32768);
  CHECK(nosa::miss_bytes<nosa::nosa_pipeline<nosa::bf16, 128, nosa::fp8_offload_store>>(c) == 2 * (8192 + 4));
}

TEST_CASE("one more cache slot costs slot_bytes per sequence") {
  using P = nosa::nosa_pipeline<nosa::bf16, 128>;
  for (const int cache : {0, 1, 63}) {
    const nosa::layer_config a = model_config(300, 513, cache), b = model_config(300, 513, cache + 1);
    CHECK(nosa::bytes_per_sequence<P>(b).device() - nosa::bytes_per_sequence<P>(a).device() ==
          nosa::slot_bytes<P>(a));
    const std::size_t grown =
        nosa::make_state_layout<P>(b).device_bytes - nosa::make_state_layout<P>(a).device_bytes;
    CHECK(grown >= 300 * nosa::slot_bytes<P>(a) - 3 * nosa::arena_alignment);
    CHECK(grown <= 300 * nosa::slot_bytes<P>(a) + 3 * nosa::arena_alignment);
  }
  CHECK(nosa::slot_bytes<P>(model_config(1, 1)) == 2 * (2 * 16384 + 8));
  CHECK(nosa::slot_bytes<nosa::nosa_pipeline<nosa::bf16, 128, nosa::resident_store>>(model_config(1, 1)) ==
        0);
}

TEST_CASE("step HBM bytes: compressed keys and scores of every window, K and V of the attended blocks") {
  const nosa::layer_config c = model_config(1, 600);
  // NOSA at 32K: 2047 windows of bf16 keys and f32 scores; 63 complete selected blocks and the 64-token tail,
  // with the f32 bias of their tokens; two KV heads.
  constexpr std::size_t nosa_32k = 2 * (2047 * 256 + 2047 * 4 + 63 * 2 * 16384 + 64 * 2 * 256 + 64 * 64 * 4);
  CHECK(nosa::step_hbm_bytes<nosa::nosa_pipeline<nosa::bf16, 128>>(c, 32768) == nosa_32k);
  // The resident store reads the same blocks from its pool.
  CHECK(nosa::step_hbm_bytes<nosa::nosa_pipeline<nosa::bf16, 128, nosa::resident_store>>(c, 32768) ==
        nosa_32k);
  // InfLLMv2 reads no cc and no bias.
  CHECK(nosa::step_hbm_bytes<nosa::infllmv2_pipeline<nosa::bf16, 128>>(c, 32768) ==
        2 * (2047 * 256 + 63 * 2 * 16384 + 64 * 2 * 256));
  // Full attention reads every token's K and V, and nothing else.
  using full = nosa::full_attention_pipeline<nosa::bf16, 128>;
  for (const int length : {1, 63, 64, 65, 1000, 32768})
    CHECK(nosa::step_hbm_bytes<full>(c, length) == std::size_t(length) * 2 * 2 * 128 * 2);
  // Short sequences: every block is selected.
  CHECK(nosa::step_hbm_bytes<nosa::infllmv2_pipeline<nosa::bf16, 128>>(c, 100) ==
        2 * (5 * 256 + 100 * 2 * 256));
  // FP8 complete blocks: codes and a scale per block; the tail stays in the element type.
  CHECK(nosa::step_hbm_bytes<nosa::infllmv2_pipeline<nosa::bf16, 128, nosa::fp8_offload_store>>(c, 32768) ==
        2 * (2047 * 256 + 63 * 2 * (8192 + 4) + 64 * 2 * 256));
}

TEST_CASE("the roofline is the longer of the gather and the HBM reads plus the GEMMs") {
  CHECK(nosa::roofline_seconds(50e9, 50e9, 0, 4e12, 0.5) == doctest::Approx(1.0));
  CHECK(nosa::roofline_seconds(10e9, 50e9, 4e12, 4e12, 0.5) == doctest::Approx(1.5));
  CHECK(nosa::roofline_seconds(10e9, 0, 4e12, 4e12, 0) == doctest::Approx(1.0));  // no link measured
}

TEST_CASE("cache-slot candidates: none, then fractions and multiples of k") {
  CHECK(nosa::cache_slot_candidates(64) == std::vector<int>{0, 8, 16, 32, 64, 128, 256});
  CHECK(nosa::cache_slot_candidates(12) == std::vector<int>{0, 1, 3, 6, 12, 24, 48});
  CHECK(nosa::cache_slot_candidates(2) == std::vector<int>{0, 1, 2, 4, 8});
}

TEST_CASE("the miss calibration replays every stream through a slot-cache model per candidate") {
  const nosa::selection_params sel = nosa_test::small_layer_config(4, 2, 1, 1).selection;
  const std::vector<int> candidates{0, 2, 8};
  const int streams = 3, warmup = 5, steps = 60;
  nosa::miss_calibration calibration(sel, candidates, streams);
  // Independent models, fed the same trace: the calibration's figures are their sums over counted steps.
  std::vector<std::vector<nosa::slot_cache_model>> models(candidates.size());
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    for (int s = 0; s < streams; ++s) models[i].emplace_back(sel, candidates[i]);
  }
  std::vector<long long> expected(candidates.size(), 0);
  std::mt19937 rng(7);
  // Selections of a drifting trace: forced blocks, then free picks from a slowly moving window of blocks.
  const auto selection = [&](int length, int centre) {
    const int blocks = (length + sel.block_size - 1) / sel.block_size, current = blocks - 1;
    std::vector<std::int32_t> out{0};
    for (int m = std::max(1, current - sel.n_local); m <= current; ++m) out.push_back(m);
    while (static_cast<int>(out.size()) < sel.top_k) {
      const int m = std::clamp(centre + static_cast<int>(rng() % 9) - 4, 1, current);
      if (std::find(out.begin(), out.end(), m) == out.end()) out.push_back(m);
    }
    return out;
  };
  const int prompt = 400;
  std::vector<int> centre(streams, 10);
  for (int s = 0; s < streams; ++s) {
    const auto chosen = selection(prompt, centre[std::size_t(s)]);
    calibration.admit(s, prompt, chosen);
    for (std::size_t i = 0; i < candidates.size(); ++i) models[i][std::size_t(s)].admit(prompt, chosen);
  }
  for (int t = prompt; t < prompt + warmup + steps; ++t) {
    for (int s = 0; s < streams; ++s) {
      centre[std::size_t(s)] += static_cast<int>(rng() % 3) - 1;
      const auto chosen = selection(t + 1, centre[std::size_t(s)]);
      const bool counted = t >= prompt + warmup;
      calibration.step(s, t, chosen, counted);
      for (std::size_t i = 0; i < candidates.size(); ++i) {
        const int loaded = models[i][std::size_t(s)].step(t, chosen);
        if (counted) expected[i] += loaded;
      }
    }
  }
  CHECK(calibration.counted_steps() == streams * steps);
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    CAPTURE(candidates[i]);
    CHECK(calibration.misses_per_step(i) == doctest::Approx(double(expected[i]) / (streams * steps)));
  }
  MESSAGE("misses per step: " << calibration.misses_per_step(0) << ", " << calibration.misses_per_step(1)
                              << ", " << calibration.misses_per_step(2));
  CHECK(calibration.misses_per_step(2) <= calibration.misses_per_step(0));
  // Between candidates the figure is interpolated; beyond them it is the largest cache's.
  CHECK(calibration.misses_per_step_at(2) == doctest::Approx(calibration.misses_per_step(1)));
  CHECK(calibration.misses_per_step_at(5) ==
        doctest::Approx(0.5 * (calibration.misses_per_step(1) + calibration.misses_per_step(2))));
  CHECK(calibration.misses_per_step_at(100) == doctest::Approx(calibration.misses_per_step(2)));
}

TEST_CASE("a host layer's gather counter is its loaded blocks times miss_bytes") {
  using P = nosa::nosa_pipeline<nosa::bf16, 64>;
  using layer_t = nosa::decode_layer<P, nosa::host_backend>;
  const nosa::layer_config c = nosa_test::small_layer_config(4, 2, 1, 40);
  nosa::owning_layer<layer_t> layer;
  REQUIRE(layer.create(c) == nosa::status::success);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  const int len = 300, hkv = 2, hq = 4, D = 64;
  std::vector<nosa::bf16> k(std::size_t(len) * hkv * D), v(k.size()), q(std::size_t(hq) * D);
  for (auto* x : {&k, &v, &q}) {
    for (auto& e : *x) e = nosa::bf16(normal(rng));
  }
  std::vector<float> cs(std::size_t(len) * hkv);
  for (auto& e : cs) e = normal(rng);
  nosa::prompt_args<nosa::bf16> p;
  p.k = nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(k.data()), {len, hkv, D});
  p.v = nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(v.data()), {len, hkv, D});
  p.c = nosa::make_contiguous<2>(static_cast<const float*>(cs.data()), {len, hkv});
  p.last_query = nosa::make_contiguous<2>(static_cast<const nosa::bf16*>(q.data()), {hq, D});
  REQUIRE(layer->add_sequence(0, p) == nosa::status::success);
  // Admission loads the initial selection (the partial tail block comes from the prompt, not the pool).
  std::uint64_t loaded = 0;
  for (int h = 0; h < hkv; ++h) {
    nosa::slot_cache_model model(c.selection, 0);
    loaded += static_cast<std::uint64_t>(model.admit(len, layer->selection(0, h)));
  }
  REQUIRE(loaded > 0);
  CHECK(layer->total_counters().bytes_h2d == loaded * nosa::miss_bytes<P>(c));
}
