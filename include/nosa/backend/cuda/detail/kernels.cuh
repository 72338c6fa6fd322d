#pragma once
/// \file
/// Every kernel of the CUDA backend, one header per stage of a step (in launch order), plus the kernels of
/// the plan calls. `common.cuh` says what they share.

#include <nosa/backend/cuda/detail/common.cuh>

#include <nosa/backend/cuda/detail/begin.cuh>
#include <nosa/backend/cuda/detail/append.cuh>
#include <nosa/backend/cuda/detail/scoring.cuh>
#include <nosa/backend/cuda/detail/select.cuh>
#include <nosa/backend/cuda/detail/gather.cuh>
#include <nosa/backend/cuda/detail/attention.cuh>
#include <nosa/backend/cuda/detail/attention_tma.cuh>
#include <nosa/backend/cuda/detail/plan.cuh>
#include <nosa/backend/cuda/detail/prefill.cuh>

// A quantized KV format (FP8): the quantisation, the gather of codes and the attention over them.
#include <nosa/backend/cuda/detail/attention_fp8.cuh>
#include <nosa/backend/cuda/detail/fp8_store.cuh>
