#!/usr/bin/env bash
# Builds the nosa demo (Release, in build/) and runs it; arguments are passed to the demo.
# On Debian, installs missing build packages first.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

nosa_install_prerequisites
nosa_cmake_args build
nosa_log "building nosa-demo"
# Same configuration as scripts/test.sh, so the two scripts share build/ without reconfiguring it.
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release "${NOSA_CMAKE_ARGS[@]}" >/dev/null
cmake --build build --parallel "$(nosa_jobs)" --target nosa-demo
nosa_log "running build/examples/nosa-demo $*"
exec build/examples/nosa-demo "$@"
