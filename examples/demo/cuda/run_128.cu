// nosa-demo on the CUDA backend, head dimension 128: fp32 and bf16 storage, NOSA and InfLLMv2 each.
#include "runner.cuh"

namespace demo {
template run_error run_demo_cuda<float, 128>(const options&);
template run_error run_demo_cuda<nosa::bf16, 128>(const options&);
}  // namespace demo
