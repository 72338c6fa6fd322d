#!/usr/bin/env bash
# The performance run, on a machine with an NVIDIA GPU (run from anywhere; it works in the repository root):
#
#   1. configures a fresh Release build in build-perf/ (NOSA_CUDA_ARCHITECTURES=90, benchmarks on, tests and
#      examples off) and builds bench_cuda_step;
#   2. reads the card's state with read-only nvidia-smi queries (clocks, PCIe link, power, other processes);
#   3. runs bench_cuda_step (ceilings, gather, attention, whole step; a few minutes, bounded by a timeout)
#      with --benchmark_out=$OUT/perf.json;
#   4. runs bench/sdpa_peer.py (PyTorch SDPA at the same shapes, when PyTorch is installed), then
#      scripts/perf_report.py, which writes $OUT/performance.md and the PNG plots beside it.
#
# $OUT (default out/) then holds perf.json, sdpa.jsonl, performance.md, five PNGs and perf.log (everything
# this script printed: build, machine, benchmark output): nine files (fetch sdpa.jsonl with the others; the
# report can be regenerated from the two JSON files). docs/performance.md is that performance.md, with
# the PNGs copied next to it.
#
# It never changes clocks, power limits, persistence or compute mode, or any other GPU setting: the card is
# measured as it is found. It installs and downloads nothing (GPU machines may have no network). Google
# Benchmark comes from, in order: NOSA_BENCHMARK_DIR (a prefix holding lib/cmake/benchmark/, or the directory
# of benchmarkConfig.cmake), an installed package CMake finds, or .deps/benchmark as staged by
# scripts/stage-gpu-deps.sh on a machine that has Debian's libbenchmark-dev (.deps is git-ignored: send it
# along with the tree).
#
# Environment: OUT (output folder), NOSA_PERF_BUILD_DIR (default build-perf), NOSA_PERF_FRESH=0 (reuse that
# build directory), NOSA_PERF_JOBS (build jobs, default: all cores), NOSA_CUDA_ARCHITECTURES (default 90),
# NOSA_PERF_TIMEOUT (seconds the benchmarks may run, default 290), NOSA_PERF_REPETITIONS (default 3),
# NOSA_PERF_FILTER (a --benchmark_filter regex, default all), NOSA_BENCH_ITERATIONS (iterations of the stage
# benchmarks, default 100), PYTHON (default python3).
#
# The exit status is 0 only when the build, every benchmark and the report succeeded.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
source scripts/common.sh

root=$(pwd)
out=${OUT:-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
build=${NOSA_PERF_BUILD_DIR:-build-perf}
jobs=${NOSA_PERF_JOBS:-$(nosa_jobs)}
archs=${NOSA_CUDA_ARCHITECTURES:-90}
limit=${NOSA_PERF_TIMEOUT:-290}
repetitions=${NOSA_PERF_REPETITIONS:-3}
python=${PYTHON:-python3}
log=$out/perf.log
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Read-only queries of the card's state; fields a driver does not know are left out.
gpu_state() {
  command -v nvidia-smi >/dev/null || {
    echo "nvidia-smi: not available"
    return 0
  }
  local fields=(name driver_version pstate clocks.sm clocks.max.sm clocks.mem clocks.max.mem
    pcie.link.gen.current pcie.link.gen.max pcie.link.width.current pcie.link.width.max power.draw
    power.limit temperature.gpu utilization.gpu memory.used memory.total persistence_mode compute_mode)
  local ok=() f
  for f in "${fields[@]}"; do
    nvidia-smi --query-gpu="$f" --format=csv,noheader >/dev/null 2>&1 && ok+=("$f")
  done
  if ((${#ok[@]} > 0)); then
    local IFS=,
    nvidia-smi --query-gpu="${ok[*]}" --format=csv 2>&1
  fi
  local apps
  apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null)
  echo "other processes on the GPU: ${apps:-none}"
}

run() {
  local start=$SECONDS
  echo "nosa performance run, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), in $root"
  export PATH="/usr/local/cuda/bin:$PATH"

  # ---- Google Benchmark --------------------------------------------------------------------------------
  local bench_args=() from=""
  if [[ -n ${NOSA_BENCHMARK_DIR:-} ]]; then
    local dir
    dir=$(cd "$NOSA_BENCHMARK_DIR" 2>/dev/null && pwd) || dir=""
    if [[ -n $dir && -f $dir/lib/cmake/benchmark/benchmarkConfig.cmake ]]; then
      bench_args=("-Dbenchmark_DIR=$dir/lib/cmake/benchmark")
      export LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    elif [[ -n $dir && -f $dir/benchmarkConfig.cmake ]]; then
      bench_args=("-Dbenchmark_DIR=$dir")
    else
      echo "error: NOSA_BENCHMARK_DIR=$NOSA_BENCHMARK_DIR holds no benchmarkConfig.cmake (nor lib/cmake/benchmark/)"
      return 1
    fi
    from="NOSA_BENCHMARK_DIR ($dir)"
  else
    # Would find_package(benchmark) succeed as things are? (C++ enabled: the package looks for Threads.)
    if nosa_cmake_finds_package benchmark CXX; then
      from="installed package"
    elif [[ -f $root/.deps/benchmark/lib/cmake/benchmark/benchmarkConfig.cmake ]]; then
      bench_args=("-Dbenchmark_DIR=$root/.deps/benchmark/lib/cmake/benchmark")
      export LD_LIBRARY_PATH="$root/.deps/benchmark/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      from=".deps/benchmark (staged by scripts/stage-gpu-deps.sh)"
    else
      echo "error: Google Benchmark is not installed on this machine, so the benchmarks cannot be built."
      echo "       On a machine with Debian's libbenchmark-dev, run scripts/stage-gpu-deps.sh: it copies it into"
      echo "       .deps/benchmark (git-ignored), which this script then uses when .deps travels with the tree."
      echo "       Or point NOSA_BENCHMARK_DIR at a prefix holding include/benchmark/ and lib/cmake/benchmark/."
      return 1
    fi
  fi
  echo "Google Benchmark: $from"

  # ---- Configure and build -----------------------------------------------------------------------------
  [[ ${NOSA_PERF_FRESH:-1} == 0 ]] || rm -rf "$build"
  nosa_cmake_args "$build"
  nosa_log "configuring $build"
  local t0=$SECONDS
  if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "-DNOSA_CUDA_ARCHITECTURES=$archs" -DNOSA_BUILD_TESTS=OFF \
    -DNOSA_BUILD_EXAMPLES=OFF -DNOSA_BUILD_BENCH=ON -DNOSA_INSTALL=OFF "${NOSA_CMAKE_ARGS[@]}" "${bench_args[@]}" \
    >"$tmp/configure.log" 2>&1; then
    cat "$tmp/configure.log"
    echo "error: configuring $build failed"
    return 1
  fi
  if ! grep -q 'CUDA language ON' "$tmp/configure.log"; then
    cat "$tmp/configure.log"
    echo "error: CMake did not enable CUDA (no nvcc found?)"
    return 1
  fi
  nosa_log "building bench_cuda_step with $jobs jobs"
  if ! cmake --build "$build" --parallel "$jobs" --target bench_cuda_step; then
    echo "error: building bench_cuda_step failed"
    return 1
  fi
  echo "configure and build took $((SECONDS - t0)) s"
  local bench=$build/bench/bench_cuda_step

  # ---- The machine -------------------------------------------------------------------------------------
  {
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1; fi
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1 || echo 'not found')"
    echo "host compiler: $(c++ --version 2>/dev/null | head -n 1 || echo 'not found')"
    echo "cores: $(nproc)"
    echo
    echo "before the run:"
    gpu_state
  } >"$tmp/machine.txt"
  nosa_log "the machine"
  cat "$tmp/machine.txt"

  # ---- Benchmarks --------------------------------------------------------------------------------------
  nosa_log "running bench_cuda_step (at most $limit s)"
  rm -f "$out/perf.json"
  t0=$SECONDS
  local filter=()
  [[ -n ${NOSA_PERF_FILTER:-} ]] && filter=("--benchmark_filter=$NOSA_PERF_FILTER")
  NOSA_BENCH_REQUIRE_GPU=1 timeout --signal=INT --kill-after=30 "$limit" "$bench" \
    "--benchmark_out=$out/perf.json" --benchmark_out_format=json "--benchmark_repetitions=$repetitions" \
    --benchmark_display_aggregates_only=true --benchmark_min_time=0.05 "${filter[@]}"
  local bench_rc=$?
  echo "bench_cuda_step exited with $bench_rc after $((SECONDS - t0)) s"
  ((bench_rc == 124 || bench_rc == 130 || bench_rc == 137)) && echo "warning: the benchmarks ran past $limit s and were stopped"
  {
    echo
    echo "after the run:"
    gpu_state
  } >>"$tmp/machine.txt"
  tail -n +"$(grep -n '^after the run:' "$tmp/machine.txt" | cut -d: -f1)" "$tmp/machine.txt"

  # ---- The peer: PyTorch SDPA at the same shapes, same run ---------------------------------------------
  local peer_args=()
  if "$python" -c 'import torch' >/dev/null 2>&1; then
    nosa_log "timing PyTorch SDPA at the same shapes (bench/sdpa_peer.py)"
    if timeout 300 "$python" bench/sdpa_peer.py --out "$out/sdpa.jsonl" >"$tmp/sdpa.txt" 2>&1; then
      peer_args=(--peer "$out/sdpa.jsonl")
    else
      echo "warning: bench/sdpa_peer.py failed; the page has no peer table"
    fi
    grep -v '^#' "$tmp/sdpa.txt" | head -n 80
  else
    echo "PyTorch is not installed here: the page has no peer table"
  fi

  # ---- Report ------------------------------------------------------------------------------------------
  if [[ ! -s $out/perf.json ]]; then
    echo "error: bench_cuda_step wrote no $out/perf.json"
    return 1
  fi
  nosa_log "writing the report"
  "$python" scripts/perf_report.py "$out/perf.json" --out "$out" --machine "$tmp/machine.txt" "${peer_args[@]}" \
    --fail-on-errors
  local report_rc=$?
  echo
  echo "files in $out:"
  ls -l "$out"
  echo "the whole run took $((SECONDS - start)) s"
  if ((bench_rc != 0 || report_rc != 0)); then
    echo "nosa performance run: FAILED (bench_cuda_step exit $bench_rc, report exit $report_rc)"
    return 1
  fi
  echo "nosa performance run: done"
}

run 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
