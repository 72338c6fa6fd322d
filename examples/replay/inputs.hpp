#pragma once
/// \file
/// Loads the input directory of `nosa-replay` and checks every file against the others, so that a bad
/// recording is reported as one line naming the file instead of reaching the library.

#include "run_replay.hpp"

#include "../common/npy.hpp"

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace replay {

/// The loaded `.npy` arrays, kept alive for the views in `view`.
struct loaded_inputs {
  npy::array prompt_k, prompt_v, prompt_c, prompt_len, q, k, v, c, prompt_q;
  replay_inputs view;  ///< dimensions and pointers into the arrays above
};

namespace detail {

/// One named axis (`T`, `B`, `P`, `Hq`, `Hkv`, `D`): its value and the file that first gave it.
struct axis {
  std::string_view name;
  std::int64_t value = -1;
  std::string_view source;
};

/// "[5,2,4]": a shape as the messages print it.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + ']';
}

/// Checks the shape of `file` against its axes: the rank first, then each axis against the file that
/// defined it earlier (or defines it now). Returns the problem without the file name.
inline std::optional<std::string> match_axes(const npy::array& a, std::string_view file,
                                             const std::vector<axis*>& axes) {
  std::string expected = "[";
  for (const axis* ax : axes) expected += std::string(expected.size() > 1 ? "," : "") + std::string(ax->name);
  expected += ']';
  if (a.shape.size() != axes.size()) {
    return "shape " + shape_string(a.shape) + " has rank " + std::to_string(a.shape.size()) + ", expected " +
           expected;
  }
  std::size_t i = 0;
  for (axis* ax : axes) {
    const std::int64_t n = a.shape[i++];
    if (ax->value < 0) {
      ax->value = n;
      ax->source = file;
    } else if (ax->value != n) {
      return std::string(ax->name) + "=" + std::to_string(n) + " disagrees with " + std::string(ax->source) +
             " (" + std::string(ax->name) + "=" + std::to_string(ax->value) + ")";
    }
  }
  return std::nullopt;
}

}  // namespace detail

/// Loads and checks the eight input files of `dir` into `out`, and `prompt_q.npy` as well when
/// `with_prompt_queries` (a prefill needs them).
/// \returns nothing on success, otherwise one line "FILE: problem"
inline std::optional<std::string> load_inputs(const std::filesystem::path& dir, loaded_inputs& out,
                                              bool with_prompt_queries = false) {
  using detail::axis;
  // Without this a mistyped --in would be reported as the first file that cannot be opened.
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) return dir.string() + ": not a directory";
  axis T{"T", -1, {}}, B{"B", -1, {}}, P{"P", -1, {}}, hq{"Hq", -1, {}}, hkv{"Hkv", -1, {}}, D{"D", -1, {}};

  // The step files come first: q fixes the batch and the heads, and the messages of the examples in
  // docs/replay.md name the file that disagrees with q.
  struct input_file {
    std::string_view name;
    npy::array* array;
    std::string_view dtype;
    std::vector<axis*> axes;
  };
  const input_file files[] = {
      {"q.npy", &out.q, "<f4", {&T, &B, &hq, &D}},
      {"k.npy", &out.k, "<f4", {&T, &B, &hkv, &D}},
      {"v.npy", &out.v, "<f4", {&T, &B, &hkv, &D}},
      {"c.npy", &out.c, "<f4", {&T, &B, &hkv}},
      {"prompt_k.npy", &out.prompt_k, "<f4", {&B, &P, &hkv, &D}},
      {"prompt_v.npy", &out.prompt_v, "<f4", {&B, &P, &hkv, &D}},
      {"prompt_c.npy", &out.prompt_c, "<f4", {&B, &P, &hkv}},
      {"prompt_len.npy", &out.prompt_len, "<i4", {&B}},
      {"prompt_q.npy", &out.prompt_q, "<f4", {&B, &P, &hq, &D}},
  };
  for (const input_file& f : files) {
    if (f.array == &out.prompt_q && !with_prompt_queries) continue;
    const auto fail = [&](const std::string& problem) { return std::string(f.name) + ": " + problem; };
    if (auto e = npy::load(dir / f.name, *f.array, f.dtype)) {
      return fail(e->message + (f.array == &out.prompt_q ? " (--prefill needs the prompts' queries)" : ""));
    }
    if (auto e = detail::match_axes(*f.array, f.name, f.axes)) return fail(*e);
    // Checks that need a value only this file introduces; each runs once, when that value first appears.
    if (f.array == &out.q) {
      if (B.value == 0) return fail("B=0: the batch has no sequence");
      if (hq.value == 0) return fail("Hq=0: there are no query heads");
      if (D.value != 64 && D.value != 128 && D.value != 256) {
        return fail("head dim " + std::to_string(D.value) + " is not supported (64, 128, 256)");
      }
    } else if (f.array == &out.k) {
      if (hkv.value == 0) return fail("Hkv=0: there are no KV heads");
      if (hq.value % hkv.value != 0) {
        return "q.npy: Hq=" + std::to_string(hq.value) +
               " is not a multiple of Hkv=" + std::to_string(hkv.value);
      }
    } else if (f.array == &out.prompt_len) {
      const std::int32_t* len = out.prompt_len.as<std::int32_t>();
      for (std::int64_t b = 0; b < B.value; ++b) {
        const std::string at = "prompt_len[" + std::to_string(b) + "]=" + std::to_string(len[b]);
        if (len[b] < 0) return fail(at + " is negative");
        if (len[b] > P.value) return fail(at + " exceeds P=" + std::to_string(P.value));
      }
    }
  }

  replay_inputs& v = out.view;
  v.steps = T.value;
  v.batch = B.value;
  v.prompt_rows = P.value;
  v.q_heads = hq.value;
  v.kv_heads = hkv.value;
  v.head_dim = D.value;
  v.prompt_k = out.prompt_k.as<float>();
  v.prompt_v = out.prompt_v.as<float>();
  v.prompt_c = out.prompt_c.as<float>();
  v.prompt_len = out.prompt_len.as<std::int32_t>();
  if (with_prompt_queries) v.prompt_q = out.prompt_q.as<float>();
  v.q = out.q.as<float>();
  v.k = out.k.as<float>();
  v.v = out.v.as<float>();
  v.c = out.c.as<float>();
  return std::nullopt;
}

}  // namespace replay
