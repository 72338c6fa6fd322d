#pragma once
/// \file
/// The prefill cache: what a dense prefill hands to the library for one prompt (every layer's K, V, c and the
/// last prompt token's query, plus the first decode token) stored in a file, so that later runs of the same
/// model, prompt and attention family skip the prefill. Long-context studies run many decode configurations
/// over one prompt; the prefill of an 8B model at 96K tokens takes tens of seconds each time, while decoding
/// is what they measure.
///
/// A file is keyed by everything its content depends on (backend, preset, weight and prompt seeds, prompt
/// index and length, and whether the attention adds the eviction bias, which changes every layer after the
/// first); the key is in the file name and again in the header, and a file whose header or size does not
/// match is treated as absent. Files are written to a temporary name and renamed when complete, so a run that
/// stops half-way leaves nothing that a later run would read.

#include "model.hpp"

#include <nosa/core/numeric.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace nosa_engine {

/// What one prefill depends on besides the model's shape.
struct prefill_key {
  std::string backend;  ///< "host" or "cuda": the two engines round differently
  std::uint64_t weight_seed = 0;
  std::uint64_t prompt_seed = 0;
  int prompt = 0;   ///< distinct prompt index
  int tokens = 0;   ///< prompt length
  bool bias = false;  ///< the attention adds c (NOSA's trained semantics)
};

/// One layer of a prefill, as the library ingests it.
struct prefill_layer {
  std::vector<nosa::bf16> k;       ///< [P][H_kv][D] post-RoPE keys
  std::vector<nosa::bf16> v;       ///< [P][H_kv][D] values
  std::vector<float> c;            ///< [P][H_kv] eviction scores (zeros without the bias)
  std::vector<nosa::bf16> last_q;  ///< [H_q][D] the last prompt token's query
};

/// The file of `key` for `model` in directory `dir`.
inline std::string prefill_cache_path(const std::string& dir, const model_config& model, const prefill_key& key) {
  return (std::filesystem::path(dir) /
          ("prefill-" + key.backend + "-" + model.name + "-w" + std::to_string(key.weight_seed) + "-p" +
           std::to_string(key.prompt_seed) + "-" + std::to_string(key.prompt) + "-" + std::to_string(key.tokens) +
           (key.bias ? "-bias" : "-nobias") + ".bin"))
      .string();
}

namespace detail_prefill {

inline constexpr char magic[8] = {'N', 'O', 'S', 'A', 'P', 'F', '0', '1'};

/// The header fields, in file order (all 64-bit little-endian, as the machines that run this are).
inline std::vector<std::uint64_t> header_fields(const model_config& m, const prefill_key& key) {
  std::uint64_t backend = 0;
  for (const char ch : key.backend) backend = backend * 131 + static_cast<unsigned char>(ch);
  return {static_cast<std::uint64_t>(m.layers), static_cast<std::uint64_t>(m.q_heads),
          static_cast<std::uint64_t>(m.kv_heads), static_cast<std::uint64_t>(m.head_dim),
          static_cast<std::uint64_t>(m.hidden), static_cast<std::uint64_t>(m.vocab),
          backend, key.weight_seed, key.prompt_seed, static_cast<std::uint64_t>(key.prompt),
          static_cast<std::uint64_t>(key.tokens), key.bias ? 1u : 0u};
}

inline std::size_t layer_bytes(const model_config& m, int tokens) {
  const std::size_t P = static_cast<std::size_t>(tokens);
  return 2 * P * m.kv_width() * sizeof(nosa::bf16) + P * m.kv_heads * sizeof(float) +
         std::size_t(m.q_width()) * sizeof(nosa::bf16);
}

inline std::size_t file_bytes(const model_config& m, const prefill_key& key) {
  return sizeof(magic) + header_fields(m, key).size() * sizeof(std::uint64_t) +
         std::size_t(m.layers) * layer_bytes(m, key.tokens) + sizeof(std::int32_t);
}

}  // namespace detail_prefill

/// Writes one prefill, layer by layer, to a temporary file that `finish` renames into place.
class prefill_cache_writer {
 public:
  /// Starts the file of `key`; on failure returns false and sets `error`.
  bool open(const std::string& dir, const model_config& model, const prefill_key& key, std::string& error) {
    model_ = model;
    key_ = key;
    path_ = prefill_cache_path(dir, model, key);
    temp_ = path_ + ".part";
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    out_.open(temp_, std::ios::binary | std::ios::trunc);
    if (!out_) {
      error = temp_ + ": cannot write the prefill cache";
      return false;
    }
    out_.write(detail_prefill::magic, sizeof(detail_prefill::magic));
    const std::vector<std::uint64_t> h = detail_prefill::header_fields(model, key);
    out_.write(reinterpret_cast<const char*>(h.data()), std::streamsize(h.size() * sizeof(std::uint64_t)));
    return true;
  }
  /// Appends the next layer (its sizes must be the model's at the key's length).
  bool write_layer(const prefill_layer& layer, std::string& error) {
    const std::size_t P = static_cast<std::size_t>(key_.tokens);
    if (layer.k.size() != P * model_.kv_width() || layer.v.size() != layer.k.size() ||
        layer.c.size() != P * model_.kv_heads || layer.last_q.size() != std::size_t(model_.q_width())) {
      error = "prefill cache: a layer of the wrong size";
      return false;
    }
    write(layer.k.data(), layer.k.size() * sizeof(nosa::bf16));
    write(layer.v.data(), layer.v.size() * sizeof(nosa::bf16));
    write(layer.c.data(), layer.c.size() * sizeof(float));
    write(layer.last_q.data(), layer.last_q.size() * sizeof(nosa::bf16));
    return check(error);
  }
  /// Ends the file with the first decode token and moves it into place.
  bool finish(std::int32_t first_token, std::string& error) {
    write(&first_token, sizeof(first_token));
    out_.close();
    if (!out_ || std::filesystem::file_size(temp_) != detail_prefill::file_bytes(model_, key_)) {
      error = temp_ + ": the prefill cache was not written completely";
      return false;
    }
    std::error_code ec;
    std::filesystem::rename(temp_, path_, ec);
    if (ec) {
      error = path_ + ": " + ec.message();
      return false;
    }
    return true;
  }
  const std::string& path() const { return path_; }

 private:
  model_config model_;
  prefill_key key_;
  std::string path_, temp_;
  std::ofstream out_;

  void write(const void* p, std::size_t bytes) { out_.write(static_cast<const char*>(p), std::streamsize(bytes)); }
  bool check(std::string& error) {
    if (out_) return true;
    error = temp_ + ": cannot write the prefill cache";
    return false;
  }
};

/// Reads a prefill written by `prefill_cache_writer`.
class prefill_cache_reader {
 public:
  /// Opens the file of `key` when it exists and matches (header and exact size); false otherwise, which
  /// callers take as "not cached".
  bool open(const std::string& dir, const model_config& model, const prefill_key& key) {
    model_ = model;
    key_ = key;
    path_ = prefill_cache_path(dir, model, key);
    std::error_code ec;
    const auto size = std::filesystem::file_size(path_, ec);
    if (ec || size != detail_prefill::file_bytes(model, key)) return false;
    if (in_.is_open()) in_.close();
    in_.clear();
    in_.open(path_, std::ios::binary);
    char magic[sizeof(detail_prefill::magic)] = {};
    in_.read(magic, sizeof(magic));
    const std::vector<std::uint64_t> want = detail_prefill::header_fields(model, key);
    std::vector<std::uint64_t> have(want.size());
    in_.read(reinterpret_cast<char*>(have.data()), std::streamsize(have.size() * sizeof(std::uint64_t)));
    return static_cast<bool>(in_) && std::equal(magic, magic + sizeof(magic), detail_prefill::magic) && have == want;
  }
  /// Reads the next layer.
  bool read_layer(prefill_layer& layer, std::string& error) {
    const std::size_t P = static_cast<std::size_t>(key_.tokens);
    layer.k.resize(P * model_.kv_width());
    layer.v.resize(layer.k.size());
    layer.c.resize(P * model_.kv_heads);
    layer.last_q.resize(std::size_t(model_.q_width()));
    read(layer.k.data(), layer.k.size() * sizeof(nosa::bf16));
    read(layer.v.data(), layer.v.size() * sizeof(nosa::bf16));
    read(layer.c.data(), layer.c.size() * sizeof(float));
    read(layer.last_q.data(), layer.last_q.size() * sizeof(nosa::bf16));
    return check(error);
  }
  /// Reads the first decode token (after the last layer).
  bool read_token(std::int32_t& token, std::string& error) {
    read(&token, sizeof(token));
    return check(error);
  }
  const std::string& path() const { return path_; }

 private:
  model_config model_;
  prefill_key key_;
  std::string path_;
  std::ifstream in_;

  void read(void* p, std::size_t bytes) { in_.read(static_cast<char*>(p), std::streamsize(bytes)); }
  bool check(std::string& error) {
    if (in_) return true;
    error = path_ + ": cannot read the prefill cache";
    return false;
  }
};

}  // namespace nosa_engine
