#!/usr/bin/env bash
# Copies the test framework the GPU suite needs (doctest: one header and its CMake package files) from this
# machine's Debian package into .deps/doctest, for a GPU machine that has no package registry. Nothing is
# downloaded: doctest-dev must be installed here (scripts/test.sh installs it).
#
#   scripts/stage-gpu-deps.sh        then send .deps along with the tree; scripts/gpu-suite.sh finds it
#
# .deps/ is ignored through .git/info/exclude, so it never ends up in a commit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=.deps/doctest
header=""
config_dir=""

# Where Debian's doctest-dev put its files (dpkg knows; the usual places otherwise).
if command -v dpkg >/dev/null && dpkg -L doctest-dev >/dev/null 2>&1; then
  header=$(dpkg -L doctest-dev | grep -m1 '/doctest/doctest\.h$' || true)
  config=$(dpkg -L doctest-dev | grep -m1 '/doctestConfig\.cmake$' || true)
  [[ -n $config ]] && config_dir=$(dirname "$config")
fi
[[ -z $header && -f /usr/include/doctest/doctest.h ]] && header=/usr/include/doctest/doctest.h
if [[ -z $config_dir ]]; then
  for dir in /usr/lib/cmake/doctest /usr/lib/x86_64-linux-gnu/cmake/doctest /usr/share/doctest/cmake; do
    if [[ -f $dir/doctestConfig.cmake ]]; then
      config_dir=$dir
      break
    fi
  done
fi
if [[ -z $header || -z $config_dir ]]; then
  echo "error: doctest is not installed here (header: '${header:-none}', CMake files: '${config_dir:-none}')" >&2
  echo "       install Debian's doctest-dev (apt-get install doctest-dev) and run this again" >&2
  exit 1
fi

rm -rf "$dest"
mkdir -p "$dest/include/doctest" "$dest/lib/cmake/doctest"
cp "$header" "$dest/include/doctest/doctest.h"
cp "$config_dir"/*.cmake "$dest/lib/cmake/doctest/"

# The Debian targets file names its install prefix (/usr) literally; make it the prefix of the copy, found
# from the file's own location (lib/cmake/doctest -> three levels up), so the folder works wherever it lands.
targets="$dest/lib/cmake/doctest/doctestTargets.cmake"
if [[ -f $targets ]] && grep -q '^set(_IMPORT_PREFIX "/usr")$' "$targets"; then
  sed -i 's|^set(_IMPORT_PREFIX "/usr")$|get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
    "$targets"
fi
if [[ -f $targets ]] && grep -q '_IMPORT_PREFIX "/usr"' "$targets"; then
  echo "error: could not relocate $targets (it still points at /usr)" >&2
  exit 1
fi

# Keep .deps/ out of git.
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n $exclude ]]; then
  mkdir -p "$(dirname "$exclude")"
  touch "$exclude"
  grep -qxF '/.deps/' "$exclude" || echo '/.deps/' >>"$exclude"
fi

version=$(awk '/^#define DOCTEST_VERSION_(MAJOR|MINOR|PATCH) / { v = v (v ? "." : "") $3 } END { print v }' \
  "$dest/include/doctest/doctest.h")
echo "staged doctest $version in $dest:"
find "$dest" -type f | sort | sed 's/^/  /'
