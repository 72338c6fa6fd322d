# Shared by scripts/test.sh, scripts/test-python.sh and scripts/demo.sh (sourced, not run).

# Debian packages needed to configure and build nosa with its tests, examples and benchmarks, and the Python
# package (a Python with its headers and venv; the rest comes from PyPI).
NOSA_DEBIAN_PACKAGES=(cmake make g++ doctest-dev libbenchmark-dev python3-dev python3-venv)

nosa_log() { printf '\n==> %s\n' "$*"; }

# Installs whichever of NOSA_DEBIAN_PACKAGES dpkg does not report as installed.
nosa_install_prerequisites() {
  local missing=() pkg
  for pkg in "${NOSA_DEBIAN_PACKAGES[@]}"; do
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
      missing+=("$pkg")
    fi
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  nosa_log "installing missing packages: ${missing[*]}"
  local sudo=()
  if ((EUID != 0)); then
    if ! command -v sudo >/dev/null; then
      echo "error: need root (or sudo) to install: ${missing[*]}" >&2
      return 1
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# Fills the array NOSA_CMAKE_ARGS with the toolchain arguments of a configure step in build directory $1:
# the generator (Ninja when available, unless the build directory already chose one), nvcc when the CUDA
# toolkit is installed in its usual place (unless $2 is "host-only"), and ccache when present.
nosa_cmake_args() {
  local build_dir=$1 mode=${2:-}
  NOSA_CMAKE_ARGS=()
  if [[ ! -f "$build_dir/CMakeCache.txt" ]] && command -v ninja >/dev/null; then
    NOSA_CMAKE_ARGS+=(-G Ninja)
  fi
  if [[ $mode != host-only && -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:$PATH"
    NOSA_CMAKE_ARGS+=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
  fi
  if command -v ccache >/dev/null; then
    NOSA_CMAKE_ARGS+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
    if [[ $mode != host-only ]]; then
      NOSA_CMAKE_ARGS+=(-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
    fi
  fi
}

nosa_jobs() { nproc 2>/dev/null || echo 2; }

# True when CMake's find_package(<package> CONFIG) succeeds as things are: asks a throw-away project that
# enables `languages` (NONE, or what the package's config needs, e.g. CXX for one that looks for Threads).
nosa_cmake_finds_package() {
  local package=$1 languages=$2 probe rc
  probe=$(mktemp -d)
  cat >"$probe/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.21)
project(nosa_${package}_probe LANGUAGES ${languages})
find_package(${package} CONFIG QUIET)
if(NOT ${package}_FOUND)
  message(FATAL_ERROR "${package} not found")
endif()
EOF
  cmake -S "$probe" -B "$probe/build" >/dev/null 2>&1
  rc=$?
  rm -rf "$probe"
  return $rc
}
