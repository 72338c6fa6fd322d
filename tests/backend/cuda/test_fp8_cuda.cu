// The FP8 KV cache (spec §6b) on the CUDA backend against the host backend, its exact reference: the
// selections, misses, slot maps and counters equal; the codes, the scales and the tail buffers of every block
// byte for byte equal (quantised on the device at admission and at each block's completion, bit-exact); the
// outputs within the fp32 tolerance of the host's FP8 path; through a captured graph replayed over many
// steps; and bad calls change nothing. bf16 and fp16, both stores, D 128 and 64.
#include "twin.cuh"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using nosa::bias_mode;
using nosa::status;
using nosa_cuda_test::make_config;
using nosa_cuda_test::ragged_spec;
using nosa_cuda_test::random_batch;
using nosa_cuda_test::random_prompt;
using nosa_cuda_test::random_source;
using nosa_cuda_test::run_differential;
using nosa_cuda_test::run_spec;
using nosa_cuda_test::scaled;

template <class T>
using nosa_fp8 = nosa::nosa_pipeline<T, 128, nosa::fp8_offload_store>;
template <class T>
using infllm_fp8_resident = nosa::infllmv2_pipeline<T, 128, nosa::fp8_resident_store>;
using nosa_fp8_d64 = nosa::nosa_pipeline<nosa::bf16, 64, nosa::fp8_offload_store>;
using full_fp8 =
    nosa::full_attention_pipeline<nosa::fp16, 64, bias_mode::after_scale, nosa::fp8_resident_store>;

/// Every E4M3 code but the two NaNs through the attention's in-register conversion, two at a time as the
/// kernel converts them (bytes 0 and 2 of a word; bytes 1 and 3 hold other codes, which must not matter).
template <class E>
__global__ void convert_codes(std::uint32_t* out) {
  const std::uint32_t x = threadIdx.x, y = 255u - threadIdx.x;
  out[threadIdx.x] = nosa::detail::e4m3_pair_to<E>(x | (0x5au << 8) | (y << 16) | (0xa5u << 24));
}

template <class E>
void check_code_conversion() {
  nosa_cuda_test::device_buffer<std::uint32_t> d(256);
  nosa_cuda_test::stream st;
  // On the stream the download runs on: a kernel on the legacy stream does not order it.
  convert_codes<E><<<1, 256, 0, st>>>(d.data());
  NOSA_CUDA_REQUIRE(cudaGetLastError());
  std::vector<std::uint32_t> got(256);
  d.download(got.data(), got.size(), st);
  for (std::uint32_t x = 0; x < 256; ++x) {
    for (const std::uint32_t code : {x, 255u - x}) {
      const nosa::fp8_e4m3 c = nosa::fp8_e4m3::from_bits(static_cast<std::uint8_t>(code));
      if (std::isnan(static_cast<float>(c))) continue;
      const std::uint16_t expected = E(static_cast<float>(c)).bits;
      const std::uint16_t half = code == x ? std::uint16_t(got[x] & 0xffffu) : std::uint16_t(got[x] >> 16);
      INFO("code 0x" << std::hex << code << ": expected 0x" << expected << ", got 0x" << half);
      CHECK(half == expected);
    }
  }
}

/// A prompt whose complete blocks stress the quantisation: all zeros (scale 1), a largest magnitude so small
/// that 448 / amax overflows (scale 1, codes 0; bf16 only, fp16 has no such values), one outlier that pushes
/// the rest of its block into E4M3's subnormals, large values, and ordinary ones; then a partial tail.
template <class P>
nosa_cuda_test::prompt<typename P::element_type> extreme_prompt(random_source& rng,
                                                                const nosa::layer_config& cfg, int length) {
  using T = typename P::element_type;
  auto p = random_prompt<P>(rng, cfg, length, true);
  constexpr int D = P::head_dim;
  const int hkv = cfg.num_kv_heads, bs = cfg.selection.block_size;
  const bool tiny = std::is_same_v<T, nosa::bf16>;
  for (int t = 0; t < length; ++t) {
    for (int h = 0; h < hkv; ++h) {
      for (int d = 0; d < D; ++d) {
        const std::size_t at = (std::size_t(t) * hkv + h) * D + d;
        const float k = nosa::to_float(p.k[at]), v = nosa::to_float(p.v[at]);
        switch (t / bs) {
        case 0:
          p.k[at] = p.v[at] = T(0.0f);
          break;
        case 1:
          p.k[at] = T(tiny ? k * 1e-37f : 0.0f), p.v[at] = T(tiny ? v * 1e-37f : -0.0f);
          break;
        case 2:
          // One outlier per block and head: the others are stored as subnormal codes.
          p.k[at] = T(t % bs == 5 && d == 3 ? 90.0f : k * 0.01f);
          p.v[at] = T(t % bs == 7 && d == 9 ? -3000.0f : v * 0.3f);
          break;
        case 3:
          p.k[at] = T(k * 8.0f), p.v[at] = T(v * 1000.0f);
          break;  // scales above 1
        default:
          break;
        }
      }
    }
  }
  return p;
}

/// Decodes `steps` steps of every live sequence; the K and V of the tokens of block `zero_block` (-1: none)
/// are zeros, so that a sequence that decodes the whole block completes a block of zeros.
template <class P>
void decode(nosa_cuda_test::twin<P>& t, random_source& rng, int steps, int zero_block) {
  using T = typename P::element_type;
  const int bs = t.cfg.selection.block_size;
  for (int step = 0; step < steps; ++step) {
    std::vector<std::int32_t> seqs;
    for (int seq = 0; seq < t.cfg.limits.max_sequences; ++seq) {
      if (t.host.layer.is_live(seq)) seqs.push_back(seq);
    }
    auto in = random_batch<P>(rng, t.cfg, seqs);
    const std::size_t row = std::size_t(t.cfg.num_kv_heads) * P::head_dim;
    for (std::size_t b = 0; b < seqs.size(); ++b) {
      if (t.host.layer.length(seqs[b]) / bs != zero_block) continue;
      std::fill_n(in.k.begin() + b * row, row, T(0.0f));
      std::fill_n(in.v.begin() + b * row, row, T(0.0f));
    }
    REQUIRE(t.reserve(1) == status::success);
    REQUIRE(t.template step<float>(in) == status::success);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("E4M3 codes convert exactly to the element type in registers", E, nosa::bf16, nosa::fp16) {
  NOSA_REQUIRE_GPU();
  check_code_conversion<E>();
}

TEST_CASE_TEMPLATE("the FP8 KV cache decodes like the host backend's, D 128", T, nosa::bf16, nosa::fp16) {
  NOSA_REQUIRE_GPU();
  const int steps = scaled(240, 8);
  run_differential<nosa_fp8<T>, float>(ragged_spec(make_config(32, 8, 2, 5, 64), 1301, steps),
                                       "FP8 offload, G 4, fp32 output");
  run_differential<nosa_fp8<T>, T>(ragged_spec(make_config(64, 6, 2, 5, 64, 2), 1302, steps),
                                   "FP8 offload, G 3, budget 2, storage-type output");
  run_spec cached = ragged_spec(make_config(32, 16, 1, 5, 64), 1303, steps);
  cached.config.limits.cache_slots = 6;
  run_differential<nosa_fp8<T>, float>(cached, "FP8 offload, G 16, 6 cache slots");
  run_differential<infllm_fp8_resident<T>, T>(ragged_spec(make_config(128, 20, 4, 5, 64), 1304, steps),
                                              "FP8 resident, G 5, storage-type output");
  run_differential<infllm_fp8_resident<T>, float>(ragged_spec(make_config(64, 2, 2, 5, 64), 1305, steps),
                                                  "FP8 resident, G 1");
}

TEST_CASE("the FP8 KV cache decodes like the host backend's, D 64, and under full attention") {
  NOSA_REQUIRE_GPU();
  const int steps = scaled(240, 8);
  // Blocks of 24 tokens: the attention's 64-row tiles are partial, its 16-row warp tiles cross blocks' ends.
  run_differential<nosa_fp8_d64, float>(ragged_spec(make_config(24, 8, 2, 5, 64), 1311, steps),
                                        "FP8 offload, D 64, blocks of 24, G 4");
  run_differential<nosa_fp8_d64, nosa::bf16>(ragged_spec(make_config(128, 16, 1, 5, 64, 1), 1312, steps),
                                             "FP8 offload, D 64, blocks of 128, G 16, budget 1");
  run_differential<full_fp8, nosa::fp16>(ragged_spec(make_config(32, 12, 2, 5, 64), 1313, steps),
                                         "FP8 full attention with bias, D 64, G 6");
}

TEST_CASE("FP8 sequences that share a prompt prefix share its pages, codes and scales") {
  NOSA_REQUIRE_GPU();
  nosa_cuda_test::run_shared_prefix<nosa_fp8_d64>(1321);
}

TEST_CASE_TEMPLATE(
    "blocks of zeros, of tiny values, with subnormal codes and of large values quantise as on the host", P,
    nosa_fp8<nosa::bf16>, infllm_fp8_resident<nosa::fp16>) {
  NOSA_REQUIRE_GPU();
  nosa::layer_config cfg = make_config(32, 8, 2, 3, 0);
  const int bs = cfg.selection.block_size;
  const int steps = scaled(3 * bs, 2 * bs);
  cfg.limits.max_blocks_per_sequence = (6 * bs + steps) / bs + 2;
  cfg.limits.pool_pages = 3 * cfg.limits.max_blocks_per_sequence;
  nosa_cuda_test::stream st;
  nosa_cuda_test::twin<P> t(cfg, st);
  t.context = "extreme blocks: ";
  random_source rng(1331);
  const auto first = extreme_prompt<P>(rng, cfg, 5 * bs + 11), second = extreme_prompt<P>(rng, cfg, 4 * bs);
  // Values up to ~4,000 that cancel: the outputs' tolerance grows with them (`value_rtol`).
  for (const auto* p : {&first, &second}) {
    for (const auto v : p->v) t.value_bound = std::max(t.value_bound, std::abs(double(nosa::to_float(v))));
  }
  REQUIRE(t.admit(0, first) == status::success);
  REQUIRE(t.admit(1, second) == status::success);  // no partial tail
  // Sequence 1 decodes block 4 in zeros: a block of zeros completed by a step.
  decode(t, rng, steps, 4);
}

TEST_CASE_TEMPLATE("a step captured once with the FP8 KV cache and replayed decodes like the host backend", P,
                   nosa_fp8<nosa::bf16>, infllm_fp8_resident<nosa::fp16>) {
  NOSA_REQUIRE_GPU();
  nosa_cuda_test::replay_captured_step<P>(scaled(1000, 100), false, "FP8 graph replay: ");
}

TEST_CASE("an FP8 step with a bad row is rejected whole: no block is quantised, nothing changes") {
  NOSA_REQUIRE_GPU();
  using P = nosa_fp8<nosa::bf16>;
  nosa::layer_config cfg = make_config(16, 4, 2, 4, 400);
  cfg.selection.window = 8;
  cfg.selection.stride = 4;
  cfg.limits.pool_pages = 30;
  nosa_cuda_test::stream st;
  random_source rng(1341);
  nosa_cuda_test::twin<P> t(cfg, st);
  t.context = "FP8 bad input: ";
  REQUIRE(t.admit(0, random_prompt<P>(rng, cfg, 31, true)) == status::success);  // token 31 ends block 1
  REQUIRE(t.admit(1, random_prompt<P>(rng, cfg, 14, false)) == status::success);
  REQUIRE(t.step<float>(random_batch<P>(rng, cfg, {0, 1})) == status::success);  // block 1 of 0 quantised
  // Sequence 1's token completes its block 0, but sequence 0 starts block 2, which no plan call reserved:
  // the whole step is rejected and the block is not quantised (the twin compares every byte).
  REQUIRE(t.step<float>(random_batch<P>(rng, cfg, {1, 0}), status::not_reserved) == status::not_reserved);
  REQUIRE(t.step<float>(random_batch<P>(rng, cfg, {1, 1}), status::duplicate_sequence) ==
          status::duplicate_sequence);
  REQUIRE(t.step<float>(random_batch<P>(rng, cfg, {1, 3}), status::unknown_sequence) ==
          status::unknown_sequence);
  REQUIRE(t.reserve(0, 1) == status::success);
  REQUIRE(t.step<float>(random_batch<P>(rng, cfg, {1, 0})) == status::success);
  decode(t, rng, scaled(40, 4), -1);
}
