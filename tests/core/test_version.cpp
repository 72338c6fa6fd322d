#include <nosa/version.hpp>

#include <doctest/doctest.h>

#include <string>

TEST_CASE("version macros agree with each other") {
  static_assert(NOSA_VERSION_MAJOR >= 0 && NOSA_VERSION_MINOR >= 0 && NOSA_VERSION_PATCH >= 0);
  static_assert(NOSA_VERSION == NOSA_VERSION_MAJOR * 10000 + NOSA_VERSION_MINOR * 100 + NOSA_VERSION_PATCH);

  const std::string expected = std::to_string(NOSA_VERSION_MAJOR) + "." + std::to_string(NOSA_VERSION_MINOR) +
                               "." + std::to_string(NOSA_VERSION_PATCH);
  CHECK(std::string(NOSA_VERSION_STRING) == expected);
}

TEST_CASE("version usable in preprocessor conditions") {
#if NOSA_VERSION >= 100
  constexpr bool at_least_0_1 = true;
#else
  constexpr bool at_least_0_1 = false;
#endif
  CHECK(at_least_0_1 == (NOSA_VERSION_MAJOR > 0 || NOSA_VERSION_MINOR >= 1));
}
