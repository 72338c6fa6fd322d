// cuda_device::probe for nosa-replay: whether --backend cuda can run on this machine.
#include "../../common/cuda_device.cuh"
