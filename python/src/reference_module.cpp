// The extension module nosa._reference: the independent double-precision reference of tests/reference/
// (written from the specification, sharing no code with include/nosa), for the Python tests. It works on one
// (sequence, KV head) at a time: its token `History`, the selection of a step (`select`, with the blocks
// resident before the step for the budget rule) and dense attention over chosen blocks (`attend`).
#include "reference/nosa_reference.hpp"
#include "reference/selection_compare.hpp"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using rows = nb::ndarray<const double, nb::c_contig, nb::device::cpu>;

nosa_ref::bias_mode parse_bias(const std::string& s) {
  if (s == "after_scale") return nosa_ref::bias_mode::after_scale;
  if (s == "before_scale") return nosa_ref::bias_mode::before_scale;
  if (s == "none") return nosa_ref::bias_mode::none;
  throw std::invalid_argument("bias '" + s + "' is not one of after_scale, before_scale, none");
}

nosa_ref::key_storage parse_keys(const std::string& s) {
  if (s == "exact") return nosa_ref::key_storage::exact;
  if (s == "fp32") return nosa_ref::key_storage::fp32;
  if (s == "bf16") return nosa_ref::key_storage::bf16;
  if (s == "fp16") return nosa_ref::key_storage::fp16;
  throw std::invalid_argument("compressed_keys '" + s + "' is not one of exact, fp32, bf16, fp16");
}

/// Checks that `a` holds `count` rows of `width` values.
const double* rows_of(const rows& a, std::size_t count, std::size_t width, const char* name) {
  if (a.size() != count * width) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(count * width) +
                                " values, got " + std::to_string(a.size()));
  }
  return a.data();
}

nb::ndarray<nb::numpy, double> to_numpy(std::vector<double> v, std::size_t rows_, std::size_t cols) {
  auto* data = new std::vector<double>(std::move(v));
  nb::capsule owner(data, [](void* p) noexcept { delete static_cast<std::vector<double>*>(p); });
  const std::size_t shape[2] = {rows_, cols};
  return nb::ndarray<nb::numpy, double>(data->data(), 2, shape, owner);
}

}  // namespace

NB_MODULE(_reference, m) {
  m.doc() = "The independent double-precision reference of nosa (tests/reference/), for tests.";
  // Layers that are still referenced when the interpreter exits (say, from a framework's global registry of
  // attention functions) are not leaks of the binding, and the package prints nothing of its own.
  nb::set_leak_warnings(false);

  nb::class_<nosa_ref::config>(m, "Config")
      .def(
          "__init__",
          [](nosa_ref::config* c, int block, int window, int stride, int topk, int topk_qa, int n_init,
             int n_local, int budget, bool query_agnostic, const std::string& bias, int head_dim, int group,
             const std::string& compressed_keys) {
            new (c) nosa_ref::config();
            c->block = block;
            c->window = window;
            c->stride = stride;
            c->topk = topk;
            c->topk_qa = topk_qa;
            c->n_init = n_init;
            c->n_local = n_local;
            c->budget = budget;
            c->query_agnostic = query_agnostic;
            c->bias = parse_bias(bias);
            c->head_dim = head_dim;
            c->group = group;
            c->compressed_keys = parse_keys(compressed_keys);
            nosa_ref::validate(*c);
          },
          nb::kw_only(), "block"_a, "window"_a, "stride"_a, "topk"_a, "topk_qa"_a, "n_init"_a, "n_local"_a,
          "budget"_a, "query_agnostic"_a, "bias"_a, "head_dim"_a, "group"_a, "compressed_keys"_a)
      .def_ro("block", &nosa_ref::config::block)
      .def_ro("window", &nosa_ref::config::window)
      .def_ro("stride", &nosa_ref::config::stride)
      .def_ro("topk", &nosa_ref::config::topk)
      .def_ro("topk_qa", &nosa_ref::config::topk_qa)
      .def_ro("n_init", &nosa_ref::config::n_init)
      .def_ro("n_local", &nosa_ref::config::n_local)
      .def_ro("budget", &nosa_ref::config::budget)
      .def_ro("head_dim", &nosa_ref::config::head_dim)
      .def_ro("group", &nosa_ref::config::group);

  nb::class_<nosa_ref::selection>(m, "Selection")
      .def_ro("ranked", &nosa_ref::selection::ranked)
      .def_ro("ascending", &nosa_ref::selection::ascending)
      .def_ro("forced_count", &nosa_ref::selection::forced_count)
      .def(
          "compare",
          [](const nosa_ref::selection& ref, const std::vector<int>& got_ascending) {
            const nosa_ref::compare_result r = nosa_ref::compare_selection(got_ascending, ref);
            return std::make_tuple(r.equal, r.equivalent_up_to_near_ties, r.message);
          },
          "got_ascending"_a,
          "(equal, equivalent up to fp32 near-ties, message) of the library's ascending selection against "
          "this one");

  nb::class_<nosa_ref::history>(m, "History", "The token history of one (sequence, KV head).")
      .def(nb::init<const nosa_ref::config&>(), "config"_a)
      .def(
          "append",
          [](nosa_ref::history& h, const rows& k, const rows& v, const rows& c) {
            const std::size_t n = c.size();
            const std::size_t d = static_cast<std::size_t>(h.head_dim());
            h.append(rows_of(k, n, d, "k"), rows_of(v, n, d, "v"), rows_of(c, n, 1, "c"),
                     static_cast<int>(n));
          },
          "k"_a, "v"_a, "c"_a, "Appends tokens: k, v [n, D], c [n].")
      .def_prop_ro("length", &nosa_ref::history::length);

  m.def(
      "select",
      [](const nosa_ref::config& cfg, const nosa_ref::history& h, std::optional<rows> q,
         std::optional<std::vector<int>> resident) {
        const std::size_t g = static_cast<std::size_t>(cfg.group), d = static_cast<std::size_t>(cfg.head_dim);
        const double* qp = q ? rows_of(*q, g, d, "q") : nullptr;
        return nosa_ref::select(cfg, nosa_ref::scores(cfg, h, qp, q.has_value()),
                                resident ? &*resident : nullptr, q.has_value());
      },
      "config"_a, "history"_a, "q"_a.none(), "resident"_a.none(),
      "The selection after the last token of `history` for the queries q [G, D] (None at admission), with "
      "the "
      "budget rule over `resident` (the blocks resident before the step's loads; None: no budget rule).");
  m.def(
      "attend",
      [](const nosa_ref::config& cfg, const nosa_ref::history& h, const rows& q,
         const std::vector<int>& blocks) {
        const std::size_t g = static_cast<std::size_t>(cfg.group), d = static_cast<std::size_t>(cfg.head_dim);
        std::vector<double> o(g * d);
        nosa_ref::attend(cfg, h, rows_of(q, g, d, "q"), blocks, h.length(), o.data());
        return to_numpy(std::move(o), g, d);
      },
      "config"_a, "history"_a, "q"_a, "blocks"_a,
      "Dense attention of q [G, D] over exactly the tokens of `blocks` (spec section 5); o [G, D].");
  m.def(
      "block_count",
      [](int length, const nosa_ref::config& cfg) { return nosa_ref::block_count(length, cfg); }, "length"_a,
      "config"_a);
}
