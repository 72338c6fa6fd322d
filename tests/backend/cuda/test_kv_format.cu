// Quantized KV formats on the CUDA backend, without a GPU: FP8 pipelines whose shapes the FP8 kernels cover
// (bf16 or fp16 storage, D 64 or 128) size their arenas as the shared state layout says; the others (fp32
// storage, D 256) still compile, and refuse with `not_supported` at `required_bytes` and `create`, before
// touching a device. test_fp8_cuda.cu runs the FP8 kernels against the host backend.
#include <nosa/cuda.cuh>

#include <doctest/doctest.h>

#include <cstddef>
#include <span>

namespace {

using fp8_offload = nosa::nosa_pipeline<nosa::bf16, 128, nosa::fp8_offload_store>;
using fp8_fp32 = nosa::nosa_pipeline<float, 128, nosa::fp8_offload_store>;
using fp8_d256 = nosa::infllmv2_pipeline<nosa::fp16, 256, nosa::fp8_resident_store>;
using offload_layer = nosa::decode_layer<fp8_offload, nosa::cuda_backend>;
using fp32_layer = nosa::decode_layer<fp8_fp32, nosa::cuda_backend>;
using d256_layer = nosa::decode_layer<fp8_d256, nosa::cuda_backend>;

// The step with fp32 output, so that its kernels are compiled for an unsupported FP8 pipeline too.
[[maybe_unused]] constexpr auto fp8_step =
    static_cast<nosa::status (fp32_layer::*)(const nosa::step_args<float, float>&, cudaStream_t) noexcept>(
        &fp32_layer::step<float>);

}  // namespace

// Every non-template member of an FP8 CUDA layer compiles, supported or not.
template class nosa::decode_layer<fp8_offload, nosa::cuda_backend>;
template class nosa::decode_layer<fp8_d256, nosa::cuda_backend>;

TEST_CASE(
    "FP8 pipelines size their arenas by the shared layout, or are refused where the kernels do not go") {
  nosa::layer_config config;
  config.num_q_heads = 8;
  config.num_kv_heads = 2;
  config.limits = {2, 16, 32};
  nosa::arena_sizes sizes{1, 1};
  REQUIRE(offload_layer::required_bytes(config, sizes) == nosa::status::success);
  const nosa::state_layout l = nosa::make_state_layout<fp8_offload>(config);
  CHECK(sizes.device == l.device_bytes);
  CHECK(sizes.host == l.host_bytes);
  CHECK(l.block_bytes() == std::size_t(config.selection.block_size) * 128 + 4);

  sizes = {1, 1};
  CHECK(fp32_layer::required_bytes(config, sizes) == nosa::status::not_supported);
  CHECK(d256_layer::required_bytes(config, sizes) == nosa::status::not_supported);
  CHECK((sizes.device == 1 && sizes.host == 1));  // left untouched
  fp32_layer layer;
  CHECK(fp32_layer::create(config, std::span<std::byte>{}, std::span<std::byte>{}, layer) ==
        nosa::status::not_supported);
  // A configuration that is invalid anyway reports that first, as every pipeline does.
  config.num_kv_heads = 3;
  CHECK(fp32_layer::required_bytes(config, sizes) == nosa::status::invalid_argument);
  CHECK(offload_layer::required_bytes(config, sizes) == nosa::status::invalid_argument);
}
