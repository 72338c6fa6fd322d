// The 16 pipelines of nosa-replay with fp16 storage and head dimension 256: 2 variants x 2 stores, with
// complete blocks in fp16 under each of the 3 bias modes, or in FP8 under the variant's standard bias.
#include "../run_replay_impl.hpp"

namespace replay {
template replay_status run_replay<nosa::fp16, 256>(const options&, const replay_inputs&, replay_outputs&);
}  // namespace replay
