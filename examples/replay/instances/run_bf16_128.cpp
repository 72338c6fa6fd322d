// The 12 pipelines of nosa-replay with bf16 storage and head dimension 128 (3 bias modes x 2 variants x
// 2 stores).
#include "../run_replay_impl.hpp"

namespace replay {
template replay_status run_replay<nosa::bf16, 128>(const options&, const replay_inputs&, replay_outputs&);
}  // namespace replay
