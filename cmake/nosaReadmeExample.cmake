# Checks that README.md shows examples/minimal/main.cpp verbatim, so the documented code is the code the
# packaging tests build. Run as: cmake -DREADME=... -DEXAMPLE=... -P nosaReadmeExample.cmake
file(READ "${README}" _readme)
file(READ "${EXAMPLE}" _example)
string(FIND "${_readme}" "```cpp\n${_example}```" _at)
if(_at EQUAL -1)
  message(FATAL_ERROR "README.md does not contain ${EXAMPLE} verbatim in a ```cpp block; copy it there")
endif()
