// cuda_device::probe for nosa-engine: whether the CUDA backend can run on this machine.
#include "../../common/cuda_device.cuh"
