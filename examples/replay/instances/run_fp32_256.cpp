// The 12 pipelines of nosa-replay with fp32 storage and head dimension 256 (3 bias modes x 2 variants x
// 2 stores).
#include "../run_replay_impl.hpp"

namespace replay {
template replay_status run_replay<float, 256>(const options&, const replay_inputs&, replay_outputs&);
}  // namespace replay
