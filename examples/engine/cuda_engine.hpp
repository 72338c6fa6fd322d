#pragma once
/// \file
/// Entry point of the CUDA engine, callable from host translation units; defined in `cuda/engine.cu`.

#include "model.hpp"
#include "options.hpp"
#include "run_config.hpp"

#include <string>

namespace nosa_engine {

/// Runs the whole workload of `opt` on the current CUDA device: weights (random, generated on the device, or
/// read from `opt.weights`), `--batch auto`, prefill, warm-up, the timed decode steps (one CUDA graph per
/// step), and fills `report`. On failure returns false and sets `error` to one line.
bool run_cuda_engine(const model_config& model, const options& opt, run_report& report, std::string& error);

}  // namespace nosa_engine
