#pragma once
/// \file
/// Everything of nosa plus the CUDA backend. Include from CUDA sources (`.cu`) only.

#include <nosa/nosa.hpp>

#include <nosa/backend/cuda/arena.cuh>
#include <nosa/backend/cuda/backend.cuh>
#include <nosa/backend/cuda/decode_layer.cuh>
#include <nosa/backend/cuda/eviction_head.cuh>
