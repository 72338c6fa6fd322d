#!/usr/bin/env bash
# The decoding-throughput study (docs/throughput.md), on a machine with an NVIDIA GPU (run from anywhere; it
# works in the repository root):
#
#   1. configures a Release build in build-throughput/ (CUDA, examples on, tests and benchmarks off, so it
#      needs neither doctest nor Google Benchmark) and builds nosa-engine;
#   2. calibrates the drift: short nosa-offload runs at the first context for each value of DRIFTS, keeping
#      the one whose measured locality is nearest the paper's 0.944 (skipped when DRIFT is set);
#   3. for each HBM budget, context and method: one run with --batch auto (profiled: one more step stage by
#      stage, with PROFILE=1), then one per batch of BATCHES that is smaller than the auto batch; for the
#      offloading methods, one run at the auto batch with one lane when the auto run used more (LANES_COMPARE=1)
#      and one more --batch auto run per value of CACHE_SLOTS (slots beyond k that keep dropped blocks
#      resident), then one at its own best configuration (--batch auto --cache-slots auto: the batch and
#      slot-cache size of the highest tokens/s the engine predicts from a calibration run, BEST=1); every
#      run prints its step against its roofline (docs/engine.md) and runs with that drift, one prompt for the whole batch (the offloading methods share its
#      pages in the host pool, see docs/engine.md), and the prefill of each prompt kept in PREFILL_CACHE, so
#      that it is computed once per context and attention family;
#   4. writes one JSON object per run to $OUT/throughput.jsonl (a failed run is a line with its error) and
#      runs scripts/throughput_report.py, which writes $OUT/throughput.md and its PNG plots.
#
# Every run prints its progress and report to $OUT/throughput.log. The device-time limits of a shared GPU
# machine are usually shorter than the whole study: run it in parts (e.g. CONTEXTS=16384, then CONTEXTS=32768
# with DRIFT set to the calibrated value), each writing its own $OUT, and give all the throughput.jsonl files
# to the report: scripts/throughput_report.py part1/throughput.jsonl part2/throughput.jsonl --out docs.
#
# Environment (defaults in brackets):
#   OUT [out]  PRESET [nosa-8b]  BACKEND [cuda]  METHODS [full infllmv2-offload nosa-offload
#   nosa-resident, then with FP8=1 full-fp8 infllmv2-offload-fp8 nosa-offload-fp8]  FP8 [1] (0: the bf16
#   methods only; ignored when METHODS is set)  CONTEXTS [16384 32768 65536 98304]  BATCHES [1 4 16 64]  HBM_GIB ["80 whole"] ("whole":
#   the whole card)  CACHE_SLOTS [64] ("" for none)  STEPS [64] timed decode steps  WARMUP [4]  DRIFT [calibrated]  DRIFTS [0.02 0.05 0.1 0.2 0.4]
#   RUN_TIMEOUT [540] seconds per run  NOSA_THROUGHPUT_BUILD_DIR [build-throughput]  NOSA_CUDA_ARCHITECTURES
#   [90]  JOBS [all cores]  PYTHON [python3]  DRY_RUN [0] (1: print the runs instead of running them)
#   ENGINE [$NOSA_THROUGHPUT_BUILD_DIR/examples/nosa-engine] (an existing executable is used as it is, without
#   a build)  PREFILL_CACHE [/tmp/nosa-prefill-cache] ("" for none)  PROFILE [1]  LANES_COMPARE [1]  AUTO [1]
#   (0: no --batch auto runs, only the BATCHES)  BEST [1]  CALIBRATION_STEPS [16] steps of the calibration
#   run of the --batch auto runs  DEADLINE [none] (seconds: runs that would start later are
#   recorded as not run, so that a time-limited machine still gets its report). With AUTO=0 the cache-slot runs
#   still run (CACHE_SLOTS="" for none).
#   LINK_GBPS [51] the gather's reachable host-to-device bandwidth (spec §6: random 16 KiB blocks on the H200;
#   take the measured figure of docs/performance.md when it differs), for the report's PCIe target
#
# BACKEND=host PRESET=tiny runs the same study on the host backend (no --batch auto there: BATCHES only),
# which is how the script itself is checked on a machine without a GPU.
#
# The exit status is 0 when the build and the report succeeded; failed runs are recorded, not fatal.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
source scripts/common.sh

out=${OUT:-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
preset=${PRESET:-nosa-8b}
backend=${BACKEND:-cuda}
# The FP8 methods (complete KV blocks in FP8 E4M3, docs/engine.md) run beside their bf16 namesakes.
default_methods="full infllmv2-offload nosa-offload nosa-resident"
[[ ${FP8:-1} == 1 ]] && default_methods+=" full-fp8 infllmv2-offload-fp8 nosa-offload-fp8"
read -r -a methods <<<"${METHODS:-$default_methods}"
read -r -a contexts <<<"${CONTEXTS:-16384 32768 65536 98304}"
read -r -a batches <<<"${BATCHES-1 4 16 64}"
read -r -a budgets <<<"${HBM_GIB:-80 whole}"
read -r -a drifts <<<"${DRIFTS:-0.02 0.05 0.1 0.2 0.4}"
read -r -a cache_slots <<<"${CACHE_SLOTS-64}"
steps=${STEPS:-64}
warmup=${WARMUP:-4}
run_timeout=${RUN_TIMEOUT:-540}
build=${NOSA_THROUGHPUT_BUILD_DIR:-build-throughput}
python=${PYTHON:-python3}
dry_run=${DRY_RUN:-0}
link_gbps=${LINK_GBPS:-51}
prefill_cache=${PREFILL_CACHE-/tmp/nosa-prefill-cache}
profile=${PROFILE:-1}
lanes_compare=${LANES_COMPARE:-1}
auto_runs=${AUTO:-1}
best_runs=${BEST:-1}
calibration_steps=${CALIBRATION_STEPS:-16}
deadline=${DEADLINE:-}
results=$out/throughput.jsonl
log=$out/throughput.log
engine=${ENGINE:-$build/examples/nosa-engine}
: >"$results"
: >"$log"

say() { printf '%s\n' "$*" | tee -a "$log" >&2; }

# ---- 1. Build --------------------------------------------------------------------------------------------
if [[ $dry_run != 1 && -n ${ENGINE:-} && -x $engine ]]; then
  say "==> using $engine as it is"
elif [[ $dry_run != 1 ]]; then
  cuda_args=()
  if [[ $backend == cuda ]]; then
    nosa_cmake_args "$build"
    cuda_args=(-DNOSA_ENABLE_CUDA=ON "-DNOSA_CUDA_ARCHITECTURES=${NOSA_CUDA_ARCHITECTURES:-90}")
  else
    nosa_cmake_args "$build" host-only
    cuda_args=(-DNOSA_ENABLE_CUDA=OFF)
  fi
  say "==> building nosa-engine in $build"
  if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DNOSA_BUILD_TESTS=OFF -DNOSA_BUILD_BENCH=OFF \
    -DNOSA_BUILD_EXAMPLES=ON -DNOSA_INSTALL=OFF "${cuda_args[@]}" "${NOSA_CMAKE_ARGS[@]}" >>"$log" 2>&1 ||
    ! cmake --build "$build" --target nosa-engine --parallel "${JOBS:-$(nosa_jobs)}" >>"$log" 2>&1; then
    say "nosa-throughput: the build failed (see $log)"
    exit 1
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv >>"$log" 2>&1
fi

# One run of the engine; appends its JSON (or an error line) to $results. Arguments: a label, then the
# engine's options.
run_engine() {
  local label=$1
  shift
  local args=(--preset "$preset" --backend "$backend" --steps "$steps" "$@")
  [[ $backend == cuda ]] && args+=(--warmup "$warmup" --calibration-steps "$calibration_steps")
  [[ -n $prefill_cache ]] && args+=(--prefill-cache "$prefill_cache")
  if [[ $dry_run == 1 ]]; then
    echo "$engine ${args[*]}"
    return 0
  fi
  if [[ -n $deadline ]] && ((SECONDS >= deadline)); then
    printf '{"error": "not run: the study reached its deadline of %s s", "args": "%s", "phase": "%s", "hbm": "%s"}\n' \
      "$deadline" "${args[*]}" "$phase" "$budget" >>"$results"
    say "==> $label: not run (deadline)"
    return 0
  fi
  local json
  json=$(mktemp)
  say "==> $label: nosa-engine ${args[*]}"
  if timeout "$run_timeout" "$engine" "${args[@]}" --json "$json" >>"$log" 2>&1 && [[ -s $json ]]; then
    # The study's own labels: which phase the run belongs to and the HBM budget as asked for.
    "$python" -c 'import json,sys; r=json.load(open(sys.argv[1])); r.update(phase=sys.argv[2], hbm=sys.argv[3]); print(json.dumps(r))' \
      "$json" "$phase" "$budget" >>"$results"
  else
    local message
    message=$(grep 'nosa-engine: ' "$log" | tail -n 1 | sed 's/"/\\"/g')
    printf '{"error": "%s", "args": "%s", "phase": "%s", "hbm": "%s"}\n' "${message:-run failed or timed out}" \
      "${args[*]}" "$phase" "$budget" >>"$results"
    say "    failed: ${message:-run failed or timed out}"
  fi
  rm -f "$json"
}

# The value of `key` in the last JSON line of $results (empty when absent or null).
last_field() {
  tail -n 1 "$results" | "$python" -c "import json,sys; v=json.loads(sys.stdin.read()).get('$1'); print('' if v is None else v)"
}

# ---- 2. Drift calibration --------------------------------------------------------------------------------
drift=${DRIFT:-}
phase=calibration
budget=${budgets[0]}
if [[ -z $drift ]]; then
  if [[ $dry_run == 1 ]]; then
    drift=${drifts[0]}
  else
    best="" best_gap=""
    for d in "${drifts[@]}"; do
      calibration_budget=()
      [[ $budget != whole ]] && calibration_budget=(--hbm-gib "$budget")
      run_engine "calibration drift $d" --method nosa-offload --context "${contexts[0]}" --batch 4 --drift "$d" \
        "${calibration_budget[@]}"
      locality=$(last_field locality)
      [[ -z $locality ]] && continue
      gap=$("$python" -c "print(abs($locality - 0.944))")
      say "    drift $d: locality $locality"
      if [[ -z $best_gap ]] || "$python" -c "import sys; sys.exit(0 if $gap < $best_gap else 1)"; then
        best=$d best_gap=$gap
      fi
    done
    drift=${best:-${drifts[0]}}
    say "==> drift $drift (locality nearest 0.944)"
    # Calibration runs stay in the results (phase "calibration"); the report shows them in their own table.
  fi
fi

# ---- 3. The sweep -----------------------------------------------------------------------------------------
phase=sweep
for budget in "${budgets[@]}"; do
  budget_args=()
  [[ $budget != whole ]] && budget_args=(--hbm-gib "$budget")
  for context in "${contexts[@]}"; do
    for method in "${methods[@]}"; do
      common=(--method "$method" --context "$context" --drift "$drift" "${budget_args[@]}")
      auto=0
      if [[ $backend == cuda && $auto_runs == 1 ]]; then
        profile_args=()
        [[ $profile == 1 ]] && profile_args=(--profile)
        run_engine "$method, context $context, HBM $budget, batch auto" "${common[@]}" --batch auto "${profile_args[@]}"
        auto_lanes=1
        if [[ $dry_run != 1 ]]; then
          auto=$(last_field batch)
          auto_lanes=$(last_field lanes)
        fi
        if [[ $method == *-offload* && $lanes_compare == 1 && -n $auto && ${auto_lanes:-1} -gt 1 ]]; then
          phase=lanes
          run_engine "$method, context $context, HBM $budget, batch $auto, one lane" "${common[@]}" \
            --batch "$auto" --lanes 1
          phase=sweep
        fi
      fi
      if [[ $backend == cuda && $method == *-offload* ]]; then
        for slots in "${cache_slots[@]}"; do
          run_engine "$method, context $context, HBM $budget, batch auto, $slots cache slots" "${common[@]}" \
            --batch auto --cache-slots "$slots"
        done
        if [[ $best_runs == 1 && $auto_runs == 1 ]]; then
          run_engine "$method, context $context, HBM $budget, batch and cache slots auto" "${common[@]}" \
            --batch auto --cache-slots auto
        fi
      fi
      for batch in "${batches[@]}"; do
        if [[ $backend == cuda && $dry_run != 1 ]] && ((${auto:-0} > 0 && batch >= auto)); then
          continue
        fi
        if [[ $backend == cuda && $dry_run != 1 && $auto_runs == 1 && -z $auto ]]; then
          continue  # not even the auto batch fitted: smaller fixed batches may, but the auto run says why
        fi
        run_engine "$method, context $context, HBM $budget, batch $batch" "${common[@]}" --batch "$batch"
      done
    done
  done
done

# ---- 4. The report ----------------------------------------------------------------------------------------
[[ $dry_run == 1 ]] && exit 0
if ! "$python" scripts/throughput_report.py "$results" --out "$out" --link-gbps "$link_gbps" >>"$log" 2>&1; then
  say "nosa-throughput: the report failed (see $log)"
  exit 1
fi
say "==> $out: throughput.jsonl, throughput.md, plots, throughput.log"
