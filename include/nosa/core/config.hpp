#pragma once
/// \file
/// Execution-space annotations. Core headers must compile with a plain host compiler, so the CUDA
/// qualifiers collapse to nothing outside nvcc; the same function bodies then serve both backends.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NOSA_HOST_DEVICE __host__ __device__
#define NOSA_DEVICE __device__
#else
#define NOSA_HOST_DEVICE
#define NOSA_DEVICE
#endif

/// Marks a function that both backends call and that must be inlined into kernels.
#define NOSA_INLINE NOSA_HOST_DEVICE inline
