#pragma once
/// \file
/// The report of a run as text (one figure per line) and as JSON (one object, for the study scripts), and
/// the progress line of long runs.

#include "run_config.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <string>

namespace nosa_engine {

/// Writes the report as aligned text lines.
inline void print_report(std::ostream& os, const run_report& r) {
  const auto gib = [](double bytes) { return bytes / (1024.0 * 1024.0 * 1024.0); };
  os << std::fixed << std::setprecision(3);
  os << "model            " << r.preset << " (" << r.layers << " layers), method " << r.method << ", backend "
     << r.backend << '\n';
  os << "workload         batch " << r.batch << ", context " << r.context << ", " << r.steps << " steps, "
     << r.distinct_prompts << " distinct prompt(s), drift " << r.drift << '\n';
  os << "KV cache         " << r.shared_blocks << " prompt blocks shared per sequence, " << r.cache_slots
     << " cache slots beyond k + 1, gather " << (r.overlap ? "beside attention" : "before attention") << '\n';
  os << "lanes            " << r.lanes << '\n';
  os << "prefill          " << r.prefill_s << " s ("
     << (r.prefill_cached ? "read from the prefill cache" : "dense prefill") << " and ingest)\n";
  os << "throughput       " << r.tokens_per_s << " tokens/s\n";
  os << "step             " << r.ms_per_step << " ms per step, " << r.ms_per_layer << " ms per layer\n";
  os << "misses           " << r.misses_per_step << " blocks per step (" << r.misses_per_head
     << " per layer, sequence and KV head)\n";
  if (r.locality >= 0.0) {
    os << "locality         " << r.locality << " (selected blocks already resident)\n";
  } else {
    os << "locality         n/a (the KV cache is not offloaded)\n";
  }
  os << "PCIe             " << r.h2d_gb_per_s << " GB/s host to device, " << r.d2h_gb_per_s
     << " GB/s device to host";
  if (r.link_h2d_gb_per_s > 0) {
    os << " (link: " << r.link_h2d_gb_per_s << " GB/s host to device copy, "
       << 100.0 * r.h2d_gb_per_s / r.link_h2d_gb_per_s << "% of it)";
  }
  os << '\n';
  if (r.roofline_ms > 0) {
    os << "speeds           gather " << r.gather_gb_per_s
       << " GB/s (random K and V blocks from pinned memory), HBM read " << r.hbm_gb_per_s << " GB/s\n";
    os << "roofline         " << r.roofline_ms << " ms per step: gather " << r.roofline_gather_ms
       << " ms, HBM " << r.roofline_hbm_ms << " ms + GEMM " << r.roofline_gemm_ms
       << " ms (per layer the longer of the two, summed); the step takes " << r.ms_per_step / r.roofline_ms
       << "x the roofline\n";
  } else {
    os << "roofline         n/a (the link and HBM speeds are measured by the CUDA backend only)\n";
  }
  if (r.predicted_tokens_per_s > 0) {
    os << "sizing          ";
    for (const auto& row : r.sizing)
      os << ' ' << row.cache_slots << " cache slots: batch " << row.batch << ", " << row.tokens_per_s
         << " tokens/s;";
    os << " (predicted, best batch of each)\n";
    os << "prediction       batch " << r.batch << ", " << r.cache_slots
       << " cache slots: " << r.predicted_tokens_per_s << " tokens/s, " << r.predicted_ms_per_step
       << " ms per step, " << r.predicted_misses_per_step << " misses per step; measured " << r.tokens_per_s
       << " tokens/s (" << r.tokens_per_s / r.predicted_tokens_per_s << "x), " << r.ms_per_step << " ms, "
       << r.misses_per_step << " misses (calibration " << r.calibration_s << " s)\n";
  }
  if (!r.profile_ms.empty()) {
    os << "profile          ms per step, stages one after the other:";
    for (const auto& [what, ms] : r.profile_ms) os << ' ' << what << ' ' << ms;
    os << '\n';
  }
  os << "memory           " << gib(r.device_bytes) << " GiB " << (r.backend == "cuda" ? "HBM" : "device tier")
     << (r.hbm_budget_bytes > 0 ? " (budget " + std::to_string(gib(r.hbm_budget_bytes)) + " GiB)"
                                : std::string())
     << ", " << gib(r.host_bytes) << " GiB host KV cache\n";
  os << "last tokens     ";
  for (std::size_t b = 0; b < r.last_tokens.size() && b < 8; ++b) os << ' ' << r.last_tokens[b];
  if (r.last_tokens.size() > 8) os << " ...";
  os << '\n';
}

/// The report as one JSON object.
inline std::string report_json(const run_report& r) {
  std::ostringstream os;
  os << std::setprecision(9);
  os << "{\"preset\": \"" << r.preset << "\", \"method\": \"" << r.method << "\", \"backend\": \""
     << r.backend << "\", \"batch\": " << r.batch << ", \"batch_auto\": " << (r.batch_auto ? "true" : "false")
     << ", \"context\": " << r.context << ", \"steps\": " << r.steps << ", \"layers\": " << r.layers
     << ", \"distinct_prompts\": " << r.distinct_prompts << ", \"shared_blocks\": " << r.shared_blocks
     << ", \"cache_slots\": " << r.cache_slots << ", \"overlap\": " << (r.overlap ? "true" : "false")
     << ", \"lanes\": " << r.lanes << ", \"drift\": " << r.drift << ", \"prefill_s\": " << r.prefill_s
     << ", \"prefill_cached\": " << (r.prefill_cached ? "true" : "false") << ", \"decode_s\": " << r.decode_s
     << ", \"tokens_per_s\": " << r.tokens_per_s << ", \"ms_per_step\": " << r.ms_per_step
     << ", \"ms_per_layer\": " << r.ms_per_layer << ", \"misses_per_step\": " << r.misses_per_step
     << ", \"misses_per_head\": " << r.misses_per_head
     << ", \"locality\": " << (r.locality >= 0 ? std::to_string(r.locality) : std::string("null"))
     << ", \"h2d_gb_per_s\": " << r.h2d_gb_per_s << ", \"d2h_gb_per_s\": " << r.d2h_gb_per_s
     << ", \"device_bytes\": " << r.device_bytes << ", \"host_bytes\": " << r.host_bytes
     << ", \"hbm_budget_bytes\": " << r.hbm_budget_bytes
     << ", \"link_h2d_gb_per_s\": " << r.link_h2d_gb_per_s;
  const auto measured = [&](const char* name, double v) {
    os << ", \"" << name << "\": ";
    if (v > 0) {
      os << v;
    } else {
      os << "null";
    }
  };
  measured("gather_gb_per_s", r.gather_gb_per_s);
  measured("hbm_gb_per_s", r.hbm_gb_per_s);
  measured("roofline_ms", r.roofline_ms);
  measured("roofline_gather_ms", r.roofline_ms > 0 ? r.roofline_gather_ms : 0.0);
  measured("roofline_hbm_ms", r.roofline_ms > 0 ? r.roofline_hbm_ms : 0.0);
  measured("roofline_gemm_ms", r.roofline_ms > 0 ? r.roofline_gemm_ms : 0.0);
  if (r.predicted_tokens_per_s > 0) {
    os << ", \"cache_slots_auto\": " << (r.cache_slots_auto ? "true" : "false")
       << ", \"calibration_s\": " << r.calibration_s
       << ", \"predicted_tokens_per_s\": " << r.predicted_tokens_per_s
       << ", \"predicted_ms_per_step\": " << r.predicted_ms_per_step
       << ", \"predicted_misses_per_step\": " << r.predicted_misses_per_step << ", \"sizing\": [";
    for (std::size_t i = 0; i < r.sizing.size(); ++i) {
      os << (i > 0 ? ", " : "") << "{\"cache_slots\": " << r.sizing[i].cache_slots
         << ", \"batch\": " << r.sizing[i].batch << ", \"tokens_per_s\": " << r.sizing[i].tokens_per_s << '}';
    }
    os << ']';
  }
  if (!r.profile_ms.empty()) {
    os << ", \"profile_ms\": {";
    for (std::size_t i = 0; i < r.profile_ms.size(); ++i)
      os << (i > 0 ? ", " : "") << '"' << r.profile_ms[i].first << "\": " << r.profile_ms[i].second;
    os << '}';
  }
  os << "}";
  return os.str();
}

/// The progress line of long runs: "step i/n, tokens/s, misses per step" on stderr, at most every `period`
/// seconds and at the last step.
class progress_line {
 public:
  explicit progress_line(int total, double period = 5.0) : total_(total), period_(period) {}
  /// True when step `done` should print (the caller then gathers the misses, which may synchronise).
  bool due(int done) const {
    return done == total_ ||
           std::chrono::duration<double>(std::chrono::steady_clock::now() - last_).count() >= period_;
  }
  void print(int done, int batch, double misses) {
    last_ = std::chrono::steady_clock::now();
    const double elapsed = std::chrono::duration<double>(last_ - start_).count();
    std::fprintf(stderr, "  step %d/%d  %.1f tokens/s  %.1f misses/step\n", done, total_,
                 elapsed > 0 ? static_cast<double>(done) * batch / elapsed : 0.0,
                 done > 0 ? misses / done : 0.0);
  }

 private:
  int total_;
  double period_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_ = start_;
};

/// Writes `json` to `path`; false on failure.
inline bool write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text << '\n';
  return static_cast<bool>(f);
}

}  // namespace nosa_engine
