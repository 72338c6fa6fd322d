#pragma once
// A scratch directory for tests that write files.

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
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

/// Writes `bytes` to `path`, replacing the file.
inline void write_bytes(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

/// The whole content of `path` (empty if it cannot be read).
inline std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

}  // namespace nosa_test
