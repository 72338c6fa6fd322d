#pragma once
/// \file
/// Command line of `nosa-replay`: usage text and a parser that reports the first problem as one line.

#include "run_replay.hpp"

#include <charconv>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace replay {

/// The usage text printed by `--help`.
inline constexpr std::string_view usage_text =
    R"(usage: nosa-replay --in DIR --out DIR [options]

Runs one nosa decode layer over recorded inputs and writes its outputs, so an engine can compare
nosa with its own implementation. See docs/replay.md for the file formats.

inputs (--in DIR, float32 unless noted):
  prompt_k.npy [B,P,Hkv,D]  prompt_v.npy [B,P,Hkv,D]  prompt_c.npy [B,P,Hkv]
  prompt_len.npy [B] int32  q.npy [T,B,Hq,D]  k.npy [T,B,Hkv,D]  v.npy [T,B,Hkv,D]  c.npy [T,B,Hkv]
  prompt_q.npy [B,P,Hq,D]   (with --prefill only)
outputs (--out DIR, created if missing):
  o.npy [T,B,Hq,D] float32  selected.npy [T,B,Hkv,topk] int32  misses.npy [T,B,Hkv] int32
  prompt_o.npy [B,P,Hq,D] float32 (with --prefill only)

options (defaults are the paper's):
  --in DIR              input directory (required)
  --out DIR             output directory (required)
  --block N             tokens per block                        (64)
  --window N            compression window length in tokens     (32)
  --stride N            compression window stride in tokens     (16)
  --topk N              selected blocks per sequence and head   (64)
  --topk-qa N           query-aware top-k, forced blocks included (33)
  --init N              sink blocks always selected             (1)
  --local N             local blocks always selected            (16)
  --bias MODE           after_scale | before_scale | none       (after_scale)
  --budget N            cap on blocks loaded per step and head  (no cap)
  --variant NAME        nosa | infllmv2                         (nosa)
  --dtype NAME          fp32 | fp16 | bf16 storage of q, K, V   (fp32)
  --store NAME          offload | resident                      (offload)
  --kv-format NAME      fp8 | the --dtype name                  (--dtype)
                        complete K and V blocks in FP8 E4M3, a scale
                        per block and head, or in the storage type;
                        fp8 on cuda: bf16 or fp16, D 64 or 128
  --prefill NAME        dense | sparse: run the prompts through the (none)
                        library's prefill (sparse: NOSA^S) instead
                        of ingesting them; host backend
  --chunk N             prompt rows per sequence and prefill call (1024)
  --backend NAME        host | cuda (CUDA builds, with a GPU)   (host)
  --help                print this text and exit

exit status: 0 success, 2 bad options, bad inputs or a failed library call (one line on stderr).
)";

/// Names of the choices, as the command line spells them.
constexpr std::string_view variant_name(variant_kind v) noexcept {
  return v == variant_kind::nosa ? "nosa" : "infllmv2";
}
constexpr std::string_view store_name(store_kind s) noexcept {
  return s == store_kind::offload ? "offload" : "resident";
}
constexpr std::string_view prefill_name(prefill_kind p) noexcept {
  return p == prefill_kind::none ? "none" : p == prefill_kind::dense ? "dense" : "sparse";
}
constexpr std::string_view bias_name(nosa::bias_mode b) noexcept {
  switch (b) {
  case nosa::bias_mode::after_scale:
    return "after_scale";
  case nosa::bias_mode::before_scale:
    return "before_scale";
  case nosa::bias_mode::none:
    return "none";
  }
  return "?";
}

/// Outcome of parsing: run, print help, or stop with `error` (one line, without the program name).
struct parse_result {
  enum class action : unsigned char { run, help, fail } what = action::run;
  std::string error;
};

namespace detail {

/// Parses a whole decimal `int`; nothing else on the string.
inline std::optional<int> parse_int(std::string_view text) {
  int value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc{} || ptr != end) return std::nullopt;
  return value;
}

/// Maps `text` to one of `names` (in the order of `values`), or nothing.
template <class T, std::size_t N>
std::optional<T> parse_choice(std::string_view text, const std::string_view (&names)[N],
                              const T (&values)[N]) {
  for (std::size_t i = 0; i < N; ++i) {
    if (text == names[i]) return values[i];
  }
  return std::nullopt;
}

}  // namespace detail

/// Parses `argv[1..argc)` into `opt` (which holds the defaults on entry). Accepts `--flag value` and
/// `--flag=value`; a repeated flag keeps its last value.
inline parse_result parse_options(int argc, const char* const* argv, options& opt) {
  const auto fail = [](std::string message) {
    return parse_result{parse_result::action::fail, std::move(message)};
  };
  // `--kv-format` names the storage type or fp8; the storage type is known once every flag is read.
  bool kv_named = false;  // --kv-format named a storage type, `kv_element`
  nosa::dtype kv_element = nosa::dtype::fp32;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") return {parse_result::action::help, {}};
    if (arg.substr(0, 2) != "--") return fail("unexpected argument '" + std::string(arg) + "' (see --help)");
    std::string_view name = arg;
    std::optional<std::string_view> value;
    if (const std::size_t eq = arg.find('='); eq != std::string_view::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    const auto take_value = [&]() -> std::optional<std::string_view> {
      if (value) return value;
      if (i + 1 < argc) return std::string_view(argv[++i]);
      return std::nullopt;
    };
    const auto expect_int = [&](int& field, bool non_negative) -> std::optional<parse_result> {
      const auto text = take_value();
      if (!text) return fail(std::string(name) + " needs a value");
      const auto parsed = detail::parse_int(*text);
      if (!parsed || (non_negative && *parsed < 0)) {
        return fail(std::string(name) + ": '" + std::string(*text) + "' is not " +
                    (non_negative ? "a non-negative integer" : "an integer"));
      }
      field = *parsed;
      return std::nullopt;
    };
    // Selection sizes go to the layer unchecked: its own validation reports an inconsistent set (e.g.
    // k_qa > k) as a library status, exactly as an engine would see it.
    std::optional<parse_result> problem;
    nosa::selection_params& sel = opt.selection;
    if (name == "--block") {
      problem = expect_int(sel.block_size, false);
    } else if (name == "--window") {
      problem = expect_int(sel.window, false);
    } else if (name == "--stride") {
      problem = expect_int(sel.stride, false);
    } else if (name == "--topk") {
      problem = expect_int(sel.top_k, false);
    } else if (name == "--topk-qa") {
      problem = expect_int(sel.top_k_query_aware, false);
    } else if (name == "--init") {
      problem = expect_int(sel.n_init, false);
    } else if (name == "--local") {
      problem = expect_int(sel.n_local, false);
    } else if (name == "--chunk") {
      problem = expect_int(opt.chunk, true);
      if (!problem && opt.chunk == 0) return fail("--chunk: '0' is not a positive integer");
    } else if (name == "--budget") {
      // Negative values are the library's "no budget" sentinel and not meant to be typed.
      problem = expect_int(sel.max_new_blocks, true);
    } else if (name == "--in" || name == "--out" || name == "--bias" || name == "--variant" ||
               name == "--dtype" || name == "--store" || name == "--backend" || name == "--kv-format" ||
               name == "--prefill") {
      const auto text = take_value();
      if (!text) return fail(std::string(name) + " needs a value");
      const auto bad_choice = [&](std::string_view allowed) {
        return fail(std::string(name) + ": unknown value '" + std::string(*text) + "' (expected " +
                    std::string(allowed) + ")");
      };
      if (name == "--in") {
        opt.in_dir = *text;
      } else if (name == "--out") {
        opt.out_dir = *text;
      } else if (name == "--bias") {
        static constexpr std::string_view names[] = {"after_scale", "before_scale", "none"};
        static constexpr nosa::bias_mode values[] = {nosa::bias_mode::after_scale,
                                                     nosa::bias_mode::before_scale, nosa::bias_mode::none};
        const auto v = detail::parse_choice(*text, names, values);
        if (!v) return bad_choice("after_scale, before_scale or none");
        opt.bias = *v;
      } else if (name == "--variant") {
        static constexpr std::string_view names[] = {"nosa", "infllmv2"};
        static constexpr variant_kind values[] = {variant_kind::nosa, variant_kind::infllmv2};
        const auto v = detail::parse_choice(*text, names, values);
        if (!v) return bad_choice("nosa or infllmv2");
        opt.variant = *v;
      } else if (name == "--dtype") {
        static constexpr std::string_view names[] = {"fp32", "fp16", "bf16"};
        static constexpr nosa::dtype values[] = {nosa::dtype::fp32, nosa::dtype::fp16, nosa::dtype::bf16};
        const auto v = detail::parse_choice(*text, names, values);
        if (!v) return bad_choice("fp32, fp16 or bf16");
        opt.element = *v;
      } else if (name == "--store") {
        static constexpr std::string_view names[] = {"offload", "resident"};
        static constexpr store_kind values[] = {store_kind::offload, store_kind::resident};
        const auto v = detail::parse_choice(*text, names, values);
        if (!v) return bad_choice("offload or resident");
        opt.store = *v;
      } else if (name == "--prefill") {
        static constexpr std::string_view names[] = {"none", "dense", "sparse"};
        static constexpr prefill_kind values[] = {prefill_kind::none, prefill_kind::dense,
                                                  prefill_kind::sparse};
        const auto v = detail::parse_choice(*text, names, values);
        if (!v) return bad_choice("none, dense or sparse");
        opt.prefill = *v;
      } else if (name == "--kv-format") {
        static constexpr std::string_view names[] = {"fp32", "fp16", "bf16"};
        static constexpr nosa::dtype values[] = {nosa::dtype::fp32, nosa::dtype::fp16, nosa::dtype::bf16};
        if (*text == "fp8") {
          opt.kv_format = kv_format_kind::fp8;
          kv_named = false;
        } else if (const auto v = detail::parse_choice(*text, names, values)) {
          opt.kv_format = kv_format_kind::element;
          kv_named = true;
          kv_element = *v;
        } else {
          return bad_choice("the --dtype name or fp8");
        }
      } else {
        static constexpr std::string_view names[] = {"host", "cuda"};
        static constexpr backend_kind values[] = {backend_kind::host, backend_kind::cuda};
        const auto v = detail::parse_choice(*text, names, values);
        if (!v) return bad_choice("host or cuda");
        opt.backend = *v;
      }
    } else {
      return fail("unknown option '" + std::string(name) + "' (see --help)");
    }
    if (problem) return *problem;
  }
  if (opt.in_dir.empty()) return fail("--in DIR is required (see --help)");
  if (opt.out_dir.empty()) return fail("--out DIR is required (see --help)");
  if (kv_named && kv_element != opt.element) {
    return fail("--kv-format: '" + std::string(nosa::to_string(kv_element)) + "' is not the storage type (--dtype " +
                std::string(nosa::to_string(opt.element)) + "); expected " +
                std::string(nosa::to_string(opt.element)) + " or fp8");
  }
  if (opt.kv_format == kv_format_kind::fp8 && opt.bias != standard_bias(opt.variant)) {
    return fail("--kv-format fp8 builds --variant " + std::string(variant_name(opt.variant)) + " with --bias " +
                std::string(bias_name(standard_bias(opt.variant))) + " only (got --bias " +
                std::string(bias_name(opt.bias)) + ")");
  }
  // The backend checks come last so that every other mistake on the command line is reported first.
  // Whether a GPU is present is a run-time question that the caller asks next.
  if (opt.backend == backend_kind::cuda) {
    if (!cuda_in_build) return fail("backend 'cuda' is not available in this build");
    if (opt.kv_format == kv_format_kind::fp8 && opt.element == nosa::dtype::fp32) {
      return fail("--backend cuda runs --kv-format fp8 with --dtype bf16 or fp16 only (got --dtype fp32)");
    }
    if (opt.prefill != prefill_kind::none) {
      return fail("--backend cuda does not support --prefill yet (the host backend does)");
    }
    if (opt.bias != cuda_bias(opt.variant)) {
      return fail("--backend cuda builds --variant " + std::string(variant_name(opt.variant)) +
                  " with --bias " + std::string(bias_name(cuda_bias(opt.variant))) + " only (got --bias " +
                  std::string(bias_name(opt.bias)) + ")");
    }
  }
  return {};
}

}  // namespace replay
