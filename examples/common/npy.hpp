#pragma once
/// \file
/// A small, strict reader and writer for NumPy `.npy` files, as the examples exchange them with Python:
/// format versions 1.0 and 2.0, little-endian `<f4` and `<i4`, C order, rank 0 to 6.
///
/// Strict means that anything outside that subset is an error with a one-line message, never a guess:
/// the files carry test vectors, and a silently misread file would make a wrong result look right. The
/// reader is safe on hostile input: sizes from the header are checked against the file before anything
/// is allocated or copied, and every product is overflow-checked.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace npy {

// Element bytes are copied between the file and memory as they are, which is right only on a
// little-endian host; every platform the library targets is one.
static_assert(std::endian::native == std::endian::little, "npy.hpp assumes a little-endian host");

/// Highest rank the reader and writer accept.
inline constexpr int max_rank = 6;

/// The `.npy` dtype string of `T` (`"<f4"` for float, `"<i4"` for std::int32_t).
template <class T>
inline constexpr std::string_view dtype_name = std::is_same_v<T, float>          ? std::string_view("<f4")
                                               : std::is_same_v<T, std::int32_t> ? std::string_view("<i4")
                                                                                 : std::string_view();

/// An array read from a `.npy` file.
struct array {
  std::string dtype;                // "<f4" or "<i4"
  std::vector<std::int64_t> shape;  // [rank], each >= 0; empty for a scalar
  std::vector<std::byte> data;      // [size() * 4] element bytes, C order, little-endian

  /// Number of elements: the product of `shape`, 1 for a scalar.
  std::size_t size() const {
    std::size_t n = 1;
    for (const std::int64_t d : shape) n *= static_cast<std::size_t>(d);
    return n;
  }

  /// The elements as `T`, or null when `T` does not match `dtype`. `data`'s storage comes from the
  /// default allocator, so it is aligned for any scalar type.
  template <class T>
  const T* as() const {
    static_assert(!dtype_name<T>.empty(), "npy arrays hold float or std::int32_t");
    return dtype == dtype_name<T> ? reinterpret_cast<const T*>(data.data()) : nullptr;
  }

  /// The elements as `T`, copied; empty when `T` does not match `dtype`.
  template <class T>
  std::vector<T> to_vector() const {
    static_assert(!dtype_name<T>.empty(), "npy arrays hold float or std::int32_t");
    std::vector<T> out;
    if (dtype != dtype_name<T>) return out;
    out.resize(data.size() / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), data.data(), out.size() * sizeof(T));
    return out;
  }
};

/// Why a load or save failed: one line naming the problem. Callers add the file name.
struct error {
  std::string message;  ///< e.g. "fortran_order arrays are not supported"
};

namespace detail {

inline constexpr char magic[] = {'\x93', 'N', 'U', 'M', 'P', 'Y'};
inline constexpr std::size_t magic_size = sizeof(magic);
inline constexpr std::size_t element_bytes = 4;  // both supported dtypes

/// `c` as it should appear in a message: quoted when printable, hex otherwise.
inline std::string show_char(char c) {
  const auto u = static_cast<unsigned char>(c);
  if (u >= 0x20 && u < 0x7f) return std::string("'") + c + "'";
  const char* hex = "0123456789abcdef";
  return std::string("byte 0x") + hex[u >> 4] + hex[u & 15];
}

/// "(2, 3)", "(3,)", "()": the Python spelling of a shape tuple.
inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ',';
  return s + ')';
}

/// Element count of `shape`, or nothing when it does not fit a byte count in both int64 and size_t.
inline std::optional<std::uint64_t> element_count(const std::vector<std::int64_t>& shape) {
  constexpr std::uint64_t byte_limit = std::min<std::uint64_t>(std::numeric_limits<std::int64_t>::max(),
                                                               std::numeric_limits<std::size_t>::max());
  std::uint64_t n = 1;
  for (const std::int64_t d : shape) {
    const auto u = static_cast<std::uint64_t>(d);
    if (u != 0 && n > byte_limit / element_bytes / u) return std::nullopt;
    n *= u;
  }
  return n;
}

/// The fields of a header dictionary.
struct header_fields {
  std::string descr;                // dtype string as written
  bool fortran_order = false;       // column-major layout flag
  std::vector<std::int64_t> shape;  // [rank]
};

/// Recursive-descent parser for the header, a Python dict literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`. It accepts exactly the grammar NumPy
/// writes plus harmless variations (either quote, any whitespace, with or without a trailing comma).
class header_parser {
 public:
  explicit header_parser(std::string_view text) : text_(text) {}

  std::optional<error> parse(header_fields& out) {
    bool have_descr = false, have_order = false, have_shape = false;
    skip_space();
    if (!consume('{')) return fail("expected '{'");
    for (;;) {
      skip_space();
      if (consume('}')) break;
      std::string key;
      if (auto e = parse_string(key)) return e;
      skip_space();
      if (!consume(':')) return fail("expected ':'");
      skip_space();
      if (key == "descr") {
        if (have_descr) return error{"malformed header: duplicate key 'descr'"};
        have_descr = true;
        if (peek() != '\'' && peek() != '"')
          return error{"unsupported dtype: descr is not a string (structured dtypes are not supported)"};
        if (auto e = parse_string(out.descr)) return e;
      } else if (key == "fortran_order") {
        if (have_order) return error{"malformed header: duplicate key 'fortran_order'"};
        have_order = true;
        if (auto e = parse_bool(out.fortran_order)) return e;
      } else if (key == "shape") {
        if (have_shape) return error{"malformed header: duplicate key 'shape'"};
        have_shape = true;
        if (auto e = parse_shape(out.shape)) return e;
      } else {
        return error{"malformed header: unexpected key '" + key + "'"};
      }
      skip_space();
      if (consume(',')) continue;
      if (consume('}')) break;
      return fail("expected ',' or '}'");
    }
    skip_space();
    if (pos_ != text_.size()) return fail("unexpected text after '}'");
    if (!have_descr) return error{"malformed header: missing key 'descr'"};
    if (!have_order) return error{"malformed header: missing key 'fortran_order'"};
    if (!have_shape) return error{"malformed header: missing key 'shape'"};
    return std::nullopt;
  }

 private:
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  bool at_end() const { return pos_ >= text_.size(); }

  bool consume(char c) {
    if (at_end() || text_[pos_] != c) return false;
    ++pos_;
    return true;
  }

  void skip_space() {
    while (!at_end() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  error fail(std::string_view what) const {
    std::string m = "malformed header: ";
    m += what;
    m += at_end() ? std::string(" at end of header")
                  : " at offset " + std::to_string(pos_) + ", found " + show_char(text_[pos_]);
    return error{m};
  }

  std::optional<error> parse_string(std::string& out) {
    const char quote = peek();
    if (quote != '\'' && quote != '"') return fail("expected a quoted string");
    ++pos_;
    const std::size_t begin = pos_;
    while (!at_end() && text_[pos_] != quote) {
      const auto u = static_cast<unsigned char>(text_[pos_]);
      // Escapes never occur in the keys and dtypes this reader accepts, so a backslash is an error
      // rather than something to interpret.
      if (u < 0x20 || u >= 0x7f || u == '\\') return fail("unexpected character in string");
      ++pos_;
    }
    if (at_end()) return fail("unterminated string");
    out.assign(text_.substr(begin, pos_ - begin));
    ++pos_;
    return std::nullopt;
  }

  bool consume_word(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    const std::size_t next = pos_ + word.size();
    if (next < text_.size()) {
      const char c = text_[next];
      if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_')
        return false;
    }
    pos_ = next;
    return true;
  }

  std::optional<error> parse_bool(bool& out) {
    if (consume_word("True")) {
      out = true;
    } else if (consume_word("False")) {
      out = false;
    } else {
      return fail("expected True or False");
    }
    return std::nullopt;
  }

  std::optional<error> parse_shape(std::vector<std::int64_t>& out) {
    out.clear();
    if (!consume('(')) return fail("expected a shape tuple");
    skip_space();
    if (consume(')')) return std::nullopt;  // scalar
    for (;;) {
      if (peek() == '-') return error{"negative dimension in shape"};
      if (peek() < '0' || peek() > '9') return fail("expected a dimension");
      std::int64_t d = 0;
      while (peek() >= '0' && peek() <= '9') {
        const int digit = peek() - '0';
        if (d > (std::numeric_limits<std::int64_t>::max() - digit) / 10) {
          return error{"shape overflow: a dimension exceeds the 64-bit range"};
        }
        d = d * 10 + digit;
        ++pos_;
      }
      if (static_cast<int>(out.size()) == max_rank) {
        return error{"rank exceeds the supported maximum of " + std::to_string(max_rank)};
      }
      out.push_back(d);
      skip_space();
      if (consume(',')) {
        skip_space();
        if (consume(')')) return std::nullopt;
        continue;
      }
      if (consume(')')) {
        // In Python "(3)" is the integer 3, not a tuple; NumPy never writes it.
        if (out.size() == 1)
          return error{"malformed header: shape (" + std::to_string(d) + ") is not a tuple"};
        return std::nullopt;
      }
      return fail("expected ',' or ')' in shape");
    }
  }

  std::string_view text_;
  std::size_t pos_ = 0;
};

/// Little-endian unsigned integer of `n` bytes at `p`.
inline std::uint32_t read_le(const std::byte* p, std::size_t n) {
  std::uint32_t v = 0;
  for (std::size_t i = 0; i < n; ++i)
    v |= static_cast<std::uint32_t>(std::to_integer<unsigned>(p[i])) << (8 * i);
  return v;
}

/// Error for a dtype outside `allowed` (one or two dtype names, joined with " or ").
inline error dtype_error(const std::string& descr, std::string_view allowed) {
  std::string shown = descr.size() > 32 ? descr.substr(0, 32) + "..." : descr;
  const bool big_endian = !descr.empty() && descr[0] == '>';
  return error{"unsupported dtype '" + shown + "' (" + (big_endian ? "big-endian; " : "") + "expected " +
               std::string(allowed) + ")"};
}

/// Writes `header + payload` to `path`.
inline std::optional<error> write_file(const std::filesystem::path& path, std::string_view dtype,
                                       const void* values, std::size_t count,
                                       const std::vector<std::int64_t>& shape) {
  if (static_cast<int>(shape.size()) > max_rank) {
    return error{"rank " + std::to_string(shape.size()) + " exceeds the supported maximum of " +
                 std::to_string(max_rank)};
  }
  for (const std::int64_t d : shape) {
    if (d < 0) return error{"negative dimension " + std::to_string(d) + " in shape " + shape_text(shape)};
  }
  const std::optional<std::uint64_t> n = element_count(shape);
  if (!n) return error{"shape overflow: " + shape_text(shape) + " has too many elements"};
  if (*n != count) {
    return error{"shape " + shape_text(shape) + " holds " + std::to_string(*n) + " elements but " +
                 std::to_string(count) + " values were given"};
  }

  // Version 1.0 suffices: with rank <= 6 the dict is far below its 65535-byte header limit. Padding the
  // preamble + header to a multiple of 64 bytes keeps the data aligned for memory-mapping readers.
  std::string header =
      "{'descr': '" + std::string(dtype) + "', 'fortran_order': False, 'shape': " + shape_text(shape) + ", }";
  const std::size_t preamble = magic_size + 2 + 2;
  const std::size_t unpadded = preamble + header.size() + 1;  // +1 for the closing newline
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';

  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) return error{"cannot open for writing"};
  const char version_and_length[4] = {1, 0, static_cast<char>(header.size() & 0xff),
                                      static_cast<char>(header.size() >> 8)};
  f.write(magic, magic_size);
  f.write(version_and_length, 4);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  if (count) f.write(static_cast<const char*>(values), static_cast<std::streamsize>(count * element_bytes));
  f.close();
  if (!f) return error{"write failed"};
  return std::nullopt;
}

}  // namespace detail

/// Parses the bytes of a whole `.npy` file into `out`. `expected_dtype` ("<f4" or "<i4") narrows the
/// accepted dtypes to one; empty accepts both. `out` is left unchanged on error.
[[nodiscard]] inline std::optional<error> parse(std::span<const std::byte> file, array& out,
                                                std::string_view expected_dtype = {}) {
  using detail::magic_size;
  if (!expected_dtype.empty() && expected_dtype != "<f4" && expected_dtype != "<i4") {
    return error{"expected dtype must be <f4 or <i4, not '" + std::string(expected_dtype) + "'"};
  }
  if (file.size() < magic_size || std::memcmp(file.data(), detail::magic, magic_size) != 0) {
    return error{"bad magic"};
  }
  if (file.size() < magic_size + 2) return error{"truncated: no format version"};
  const unsigned major = std::to_integer<unsigned>(file[magic_size]);
  const unsigned minor = std::to_integer<unsigned>(file[magic_size + 1]);
  // 3.0 differs from 2.0 only in allowing UTF-8 in the header, which NumPy writes only for structured
  // dtypes with non-ASCII field names, never for the dtypes supported here.
  if ((major != 1 && major != 2) || minor != 0) {
    return error{"unsupported format version " + std::to_string(major) + "." + std::to_string(minor)};
  }
  const std::size_t length_bytes = major == 1 ? 2 : 4;
  const std::size_t preamble = magic_size + 2 + length_bytes;
  if (file.size() < preamble) return error{"truncated: header length missing"};
  const std::size_t header_size = detail::read_le(file.data() + magic_size + 2, length_bytes);
  if (header_size > file.size() - preamble) {
    return error{"truncated: header length is " + std::to_string(header_size) + " bytes, file holds " +
                 std::to_string(file.size() - preamble)};
  }

  const std::string_view header_text(reinterpret_cast<const char*>(file.data() + preamble), header_size);
  detail::header_fields fields;
  if (auto e = detail::header_parser(header_text).parse(fields)) return e;

  if (expected_dtype.empty()) {
    if (fields.descr != "<f4" && fields.descr != "<i4")
      return detail::dtype_error(fields.descr, "<f4 or <i4");
  } else if (fields.descr != expected_dtype) {
    return detail::dtype_error(fields.descr, expected_dtype);
  }
  if (fields.fortran_order) return error{"fortran_order arrays are not supported"};
  const std::optional<std::uint64_t> count = detail::element_count(fields.shape);
  if (!count) return error{"shape overflow: " + detail::shape_text(fields.shape) + " has too many elements"};

  const std::size_t available = file.size() - preamble - header_size;
  const std::uint64_t needed = *count * detail::element_bytes;  // cannot overflow: element_count bounds it
  if (available < needed) {
    return error{"truncated: header says " + std::to_string(*count) + " elements, file holds " +
                 std::to_string(available / detail::element_bytes)};
  }
  if (available > needed) {
    return error{"trailing data: header says " + std::to_string(*count) + " elements, file has " +
                 std::to_string(available - needed) + " bytes more"};
  }

  array result;
  result.dtype = std::move(fields.descr);
  result.shape = std::move(fields.shape);
  const auto data_begin = file.begin() + static_cast<std::ptrdiff_t>(preamble + header_size);
  result.data.assign(data_begin, file.end());
  out = std::move(result);
  return std::nullopt;
}

/// Reads the `.npy` file at `path` into `out` (see `parse`). `out` is left unchanged on error.
[[nodiscard]] inline std::optional<error> load(const std::filesystem::path& path, array& out,
                                               std::string_view expected_dtype = {}) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return error{"cannot open"};
  std::vector<std::byte> bytes;
  constexpr std::size_t chunk = std::size_t{1} << 16;
  for (;;) {
    const std::size_t old_size = bytes.size();
    bytes.resize(old_size + chunk);
    f.read(reinterpret_cast<char*>(bytes.data() + old_size), static_cast<std::streamsize>(chunk));
    bytes.resize(old_size + static_cast<std::size_t>(f.gcount()));
    if (f.bad()) return error{"read failed"};
    if (!f) break;  // end of file
  }
  return parse(bytes, out, expected_dtype);
}

/// Writes `values` with `shape` (rank <= 6, non-negative, product == values.size()) as a version 1.0
/// `<f4` file.
[[nodiscard]] inline std::optional<error> save(const std::filesystem::path& path,
                                               std::span<const float> values,
                                               const std::vector<std::int64_t>& shape) {
  return detail::write_file(path, dtype_name<float>, values.data(), values.size(), shape);
}

/// Writes `values` with `shape` (rank <= 6, non-negative, product == values.size()) as a version 1.0
/// `<i4` file.
[[nodiscard]] inline std::optional<error> save(const std::filesystem::path& path,
                                               std::span<const std::int32_t> values,
                                               const std::vector<std::int64_t>& shape) {
  return detail::write_file(path, dtype_name<std::int32_t>, values.data(), values.size(), shape);
}

}  // namespace npy
