#!/usr/bin/env bash
# Builds nosa and runs the whole test suite; on Debian, installs missing build packages first.
#
#   build/       Release build: host tests, CUDA tests (when nvcc is installed; they skip without a GPU),
#                header self-containment check, packaging tests
#   build-asan/  Debug build with AddressSanitizer and UBSan: host tests and examples
#   build-python/  the Python package, built with pip in a virtual environment and tested with pytest
#                (scripts/test-python.sh)
#
# Extra arguments are passed to both configure steps, e.g. scripts/test.sh -DNOSA_WARNINGS_AS_ERRORS=ON
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

step="setup"
trap 'rc=$?; if ((rc != 0)); then echo; echo "nosa: TESTS FAILED while $step (exit $rc)" >&2; fi' EXIT

step="installing prerequisites"
nosa_install_prerequisites
jobs=$(nosa_jobs)

step="configuring build/"
nosa_cmake_args build
nosa_log "$step"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${NOSA_CMAKE_ARGS[@]}" "$@"
step="building build/"
nosa_log "$step"
cmake --build build --parallel "$jobs"
step="testing build/"
nosa_log "$step"
ctest --test-dir build --output-on-failure --parallel "$jobs"

# CUDA and the header check are left to the build above: the sanitizers cover host code only.
step="configuring build-asan/"
nosa_cmake_args build-asan host-only
nosa_log "$step"
# -O1 keeps the long generation tests to seconds; the sanitizers lose nothing at that level.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug "-DCMAKE_CXX_FLAGS_DEBUG=-g -O1" -DNOSA_SANITIZE=ON \
  -DNOSA_ENABLE_CUDA=OFF -DNOSA_CHECK_HEADERS=OFF \
  -DNOSA_BUILD_TESTS=ON -DNOSA_BUILD_EXAMPLES=ON -DNOSA_BUILD_BENCH=OFF \
  "${NOSA_CMAKE_ARGS[@]}" "$@"
step="building build-asan/"
nosa_log "$step"
cmake --build build-asan --parallel "$jobs"
step="testing build-asan/"
nosa_log "$step"
ctest --test-dir build-asan --output-on-failure --parallel "$jobs" -LE packaging

step="building and testing the Python package"
scripts/test-python.sh

echo
echo "nosa: all tests passed (build/ Release, build-asan/ ASan+UBSan, build-python/ Python package)"
