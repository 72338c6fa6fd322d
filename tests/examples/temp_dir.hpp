#pragma once
// A scratch directory for tests that write files.

#include <chrono>
#include <filesystem>
#include <random>
#include <string>
#include <system_error>

namespace nosa_test {

/// A fresh directory under the system temp directory, removed with everything in it on destruction.
struct temp_dir {
  std::filesystem::path path;

  explicit temp_dir(const std::string& prefix) {
    std::random_device rd;
    const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    for (int attempt = 0;; ++attempt) {
      path = std::filesystem::temp_directory_path() /
             (prefix + std::to_string(now) + "_" + std::to_string(rd()) + "_" + std::to_string(attempt));
      if (std::filesystem::create_directory(path)) break;
    }
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  std::filesystem::path file(const std::string& name) const { return path / name; }
};

}  // namespace nosa_test
