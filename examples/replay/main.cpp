// nosa-replay: runs one nosa decode layer over inputs recorded from an engine (a directory of .npy files)
// and writes the attention output, the selections and the per-step misses, so that an engine's own
// implementation can be compared with the library tensor by tensor. File formats: docs/replay.md.

#include "../common/cuda_device.hpp"
#include "../common/npy.hpp"
#include "inputs.hpp"
#include "options.hpp"
#include "run_replay.hpp"

#include <nosa/core/dispatch.hpp>
#include <nosa/core/numeric.hpp>
#include <nosa/core/status.hpp>

#include <cstdint>
#include <exception>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace replay {

namespace {

/// Calls `run.template operator()<Element, HeadDim>()` for the storage element of `opt` and the head
/// dimension of `in`; a value outside the compiled lists gives `not_supported` from the call "dispatch".
template <class Run>
replay_status dispatch_shape(const options& opt, const replay_inputs& in, Run&& run) {
  replay_status result;
  const nosa::status dispatched =
      nosa::dispatch_element<float, nosa::fp16, nosa::bf16>(opt.element, [&](auto element) {
        return nosa::dispatch_value<64, 128, 256>(in.head_dim, [&](auto head_dim) {
          result = run.template operator()<typename decltype(element)::type, decltype(head_dim)::value>();
          return result.status;
        });
      });
  if (!nosa::ok(dispatched) && nosa::ok(result.status)) result = {dispatched, "dispatch"};
  return result;
}

}  // namespace

replay_status run_replay(const options& opt, const replay_inputs& in, replay_outputs& out) {
  return dispatch_shape(
      opt, in, [&]<class Element, int HeadDim>() { return run_replay<Element, HeadDim>(opt, in, out); });
}

#ifdef NOSA_REPLAY_CUDA
replay_status run_replay_cuda(const options& opt, const replay_inputs& in, replay_outputs& out) {
  return dispatch_shape(opt, in, [&]<class Element, int HeadDim>() -> replay_status {
    if (opt.kv_format == kv_format_kind::element) return run_replay_cuda<Element, HeadDim>(opt, in, out);
    if constexpr (cuda_fp8_compiled<Element, HeadDim>) {
      return run_replay_cuda<Element, HeadDim, kv_format_kind::fp8>(opt, in, out);
    } else {
      // parse_options refuses fp32 storage; the head dimension comes with the inputs.
      return {nosa::status::not_supported, "dispatch",
              "--kv-format fp8 runs on the cuda backend with bf16 or fp16 storage and D 64 or 128 only"};
    }
  });
}
#endif

namespace {

/// Exit status of every failure: bad options, bad inputs, a failed library call or output error.
constexpr int exit_failure = 2;

/// Prints "nosa-replay: <message>" as one line on stderr and returns the failure exit status.
int report(std::string_view message) {
  std::cerr << "nosa-replay: " << message << '\n';
  return exit_failure;
}

/// Writes the output files (three, and `prompt_o.npy` with a prefill). Returns one line "FILE: problem" on
/// failure.
std::optional<std::string> write_outputs(const std::filesystem::path& dir, const options& opt,
                                         const replay_inputs& in, const replay_outputs& out) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return dir.string() + ": cannot create the output directory (" + ec.message() + ")";
  const std::int64_t T = in.steps, B = in.batch;
  if (auto e = npy::save(dir / "o.npy", out.o, {T, B, in.q_heads, in.head_dim}))
    return "o.npy: " + e->message;
  if (auto e = npy::save(dir / "selected.npy", out.selected, {T, B, in.kv_heads, opt.selection.top_k})) {
    return "selected.npy: " + e->message;
  }
  if (auto e = npy::save(dir / "misses.npy", out.misses, {T, B, in.kv_heads}))
    return "misses.npy: " + e->message;
  if (opt.prefill != prefill_kind::none) {
    if (auto e =
            npy::save(dir / "prompt_o.npy", out.prompt_o, {B, in.prompt_rows, in.q_heads, in.head_dim})) {
      return "prompt_o.npy: " + e->message;
    }
  }
  return std::nullopt;
}

/// Runs the replay on the backend `opt` names (parse_options has already refused `cuda` where this build
/// lacks it).
replay_status run_on_backend(const options& opt, const replay_inputs& in, replay_outputs& out) {
#ifdef NOSA_REPLAY_CUDA
  if (opt.backend == backend_kind::cuda) return run_replay_cuda(opt, in, out);
#endif
  return run_replay(opt, in, out);
}

int run(int argc, const char* const* argv) {
  options opt;
  const parse_result parsed = parse_options(argc, argv, opt);
  if (parsed.what == parse_result::action::help) {
    std::cout << usage_text;
    return 0;
  }
  if (parsed.what == parse_result::action::fail) return report(parsed.error);
#ifdef NOSA_REPLAY_CUDA
  if (opt.backend == backend_kind::cuda) {
    // The build has CUDA (parse_options checked that), but a usable GPU is a property of the machine.
    if (const cuda_device::probe_result device = cuda_device::probe(); !device.usable) {
      return report("backend 'cuda' is not available: " + device.description);
    }
  }
#endif

  loaded_inputs inputs;
  if (auto e = load_inputs(opt.in_dir, inputs, opt.prefill != prefill_kind::none)) return report(*e);
  const replay_inputs& in = inputs.view;

  replay_outputs out;
  if (const replay_status s = run_on_backend(opt, in, out); !nosa::ok(s.status)) {
    const std::string_view reason = s.reason.empty() ? nosa::to_string(s.status) : s.reason;
    return report(std::string(s.call) + ": " + std::string(reason));
  }
  if (auto e = write_outputs(opt.out_dir, opt, in, out)) return report(*e);

  const nosa::counters& c = out.totals;
  std::cout << "nosa-replay: " << in.steps << " steps, " << in.batch << " sequences ("
            << variant_name(opt.variant) << ", " << nosa::to_string(opt.element) << ", D=" << in.head_dim
            << ", bias " << bias_name(opt.bias) << ", " << store_name(opt.store)
            << (opt.kv_format == kv_format_kind::fp8 ? ", kv fp8" : "")
            << (opt.prefill != prefill_kind::none ? ", prefill " + std::string(prefill_name(opt.prefill))
                                                  : "")
            << "): hits " << c.hits << ", misses " << c.misses << ", bytes h2d " << c.bytes_h2d
            << ", bytes d2h " << c.bytes_d2h << '\n';
  return 0;
}

}  // namespace
}  // namespace replay

int main(int argc, char** argv) {
  try {
    return replay::run(argc, argv);
  } catch (const std::exception& e) {
    // Allocation of large inputs is the realistic source; the tool still fails with one line.
    return replay::report(std::string("unexpected error: ") + e.what());
  } catch (...) {
    return replay::report("unexpected error");
  }
}
