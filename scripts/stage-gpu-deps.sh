#!/usr/bin/env bash
# Copies what the GPU scripts need from this machine's Debian packages into .deps/, for a GPU machine that
# has no package registry. Nothing is downloaded: doctest-dev and libbenchmark-dev must be installed here
# (scripts/test.sh installs both).
#
#   - .deps/doctest: the test framework of scripts/gpu-suite.sh (one header and its CMake package files);
#   - .deps/benchmark: Google Benchmark for scripts/perf.sh (headers, the shared library under its file name,
#     its soname and its link name, libbenchmark_main.a, and the CMake package files), so that
#     `find_package(benchmark)` works with -Dbenchmark_DIR=.deps/benchmark/lib/cmake/benchmark or with
#     .deps/benchmark on CMAKE_PREFIX_PATH, and a program linked against it runs with
#     LD_LIBRARY_PATH=.deps/benchmark/lib.
#
#   scripts/stage-gpu-deps.sh        then send .deps along with the tree; scripts/gpu-suite.sh and
#                                    scripts/perf.sh find it
#
# Every absolute /usr path in the CMake files is made relative to the file's own location, so the folders
# work wherever they land. Google Benchmark's library needs only the C and C++ runtimes (libstdc++, libm,
# libgcc_s, libc), which every Linux with a C++ compiler has; the script checks that with ldd and stops if the
# library needs anything else.
#
# .deps/ is ignored through .git/info/exclude, so it never ends up in a commit.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Keep .deps/ out of git.
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n $exclude ]]; then
  mkdir -p "$(dirname "$exclude")"
  touch "$exclude"
  grep -qxF '/.deps/' "$exclude" || echo '/.deps/' >>"$exclude"
fi

# ---- doctest -----------------------------------------------------------------------------------------------

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

version=$(awk '/^#define DOCTEST_VERSION_(MAJOR|MINOR|PATCH) / { v = v (v ? "." : "") $3 } END { print v }' \
  "$dest/include/doctest/doctest.h")
echo "staged doctest $version in $dest:"
find "$dest" -type f | sort | sed 's/^/  /'

# ---- Google Benchmark --------------------------------------------------------------------------------------

dest=.deps/benchmark
header_dir=""
config_dir=""
library=""   # the link name, libbenchmark.so (a symbolic link to the real file)
main_lib=""
if command -v dpkg >/dev/null && dpkg -L libbenchmark-dev >/dev/null 2>&1; then
  header=$(dpkg -L libbenchmark-dev | grep -m1 '/benchmark/benchmark\.h$' || true)
  [[ -n $header ]] && header_dir=$(dirname "$header")
  config=$(dpkg -L libbenchmark-dev | grep -m1 '/benchmarkConfig\.cmake$' || true)
  [[ -n $config ]] && config_dir=$(dirname "$config")
  library=$(dpkg -L libbenchmark-dev | grep -m1 '/libbenchmark\.so$' || true)
  main_lib=$(dpkg -L libbenchmark-dev | grep -m1 '/libbenchmark_main\.a$' || true)
fi
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
[[ -z $header_dir && -f /usr/include/benchmark/benchmark.h ]] && header_dir=/usr/include/benchmark
for libdir in "/usr/lib/$multiarch" /usr/lib /usr/lib64; do
  [[ -z $config_dir && -f $libdir/cmake/benchmark/benchmarkConfig.cmake ]] && config_dir=$libdir/cmake/benchmark
  [[ -z $library && -e $libdir/libbenchmark.so ]] && library=$libdir/libbenchmark.so
  [[ -z $main_lib && -f $libdir/libbenchmark_main.a ]] && main_lib=$libdir/libbenchmark_main.a
done
if [[ -z $header_dir || -z $config_dir || -z $library || ! -e $library || -z $main_lib ]]; then
  echo "error: Google Benchmark is not installed here (headers: '${header_dir:-none}'," >&2
  echo "       CMake files: '${config_dir:-none}', library: '${library:-none}', main: '${main_lib:-none}')" >&2
  echo "       install Debian's libbenchmark-dev (apt-get install libbenchmark-dev) and run this again" >&2
  exit 1
fi
real_library=$(readlink -f "$library")
soname=$(objdump -p "$real_library" 2>/dev/null | awk '$1 == "SONAME" { print $2 }' || true)
[[ -n $soname ]] || soname=$(basename "$real_library")

# Its dependencies must be the C and C++ runtimes alone (Ubuntu 24.04 has those; it may lack anything else,
# e.g. libpfm, which some builds of Google Benchmark link).
runtimes='^(linux-vdso\.so|/lib64/ld-linux|ld-linux|libstdc\+\+\.so|libm\.so|libgcc_s\.so|libc\.so|libpthread\.so'
runtimes+='|libdl\.so|librt\.so)'
unexpected=$(ldd "$real_library" | awk '{ print $1 }' | grep -vE "$runtimes" || true)
if [[ -n $unexpected ]]; then
  echo "error: $real_library needs libraries a GPU machine may lack: ${unexpected//$'\n'/ }" >&2
  echo "       stage them next to it in $dest/lib (not done by this script)" >&2
  exit 1
fi

rm -rf "$dest"
mkdir -p "$dest/include/benchmark" "$dest/lib/cmake/benchmark"
cp "$header_dir"/*.h "$dest/include/benchmark/"
# Plain copies under all three names (links may not survive the trip to the GPU machine).
cp "$real_library" "$dest/lib/$(basename "$real_library")"
[[ $soname == "$(basename "$real_library")" ]] || cp "$real_library" "$dest/lib/$soname"
cp "$real_library" "$dest/lib/libbenchmark.so"
cp "$main_lib" "$dest/lib/libbenchmark_main.a"
cp "$config_dir"/*.cmake "$dest/lib/cmake/benchmark/"

# Relocate the CMake files. The config and targets files find their prefix from their own location, four
# levels up from <prefix>/lib/<multiarch>/cmake/benchmark; the copy sits at <prefix>/lib/cmake/benchmark,
# three levels up. Both also compare their location with the original /usr path to undo a /lib -> /usr/lib
# link; that comparison is dropped. The per-configuration files name the libraries under
# <prefix>/lib/<multiarch>/.
libdir_rel=$(dirname "$real_library")
libdir_rel=${libdir_rel#/usr/}
cmake_dir=$dest/lib/cmake/benchmark
for f in "$cmake_dir"/benchmarkConfig.cmake "$cmake_dir"/benchmarkTargets.cmake; do
  awk '
    /^# Use original install prefix when loaded through a/ { skip = 1 }
    skip && /^unset\(_realCurr\)$/ { skip = 0; next }
    skip { next }
    { print }
  ' "$f" >"$f.new"
  mv "$f.new" "$f"
done
sed -i 's|^get_filename_component(PACKAGE_PREFIX_DIR "${CMAKE_CURRENT_LIST_DIR}/\.\./\.\./\.\./\.\./" ABSOLUTE)$|get_filename_component(PACKAGE_PREFIX_DIR "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
  "$cmake_dir/benchmarkConfig.cmake"
# In the targets file: the first computation of _IMPORT_PREFIX (from this file) and the four steps up become
# one line three levels up.
awk '
  /^get_filename_component\(_IMPORT_PREFIX "\$\{CMAKE_CURRENT_LIST_FILE\}" PATH\)$/ {
    print "get_filename_component(_IMPORT_PREFIX \"${CMAKE_CURRENT_LIST_DIR}/../../..\" ABSOLUTE)"
    next
  }
  /^get_filename_component\(_IMPORT_PREFIX "\$\{_IMPORT_PREFIX\}" PATH\)$/ { next }
  { print }
' "$cmake_dir/benchmarkTargets.cmake" >"$cmake_dir/benchmarkTargets.cmake.new"
mv "$cmake_dir/benchmarkTargets.cmake.new" "$cmake_dir/benchmarkTargets.cmake"
for f in "$cmake_dir"/benchmarkTargets-*.cmake; do
  [[ -f $f ]] && sed -i "s|\${_IMPORT_PREFIX}/$libdir_rel/|\${_IMPORT_PREFIX}/lib/|g" "$f"
done
if grep -n '/usr' "$cmake_dir"/*.cmake; then
  echo "error: could not relocate the CMake files in $cmake_dir (the lines above still name /usr)" >&2
  exit 1
fi
if ! grep -q 'CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)' "$cmake_dir/benchmarkTargets.cmake" ||
  ! grep -q 'CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)' "$cmake_dir/benchmarkConfig.cmake"; then
  echo "error: the CMake files in $cmake_dir do not have the layout this script expects; check them by hand" >&2
  exit 1
fi

version=$(awk -F'"' '/set\(PACKAGE_VERSION "/ { print $2; exit }' "$cmake_dir/benchmarkConfigVersion.cmake")
echo "staged Google Benchmark ${version:-?} in $dest:"
find "$dest" -type f | sort | sed 's/^/  /'
