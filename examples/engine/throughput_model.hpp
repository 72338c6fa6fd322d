#pragma once
/// \file
/// The engine's throughput model: a step's time against what the hardware allows (the roofline of every
/// run), the prediction of tokens/s for a batch and a slot-cache size (`--batch auto`, `--cache-slots auto`),
/// and the calibration that measures the misses of each slot-cache size. The figures per layer come from
/// the library (`<nosa/store/sizing.hpp>`); the speeds and GEMM times are measured by the CUDA engine.

#include "attention_stack.hpp"
#include "model.hpp"
#include "run_config.hpp"

#include <nosa/core/dispatch.hpp>
#include <nosa/store/sizing.hpp>

#include <algorithm>
#include <cstddef>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace nosa_engine {

/// What one layer of a workload moves per step, per sequence: the bytes of one miss over the link and the
/// state read from HBM, averaged over the positions of the steps `first_step .. first_step + steps - 1`
/// after the prompt (step s appends the token at position `prompt_tokens + s`).
struct layer_traffic {
  double miss_bytes = 0.0;
  double hbm_bytes = 0.0;
  /// The K (or V) values of one block of one KV head without its scale: the contiguous run a miss copies
  /// twice (`b_s * D` bytes in FP8, twice that in bf16).
  std::size_t block_run_bytes = 0;
};

inline nosa::status traffic_of(const model_config& m, const run_config& run, int first_step, int steps,
                               layer_traffic& out) {
  const nosa::layer_config config = layer_config_for(m, run);
  return nosa::dispatch_value<64, 128>(m.head_dim, [&](auto dim) {
    return with_pipeline<decltype(dim)::value>(run.attention, [&]<class P>() {
      out.miss_bytes = double(nosa::miss_bytes<P>(config));
      const nosa::state_layout layout = nosa::make_state_layout<P>(config);
      out.block_run_bytes = layout.block_elements() * layout.value_size;
      double sum = 0.0;
      for (int s = first_step; s < first_step + steps; ++s)
        sum += double(nosa::step_hbm_bytes<P>(config, run.prompt_tokens + s + 1));
      out.hbm_bytes = steps > 0 ? sum / steps : 0.0;
      return nosa::status::success;
    });
  });
}

/// Speeds measured at start-up, in bytes per second (0: not measured).
struct device_speeds {
  double copy = 0.0;    ///< a contiguous host-to-device copy from pinned memory (the copy engine)
  double gather = 0.0;  ///< random blocks read from pinned host memory by a kernel, as nosa's gather does
  double hbm = 0.0;     ///< a streaming read of device memory
};

/// Time of a GEMM sequence as a function of its rows: measured points, linear between them and along the
/// last two beyond them.
struct gemm_curve {
  std::vector<std::pair<int, double>> points;  ///< (rows, seconds), rows increasing

  double seconds(int rows) const {
    if (points.empty()) return 0.0;
    if (points.size() == 1) return points[0].second * rows / std::max(1, points[0].first);
    std::size_t i = 1;
    while (i + 1 < points.size() && points[i].first < rows) ++i;
    const auto [r0, t0] = points[i - 1];
    const auto [r1, t1] = points[i];
    return std::max(0.0, t0 + (t1 - t0) * double(rows - r0) / double(r1 - r0));
  }
};

/// The time a step of one layer is bounded by, and its parts, summed over layers for a whole step.
struct step_bound {
  double gather_s = 0.0;  ///< gather bytes / gather speed
  double hbm_s = 0.0;     ///< HBM bytes / HBM speed
  double gemm_s = 0.0;    ///< the GEMMs (the LM head's included in a whole step)
  double step_s = 0.0;    ///< sum over layers of max(gather, HBM + GEMM), plus the LM head

  void add_layer(double gather, double hbm, double gemm) {
    gather_s += gather;
    hbm_s += hbm;
    gemm_s += gemm;
    step_s += std::max(gather, hbm + gemm);
  }
  void add_head(double gemm) {
    gemm_s += gemm;
    step_s += gemm;
  }
};

/// The roofline of measured steps: for each layer, the bytes it gathered per step (`gather_bytes`, from its
/// counters) over the gather speed against `hbm_bytes` (its step's HBM reads, all sequences) over the HBM
/// speed plus `layer_gemm_s`; then the LM head's `head_gemm_s`.
inline step_bound measured_roofline(const std::vector<double>& gather_bytes, double hbm_bytes,
                                    double layer_gemm_s, double head_gemm_s, const device_speeds& speeds) {
  step_bound b;
  for (const double g : gather_bytes) {
    b.add_layer(speeds.gather > 0 ? g / speeds.gather : 0.0, speeds.hbm > 0 ? hbm_bytes / speeds.hbm : 0.0,
                layer_gemm_s);
  }
  b.add_head(head_gemm_s);
  return b;
}

/// What the prediction of a workload needs, all measured in the same run.
struct throughput_inputs {
  model_config model;
  run_config run;                 ///< method, context, lanes rule; batch and cache slots are what is chosen
  int first_step = 0, steps = 1;  ///< the timed steps (their positions give the HBM bytes)
  device_speeds speeds;
  gemm_curve layer_gemm;  ///< one layer's projections and MLP, by rows
  gemm_curve head_gemm;   ///< the LM head, by rows
  /// Per layer: misses per (sequence, KV head) and step of each slot-cache size (empty: no misses).
  std::vector<nosa::miss_calibration> misses;
};

/// The lanes of a run of `batch` rows on the CUDA backend.
inline int cuda_lanes(const run_config& run, int batch) {
  return run.lanes > 0 ? run.lanes : default_lanes(run.attention, batch, true);
}

/// A predicted step and its throughput.
struct prediction {
  int batch = 0, cache_slots = 0;
  step_bound bound;
  double misses_per_step = 0.0;  ///< blocks loaded per step, all layers, sequences and KV heads
  double tokens_per_s() const { return bound.step_s > 0 ? batch / bound.step_s : 0.0; }
};

/// The step of `batch` sequences with `cache_slots` extra slots: per layer, the longer of its gather and its
/// HBM reads plus GEMMs (each lane runs the GEMMs over its rows); then the LM head.
inline prediction predict(const throughput_inputs& in, int batch, int cache_slots, std::string& error) {
  prediction p;
  p.batch = batch;
  p.cache_slots = cache_slots;
  run_config run = in.run;
  run.batch = batch;
  run.cache_slots = cache_slots;
  layer_traffic traffic;
  const nosa::status s = traffic_of(in.model, run, in.first_step, in.steps, traffic);
  if (!nosa::ok(s)) {
    error = "sizing the layers: " + std::string(nosa::to_string(s));
    return p;
  }
  const lane_layout lanes(batch, cuda_lanes(run, batch));
  double gemm = 0.0;
  for (int i = 0; i < lanes.lanes; ++i) gemm += in.layer_gemm.seconds(lanes.rows(i));
  const int heads = batch * in.model.kv_heads;
  std::vector<double> gather(std::size_t(in.model.layers), 0.0);
  for (std::size_t l = 0; l < gather.size() && l < in.misses.size(); ++l) {
    const double misses = heads * in.misses[l].misses_per_step_at(cache_slots);
    p.misses_per_step += misses;
    gather[l] = misses * traffic.miss_bytes;
  }
  p.bound =
      measured_roofline(gather, batch * traffic.hbm_bytes, gemm, in.head_gemm.seconds(batch), in.speeds);
  return p;
}

/// The batch and slot-cache size of the highest predicted tokens/s, and the best of each size tried.
struct sizing_choice {
  prediction best;
  std::vector<prediction> per_size;  ///< the best batch of each slot-cache size, in the order tried
};

/// Largest batch `--batch auto` considers: the engine keeps one graph of the whole batch per lane, and a small
/// model at a short context would otherwise fit hundreds of thousands of sequences in the budget.
inline constexpr int max_auto_batch = 4096;

/// Tries each of `sizes` (slot-cache sizes) with batches 1 .. `largest(size)` (the largest that fits the
/// memory budgets, at most `max_auto_batch`; 0 when none does), or only `batch` when it is not 0, and keeps
/// the highest predicted tokens/s (ties: the larger batch, then the smaller cache). `best.batch` is 0 when
/// nothing fits.
inline sizing_choice choose_sizing(const throughput_inputs& in, const std::vector<int>& sizes, int batch,
                                   const std::function<int(int)>& largest, std::string& error) {
  sizing_choice out;
  for (const int size : sizes) {
    const int top = std::min(largest(size), batch > 0 ? std::max(batch, max_auto_batch) : max_auto_batch);
    if (!error.empty()) return out;
    if (top < 1 || (batch > 0 && batch > top)) continue;
    prediction best;
    for (int b = batch > 0 ? batch : 1; b <= (batch > 0 ? batch : top); ++b) {
      const prediction p = predict(in, b, size, error);
      if (!error.empty()) return out;
      if (best.batch == 0 || p.tokens_per_s() >= best.tokens_per_s()) best = p;
    }
    out.per_size.push_back(best);
    if (out.best.batch == 0 || best.tokens_per_s() > out.best.tokens_per_s()) out.best = best;
  }
  return out;
}

/// Measures, from a calibration run of `engine` (prefilled, not yet stepped), the misses per step of each
/// slot-cache size in `sizes`, layer by layer: every (sequence, KV head) replays its selections through a
/// slot-cache model of each size (`nosa::miss_calibration`). Runs `warmup + steps` steps and counts the last
/// `steps`. `Engine` is `host_engine` or `cuda_engine` (`selection` waits for the step on the GPU).
template <class Engine>
bool calibrate_misses(Engine& engine, const std::vector<int>& sizes, int warmup, int steps,
                      std::vector<nosa::miss_calibration>& out, std::string& error) {
  const model_config& m = engine.model();
  const int batch = engine.run().batch, heads = m.kv_heads, prompt = engine.run().prompt_tokens;
  out.clear();
  for (int l = 0; l < m.layers; ++l) out.emplace_back(m.selection, sizes, batch * heads);
  const auto each = [&](auto&& f) {
    for (int l = 0; l < m.layers; ++l) {
      for (int b = 0; b < batch; ++b) {
        for (int h = 0; h < heads; ++h) f(out[std::size_t(l)], b * heads + h, engine.selection(l, b, h));
      }
    }
  };
  each([&](nosa::miss_calibration& c, int stream, const std::vector<std::int32_t>& s) {
    c.admit(stream, prompt, s);
  });
  for (int s = 0; s < warmup + steps; ++s) {
    if (!engine.step(error)) return false;
    each([&](nosa::miss_calibration& c, int stream, const std::vector<std::int32_t>& chosen) {
      c.step(stream, prompt + s, chosen, s >= warmup);
    });
  }
  return true;
}

}  // namespace nosa_engine
