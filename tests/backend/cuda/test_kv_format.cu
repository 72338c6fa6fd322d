// Quantized KV formats on the CUDA backend. Its kernels read and write complete blocks in the element type
// only, so until FP8 kernels exist an FP8 pipeline must still compile for the CUDA backend (every member of
// the layer and the step's kernels) and refuse with `not_supported` at `required_bytes` and `create`,
// before it touches a device. Runs without a GPU.
#include <nosa/cuda.cuh>

#include <doctest/doctest.h>

#include <cstddef>
#include <span>

namespace {

using fp8_offload = nosa::nosa_pipeline<nosa::bf16, 128, nosa::fp8_offload_store>;
using fp8_resident = nosa::infllmv2_pipeline<nosa::fp16, 64, nosa::fp8_resident_store>;
using offload_layer = nosa::decode_layer<fp8_offload, nosa::cuda_backend>;
using resident_layer = nosa::decode_layer<fp8_resident, nosa::cuda_backend>;

// The step with fp32 output, so that its kernels are compiled for the FP8 pipeline too.
[[maybe_unused]] constexpr auto fp8_step =
    static_cast<nosa::status (offload_layer::*)(const nosa::step_args<nosa::bf16, float>&, cudaStream_t) noexcept>(
        &offload_layer::step<float>);

}  // namespace

// Every non-template member of an FP8 CUDA layer compiles.
template class nosa::decode_layer<fp8_offload, nosa::cuda_backend>;

TEST_CASE("FP8 pipelines compile for the CUDA backend and are not supported there yet") {
  nosa::layer_config config;
  config.num_q_heads = 8;
  config.num_kv_heads = 2;
  config.limits = {2, 16, 32};
  nosa::arena_sizes sizes{1, 1};
  CHECK(offload_layer::required_bytes(config, sizes) == nosa::status::not_supported);
  CHECK(resident_layer::required_bytes(config, sizes) == nosa::status::not_supported);
  CHECK((sizes.device == 1 && sizes.host == 1));  // left untouched
  offload_layer layer;
  CHECK(offload_layer::create(config, std::span<std::byte>{}, std::span<std::byte>{}, layer) ==
        nosa::status::not_supported);
  // A configuration that is invalid anyway reports that first, as every pipeline does.
  config.num_kv_heads = 3;
  CHECK(offload_layer::required_bytes(config, sizes) == nosa::status::invalid_argument);
  // The same pipelines in the element type are supported.
  config.num_kv_heads = 2;
  using bf16_layer = nosa::decode_layer<nosa::nosa_pipeline<nosa::bf16, 128>, nosa::cuda_backend>;
  CHECK(bf16_layer::required_bytes(config, sizes) == nosa::status::success);
}
