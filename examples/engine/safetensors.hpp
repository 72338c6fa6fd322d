#pragma once
/// \file
/// A small, strict reader and writer for safetensors files, the checkpoint format of Llama-style models.
///
/// Layout: an 8-byte little-endian length N, N bytes of JSON, then the data buffer. The JSON is an object
/// that maps each tensor name to `{"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}` (offsets
/// relative to the start of the data buffer), plus an optional `"__metadata__"` object of strings.
///
/// Strict means that anything malformed is an error with a one-line message, never a guess: a checkpoint
/// read wrongly would make every later result wrong without a sign. Nothing here throws across the API or
/// aborts; sizes from the header are checked against the file, and every product is overflow-checked.
/// Standard library only.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace nosa_engine {

// The header length and element bytes are little-endian; every platform the library targets is one.
static_assert(std::endian::native == std::endian::little, "safetensors.hpp assumes a little-endian host");

/// Element types the engine understands; anything else reads as `other` (its name stays in `dtype_name`).
enum class dtype { bf16, f16, f32, other };

/// The safetensors name of `t` ("BF16", "F16", "F32"; "" for `other`).
inline std::string_view dtype_name(dtype t) {
  switch (t) {
  case dtype::bf16:
    return "BF16";
  case dtype::f16:
    return "F16";
  case dtype::f32:
    return "F32";
  case dtype::other:
    break;
  }
  return "";
}

/// Bytes per element of `t`; 0 for `other`.
inline std::size_t element_size(dtype t) {
  switch (t) {
  case dtype::bf16:
  case dtype::f16:
    return 2;
  case dtype::f32:
    return 4;
  case dtype::other:
    break;
  }
  return 0;
}

/// One tensor of a file.
struct tensor_info {
  std::string name;
  dtype type = dtype::other;
  std::string dtype_name;           ///< as written in the file, e.g. "BF16" or "I64"
  std::vector<std::int64_t> shape;  ///< each >= 0; empty for a scalar
  std::uint64_t offset = 0;         ///< first byte, relative to the start of the data buffer
  std::uint64_t size = 0;           ///< bytes
};

/// `shape` as text: "[4096, 1024]".
inline std::string shape_text(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

namespace detail {

/// Largest header the reader accepts (the limit of the reference implementation).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

/// Deepest nesting the JSON parser accepts; a valid header needs 3.
inline constexpr int max_json_depth = 16;

/// The element size of every dtype of the safetensors specification, 0 when unknown.
inline std::size_t known_element_size(std::string_view name) {
  static constexpr std::pair<std::string_view, std::size_t> table[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2}, {"F16", 2},
      {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4},     {"F64", 8},     {"I64", 8}, {"U64", 8}};
  for (const auto& [n, s] : table)
    if (n == name) return s;
  return 0;
}

inline dtype parse_dtype(std::string_view name) {
  if (name == "BF16") return dtype::bf16;
  if (name == "F16") return dtype::f16;
  if (name == "F32") return dtype::f32;
  return dtype::other;
}

/// `a * b`, or nothing on overflow.
inline std::optional<std::uint64_t> mul(std::uint64_t a, std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return std::nullopt;
  return a * b;
}

/// Elements in `shape` (1 for a scalar), or nothing on overflow. Dimensions must be >= 0.
inline std::optional<std::uint64_t> element_count(std::span<const std::int64_t> shape) {
  std::uint64_t n = 1;
  for (const std::int64_t d : shape) {
    const auto p = mul(n, static_cast<std::uint64_t>(d));
    if (!p) return std::nullopt;
    n = *p;
  }
  return n;
}

/// A JSON value of the subset a safetensors header uses: objects, arrays, strings and integers.
struct json_value {
  enum class kind { object, array, string, integer };
  kind k = kind::integer;
  std::string str;                // string
  std::uint64_t magnitude = 0;    // integer: absolute value
  bool negative = false;          // integer: sign
  std::vector<json_value> items;  // array elements; object values
  std::vector<std::string> keys;  // object keys, parallel to items
};

/// A recursive-descent parser for that subset. Errors name the byte offset within the header.
class json_parser {
 public:
  explicit json_parser(std::string_view text) : s_(text) {}

  /// Parses the whole text as one object, surrounded by optional whitespace.
  bool parse_document(json_value& out, std::string& error) {
    skip_ws();
    if (peek() != '{') return fail("the header is not a JSON object", error);
    if (!parse_value(out, 0, error)) return false;
    skip_ws();
    if (pos_ != s_.size()) return fail("unexpected text after the top-level object", error);
    return true;
  }

 private:
  std::string_view s_;
  std::size_t pos_ = 0;

  int peek() const { return pos_ < s_.size() ? static_cast<unsigned char>(s_[pos_]) : -1; }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }

  bool fail(std::string_view what, std::string& error) const {
    error = "malformed JSON header at byte " + std::to_string(pos_) + ": " + std::string(what);
    return false;
  }

  bool expect(char c, std::string& error) {
    skip_ws();
    if (peek() != static_cast<unsigned char>(c)) {
      return fail(std::string("expected '") + c + "'" + (peek() < 0 ? " but the header ended" : ""), error);
    }
    ++pos_;
    return true;
  }

  bool parse_value(json_value& out, int depth, std::string& error) {
    if (depth >= max_json_depth)
      return fail("nesting deeper than " + std::to_string(max_json_depth) + " levels", error);
    skip_ws();
    const int c = peek();
    if (c == '{') return parse_object(out, depth, error);
    if (c == '[') return parse_array(out, depth, error);
    if (c == '"') {
      out.k = json_value::kind::string;
      return parse_string(out.str, error);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_integer(out, error);
    if (c < 0) return fail("the header ended where a value was expected", error);
    if (c == 't' || c == 'f' || c == 'n')
      return fail("true, false and null are not supported in a safetensors header", error);
    return fail("unexpected character where a value was expected", error);
  }

  bool parse_object(json_value& out, int depth, std::string& error) {
    out.k = json_value::kind::object;
    ++pos_;  // '{'
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return true;
    }
    for (;;) {
      skip_ws();
      if (peek() != '"') return fail("expected a string key", error);
      const std::size_t key_pos = pos_;
      std::string key;
      if (!parse_string(key, error)) return false;
      if (std::find(out.keys.begin(), out.keys.end(), key) != out.keys.end()) {
        pos_ = key_pos;
        return fail("duplicate key \"" + key + "\"", error);
      }
      if (!expect(':', error)) return false;
      json_value v;
      if (!parse_value(v, depth + 1, error)) return false;
      out.keys.push_back(std::move(key));
      out.items.push_back(std::move(v));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return true;
      }
      return fail(peek() < 0 ? "the header ended inside an object" : "expected ',' or '}'", error);
    }
  }

  bool parse_array(json_value& out, int depth, std::string& error) {
    out.k = json_value::kind::array;
    ++pos_;  // '['
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return true;
    }
    for (;;) {
      json_value v;
      if (!parse_value(v, depth + 1, error)) return false;
      out.items.push_back(std::move(v));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return true;
      }
      return fail(peek() < 0 ? "the header ended inside an array" : "expected ',' or ']'", error);
    }
  }

  bool parse_integer(json_value& out, std::string& error) {
    out.k = json_value::kind::integer;
    out.negative = peek() == '-';
    if (out.negative) ++pos_;
    if (!(peek() >= '0' && peek() <= '9')) return fail("expected a digit", error);
    if (peek() == '0' && pos_ + 1 < s_.size() && s_[pos_ + 1] >= '0' && s_[pos_ + 1] <= '9')
      return fail("leading zeros are not allowed in a number", error);
    std::uint64_t v = 0;
    while (peek() >= '0' && peek() <= '9') {
      const auto digit = static_cast<std::uint64_t>(peek() - '0');
      if (v > (std::numeric_limits<std::uint64_t>::max() - digit) / 10)
        return fail("integer exceeds the 64-bit range", error);
      v = v * 10 + digit;
      ++pos_;
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E')
      return fail("only integers are supported, not fractions or exponents", error);
    out.magnitude = v;
    return true;
  }

  bool parse_hex4(std::uint32_t& out, std::string& error) {
    if (s_.size() - pos_ < 4) return fail("truncated \\u escape", error);
    out = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_];
      std::uint32_t d;
      if (c >= '0' && c <= '9')
        d = static_cast<std::uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f')
        d = static_cast<std::uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        d = static_cast<std::uint32_t>(c - 'A' + 10);
      else
        return fail("invalid hex digit in \\u escape", error);
      out = out * 16 + d;
      ++pos_;
    }
    return true;
  }

  static void append_utf8(std::string& s, std::uint32_t cp) {
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xE0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      s += static_cast<char>(0xF0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  bool parse_string(std::string& out, std::string& error) {
    ++pos_;  // opening quote
    out.clear();
    for (;;) {
      if (pos_ >= s_.size()) return fail("the header ended inside a string", error);
      const char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        return true;
      }
      if (static_cast<unsigned char>(c) < 0x20) return fail("unescaped control character in a string", error);
      if (c != '\\') {
        out += c;
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= s_.size()) return fail("the header ended inside a string", error);
      const char e = s_[pos_++];
      switch (e) {
      case '"':
        out += '"';
        break;
      case '\\':
        out += '\\';
        break;
      case '/':
        out += '/';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'u': {
        std::uint32_t cp = 0;
        if (!parse_hex4(cp, error)) return false;
        if (cp >= 0xDC00 && cp <= 0xDFFF) return fail("unpaired low surrogate in \\u escape", error);
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          if (s_.size() - pos_ < 2 || s_[pos_] != '\\' || s_[pos_ + 1] != 'u')
            return fail("unpaired high surrogate in \\u escape", error);
          pos_ += 2;
          std::uint32_t lo = 0;
          if (!parse_hex4(lo, error)) return false;
          if (lo < 0xDC00 || lo > 0xDFFF) return fail("unpaired high surrogate in \\u escape", error);
          cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        append_utf8(out, cp);
        break;
      }
      default:
        --pos_;
        return fail("invalid escape in a string", error);
      }
    }
  }
};

/// `s` as a JSON string literal.
inline std::string json_quote(std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out = "\"";
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"')
      out += "\\\"";
    else if (c == '\\')
      out += "\\\\";
    else if (u < 0x20) {
      out += "\\u00";
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

/// A JSON integer as a non-negative value that fits `limit`, or an error naming `what`.
inline bool non_negative(const json_value& v, std::uint64_t limit, const std::string& what,
                         std::uint64_t& out, std::string& error) {
  if (v.k != json_value::kind::integer) {
    error = what + " is not an integer";
    return false;
  }
  if (v.negative && v.magnitude != 0) {
    error = what + " is negative (-" + std::to_string(v.magnitude) + ")";
    return false;
  }
  if (v.magnitude > limit) {
    error = what + " is too large (" + std::to_string(v.magnitude) + ")";
    return false;
  }
  out = v.magnitude;
  return true;
}

/// The value of `key` in object `o`, or null.
inline const json_value* member(const json_value& o, std::string_view key) {
  for (std::size_t i = 0; i < o.keys.size(); ++i)
    if (o.keys[i] == key) return &o.items[i];
  return nullptr;
}

}  // namespace detail

/// A safetensors file read whole into memory and validated.
class safetensors_file {
 public:
  /// Reads and validates the file at `path`. On failure returns nothing and sets `error` to one line.
  static std::optional<safetensors_file> open(const std::string& path, std::string& error) {
    try {
      std::ifstream f(path, std::ios::binary | std::ios::ate);
      if (!f) {
        error = path + ": cannot open for reading";
        return std::nullopt;
      }
      const std::streamoff end = f.tellg();
      if (end < 0) {
        error = path + ": cannot determine the file size";
        return std::nullopt;
      }
      std::vector<std::byte> bytes(static_cast<std::size_t>(end));
      f.seekg(0);
      if (!bytes.empty() &&
          !f.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(end))) {
        error = path + ": read error";
        return std::nullopt;
      }
      std::optional<safetensors_file> r = from_bytes(std::move(bytes), error);
      if (!r) error = path + ": " + error;
      return r;
    } catch (const std::exception& e) {
      error = path + ": " + e.what();
      return std::nullopt;
    }
  }

  /// Validates a whole file's bytes already in memory; as `open`, without the path in messages.
  static std::optional<safetensors_file> from_bytes(std::vector<std::byte> bytes, std::string& error) {
    try {
      safetensors_file file;
      file.bytes_ = std::move(bytes);
      if (!file.parse(error)) return std::nullopt;
      return file;
    } catch (const std::exception& e) {
      error = e.what();
      return std::nullopt;
    }
  }

  /// The tensors, in the order of the header.
  const std::vector<tensor_info>& tensors() const { return tensors_; }

  /// The tensor called `name`, or null.
  const tensor_info* find(std::string_view name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }

  /// The bytes of `t`, a tensor of this file (empty when `t` does not fit the data buffer).
  std::span<const std::byte> data(const tensor_info& t) const {
    if (t.offset > data_size() || t.size > data_size() - t.offset) return {};
    return std::span<const std::byte>(bytes_).subspan(static_cast<std::size_t>(data_start_ + t.offset),
                                                      static_cast<std::size_t>(t.size));
  }

  /// The `__metadata__` entries (empty when the file has none).
  const std::map<std::string, std::string, std::less<>>& metadata() const { return metadata_; }

  /// Bytes in the data buffer.
  std::uint64_t data_size() const { return bytes_.size() - data_start_; }

 private:
  std::vector<std::byte> bytes_;
  std::uint64_t data_start_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::map<std::string, std::string, std::less<>> metadata_;

  bool parse(std::string& error) {
    const std::uint64_t file_size = bytes_.size();
    if (file_size < 8) {
      error = "file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length";
      return false;
    }
    std::uint64_t n = 0;
    std::memcpy(&n, bytes_.data(), 8);
    if (n > file_size - 8) {
      error = "header length " + std::to_string(n) + " exceeds the " + std::to_string(file_size - 8) +
              " bytes that follow the length field (corrupt or truncated file)";
      return false;
    }
    if (n > detail::max_header_bytes) {
      error = "header length " + std::to_string(n) + " exceeds the limit of " +
              std::to_string(detail::max_header_bytes) + " bytes";
      return false;
    }
    data_start_ = 8 + n;
    const std::string_view text(reinterpret_cast<const char*>(bytes_.data()) + 8,
                                static_cast<std::size_t>(n));

    detail::json_value root;
    if (!detail::json_parser(text).parse_document(root, error)) return false;

    for (std::size_t i = 0; i < root.keys.size(); ++i) {
      const std::string& name = root.keys[i];
      const detail::json_value& v = root.items[i];
      if (name == "__metadata__") {
        if (!read_metadata(v, error)) return false;
        continue;
      }
      tensor_info t;
      if (!read_tensor(name, v, t, error)) return false;
      index_.emplace(name, tensors_.size());
      tensors_.push_back(std::move(t));
    }

    // Every tensor inside the data buffer: reported for the one that ends last.
    const std::uint64_t buffer = data_size();
    const tensor_info* last = nullptr;
    for (const tensor_info& t : tensors_)
      if (!last || t.offset + t.size > last->offset + last->size) last = &t;
    if (last && last->offset + last->size > buffer) {
      error = "tensor \"" + last->name + "\": data_offsets end " + std::to_string(last->offset + last->size) +
              " is beyond the data buffer of " + std::to_string(buffer) +
              " bytes (truncated file or wrong offsets)";
      return false;
    }

    // No two tensors share a byte.
    std::vector<const tensor_info*> order;
    for (const tensor_info& t : tensors_)
      if (t.size) order.push_back(&t);
    std::sort(order.begin(), order.end(),
              [](const tensor_info* a, const tensor_info* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < order.size(); ++i) {
      const tensor_info& a = *order[i - 1];
      const tensor_info& b = *order[i];
      if (b.offset < a.offset + a.size) {
        error = "tensors \"" + a.name + "\" [" + std::to_string(a.offset) + ", " +
                std::to_string(a.offset + a.size) + ") and \"" + b.name + "\" [" + std::to_string(b.offset) +
                ", " + std::to_string(b.offset + b.size) + ") overlap in the data buffer";
        return false;
      }
    }
    return true;
  }

  bool read_metadata(const detail::json_value& v, std::string& error) {
    if (v.k != detail::json_value::kind::object) {
      error = "__metadata__ is not an object";
      return false;
    }
    for (std::size_t i = 0; i < v.keys.size(); ++i) {
      if (v.items[i].k != detail::json_value::kind::string) {
        error = "__metadata__ entry \"" + v.keys[i] + "\" is not a string";
        return false;
      }
      metadata_.emplace(v.keys[i], v.items[i].str);
    }
    return true;
  }

  static bool read_tensor(const std::string& name, const detail::json_value& v, tensor_info& t,
                          std::string& error) {
    using kind = detail::json_value::kind;
    const std::string where = "tensor \"" + name + "\"";
    if (v.k != kind::object) {
      error = where + ": entry is not an object";
      return false;
    }
    t.name = name;
    const detail::json_value* dt = detail::member(v, "dtype");
    const detail::json_value* shape = detail::member(v, "shape");
    const detail::json_value* offsets = detail::member(v, "data_offsets");
    for (const auto& [field, p] :
         {std::pair{"dtype", dt}, std::pair{"shape", shape}, std::pair{"data_offsets", offsets}}) {
      if (!p) {
        error = where + ": missing field \"" + field + "\"";
        return false;
      }
    }
    if (dt->k != kind::string) {
      error = where + ": dtype is not a string";
      return false;
    }
    t.dtype_name = dt->str;
    t.type = detail::parse_dtype(dt->str);

    if (shape->k != kind::array) {
      error = where + ": shape is not an array";
      return false;
    }
    for (std::size_t i = 0; i < shape->items.size(); ++i) {
      std::uint64_t d;
      if (!detail::non_negative(shape->items[i], std::numeric_limits<std::int64_t>::max(),
                                where + ": shape[" + std::to_string(i) + "]", d, error))
        return false;
      t.shape.push_back(static_cast<std::int64_t>(d));
    }

    if (offsets->k != kind::array || offsets->items.size() != 2) {
      error = where + ": data_offsets is not an array of two integers";
      return false;
    }
    std::uint64_t begin, end;
    if (!detail::non_negative(offsets->items[0], std::numeric_limits<std::uint64_t>::max(),
                              where + ": data_offsets begin", begin, error) ||
        !detail::non_negative(offsets->items[1], std::numeric_limits<std::uint64_t>::max(),
                              where + ": data_offsets end", end, error))
      return false;
    if (begin > end) {
      error = where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
              "] has begin > end";
      return false;
    }
    t.offset = begin;
    t.size = end - begin;

    if (const std::size_t es = detail::known_element_size(t.dtype_name)) {
      const auto count = detail::element_count(t.shape);
      const auto bytes = count ? detail::mul(*count, es) : std::nullopt;
      if (!bytes) {
        error = where + ": shape " + shape_text(t.shape) + " has too many elements";
        return false;
      }
      if (*bytes != t.size) {
        error = where + ": " + t.dtype_name + " shape " + shape_text(t.shape) + " needs " +
                std::to_string(*bytes) + " bytes but data_offsets [" + std::to_string(begin) + ", " +
                std::to_string(end) + "] hold " + std::to_string(t.size);
        return false;
      }
    }
    return true;
  }
};

/// Checks that `file` holds `name` with dtype `type` and shape `shape`; on mismatch or absence returns
/// false and sets `error`, e.g. "model.layers.0.self_attn.q_proj.weight: expected shape [4096, 4096], found
/// [4096, 1024]".
inline bool check_tensor(const safetensors_file& file, std::string_view name, dtype type,
                         const std::vector<std::int64_t>& shape, std::string& error) {
  const tensor_info* t = file.find(name);
  if (!t) {
    error = std::string(name) + ": not found in the file";
    return false;
  }
  if (t->type != type || type == dtype::other) {
    error = std::string(name) + ": expected dtype " +
            (type == dtype::other ? std::string("other") : std::string(dtype_name(type))) + ", found " +
            t->dtype_name;
    return false;
  }
  if (t->shape != shape) {
    error = std::string(name) + ": expected shape " + shape_text(shape) + ", found " + shape_text(t->shape);
    return false;
  }
  return true;
}

/// One tensor for `write_safetensors`; `bytes` must stay valid until the call returns.
struct tensor_to_write {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;  ///< product(shape) * element_size(type) bytes, little-endian, C order
};

/// Writes `tensors` (in this order, data contiguous) and `metadata` to `path`. On failure returns false
/// and sets `error` to one line; the file may then be partly written.
inline bool write_safetensors(const std::string& path, const std::vector<tensor_to_write>& tensors,
                              std::string& error,
                              const std::map<std::string, std::string, std::less<>>& metadata = {}) {
  try {
    std::string header = "{";
    bool first = true;
    if (!metadata.empty()) {
      header += "\"__metadata__\":{";
      for (const auto& [k, v] : metadata) {
        if (!first) header += ',';
        first = false;
        header += detail::json_quote(k) + ":" + detail::json_quote(v);
      }
      header += '}';
      first = false;
    }
    std::map<std::string_view, bool> seen;
    std::uint64_t offset = 0;
    for (const tensor_to_write& t : tensors) {
      if (t.name == "__metadata__") {
        error = "tensor name \"__metadata__\" is reserved";
        return false;
      }
      if (!seen.emplace(t.name, true).second) {
        error = "tensor \"" + t.name + "\": duplicate name";
        return false;
      }
      if (t.type == dtype::other) {
        error = "tensor \"" + t.name + "\": cannot write dtype other";
        return false;
      }
      for (const std::int64_t d : t.shape) {
        if (d < 0) {
          error = "tensor \"" + t.name + "\": negative dimension in shape " + shape_text(t.shape);
          return false;
        }
      }
      const auto count = detail::element_count(t.shape);
      const auto bytes = count ? detail::mul(*count, element_size(t.type)) : std::nullopt;
      if (!bytes || *bytes != t.bytes.size()) {
        error = "tensor \"" + t.name + "\": " + std::string(dtype_name(t.type)) + " shape " +
                shape_text(t.shape) + " does not match the " + std::to_string(t.bytes.size()) +
                " bytes given";
        return false;
      }
      if (!first) header += ',';
      first = false;
      header += detail::json_quote(t.name) + ":{\"dtype\":\"" + std::string(dtype_name(t.type)) +
                "\",\"shape\":" + shape_text(t.shape) + ",\"data_offsets\":[" + std::to_string(offset) + "," +
                std::to_string(offset + *bytes) + "]}";
      offset += *bytes;
    }
    header += '}';
    // Pad with spaces so that the data buffer starts 8-byte aligned.
    header.append((8 - header.size() % 8) % 8, ' ');

    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) {
      error = path + ": cannot open for writing";
      return false;
    }
    const std::uint64_t n = header.size();
    char len[8];
    std::memcpy(len, &n, 8);
    f.write(len, 8);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    for (const tensor_to_write& t : tensors)
      f.write(reinterpret_cast<const char*>(t.bytes.data()), static_cast<std::streamsize>(t.bytes.size()));
    f.close();
    if (!f) {
      error = path + ": write error";
      return false;
    }
    return true;
  } catch (const std::exception& e) {
    error = path + ": " + e.what();
    return false;
  }
}

}  // namespace nosa_engine
