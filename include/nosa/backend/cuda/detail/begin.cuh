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

/// Checks every batch row against the state as the host backend does, row `b` appending `tokens(b)` tokens:
/// unknown, duplicate, full, unreserved (a block the row's tokens reach has no page); the first row in batch
/// order with an error decides. Returns that status's code, 0 on success, to every thread. Called by every
/// thread of one CTA.
template <class E, int D, class Tokens>
__device__ int check_batch_rows(const cuda_state<E, D>& s, sequence_source seqs, int batch, Tokens tokens) {
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
      const long long t = s.lengths[seq], n = tokens(b);
      if (t < 0 || t + n > s.max_tokens) {
        e = status::sequence_full;
      } else if (n > 0) {
        for (long long m = t / s.sel.block_size; m <= (t + n - 1) / s.sel.block_size; ++m) {
          if (s.table(seq)[m] < 0) {
            e = status::not_reserved;
            break;
          }
        }
      }
    }
    if (e != status::success) atomicMin(&first_error, b * 64 + static_cast<int>(e));
  }
  __syncthreads();
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int seq = seqs(b);
    if (seq >= 0 && seq < s.sequences) s.batch_mark[seq] = 0;
  }
  return first_error == INT_MAX ? 0 : first_error % 64;
}

/// Checks every batch row of a step (`check_batch_rows`, one token each), publishes the status and, on
/// success, opens the step's counters. One CTA; launched, like the step's other kernels, as a dependent
/// launch where the device has them, so that it is scheduled while the work before the step drains.
template <class E, int D>
__global__ void begin_step_kernel(cuda_state<E, D> s, sequence_source seqs, int batch) {
  dependent_launch_wait();
  const int code = check_batch_rows(s, seqs, batch, [](int) { return 1; });
  if (threadIdx.x == 0) {
    *s.status = code;
    if (code == 0) {
      *s.last_step = counters{1, 0, 0, 0, 0};
      s.totals->steps += 1;
    }
  }
}

}  // namespace nosa::detail
