// nosa-engine: a small decoding engine built on nosa (see docs/engine.md). The host backend runs the model
// in plain C++; the CUDA backend (CUDA builds) runs it with cuBLAS and one CUDA graph per decode step.

#include "host_engine.hpp"
#include "model.hpp"
#include "options.hpp"
#include "report.hpp"
#include "run_config.hpp"

#ifdef NOSA_ENGINE_CUDA
#include "../common/cuda_device.hpp"
#include "cuda_engine.hpp"
#endif

#include <chrono>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace {

constexpr int exit_failure = 2;

int report_error(std::string_view message) {
  std::cerr << "nosa-engine: " << message << '\n';
  return exit_failure;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

/// The whole run on the host backend.
bool run_host(const nosa_engine::model_config& model, const nosa_engine::options& opt,
              nosa_engine::run_report& r, std::string& error) {
  using namespace nosa_engine;
  std::optional<host_weights> weights;
  if (!opt.weights.empty()) {
    weights = load_weights(opt.weights, model, error);
    if (!weights) return false;
  } else {
    weights = random_weights(model, opt.run.weight_seed);
  }
  if (!opt.save_weights.empty() && !save_weights(opt.save_weights, model, *weights, error)) return false;
  const auto engine = host_engine::create(model, std::move(*weights), opt.run, error);
  if (!engine) return false;
  auto t0 = std::chrono::steady_clock::now();
  if (!engine->prefill(error)) return false;
  r.prefill_s = seconds_since(t0);
  r.prefill_cached = engine->prefill_cached();
  r.lanes = engine->lanes().lanes;
  const nosa::counters before = engine->total_counters();
  progress_line progress(opt.run.steps);
  t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < opt.run.steps; ++s) {
    if (!engine->step(error)) return false;
    if (progress.due(s + 1))
      progress.print(s + 1, opt.run.batch, double((engine->total_counters() - before).misses));
  }
  finish_report(r, engine->total_counters() - before, seconds_since(t0), model.kv_heads);
  r.device_bytes = engine->device_bytes();
  r.host_bytes = engine->host_bytes();
  r.last_tokens = engine->tokens();
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace nosa_engine;
  options opt;
  const parse_result parsed = parse_options(argc, argv, opt);
  if (parsed.what == parse_result::action::help) {
    std::cout << usage_text;
    return 0;
  }
  if (parsed.what == parse_result::action::fail) return report_error(parsed.error);
  const model_config model = *find_preset(opt.preset);
  if (opt.distinct_per_sequence) opt.run.distinct_prompts = opt.run.batch;

  run_report r;
  r.preset = model.name;
  r.method = std::string(method_name(opt.run.attention));
  r.backend = opt.backend == backend_kind::cuda ? "cuda" : "host";
  r.layers = model.layers;
  r.context = opt.run.prompt_tokens;
  r.steps = opt.run.steps;
  r.drift = opt.run.drift;
  r.batch_auto = opt.batch_auto;
  r.cache_slots = offloads(opt.run.attention) ? opt.run.cache_slots : 0;
  r.overlap = opt.backend == backend_kind::cuda && opt.run.overlap && overlaps_gather(opt.run.attention);
  std::string error;
  if (opt.backend == backend_kind::cuda) {
#ifdef NOSA_ENGINE_CUDA
    const cuda_device::probe_result device = cuda_device::probe();
    if (!device.usable) return report_error("--backend cuda: " + device.description);
    std::cerr << "nosa-engine: " << device.description << '\n';
    if (!run_cuda_engine(model, opt, r, error)) return report_error(error);
#else
    return report_error("--backend cuda: this build has no CUDA backend");
#endif
  } else {
    r.batch = opt.run.batch;
    r.distinct_prompts = opt.run.distinct_prompts;
    r.shared_blocks = shared_prompt_blocks(opt.run.attention, opt.run.share_prompts, opt.run.prompt_tokens,
                                           model.selection.block_size);
    if (!run_host(model, opt, r, error)) return report_error(error);
  }
  print_report(std::cout, r);
  if (!opt.json.empty() && !write_text(opt.json, report_json(r)))
    return report_error(opt.json + ": cannot write");
  return 0;
}
