#!/usr/bin/env bash
# Builds the Python package nosa into a virtual environment and runs its tests (tests/python); scripts/test.sh
# runs it as its last step.
#
#   build-python/venv    the environment: pip installs the build and test requirements into it from PyPI
#   build-python/build   the CMake build of the extension modules, kept so that a second run rebuilds only
#                        what changed (hence pip's --no-build-isolation, with the build requirements in the
#                        environment)
#
# The CUDA backend is compiled when nvcc is installed in /usr/local/cuda (or on PATH); its tests need a GPU and
# skip without one, as do the PyTorch and transformers tests where those are not installed.
#
# NOSA_PYTHON_OFFLINE=1 is for a machine without a package registry whose Python already has numpy, pytest,
# ml_dtypes, nanobind and scikit-build-core (and PyTorch, transformers): the environment then sees that
# Python's packages (--system-site-packages) and pip installs nothing but nosa itself. That is how the GPU tests
# run on a GPU machine:  NOSA_PYTHON_OFFLINE=1 scripts/test-python.sh
#
# Environment: PYTHON (default python3). Extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

python=${PYTHON:-python3}
venv=build-python/venv
offline=${NOSA_PYTHON_OFFLINE:-0}

step="setup"
trap 'rc=$?; if ((rc != 0)); then echo; echo "nosa: PYTHON TESTS FAILED while $step (exit $rc)" >&2; fi' EXIT

step="making the environment $venv"
if [[ ! -x $venv/bin/python ]]; then
  nosa_log "$step"
  if [[ $offline == 1 ]]; then
    "$python" -m venv --system-site-packages "$venv"
    # When PYTHON is itself a virtual environment's interpreter, --system-site-packages reaches the base
    # interpreter's packages, not that environment's: a .pth file adds that environment's site-packages too.
    "$python" -c 'import site; print("\n".join(site.getsitepackages()))' \
      >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nosa-parent-site.pth"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
if [[ $offline != 1 ]]; then
  step="installing the build and test requirements"
  nosa_log "$step"
  "${pip[@]}" install --quiet "scikit-build-core>=0.10" "nanobind>=2.4" "numpy>=1.22" "pytest>=7" ml_dtypes
fi

# The toolchain of the C++ builds (nvcc when installed, ccache when present), as CMake definitions for pip.
nosa_cmake_args build-python/build
settings=(--config-settings=build-dir=build-python/build)
for arg in "${NOSA_CMAKE_ARGS[@]}"; do
  if [[ $arg == -D* ]]; then settings+=("--config-settings=cmake.define.${arg#-D}"); fi
done

step="building and installing the package (pip install .)"
nosa_log "$step"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nosa_jobs)}
"${pip[@]}" install --no-build-isolation --no-deps "${settings[@]}" .

step="testing the package (pytest tests/python)"
nosa_log "$step"
"$venv/bin/python" -c 'import nosa; print(f"nosa {nosa.__version__}: CUDA backend built: {nosa._core.cuda_built()}, CUDA devices: {nosa._core.cuda_device_count()}")'
"$venv/bin/python" -m pytest tests/python -q -rs -p no:cacheprovider "$@"
