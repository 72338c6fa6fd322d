// The attention methods of the CUDA engine at head dim 64 (one source per head dim, so the pipelines'
// kernels compile in parallel).
#include "stack.cuh"

namespace nosa_engine {
template nosa::status make_cuda_stack_for<64>(method, const nosa::layer_config&, int,
                                              std::unique_ptr<cuda_stack>*, nosa::arena_sizes*);
}  // namespace nosa_engine
