#pragma once
/// \file
/// `make_host_layer_for<E, D>`: the host pipeline of storage type `E` and head dim `D` that a spec chooses.
/// Each generated source instantiates it for one (E, D).

#include "host_glue.hpp"
#include "layer_impl.hpp"
#include "pipelines.hpp"

#include <nosa/nosa.hpp>

#include <memory>

namespace nosa_python {

template <nosa::storage_element E, int D>
problem make_host_layer_for(const layer_spec& spec, std::unique_ptr<layer_base>& out) {
  return make_matching(host_pipelines<E, D>{}, spec, "host",
                       [&]<class P>() { return layer_impl<P, nosa::host_backend>::create(spec, out); });
}

}  // namespace nosa_python
