// The extension module nosa._core: the layer object, its factory and what this build contains. Arrays come
// in through DLPack (or the buffer protocol) as nb::ndarray and cross into the library as descriptions;
// nothing is copied. Every failure raises nosa.Error (a ValueError) naming the status.
#include "layer.hpp"
#include "pipelines.hpp"

#include <nosa/version.hpp>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace nb = nanobind;
using namespace nb::literals;

namespace nosa_python {
namespace {

/// Raises nosa.Error(status, "call: status: detail"). The class lives in nosa/_errors.py, so every module
/// of the package raises the same one.
[[noreturn]] void raise(std::string_view call, const problem& p) {
  const std::string name(status_name(p.status));
  const std::string message = std::string(call) + ": " + name + ": " +
                              (p.detail.empty() ? std::string(nosa::to_string(p.status)) : p.detail);
  nb::object error = nb::module_::import_("nosa._errors").attr("Error");
  nb::object instance = error(name, message);
  PyErr_SetObject(error.ptr(), instance.ptr());
  throw nb::python_error();
}

void check(std::string_view call, const problem& p) {
  if (p.failed()) raise(call, p);
}

element_kind element_of(nb::dlpack::dtype t) {
  using code = nb::dlpack::dtype_code;
  if (t.lanes != 1) return element_kind::other;
  if (t.code == static_cast<std::uint8_t>(code::Float) && t.bits == 32) return element_kind::f32;
  if (t.code == static_cast<std::uint8_t>(code::Float) && t.bits == 16) return element_kind::f16;
  if (t.code == static_cast<std::uint8_t>(code::Bfloat) && t.bits == 16) return element_kind::bf16;
  if (t.code == static_cast<std::uint8_t>(code::Int) && t.bits == 32) return element_kind::i32;
  return element_kind::other;
}

std::string dtype_name(nb::dlpack::dtype t) {
  using code = nb::dlpack::dtype_code;
  std::string prefix = "dtype code " + std::to_string(t.code) + " of ";
  switch (static_cast<code>(t.code)) {
    case code::Int: prefix = "int"; break;
    case code::UInt: prefix = "uint"; break;
    case code::Float: prefix = "float"; break;
    case code::Bfloat: prefix = "bfloat"; break;
    case code::Complex: prefix = "complex"; break;
    case code::Bool: prefix = "bool"; break;
    default: break;
  }
  std::string name = prefix;
  name += std::to_string(t.bits);
  if (t.lanes != 1) {
    name += 'x';
    name += std::to_string(t.lanes);
  }
  return name;
}

memory_kind memory_of(int device_type) {
  switch (device_type) {
    case nb::device::cpu::value: return memory_kind::cpu;
    case nb::device::cuda::value: return memory_kind::cuda;
    case nb::device::cuda_host::value: return memory_kind::cuda_host;
    case nb::device::cuda_managed::value: return memory_kind::cuda_managed;
    default: return memory_kind::other;
  }
}

/// A caller array for the length of one call: the imported ndarray (which keeps the source alive) and its
/// description. `None` is an absent optional argument.
struct caller_array {
  std::optional<nb::ndarray<nb::ro>> input;
  std::optional<nb::ndarray<>> output;
  array_ref ref;
};

/// `str(h)` as UTF-8.
std::string text_of(nb::handle h) {
  const nb::str s(h);
  const char* c = s.c_str();
  if (c == nullptr) {
    PyErr_Clear();
    return "?";
  }
  return c;
}

/// NumPy has no bfloat16 of its own: arrays of ml_dtypes' `bfloat16` (the type JAX and others use) can be
/// exported neither through DLPack nor the buffer protocol. For such an array this is a view of the same
/// memory as uint16 bit patterns, which the caller then reads as bfloat16; for anything else, no object.
nb::object bfloat16_bits(nb::handle h) {
  if (!nb::hasattr(h, "dtype") || !nb::hasattr(h, "view")) return {};
  try {
    const nb::object dtype = h.attr("dtype");
    if (!nb::hasattr(dtype, "name") || !nb::hasattr(dtype, "itemsize")) return {};
    if (text_of(nb::object(dtype.attr("name"))) != "bfloat16" ||
        text_of(nb::object(dtype.attr("itemsize"))) != "2") {
      return {};
    }
    return h.attr("view")("uint16");
  } catch (const nb::python_error&) {
    return {};
  }
}

/// Why `h` cannot be imported as an array.
std::string unimportable(std::string_view name, nb::handle h) {
  std::string s(name);
  if (nb::hasattr(h, "dtype")) {
    return s + " (" + text_of(nb::type_name(h.type())) + " of dtype " + text_of(nb::object(h.attr("dtype"))) +
           ") cannot be exported through DLPack or the buffer protocol";
  }
  return s + " is not an array (DLPack or the buffer protocol): got " + text_of(nb::type_name(h.type()));
}

/// Imports `h` without conversion (nb::ndarray<> has no dtype or order to convert to), as a read-only input
/// or as a writable output.
caller_array import_array(std::string_view call, std::string_view name, nb::handle h, bool writable) {
  caller_array a;
  if (h.is_none()) return a;
  const auto describe = [&](const auto& nd) {
    a.ref.present = true;
    a.ref.data = const_cast<void*>(static_cast<const void*>(nd.data()));
    a.ref.element = element_of(nd.dtype());
    a.ref.dtype_name = dtype_name(nd.dtype());
    a.ref.rank = static_cast<int>(nd.ndim());
    a.ref.memory = memory_of(nd.device_type());
    a.ref.device_id = nd.device_id();
    if (a.ref.rank > max_rank) return;
    for (int d = 0; d < a.ref.rank; ++d) {
      a.ref.shape[d] = static_cast<std::int64_t>(nd.shape(static_cast<std::size_t>(d)));
      a.ref.strides[d] = nd.stride(static_cast<std::size_t>(d));
    }
  };
  if (writable) {
    nb::ndarray<> nd;
    if (nb::try_cast(h, nd, /*convert=*/false)) {
      describe(nd);
      a.output = std::move(nd);
    } else {
      nb::ndarray<nb::ro> readonly;
      const bool is_array = nb::try_cast(h, readonly, false);
      raise(call, fail(nosa::status::invalid_argument,
                       is_array ? std::string(name) + " is read-only; the output must be writable"
                                : unimportable(name, h)));
    }
  } else {
    nb::ndarray<nb::ro> nd;
    if (nb::try_cast(h, nd, /*convert=*/false)) {
      describe(nd);
    } else if (nb::object bits = bfloat16_bits(h); bits.is_valid() && nb::try_cast(bits, nd, false)) {
      describe(nd);
      a.ref.element = element_kind::bf16;
      a.ref.dtype_name = "bfloat16";
    } else {
      raise(call, fail(nosa::status::invalid_argument, unimportable(name, h)));
    }
    a.input = std::move(nd);
  }
  if (a.ref.rank > max_rank) {
    raise(call, fail(nosa::status::shape_mismatch, std::string(name) + " has " + std::to_string(a.ref.rank) +
                                                       " dimensions; at most " + std::to_string(max_rank) +
                                                       " are ever expected"));
  }
  return a;
}

/// A new NumPy int32 array of the given shape, filled by `fill` (called without the GIL).
template <class Fill>
nb::ndarray<nb::numpy, std::int32_t> int32_array(std::string_view call, std::size_t rows, std::size_t cols,
                                                 int rank, Fill&& fill) {
  const std::size_t n = rows * cols;
  auto* data = new std::int32_t[n > 0 ? n : 1];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<std::int32_t*>(p); });
  problem p;
  {
    nb::gil_scoped_release release;
    p = fill(data);
  }
  check(call, p);
  const std::size_t shape[2] = {rows, cols};
  return nb::ndarray<nb::numpy, std::int32_t>(data, static_cast<std::size_t>(rank), shape, owner);
}

template <class E>
E parse(std::string_view what, const std::string& value,
        std::initializer_list<std::pair<std::string_view, E>> names) {
  std::string options;
  for (const auto& [name, e] : names) {
    if (name == value) return e;
    options += (options.empty() ? "" : ", ") + std::string(name);
  }
  raise("DecodeLayer", fail(nosa::status::invalid_argument,
                            std::string(what) + " '" + value + "' is not one of " + options));
}

nb::list describe_choices(const std::vector<pipeline_choice>& list) {
  nb::list out;
  for (const pipeline_choice& c : list) {
    out.append(nb::make_tuple(std::string(to_string(c.variant)), std::string(to_string(c.store)),
                              std::string(bias_name(c.bias))));
  }
  return out;
}

std::unique_ptr<layer_base> create_layer(const std::string& backend, const std::string& variant,
                                         const std::string& store, const std::string& bias,
                                         const std::string& dtype, int head_dim, int num_q_heads,
                                         int num_kv_heads, int block, int window, int stride, int topk,
                                         int topk_qa, int init, int local, int budget, int cache_slots,
                                         int max_sequences, int max_blocks_per_sequence, int pool_pages,
                                         int device) {
  layer_spec spec;
  spec.backend =
      parse<backend_kind>("device", backend, {{"cpu", backend_kind::host}, {"cuda", backend_kind::cuda}});
  spec.variant = parse<variant_kind>(
      "variant", variant,
      {{"nosa", variant_kind::nosa}, {"infllmv2", variant_kind::infllmv2}, {"full", variant_kind::full}});
  spec.store = parse<store_kind>("store", store,
                                 {{"offload", store_kind::offload}, {"resident", store_kind::resident}});
  spec.bias = parse<nosa::bias_mode>("bias", bias,
                                     {{"after_scale", nosa::bias_mode::after_scale},
                                      {"before_scale", nosa::bias_mode::before_scale},
                                      {"none", nosa::bias_mode::none}});
  spec.element = parse<nosa::dtype>(
      "dtype", dtype,
      {{"fp32", nosa::dtype::fp32}, {"bf16", nosa::dtype::bf16}, {"fp16", nosa::dtype::fp16}});
  if (spec.variant == variant_kind::full && spec.store == store_kind::offload) {
    raise("DecodeLayer", fail(nosa::status::invalid_argument,
                              "full attention keeps every block in device memory: use store='resident'"));
  }
  spec.head_dim = head_dim;
  spec.device = device;
  nosa::layer_config& c = spec.config;
  c.num_q_heads = num_q_heads;
  c.num_kv_heads = num_kv_heads;
  c.selection.block_size = block;
  c.selection.window = window;
  c.selection.stride = stride;
  c.selection.top_k = topk;
  c.selection.top_k_query_aware = topk_qa;
  c.selection.n_init = init;
  c.selection.n_local = local;
  c.selection.max_new_blocks = budget;
  c.limits.max_sequences = max_sequences;
  c.limits.max_blocks_per_sequence = max_blocks_per_sequence;
  c.limits.pool_pages = pool_pages;
  c.limits.cache_slots = cache_slots;

  std::unique_ptr<layer_base> layer;
  problem p;
  {
    nb::gil_scoped_release release;
    p = spec.backend == backend_kind::host ? make_host_layer(spec, layer) : make_cuda_layer(spec, layer);
  }
  check("DecodeLayer", p);
  return layer;
}

}  // namespace
}  // namespace nosa_python

NB_MODULE(_core, m) {
  using namespace nosa_python;
  m.doc() = "nosa's extension module; use the nosa package, which wraps it.";
  // Layers that are still referenced when the interpreter exits (say, from a framework's global registry of
  // attention functions) are not leaks of the binding, and the package prints nothing of its own.
  nb::set_leak_warnings(false);

  nb::class_<layer_base>(m, "Layer", "One decode layer of a compiled pipeline (created by nosa.DecodeLayer).")
      .def(
          "add_sequence",
          [](layer_base& l, int seq, nb::handle k, nb::handle v, nb::handle c, nb::handle last_query,
             std::uintptr_t stream) {
            constexpr std::string_view call = "add_sequence";
            const caller_array ka = import_array(call, "k", k, false), va = import_array(call, "v", v, false),
                               ca = import_array(call, "c", c, false),
                               qa = import_array(call, "last_query", last_query, false);
            problem p;
            {
              nb::gil_scoped_release release;
              p = l.add_sequence(seq, ka.ref, va.ref, ca.ref, qa.ref, stream);
            }
            check(call, p);
          },
          "seq"_a, "k"_a.none(), "v"_a.none(), "c"_a.none(), "last_query"_a.none(), "stream"_a)
      .def(
          "remove_sequence",
          [](layer_base& l, int seq, std::uintptr_t stream) {
            problem p;
            {
              nb::gil_scoped_release release;
              p = l.remove_sequence(seq, stream);
            }
            check("remove_sequence", p);
          },
          "seq"_a, "stream"_a)
      .def(
          "reserve",
          [](layer_base& l, int seq, int tokens, std::uintptr_t stream) {
            problem p;
            {
              nb::gil_scoped_release release;
              p = l.reserve(seq, tokens, stream);
            }
            check("reserve", p);
          },
          "seq"_a, "tokens"_a, "stream"_a)
      .def(
          "step",
          [](layer_base& l, nb::handle sequences, nb::handle q, nb::handle k, nb::handle v, nb::handle c,
             nb::handle out, std::uintptr_t stream) {
            constexpr std::string_view call = "step";
            const caller_array sa = import_array(call, "sequences", sequences, false),
                               qa = import_array(call, "q", q, false), ka = import_array(call, "k", k, false),
                               va = import_array(call, "v", v, false), ca = import_array(call, "c", c, false),
                               oa = import_array(call, "out", out, true);
            problem p;
            {
              nb::gil_scoped_release release;
              p = l.step(sa.ref, qa.ref, ka.ref, va.ref, ca.ref, oa.ref, stream);
            }
            check(call, p);
          },
          "sequences"_a.none(), "q"_a.none(), "k"_a.none(), "v"_a.none(), "c"_a.none(), "out"_a.none(),
          "stream"_a)
      .def(
          "step_status",
          [](layer_base& l, std::uintptr_t stream) {
            problem p;
            {
              nb::gil_scoped_release release;
              p = l.step_status(stream);
            }
            check("check_step", p);
          },
          "stream"_a)
      .def(
          "selection",
          [](layer_base& l, int seq, std::uintptr_t stream) {
            const auto kv_heads = static_cast<std::size_t>(l.kv_heads());
            const std::size_t width = static_cast<std::size_t>(l.selection_width());
            return int32_array("selection", kv_heads, width, 2,
                               [&](std::int32_t* out) { return l.selection(seq, out, stream); });
          },
          "seq"_a, "stream"_a)
      .def(
          "step_misses",
          [](layer_base& l, int seq, std::uintptr_t stream) {
            const auto kv_heads = static_cast<std::size_t>(l.kv_heads());
            return int32_array("step_misses", kv_heads, 1, 1,
                               [&](std::int32_t* out) { return l.step_misses(seq, out, stream); });
          },
          "seq"_a, "stream"_a)
      .def(
          "slots",
          [](layer_base& l, int seq, std::uintptr_t stream) {
            const auto kv_heads = static_cast<std::size_t>(l.kv_heads());
            const std::size_t width = static_cast<std::size_t>(l.slot_count());
            return int32_array("slots", kv_heads, width, 2,
                               [&](std::int32_t* out) { return l.slots(seq, out, stream); });
          },
          "seq"_a, "stream"_a)
      .def(
          "counters",
          [](layer_base& l, bool last_step, std::uintptr_t stream) {
            nosa::counters n;
            problem p;
            {
              nb::gil_scoped_release release;
              p = l.counters(last_step, n, stream);
            }
            check("counters", p);
            nb::dict d;
            d["steps"] = n.steps;
            d["hits"] = n.hits;
            d["misses"] = n.misses;
            d["bytes_h2d"] = n.bytes_h2d;
            d["bytes_d2h"] = n.bytes_d2h;
            return d;
          },
          "last_step"_a, "stream"_a)
      .def(
          "length",
          [](layer_base& l, int seq, std::uintptr_t stream) {
            int n = -1;
            problem p;
            {
              nb::gil_scoped_release release;
              p = l.length(seq, n, stream);
            }
            check("length", p);
            return n;
          },
          "seq"_a, "stream"_a)
      .def_prop_ro("free_pages", &layer_base::free_pages);

  m.def("create_layer", &create_layer, "backend"_a, "variant"_a, "store"_a, "bias"_a, "dtype"_a, "head_dim"_a,
        "num_q_heads"_a, "num_kv_heads"_a, "block"_a, "window"_a, "stride"_a, "topk"_a, "topk_qa"_a, "init"_a,
        "local"_a, "budget"_a, "cache_slots"_a, "max_sequences"_a, "max_blocks_per_sequence"_a,
        "pool_pages"_a, "device"_a);
  m.def("cuda_built", &cuda_built, "True when this build contains the CUDA backend.");
  m.def("cuda_device_count", &cuda_device_count,
        "CUDA devices the runtime sees (0 without a GPU or driver).");
  m.def(
      "pipelines",
      [](const std::string& backend) {
        if (backend == "cpu") return describe_choices(choices(host_pipelines<float, 64>{}));
        if (backend == "cuda") {
          return cuda_built() ? describe_choices(choices(cuda_pipelines<float, 64>{})) : nb::list();
        }
        raise("pipelines",
              fail(nosa::status::invalid_argument, "device '" + backend + "' is not one of cpu, cuda"));
      },
      "backend"_a);
  m.attr("dtypes") = nb::make_tuple("fp32", "fp16", "bf16");
  m.attr("head_dims") = nb::make_tuple(64, 128, 256);
  m.attr("library_version") = NOSA_VERSION_STRING;
}
