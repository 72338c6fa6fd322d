// The 16 pipelines of nosa-replay with fp32 storage and head dimension 64: 2 variants x 2 stores, with
// complete blocks in fp32 under each of the 3 bias modes, or in FP8 under the variant's standard bias.
#include "../run_replay_impl.hpp"

namespace replay {
template replay_status run_replay<float, 64>(const options&, const replay_inputs&, replay_outputs&);
}  // namespace replay
