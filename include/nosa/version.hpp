#pragma once
/// \file
/// Library version. The numbers must match `project(nosa VERSION ...)`; configuring fails otherwise.

/// Major version; 0 while the API is still settling.
#define NOSA_VERSION_MAJOR 0
/// Minor version; within 0.x a new minor version may break compatibility.
#define NOSA_VERSION_MINOR 1
/// Patch version.
#define NOSA_VERSION_PATCH 0

/// The version as one integer, `major * 10000 + minor * 100 + patch`, for `#if` comparisons.
#define NOSA_VERSION (NOSA_VERSION_MAJOR * 10000 + NOSA_VERSION_MINOR * 100 + NOSA_VERSION_PATCH)

/// The version as a string literal, "major.minor.patch".
#define NOSA_VERSION_STRING "0.1.0"
