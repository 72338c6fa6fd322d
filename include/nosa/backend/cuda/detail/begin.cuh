#pragma once
/// \file
/// Step stage 0, the state checks: before any kernel of a step changes state, one CTA checks every batch row
/// against the state as the host backend does, publishes the step's status and opens its counters.

#include <nosa/backend/cuda/detail/common.cuh>
#include <nosa/backend/cuda/detail/state.cuh>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>
#include <nosa/scorer/windows.hpp>

#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>

namespace nosa::detail {

/// Checks every batch row as the host backend does (unknown, duplicate, full, unreserved; the first row in
/// batch order with an error decides the status), publishes the status and, on success, opens the step's
/// counters. One CTA.
template <class E, int D>
__global__ void begin_step_kernel(cuda_state<E, D> s, sequence_source seqs, int batch) {
  __shared__ int first_error;
  if (threadIdx.x == 0) first_error = INT_MAX;
  __syncthreads();
  // Marks hold (batch - first row) of each sequence, so the largest value belongs to the first occurrence.
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    if (seq >= 0 && seq < s.sequences && s.live[seq] != 0) atomicMax(&s.batch_mark[seq], batch - b);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    status e = status::success;
    if (seq < 0 || seq >= s.sequences || s.live[seq] == 0) {
      e = status::unknown_sequence;
    } else if (s.batch_mark[seq] != batch - b) {
      e = status::duplicate_sequence;
    } else {
      const int t = s.lengths[seq];
      if (t < 0 || t + 1 > s.max_tokens) {
        e = status::sequence_full;
      } else if (s.table(seq)[t / s.sel.block_size] < 0) {
        e = status::not_reserved;
      }
    }
    if (e != status::success) atomicMin(&first_error, b * 64 + static_cast<int>(e));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    if (seq >= 0 && seq < s.sequences) s.batch_mark[seq] = 0;
  }
  if (threadIdx.x == 0) {
    const int code = first_error == INT_MAX ? 0 : first_error % 64;
    *s.status = code;
    if (code == 0) {
      *s.last_step = counters{1, 0, 0, 0, 0};
      s.totals->steps += 1;
    }
  }
}

}  // namespace nosa::detail
