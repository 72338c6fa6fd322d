# Build settings and helper functions for nosa's own tests, examples and benchmarks.
#
# Nothing here reaches the exported targets: warnings and sanitizers live on INTERFACE targets that are
# neither installed nor exported, and CUDA architectures are set only on executables built here.

include_guard(GLOBAL)
include(nosaHeaderCheck)

# Standard C++ only (-std=c++20, not gnu++20), so nothing comes to rely on compiler extensions. This is a
# variable of nosa's directory scope: it reaches nosa's own executables, not a parent project.
if(NOT DEFINED CMAKE_CXX_EXTENSIONS)
  set(CMAKE_CXX_EXTENSIONS OFF)
endif()

# ---- Warnings: every executable nosa builds for itself -----------------------------------------------------

add_library(nosa_internal_warnings INTERFACE)
target_compile_options(
  nosa_internal_warnings
  INTERFACE "$<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>:-Wall;-Wextra;-Wpedantic>"
            "$<$<COMPILE_LANG_AND_ID:CXX,MSVC>:/W4>"
            # nvcc passes these to the host compiler; -Wpedantic would only flag nvcc's generated code.
            "$<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>")
if(NOSA_WARNINGS_AS_ERRORS)
  target_compile_options(
    nosa_internal_warnings
    INTERFACE "$<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang,AppleClang>:-Werror>"
              "$<$<COMPILE_LANG_AND_ID:CXX,MSVC>:/WX>" "$<$<COMPILE_LANGUAGE:CUDA>:-Werror=all-warnings>")
endif()

# ---- Sanitizers: tests and examples only (host code) -------------------------------------------------------

add_library(nosa_internal_sanitizers INTERFACE)
if(NOSA_SANITIZE)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    set(_nosa_sanitize_flags -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all)
    target_compile_options(nosa_internal_sanitizers
                           INTERFACE "$<$<COMPILE_LANGUAGE:CXX>:${_nosa_sanitize_flags}>")
    target_link_options(nosa_internal_sanitizers INTERFACE "$<$<LINK_LANGUAGE:CXX>:${_nosa_sanitize_flags}>")
  else()
    message(WARNING "NOSA_SANITIZE is not supported with ${CMAKE_CXX_COMPILER_ID}; ignored")
  endif()
endif()

# ---- CUDA sources of nosa's own executables ----------------------------------------------------------------

# Sets `out` to TRUE when any of the given sources is a CUDA source (.cu).
function(_nosa_has_cuda_sources out)
  set(_has FALSE)
  foreach(src IN LISTS ARGN)
    if(src MATCHES "\\.cu$")
      set(_has TRUE)
    endif()
  endforeach()
  set(${out} ${_has} PARENT_SCOPE)
endfunction()

# Compiles the CUDA sources of `target` as C++20. CMake versions that do not know nvcc's C++20 switch
# (3.25 among them) do not offer the cuda_std_20 feature, so the flag is passed directly there.
function(nosa_target_cuda_std_20 target)
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    target_compile_features(${target} PRIVATE cuda_std_20)
  else()
    target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>")
  endif()
endfunction()

# Settings shared by nosa's own executables that contain CUDA sources. nosa::cuda brings the shared CUDA
# runtime, so CMake must not add the static one it links into CUDA executables by default.
function(_nosa_setup_cuda_executable target)
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${NOSA_CUDA_ARCHITECTURES}"
                                             CUDA_RUNTIME_LIBRARY Shared)
  nosa_target_cuda_std_20(${target})
  target_link_libraries(${target} PRIVATE nosa::cuda)
endfunction()

# Sets `skip` to TRUE (and says why) when the given sources need CUDA and CUDA is not enabled.
function(_nosa_check_cuda_available kind name skip)
  _nosa_has_cuda_sources(_cuda ${ARGN})
  if(_cuda AND NOT NOSA_CUDA_LANGUAGE_ENABLED)
    message(STATUS "nosa: not building CUDA ${kind} ${name} (no CUDA compiler or NOSA_ENABLE_CUDA=OFF)")
    set(${skip} TRUE PARENT_SCOPE)
  else()
    set(${skip} FALSE PARENT_SCOPE)
  endif()
endfunction()

# Checks the arguments a nosa_add_* function parsed into arg_* (a macro, so it sees the caller's scope).
macro(_nosa_validate_target_args fn)
  if(NOT arg_NAME OR NOT arg_SOURCES)
    message(FATAL_ERROR "${fn}: NAME and SOURCES are required")
  endif()
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "${fn}: unexpected arguments: ${arg_UNPARSED_ARGUMENTS}")
  endif()
endmacro()

# ---- Public helpers ----------------------------------------------------------------------------------------

# nosa_add_test(NAME <name> SOURCES <src>... [LIBS <lib>...] [LABELS <label>...])
#
# One doctest executable <name> registered as the ctest test <name>. It links nosa::core, doctest and the
# shared doctest main, plus LIBS, and may include test helpers and example code relative to tests/ and
# examples/ (#include "reference/....hpp", #include "common/....hpp").
#
# Sources ending in .cu make it a CUDA test: it then also links nosa::cuda, is built for
# NOSA_CUDA_ARCHITECTURES, gets the label `cuda` (host tests get `host`), and is left out when CUDA is not
# enabled. A CUDA test run on a machine without a GPU must skip itself at run time.
function(nosa_add_test)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME" "SOURCES;LIBS;LABELS")
  _nosa_validate_target_args(nosa_add_test)
  _nosa_check_cuda_available(test ${arg_NAME} _skip ${arg_SOURCES})
  if(_skip)
    return()
  endif()
  _nosa_has_cuda_sources(_cuda ${arg_SOURCES})

  add_executable(${arg_NAME} ${arg_SOURCES})
  target_link_libraries(${arg_NAME} PRIVATE nosa_doctest_main nosa::core doctest::doctest
                                            nosa_internal_warnings nosa_internal_sanitizers ${arg_LIBS})
  target_include_directories(${arg_NAME} PRIVATE "${PROJECT_SOURCE_DIR}/tests"
                                                 "${PROJECT_SOURCE_DIR}/examples")
  set(_labels ${arg_LABELS})
  if(_cuda)
    _nosa_setup_cuda_executable(${arg_NAME})
    list(APPEND _labels cuda)
  else()
    list(APPEND _labels host)
  endif()

  add_test(NAME ${arg_NAME} COMMAND ${arg_NAME} --no-version)
  set_tests_properties(${arg_NAME} PROPERTIES LABELS "${_labels}")
  if(NOSA_SANITIZE)
    # The CUDA runtime maps memory where AddressSanitizer keeps its shadow gap by default.
    set(_asan "ASAN_OPTIONS=detect_leaks=1")
    if(_cuda)
      set(_asan "ASAN_OPTIONS=protect_shadow_gap=0:detect_leaks=0")
    endif()
    set_tests_properties(${arg_NAME} PROPERTIES ENVIRONMENT "${_asan};UBSAN_OPTIONS=print_stacktrace=1")
  endif()
endfunction()

# nosa_add_example(NAME <name> SOURCES <src>... [LIBS <lib>...])
#
# One example executable, written to <build>/examples/<name>. It links nosa::nosa plus LIBS and gets the
# project's warnings and sanitizers. Sources ending in .cu are built as for nosa_add_test.
function(nosa_add_example)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME" "SOURCES;LIBS")
  _nosa_validate_target_args(nosa_add_example)
  _nosa_check_cuda_available(example ${arg_NAME} _skip ${arg_SOURCES})
  if(_skip)
    return()
  endif()
  _nosa_has_cuda_sources(_cuda ${arg_SOURCES})

  add_executable(${arg_NAME} ${arg_SOURCES})
  target_link_libraries(${arg_NAME} PRIVATE nosa::nosa nosa_internal_warnings nosa_internal_sanitizers
                                            ${arg_LIBS})
  set_target_properties(${arg_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/examples")
  if(_cuda)
    _nosa_setup_cuda_executable(${arg_NAME})
  endif()
endfunction()

# nosa_add_benchmark(NAME <name> SOURCES <src>... [LIBS <lib>...])
#
# One Google Benchmark executable, written to <build>/bench/<name>. It links nosa::nosa,
# benchmark::benchmark and LIBS; the sources provide main() with BENCHMARK_MAIN(). Benchmarks get the
# project's warnings but never sanitizers. Sources ending in .cu are built as for nosa_add_test.
function(nosa_add_benchmark)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME" "SOURCES;LIBS")
  _nosa_validate_target_args(nosa_add_benchmark)
  _nosa_check_cuda_available(benchmark ${arg_NAME} _skip ${arg_SOURCES})
  if(_skip)
    return()
  endif()
  _nosa_has_cuda_sources(_cuda ${arg_SOURCES})

  add_executable(${arg_NAME} ${arg_SOURCES})
  target_link_libraries(${arg_NAME} PRIVATE nosa::nosa benchmark::benchmark nosa_internal_warnings
                                            ${arg_LIBS})
  set_target_properties(${arg_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY "${PROJECT_BINARY_DIR}/bench")
  if(_cuda)
    _nosa_setup_cuda_executable(${arg_NAME})
  endif()
endfunction()
