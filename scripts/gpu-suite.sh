#!/usr/bin/env bash
# The CUDA test suite, on a machine with a GPU (run from anywhere; it works in the repository root):
#
#   1. configures a fresh Release build in build-gpu/ (NOSA_CUDA_ARCHITECTURES=90, examples on, benchmarks
#      off) and builds only the CUDA tests (ctest label `cuda`), nosa-replay and nosa-demo;
#   2. runs `ctest -L cuda`;
#   3. runs every CUDA test executable under compute-sanitizer (memcheck with leak checking, racecheck,
#      synccheck, initcheck) in its short variant (NOSA_TEST_SHORT=1: every kernel runs 10-100x slower
#      under a sanitizer), several at a time;
#   4. prints a summary table.
#
# Logs go to ${OUT:-out}/: build.log (configure and build), ctest.log, sanitizer.log (every sanitizer run,
# one after the other) and summary.txt. The exit status is 0 only when everything passed.
#
# It installs nothing and downloads nothing (GPU machines may have no network). doctest comes from, in order:
# NOSA_DOCTEST_DIR (a prefix holding include/doctest/doctest.h and lib/cmake/doctest/, or the directory of
# doctestConfig.cmake), an installed package CMake finds, or .deps/doctest as staged by
# scripts/stage-gpu-deps.sh on a machine that has Debian's doctest-dev.
#
# With NOSA_GPU_PREBUILT=DIR (the unpacked folder of scripts/stage-gpu-build.sh, built on a machine without a
# GPU) nothing is configured or built: the CUDA tests listed in DIR/cuda-tests.txt run from DIR/tests, each
# on its own, several at a time, then under the sanitizers as below.
#
# Environment: OUT (log folder), NOSA_GPU_BUILD_DIR (default build-gpu), NOSA_GPU_FRESH=0 (reuse that build
# directory instead of starting afresh), NOSA_SANITIZER_TOOLS and NOSA_SANITIZER_TESTS (which sanitizers run on
# which tests; default all four on every CUDA test), NOSA_GPU_JOBS (build jobs, default 16), NOSA_SANITIZER_JOBS
# (sanitizer runs at a time, default 8), NOSA_SANITIZER_TIMEOUT (seconds per sanitizer run, default 150),
# NOSA_CUDA_ARCHITECTURES (default 90).
#
# The tests run with NOSA_TEST_REQUIRE_GPU=1: a CUDA test that finds no usable device fails instead of
# skipping itself, so a passing suite really ran on the GPU.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

root=$(pwd)
out=${OUT:-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
build=${NOSA_GPU_BUILD_DIR:-build-gpu}
jobs=${NOSA_GPU_JOBS:-16}
sanitizer_jobs=${NOSA_SANITIZER_JOBS:-8}
sanitizer_timeout=${NOSA_SANITIZER_TIMEOUT:-150}
archs=${NOSA_CUDA_ARCHITECTURES:-90}

build_log=$out/build.log
ctest_log=$out/ctest.log
sanitizer_log=$out/sanitizer.log
summary=$out/summary.txt
: >"$build_log"
: >"$ctest_log"
: >"$sanitizer_log"
: >"$summary"

# A CUDA test without a device fails here rather than skipping itself (see tests/backend/cuda/gpu.hpp).
export NOSA_TEST_REQUIRE_GPU=1

suite_start=$SECONDS
failures=0
rows=()  # summary table rows: "step|what|result|seconds"

row() { rows+=("$1|$2|$3|$4"); }

print_summary() {
  {
    echo
    echo "nosa GPU suite summary ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), $((SECONDS - suite_start)) s in all)"
    printf '%-12s %-52s %-10s %8s\n' step what result seconds
    printf '%-12s %-52s %-10s %8s\n' ------------ ---------------------------------------------------- ---------- --------
    local r step what result secs
    for r in "${rows[@]}"; do
      IFS='|' read -r step what result secs <<<"$r"
      printf '%-12s %-52s %-10s %8s\n' "$step" "$what" "$result" "$secs"
    done
    echo
    if ((failures == 0)); then
      echo "nosa GPU suite: all passed"
    else
      echo "nosa GPU suite: $failures failure(s); see build.log, ctest.log and sanitizer.log in $out"
    fi
  } | tee -a "$summary"
}

finish() {
  print_summary
  exit $((failures == 0 ? 0 : 1))
}

# ---- The machine -------------------------------------------------------------------------------------------

prebuilt=${NOSA_GPU_PREBUILT:-}
if [[ -n $prebuilt ]]; then
  build=$(cd "$prebuilt" && pwd)
# A fresh build directory, unless NOSA_GPU_FRESH=0 asks to reuse one (a rerun on the same machine).
elif [[ ${NOSA_GPU_FRESH:-1} != 0 ]]; then
  rm -rf "$build"
fi
nosa_cmake_args "$build"
export PATH="/usr/local/cuda/bin:$PATH"
sanitizer=$(command -v compute-sanitizer || true)
for candidate in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [[ -z $sanitizer && -x $candidate ]] && sanitizer=$candidate
done
{
  echo "machine"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L 2>&1
    echo "driver, memory: $(nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader 2>&1)"
  else
    echo "nvidia-smi: not available"
  fi
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1 || echo 'not found')"
  echo "cmake: $(cmake --version | head -n 1)"
  echo "host compiler: $(c++ --version 2>/dev/null | head -n 1 || echo 'not found')"
  echo "compute-sanitizer: ${sanitizer:-not found} $([[ -n $sanitizer ]] && "$sanitizer" --version | grep -i version | head -n 1)"
  echo "cores: $(nproc)"
} | tee -a "$summary"

# ---- Prebuilt tests ----------------------------------------------------------------------------------------

# Runs the prebuilt CUDA tests, each on its own, `sanitizer_jobs` at a time, logging like ctest does.
run_prebuilt() {
  mapfile -t cuda_tests <"$build/cuda-tests.txt"
  echo "prebuilt: $build ($(cat "$build/commit.txt" 2>/dev/null || echo 'commit unknown'))" | tee -a "$summary"
  nosa_log "CUDA tests from $build (log: $ctest_log)"
  local test running=0
  for test in "${cuda_tests[@]}"; do
    if ((running >= sanitizer_jobs)); then
      wait -n
      running=$((running - 1))
    fi
    (
      start=$SECONDS
      timeout --kill-after=10 420 "$build/tests/$test" >"$build/$test.ctest.log" 2>&1
      echo "$? $((SECONDS - start))" >"$build/$test.ctest.status"
    ) &
    running=$((running + 1))
  done
  wait
  for test in "${cuda_tests[@]}"; do
    {
      echo "### $test"
      cat "$build/$test.ctest.log"
      echo
    } >>"$ctest_log"
    local rc secs result
    read -r rc secs <"$build/$test.ctest.status" || { rc=99; secs=?; }
    if ((rc == 0)); then result=ok; else result=FAILED; failures=$((failures + 1)); fi
    row ctest "$test" "$result" "$secs"
    tail -n 3 "$build/$test.ctest.log" | sed "s/^/  $test: /"
  done
}

if [[ -n $prebuilt ]]; then
  run_prebuilt
else

# ---- doctest -----------------------------------------------------------------------------------------------

doctest_args=()
doctest_from=""
if [[ -n ${NOSA_DOCTEST_DIR:-} ]]; then
  dir=$(cd "$NOSA_DOCTEST_DIR" 2>/dev/null && pwd || true)
  if [[ -n $dir && -f $dir/lib/cmake/doctest/doctestConfig.cmake ]]; then
    doctest_args=("-Ddoctest_DIR=$dir/lib/cmake/doctest")
  elif [[ -n $dir && -f $dir/doctestConfig.cmake ]]; then
    doctest_args=("-Ddoctest_DIR=$dir")
  else
    echo "error: NOSA_DOCTEST_DIR=$NOSA_DOCTEST_DIR holds no doctestConfig.cmake (nor lib/cmake/doctest/)" | tee -a "$summary"
    row configure doctest FAILED 0
    failures=$((failures + 1))
    finish
  fi
  doctest_from="NOSA_DOCTEST_DIR ($dir)"
else
  # Would the project's find_package(doctest REQUIRED) succeed as things are?
  if nosa_cmake_finds_package doctest NONE; then
    doctest_from="installed package"
  elif [[ -f $root/.deps/doctest/lib/cmake/doctest/doctestConfig.cmake ]]; then
    doctest_args=("-Ddoctest_DIR=$root/.deps/doctest/lib/cmake/doctest")
    doctest_from=".deps/doctest (staged by scripts/stage-gpu-deps.sh)"
  else
    {
      echo "error: doctest is not installed on this machine, so the tests cannot be built."
      echo "       On a machine with Debian's doctest-dev, run scripts/stage-gpu-deps.sh: it copies doctest into"
      echo "       .deps/doctest (git-ignored), which this script then uses when .deps travels with the tree."
      echo "       Or point NOSA_DOCTEST_DIR at a prefix holding include/doctest/doctest.h and lib/cmake/doctest/."
    } | tee -a "$summary"
    row configure doctest MISSING 0
    failures=$((failures + 1))
    finish
  fi
fi
echo "doctest: $doctest_from" | tee -a "$summary"

# ---- Configure and build -----------------------------------------------------------------------------------

nosa_log "configuring $build (log: $build_log)"
t0=$SECONDS
if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "-DNOSA_CUDA_ARCHITECTURES=$archs" -DNOSA_BUILD_TESTS=ON \
  -DNOSA_BUILD_EXAMPLES=ON -DNOSA_BUILD_BENCH=OFF "${NOSA_CMAKE_ARGS[@]}" "${doctest_args[@]}" >>"$build_log" 2>&1; then
  tail -n 30 "$build_log"
  row configure "cmake $build" FAILED $((SECONDS - t0))
  failures=$((failures + 1))
  finish
fi
if ! grep -q 'CUDA language ON' "$build_log"; then
  echo "error: CMake did not enable CUDA (no nvcc found?); see $build_log" | tee -a "$summary"
  row configure "cmake $build" "NO CUDA" $((SECONDS - t0))
  failures=$((failures + 1))
  finish
fi
row configure "cmake $build" ok $((SECONDS - t0))

# The CUDA tests are the tests labelled `cuda`; each is built by a target of the same name.
mapfile -t cuda_tests < <(cd "$build" && ctest -N -L cuda | sed -n 's/^ *Test *#[0-9]*: *\([^ ]*\).*$/\1/p')
if ((${#cuda_tests[@]} == 0)); then
  echo "error: no test carries the cuda label" | tee -a "$summary"
  row configure "ctest -N -L cuda" EMPTY 0
  failures=$((failures + 1))
  finish
fi
available=$(cmake --build "$build" --target help 2>/dev/null)
examples=()
for example in nosa-replay nosa-demo; do
  if grep -qE "(^|[ .:])$example([ :]|$)" <<<"$available"; then
    examples+=("$example")
  else
    row build "$example" "NO TARGET" 0
    failures=$((failures + 1))
  fi
done

# One build of everything, so that the cores stay busy; if it fails, the tests alone decide whether the
# suite can go on (a broken example is reported but does not stop the tests).
nosa_log "building ${cuda_tests[*]} ${examples[*]} with $jobs jobs (log: $build_log)"
t0=$SECONDS
if cmake --build "$build" --parallel "$jobs" --target "${cuda_tests[@]}" "${examples[@]}" >>"$build_log" 2>&1; then
  row build "${#cuda_tests[@]} CUDA tests, ${examples[*]}" ok $((SECONDS - t0))
else
  grep -E 'error|Error' "$build_log" | head -n 40
  row build "${#cuda_tests[@]} CUDA tests, ${examples[*]}" FAILED $((SECONDS - t0))
  failures=$((failures + 1))
  t0=$SECONDS
  echo "=== building the CUDA tests alone ===" >>"$build_log"
  if cmake --build "$build" --parallel "$jobs" --target "${cuda_tests[@]}" >>"$build_log" 2>&1; then
    row build "${#cuda_tests[@]} CUDA tests alone" ok $((SECONDS - t0))
  else
    row build "${#cuda_tests[@]} CUDA tests alone" FAILED $((SECONDS - t0))
    finish
  fi
fi

# ---- ctest -------------------------------------------------------------------------------------------------

nosa_log "ctest -L cuda (log: $ctest_log)"
t0=$SECONDS
# Several at a time: much of each test's time is the host backend it is compared with. Verbose, so that the
# log keeps what every run saw (near-ties, misses, largest output and score differences).
(cd "$build" && ctest -L cuda --verbose --output-on-failure --timeout 420 --parallel "$sanitizer_jobs") \
  >"$ctest_log" 2>&1
ctest_rc=$?
grep -E '^[0-9]+/[0-9]+ Test +#' "$ctest_log"
while IFS= read -r line; do
  name=$(sed -n 's/^.*Test *#[0-9]*: *\([^ ]*\) .*$/\1/p' <<<"$line")
  secs=$(sed -n 's/^.* \([0-9.]*\) sec$/\1/p' <<<"$line")
  if grep -q 'Passed' <<<"$line"; then result=ok; else result=FAILED; fi
  row ctest "$name" "$result" "${secs:-?}"
done < <(grep -E '^[0-9]+/[0-9]+ Test +#[0-9]+: ' "$ctest_log")
if ((ctest_rc != 0)); then
  failures=$((failures + 1))
  row ctest "ctest -L cuda (exit $ctest_rc)" FAILED $((SECONDS - t0))
fi

fi  # built here

# ---- compute-sanitizer -------------------------------------------------------------------------------------

if [[ -z $sanitizer ]]; then
  echo "compute-sanitizer not found: sanitizer runs skipped" | tee -a "$summary"
  row sanitizer "compute-sanitizer" MISSING 0
  failures=$((failures + 1))
  finish
fi

# One run: tool, test name. Writes its log to $logs/<tool>.<test>.log and its status and time beside it.
logs=$build/sanitizer-logs
rm -rf "$logs"
mkdir -p "$logs"
sanitize() {
  local tool=$1 test=$2 extra=()
  local log=$logs/$tool.$test.log start=$SECONDS rc
  case $tool in
    memcheck) extra=(--leak-check full) ;;
  esac
  {
    echo "### compute-sanitizer --tool $tool ${extra[*]} $test (NOSA_TEST_SHORT=1)"
    # The case named "wrong kind of memory" makes CUDA API calls fail on purpose, which a sanitizer reports.
    NOSA_TEST_SHORT=1 timeout --kill-after=10 "$sanitizer_timeout" "$sanitizer" --tool "$tool" "${extra[@]}" \
      --error-exitcode 1 --print-limit 20 "$build/tests/$test" --no-version --test-case-exclude='*wrong kind of memory*'
    rc=$?
    echo "### exit $rc after $((SECONDS - start)) s"
  } >"$log" 2>&1
  echo "$rc $((SECONDS - start))" >"$log.status"
}

read -r -a tools <<<"${NOSA_SANITIZER_TOOLS-racecheck memcheck initcheck synccheck}"  # the slowest first
# NOSA_SANITIZER_TESTS: the tests to run under the sanitizers (default: every CUDA test).
[[ -n ${NOSA_SANITIZER_TESTS:-} ]] && read -r -a cuda_tests <<<"$NOSA_SANITIZER_TESTS"
nosa_log "compute-sanitizer: ${tools[*]} on ${#cuda_tests[@]} tests, $sanitizer_jobs at a time (log: $sanitizer_log)"
t0=$SECONDS
running=0
for tool in "${tools[@]}"; do
  for test in "${cuda_tests[@]}"; do
    if ((running >= sanitizer_jobs)); then
      wait -n
      running=$((running - 1))
    fi
    sanitize "$tool" "$test" &
    running=$((running + 1))
  done
done
wait
for tool in "${tools[@]}"; do
  for test in "${cuda_tests[@]}"; do
    log=$logs/$tool.$test.log
    cat "$log" >>"$sanitizer_log"
    echo >>"$sanitizer_log"
    read -r rc secs <"$log.status" || { rc=99; secs=?; }
    case $rc in
      0) result=ok ;;
      124 | 137) result=TIMEOUT ;;
      *) result=FAILED ;;
    esac
    [[ $result == ok ]] || failures=$((failures + 1))
    row "$tool" "$test" "$result" "$secs"
  done
done
echo "sanitizer runs took $((SECONDS - t0)) s" | tee -a "$summary"

finish
