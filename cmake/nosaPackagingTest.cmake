# Script mode (cmake -P) driver of nosa's packaging tests.
#
#   -DMODE=install   install the nosa build BUILD_DIR (CONFIG) into a fresh PREFIX and check that the
#                    headers of SOURCE_INCLUDE_DIR and the package files landed under INCLUDEDIR / CMAKEDIR
#   -DMODE=consumer  configure, build and ctest the consumer project SOURCE_DIR in a fresh BINARY_DIR with
#                    the given GENERATOR, GENERATOR_PLATFORM, GENERATOR_TOOLSET, MAKE_PROGRAM, CXX_COMPILER,
#                    CONFIG and CUDA_TOOLKIT_ROOT; PREFIX_PATH (an installed nosa), NOSA_DIR (a nosa
#                    build tree) or NOSA_SOURCE_TREE (nosa's sources) is handed to the consumer
cmake_minimum_required(VERSION 3.21)

function(run_step what)
  message(STATUS "${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${_rc})")
  endif()
endfunction()

set(_config_args "")
if(CONFIG)
  set(_config_args --config "${CONFIG}")
endif()

if(MODE STREQUAL "install")
  file(REMOVE_RECURSE "${PREFIX}")
  run_step("install" "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${_config_args})

  set(_missing "")
  foreach(_file IN ITEMS nosaConfig.cmake nosaConfigVersion.cmake nosaTargets.cmake)
    if(NOT EXISTS "${PREFIX}/${CMAKEDIR}/${_file}")
      list(APPEND _missing "${CMAKEDIR}/${_file}")
    endif()
  endforeach()
  file(GLOB_RECURSE _headers RELATIVE "${SOURCE_INCLUDE_DIR}" "${SOURCE_INCLUDE_DIR}/nosa/*.hpp"
       "${SOURCE_INCLUDE_DIR}/nosa/*.cuh")
  foreach(_header IN LISTS _headers)
    if(NOT EXISTS "${PREFIX}/${INCLUDEDIR}/${_header}")
      list(APPEND _missing "${INCLUDEDIR}/${_header}")
    endif()
  endforeach()
  if(_missing)
    list(JOIN _missing "\n  " _missing)
    message(FATAL_ERROR "not installed under ${PREFIX}:\n  ${_missing}")
  endif()
  list(LENGTH _headers _n_headers)
  message(STATUS "installed ${_n_headers} headers and the CMake package into ${PREFIX}")

elseif(MODE STREQUAL "consumer")
  file(REMOVE_RECURSE "${BINARY_DIR}")
  set(_configure "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}")
  if(GENERATOR_PLATFORM)
    list(APPEND _configure -A "${GENERATOR_PLATFORM}")
  endif()
  if(GENERATOR_TOOLSET)
    list(APPEND _configure -T "${GENERATOR_TOOLSET}")
  endif()
  if(MAKE_PROGRAM)
    list(APPEND _configure "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  if(CXX_COMPILER)
    list(APPEND _configure "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
  endif()
  if(CONFIG)
    list(APPEND _configure "-DCMAKE_BUILD_TYPE=${CONFIG}")
  endif()
  if(CUDA_TOOLKIT_ROOT)
    list(APPEND _configure "-DCUDAToolkit_ROOT=${CUDA_TOOLKIT_ROOT}")
  endif()
  if(PREFIX_PATH)
    # Only the given prefix may provide nosa: no package registry, and a check in the consumer.
    list(APPEND _configure "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}" "-DNOSA_EXPECTED_PREFIX=${PREFIX_PATH}"
         -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  endif()
  if(NOSA_DIR)
    list(APPEND _configure "-Dnosa_DIR=${NOSA_DIR}" "-DNOSA_EXPECTED_PREFIX=${NOSA_DIR}"
         -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
  endif()
  if(NOSA_SOURCE_TREE)
    list(APPEND _configure "-DNOSA_SOURCE_TREE=${NOSA_SOURCE_TREE}")
  endif()

  run_step("configure" ${_configure})
  run_step("build" "${CMAKE_COMMAND}" --build "${BINARY_DIR}" ${_config_args})
  set(_ctest_config "")
  if(CONFIG)
    set(_ctest_config -C "${CONFIG}")
  endif()
  run_step("run" "${CMAKE_CTEST_COMMAND}" --test-dir "${BINARY_DIR}" ${_ctest_config} --output-on-failure)

else()
  message(FATAL_ERROR "MODE must be install or consumer, not '${MODE}'")
endif()
