#!/usr/bin/env bash
# Builds the GPU programs on this machine (which needs nvcc, not a GPU) and stages them for a GPU machine of
# the same CUDA major version, so that the GPU machine's time goes to running them:
#
#   .deps/gpu-build.tar.xz   tests/<every CUDA test>, cuda-tests.txt (their names), examples/nosa-engine,
#                            bench/bench_cuda_step and lib/ (Google Benchmark's shared library, which the GPU
#                            machine may not have)
#
# On the GPU machine, with .deps travelling along with the tree (it is git-ignored):
#
#   tar xJf .deps/gpu-build.tar.xz -C /tmp        # unpacks /tmp/gpu-build
#   NOSA_GPU_PREBUILT=/tmp/gpu-build scripts/gpu-suite.sh
#   ENGINE=/tmp/gpu-build/examples/nosa-engine scripts/throughput.sh
#
# The programs link the CUDA runtime and cuBLAS dynamically: the GPU machine's toolkit provides them (put its
# lib64 on LD_LIBRARY_PATH if the loader does not find them there).
#
# Environment: NOSA_STAGE_BUILD_DIR (default build, the Release build of scripts/test.sh),
# NOSA_CUDA_ARCHITECTURES (default 90), JOBS (default: all cores).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

build=${NOSA_STAGE_BUILD_DIR:-build}
archs=${NOSA_CUDA_ARCHITECTURES:-90}
stage=.deps/gpu-build

exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n $exclude ]]; then
  mkdir -p "$(dirname "$exclude")"
  touch "$exclude"
  grep -qxF '/.deps/' "$exclude" || echo '/.deps/' >>"$exclude"
fi

nosa_cmake_args "$build"
nosa_log "configuring $build"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release "-DNOSA_CUDA_ARCHITECTURES=$archs" -DNOSA_BUILD_TESTS=ON \
  -DNOSA_BUILD_EXAMPLES=ON -DNOSA_BUILD_BENCH=ON "${NOSA_CMAKE_ARGS[@]}" >/dev/null
mapfile -t cuda_tests < <(cd "$build" && ctest -N -L cuda | sed -n 's/^ *Test *#[0-9]*: *\([^ ]*\).*$/\1/p')
if ((${#cuda_tests[@]} == 0)); then
  echo "error: no test carries the cuda label (is nvcc found?)" >&2
  exit 1
fi
nosa_log "building ${cuda_tests[*]} nosa-engine bench_cuda_step"
cmake --build "$build" --parallel "${JOBS:-$(nosa_jobs)}" --target "${cuda_tests[@]}" nosa-engine bench_cuda_step

rm -rf "$stage" "$stage.tar.xz"
mkdir -p "$stage/tests" "$stage/examples" "$stage/bench" "$stage/lib"
for t in "${cuda_tests[@]}"; do cp "$build/tests/$t" "$stage/tests/"; done
printf '%s\n' "${cuda_tests[@]}" >"$stage/cuda-tests.txt"
cp "$build/examples/nosa-engine" "$stage/examples/"
cp "$build/bench/bench_cuda_step" "$stage/bench/"
# Google Benchmark's shared library, under the name the program asks for.
lib=$(ldd "$build/bench/bench_cuda_step" | awk '/libbenchmark/ {print $3}')
[[ -n $lib ]] && cp "$lib" "$stage/lib/"
git rev-parse HEAD >"$stage/commit.txt" 2>/dev/null || true
tar cJf "$stage.tar.xz" -C .deps gpu-build
rm -rf "$stage"
nosa_log "$stage.tar.xz: $(du -h "$stage.tar.xz" | cut -f1), ${#cuda_tests[@]} CUDA tests, nosa-engine, bench_cuda_step"
