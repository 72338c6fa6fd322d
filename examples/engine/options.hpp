#pragma once
/// \file
/// Command line of `nosa-engine`: usage text and a parser that reports the first problem as one line.

#include "attention_stack.hpp"
#include "model.hpp"
#include "run_config.hpp"

#include <charconv>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>

namespace nosa_engine {

inline constexpr std::string_view usage_text =
    R"(usage: nosa-engine [options]

A Llama-style decoder with NOSA's eviction head and nosa attention in every layer: dense prefill of the
prompts, ingest into the KV cache (NOSA with full prefill), then batched greedy decoding. See docs/engine.md.

options:
  --preset NAME         nosa-8b | llama3-8b | tiny                          (tiny)
  --method NAME         full | infllmv2-offload | nosa-offload | nosa-resident, or
                        full-fp8 | infllmv2-offload-fp8 | nosa-offload-fp8: the
                        same with complete KV blocks in FP8 E4M3   (nosa-offload)
  --backend NAME        host | cuda (CUDA builds, with a GPU)              (host)
  --batch N|auto        sequences decoded together; auto (CUDA): the batch of the
                        highest predicted tokens/s among those that fit the HBM
                        and host-memory budgets (a calibration run measures the
                        GEMMs and the misses first)                         (1)
  --context N           prompt tokens of every sequence                     (256)
  --steps N             decode steps (tokens generated per sequence)        (16)
  --distinct-prompts N  distinct prompts; sequence b gets prompt b % N, and
                        prefill runs once per distinct prompt; 0 = batch    (1)
  --drift X             0: greedy decoding; X in (0, 1]: the input embedding of each
                        sequence follows a random walk with step X, so queries drift (0)
  --share-prompts on|off  offloading methods: sequences of one prompt share its
                        complete blocks' pages in the host pool (resident methods
                        always keep a copy per sequence)                    (on)
  --cache-slots N|auto  offloading methods: slots per sequence and KV head beyond
                        k + 1 that keep recently dropped blocks resident; auto
                        (CUDA): the size of the highest predicted tokens/s,
                        from 0, k/8, ... 4k                                  (0)
  --calibration-steps N steps of the calibration run of --batch auto and
                        --cache-slots auto, after --warmup untimed ones     (16)
  --overlap on|off      CUDA, offloading methods in bf16: gather on a second stream
                        while attention reads the blocks already resident   (on)
  --lanes N|auto        split the batch into N lanes of contiguous rows; on CUDA
                        they run side by side, so one lane's gathers cross PCIe
                        while another computes; auto: 2 for the offloading
                        methods on CUDA from batch 32, else 1                (auto)
  --prefill-cache DIR   keep each prompt's prefill (every layer's K, V, c) in DIR
                        and read it back in later runs instead of recomputing it
  --profile             CUDA: after the timed steps, one more step run stage by
                        stage with events between them (lanes one after the
                        other, gathers not overlapped): where a step's time goes
  --seed N              seed of the random weights                          (1)
  --prompt-seed N       seed of the prompts and of the drift                (2)
  --weights FILE        read the weights from a safetensors file (Llama names plus
                        model.layers.{i}.self_attn.eviction_head.{weight,bias,scale})
  --save-weights FILE   write the weights used to a safetensors file
  --hbm-gib X           device-memory budget in GiB (CUDA; default: the whole card)
  --host-gib X          host-memory budget in GiB for the offloaded KV cache
                        (default: 80% of the machine's memory)
  --warmup N            untimed decode steps before the timed ones (CUDA) (2)
  --json FILE           also write the report as JSON
  --help                print this text and exit

exit status: 0 success, 2 bad options or a failed run (one line on stderr).
)";

enum class backend_kind : unsigned char { host, cuda };

/// Everything the command line sets.
struct options {
  std::string preset = "tiny";
  backend_kind backend = backend_kind::host;
  run_config run{};
  bool batch_auto = false;
  bool cache_slots_auto = false;  ///< --cache-slots auto
  int calibration_steps = 16;
  bool distinct_per_sequence = false;  ///< --distinct-prompts 0
  double hbm_gib = 0.0;                ///< 0: the whole card
  double host_gib = 0.0;               ///< 0: 80% of physical memory
  int warmup = 2;
  bool profile = false;
  std::string weights, save_weights, json;
};

/// Outcome of parsing.
struct parse_result {
  enum class action : unsigned char { run, help, fail } what = action::run;
  std::string error;
};

/// Parses `argv[1..argc)` into `opt`. Accepts `--flag value` and `--flag=value`.
inline parse_result parse_options(int argc, const char* const* argv, options& opt) {
  const auto fail = [](std::string message) {
    return parse_result{parse_result::action::fail, std::move(message)};
  };
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") return {parse_result::action::help, {}};
    if (arg == "--profile") {
      opt.profile = true;
      continue;
    }
    if (arg.substr(0, 2) != "--") return fail("unexpected argument '" + std::string(arg) + "' (see --help)");
    std::string_view name = arg;
    std::optional<std::string_view> value;
    if (const std::size_t eq = arg.find('='); eq != std::string_view::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    } else if (i + 1 < argc) {
      value = std::string_view(argv[++i]);
    }
    if (!value) return fail(std::string(name) + " needs a value");
    const std::string text(*value);
    const auto bad = [&](std::string_view expected) {
      return fail(std::string(name) + ": '" + text + "' is not " + std::string(expected));
    };
    const auto as_int = [&](int& out, int min) -> bool {
      const char* end = text.data() + text.size();
      const auto [ptr, ec] = std::from_chars(text.data(), end, out);
      return ec == std::errc{} && ptr == end && out >= min;
    };
    const auto as_u64 = [&](std::uint64_t& out) -> bool {
      const char* end = text.data() + text.size();
      const auto [ptr, ec] = std::from_chars(text.data(), end, out);
      return ec == std::errc{} && ptr == end;
    };
    const auto as_double = [&](double& out) -> bool {
      try {
        std::size_t used = 0;
        out = std::stod(text, &used);
        return used == text.size() && out >= 0.0;
      } catch (...) {
        return false;
      }
    };
    double d = 0.0;
    if (name == "--preset") {
      if (!find_preset(text)) return bad("a preset (" + std::string(preset_names) + ")");
      opt.preset = text;
    } else if (name == "--method") {
      const auto m = find_method(text);
      if (!m) return bad("a method (" + std::string(method_names) + ")");
      opt.run.attention = *m;
    } else if (name == "--backend") {
      if (text == "host") {
        opt.backend = backend_kind::host;
      } else if (text == "cuda") {
        opt.backend = backend_kind::cuda;
      } else {
        return bad("host or cuda");
      }
    } else if (name == "--batch") {
      opt.batch_auto = text == "auto";
      if (!opt.batch_auto && !as_int(opt.run.batch, 1)) return bad("a positive integer or auto");
    } else if (name == "--context") {
      if (!as_int(opt.run.prompt_tokens, 1)) return bad("a positive integer");
    } else if (name == "--steps") {
      if (!as_int(opt.run.steps, 1)) return bad("a positive integer");
    } else if (name == "--distinct-prompts") {
      if (!as_int(opt.run.distinct_prompts, 0)) return bad("a non-negative integer");
      opt.distinct_per_sequence = opt.run.distinct_prompts == 0;
    } else if (name == "--drift") {
      if (!as_double(d) || d > 1.0) return bad("a number in [0, 1]");
      opt.run.drift = static_cast<float>(d);
    } else if (name == "--share-prompts") {
      if (text != "on" && text != "off") return bad("on or off");
      opt.run.share_prompts = text == "on";
    } else if (name == "--overlap") {
      if (text != "on" && text != "off") return bad("on or off");
      opt.run.overlap = text == "on";
    } else if (name == "--lanes") {
      if (text == "auto") {
        opt.run.lanes = 0;
      } else if (!as_int(opt.run.lanes, 1)) {
        return bad("a positive integer or auto");
      }
    } else if (name == "--prefill-cache") {
      if (text.empty()) return bad("a directory");
      opt.run.prefill_cache = text;
    } else if (name == "--cache-slots") {
      opt.cache_slots_auto = text == "auto";
      if (!opt.cache_slots_auto && !as_int(opt.run.cache_slots, 0))
        return bad("a non-negative integer or auto");
    } else if (name == "--calibration-steps") {
      if (!as_int(opt.calibration_steps, 1)) return bad("a positive integer");
    } else if (name == "--seed") {
      if (!as_u64(opt.run.weight_seed)) return bad("an unsigned integer");
    } else if (name == "--prompt-seed") {
      if (!as_u64(opt.run.prompt_seed)) return bad("an unsigned integer");
    } else if (name == "--weights") {
      opt.weights = text;
    } else if (name == "--save-weights") {
      opt.save_weights = text;
    } else if (name == "--hbm-gib") {
      if (!as_double(opt.hbm_gib) || opt.hbm_gib <= 0.0) return bad("a positive number");
    } else if (name == "--host-gib") {
      if (!as_double(opt.host_gib) || opt.host_gib <= 0.0) return bad("a positive number");
    } else if (name == "--warmup") {
      if (!as_int(opt.warmup, 0)) return bad("a non-negative integer");
    } else if (name == "--json") {
      opt.json = text;
    } else {
      return fail("unknown option '" + std::string(name) + "' (see --help)");
    }
  }
  if (opt.batch_auto && opt.backend != backend_kind::cuda) return fail("--batch auto needs --backend cuda");
  if (opt.cache_slots_auto && opt.backend != backend_kind::cuda)
    return fail("--cache-slots auto needs --backend cuda");
  if (opt.profile && opt.backend != backend_kind::cuda) return fail("--profile needs --backend cuda");
  if (!opt.run.prefill_cache.empty() && !opt.weights.empty())
    return fail("--prefill-cache keys its files by the seeds of the random weights: not with --weights");
  return {};
}

}  // namespace nosa_engine
