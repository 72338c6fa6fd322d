#pragma once
/// \file
/// Geometry of the compression windows (spec §3–§4): which windows exist, which window a token completes,
/// and which windows overlap a block. Shared by the scorers of every backend.

#include <nosa/core/config.hpp>
#include <nosa/core/params.hpp>

namespace nosa {

/// Number of complete compression windows in a sequence of `length` tokens: N_c(L).
NOSA_INLINE constexpr int window_count(int length, const selection_params& p) noexcept {
  return length >= p.window ? (length - p.window) / p.stride + 1 : 0;
}

/// Index of the window completed by the token at position `t`, or -1 if that token completes none.
NOSA_INLINE constexpr int window_completed_at(int t, const selection_params& p) noexcept {
  const int end = t + 1 - p.window;
  return (end >= 0 && end % p.stride == 0) ? end / p.stride : -1;
}

/// Number of blocks of a sequence of `length` tokens: M = ceil(L / b_s).
NOSA_INLINE constexpr int block_count(int length, const selection_params& p) noexcept {
  return (length + p.block_size - 1) / p.block_size;
}

/// Half-open range `[first, last)` of windows that overlap a block. A window w covers tokens
/// `[w*s_c, w*s_c + l_c)`; it overlaps block m when the two token ranges intersect.
struct window_range {
  int first;
  int last;
};

/// Windows overlapping block `m`, clipped to the `n_windows` windows that exist.
NOSA_INLINE constexpr window_range windows_overlapping_block(int m, int n_windows, const selection_params& p) noexcept {
  // w*s_c + l_c > m*b_s  <=>  w > (m*b_s - l_c) / s_c  (floor division, the numerator may be negative)
  const int num = m * p.block_size - p.window;
  const int floor_div = num >= 0 ? num / p.stride : -((-num + p.stride - 1) / p.stride);
  int first = floor_div + 1;
  if (first < 0) first = 0;
  // w*s_c < (m+1)*b_s  <=>  w <= ((m+1)*b_s - 1) / s_c
  int last = ((m + 1) * p.block_size - 1) / p.stride + 1;
  if (last > n_windows) last = n_windows;
  if (last < first) last = first;
  return {first, last};
}

/// True when block `m` of a sequence whose current block is `current` is always selected: a sink
/// (`m < n_init`), a local block or the current block itself (`m >= current - n_local`).
NOSA_INLINE constexpr bool is_forced_block(int m, int current, const selection_params& p) noexcept {
  return m < p.n_init || m >= current - p.n_local;
}

/// Number of forced blocks among the `n_blocks` blocks of a sequence.
NOSA_INLINE constexpr int forced_block_count(int n_blocks, const selection_params& p) noexcept {
  if (n_blocks <= 0) return 0;
  const int current = n_blocks - 1;
  int local_first = current - p.n_local;
  if (local_first < 0) local_first = 0;
  const int sinks = p.n_init < n_blocks ? p.n_init : n_blocks;
  const int overlap = sinks > local_first ? sinks - local_first : 0;
  return sinks + (n_blocks - local_first) - overlap;
}

}  // namespace nosa
