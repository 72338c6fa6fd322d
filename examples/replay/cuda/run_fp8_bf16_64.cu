// The 4 CUDA pipelines of nosa-replay with bf16 storage, head dimension 64 and complete blocks in FP8
// (2 variants x 2 stores; nosa with the after_scale bias, infllmv2 without bias).
#include "run_replay_cuda.cuh"

namespace replay {
template replay_status
run_replay_cuda<nosa::bf16, 64, kv_format_kind::fp8>(const options&, const replay_inputs&, replay_outputs&);
}  // namespace replay
