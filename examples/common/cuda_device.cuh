#pragma once
/// \file
/// Definition of `cuda_device::probe` (declared in `cuda_device.hpp`). Include from exactly one CUDA source
/// of a program: the probe kernel below is compiled for the same architectures as the program's own
/// kernels, so asking for its attributes tells whether they can run on the device.

#include "cuda_device.hpp"

#include <cuda_runtime.h>

#include <string>

namespace cuda_device {

namespace detail {
__global__ void probe_kernel() {}

inline std::string capability(const cudaDeviceProp& prop) {
  return std::to_string(prop.major) + "." + std::to_string(prop.minor);
}
}  // namespace detail

probe_result probe() {
  int count = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    cudaGetLastError();
    return {false, std::string("no usable CUDA device (") + cudaGetErrorString(e) + ")"};
  }
  if (count == 0) return {false, "no CUDA device"};
  int device = 0;
  cudaDeviceProp prop{};
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    cudaGetLastError();
    return {false, std::string("no usable CUDA device (") + cudaGetErrorString(e) + ")"};
  }
  if (const cudaError_t e = cudaGetDeviceProperties(&prop, device); e != cudaSuccess) {
    cudaGetLastError();
    return {false, std::string("cannot query CUDA device ") + std::to_string(device) + " (" +
                       cudaGetErrorString(e) + ")"};
  }
  const std::string name = std::string(prop.name) + " (compute capability " + detail::capability(prop) + ")";
  cudaFuncAttributes attributes{};
  if (const cudaError_t e = cudaFuncGetAttributes(&attributes, detail::probe_kernel); e != cudaSuccess) {
    cudaGetLastError();
    return {false,
            name + " cannot run this build's kernels (" + cudaGetErrorString(e) +
                "); rebuild with NOSA_CUDA_ARCHITECTURES=" + std::to_string(prop.major * 10 + prop.minor)};
  }
  return {true, name};
}

}  // namespace cuda_device
