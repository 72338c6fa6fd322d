#pragma once
/// \file
/// Whether this process can run nosa's CUDA backend: a CUDA device is present and this build's kernels run
/// on it. Plain C++, so that host translation units can ask; the definition is in `cuda_device.cuh`, which
/// exactly one CUDA source of each program includes.

#include <string>

namespace cuda_device {

/// Outcome of `probe`.
struct probe_result {
  bool usable = false;
  /// The current device, e.g. "NVIDIA H200 (compute capability 9.0)", or why there is none to use, as one
  /// line without a trailing period.
  std::string description;
};

/// Checks the current CUDA device: present, and able to run the kernels this program was compiled for.
probe_result probe();

}  // namespace cuda_device
