#pragma once
/// \file
/// `make_cuda_layer_for<E, D>`: the CUDA pipeline of storage type `E` and head dim `D` that a spec chooses.
/// Each generated CUDA source instantiates it for one (E, D).

#include "cuda_glue.cuh"
#include "layer_impl.hpp"
#include "pipelines.hpp"

#include <nosa/cuda.cuh>

#include <memory>

namespace nosa_python {

template <nosa::storage_element E, int D>
problem make_cuda_layer_for(const layer_spec& spec, std::unique_ptr<layer_base>& out) {
  return make_matching(cuda_pipelines<E, D>{}, spec, "CUDA",
                       [&]<class P>() { return layer_impl<P, nosa::cuda_backend>::create(spec, out); });
}

}  // namespace nosa_python
