// Tests of the .npy reader and writer used by the examples: round trips, the exact bytes NumPy expects,
// and one precise error for each kind of malformed file.

#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "common/npy.hpp"
#include "examples/temp_dir.hpp"

namespace {

namespace fs = std::filesystem;

/// A scratch directory with this test's prefix.
struct temp_dir : nosa_test::temp_dir {
  temp_dir() : nosa_test::temp_dir("nosa_npy_test_") {}
};

using nosa_test::read_bytes;
using nosa_test::write_bytes;

/// A .npy file with `header` written verbatim after the preamble of format `major`.0, followed by
/// `data_bytes` bytes of payload.
std::string raw_npy(std::string_view header, std::size_t data_bytes, int major = 1) {
  std::string s("\x93NUMPY", 6);
  s += static_cast<char>(major);
  s += '\0';
  const std::size_t n = header.size();
  s += static_cast<char>(n & 0xff);
  s += static_cast<char>((n >> 8) & 0xff);
  if (major >= 2) {
    s += static_cast<char>((n >> 16) & 0xff);
    s += static_cast<char>((n >> 24) & 0xff);
  }
  s += header;
  s.append(data_bytes, '\x01');
  return s;
}

/// A header of the usual form with the given descr, fortran_order and shape text.
std::string dict(std::string_view descr, std::string_view order, std::string_view shape) {
  return "{'descr': '" + std::string(descr) + "', 'fortran_order': " + std::string(order) +
         ", 'shape': " + std::string(shape) + ", }\n";
}

/// The error message from loading `bytes` written to a file, or "" when the load succeeds.
std::string load_error(const temp_dir& dir, std::string_view bytes, std::string_view expected_dtype = {}) {
  const fs::path p = dir.file("case.npy");
  write_bytes(p, bytes);
  npy::array a;
  const std::optional<npy::error> e = npy::load(p, a, expected_dtype);
  return e ? e->message : std::string();
}

bool starts_with(const std::string& s, std::string_view prefix) { return s.rfind(prefix, 0) == 0; }

const std::vector<std::vector<std::int64_t>> round_trip_shapes = {
    {}, {5}, {2, 3}, {2, 3, 4}, {2, 1, 3, 2}, {0}, {3, 0}, {1, 1, 1, 1, 1, 7}};

}  // namespace

TEST_CASE("float32 arrays of rank 0 to 6 round-trip") {
  const temp_dir dir;
  for (const auto& shape : round_trip_shapes) {
    std::size_t n = 1;
    for (const std::int64_t d : shape) n *= static_cast<std::size_t>(d);
    std::vector<float> values(n);
    for (std::size_t i = 0; i < n; ++i) values[i] = 0.5f * static_cast<float>(i) - 3.25f;
    if (n > 1) values[1] = std::numeric_limits<float>::denorm_min();

    const fs::path p = dir.file("f4.npy");
    CAPTURE(shape.size());
    REQUIRE_FALSE(npy::save(p, values, shape));
    const std::string bytes = read_bytes(p);
    CHECK((bytes.size() - 4 * n) % 64 == 0);  // data starts 64-byte aligned

    npy::array a;
    REQUIRE_FALSE(npy::load(p, a));
    CHECK(a.dtype == "<f4");
    CHECK(a.shape == shape);
    CHECK(a.size() == n);
    CHECK(a.data.size() == 4 * n);
    CHECK(a.to_vector<float>() == values);
    CHECK(a.as<std::int32_t>() == nullptr);
    CHECK(a.to_vector<std::int32_t>().empty());
    if (n > 0) {
      REQUIRE(a.as<float>() != nullptr);
      for (std::size_t i = 0; i < n; ++i) CHECK(a.as<float>()[i] == values[i]);
    }
    npy::array typed;
    CHECK_FALSE(npy::load(p, typed, "<f4"));
  }
}

TEST_CASE("int32 arrays of rank 0 to 6 round-trip") {
  const temp_dir dir;
  for (const auto& shape : round_trip_shapes) {
    std::size_t n = 1;
    for (const std::int64_t d : shape) n *= static_cast<std::size_t>(d);
    std::vector<std::int32_t> values(n);
    for (std::size_t i = 0; i < n; ++i) values[i] = static_cast<std::int32_t>(i * 7919) - 1000;
    if (n > 2) {
      values[0] = std::numeric_limits<std::int32_t>::min();
      values[1] = std::numeric_limits<std::int32_t>::max();
    }
    const fs::path p = dir.file("i4.npy");
    CAPTURE(shape.size());
    REQUIRE_FALSE(npy::save(p, values, shape));
    npy::array a;
    REQUIRE_FALSE(npy::load(p, a, "<i4"));
    CHECK(a.dtype == "<i4");
    CHECK(a.shape == shape);
    CHECK(a.to_vector<std::int32_t>() == values);
    CHECK(a.as<float>() == nullptr);
  }
}

TEST_CASE("the writer produces the bytes NumPy writes for a small vector") {
  const temp_dir dir;
  const fs::path p = dir.file("v.npy");
  const std::vector<float> values{1.0f, 2.0f, 3.0f};
  REQUIRE_FALSE(npy::save(p, values, {3}));
  const std::string bytes = read_bytes(p);
  const std::string dict_text = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
  REQUIRE(bytes.size() == 128 + 12);
  CHECK(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  CHECK(bytes[8] == 118);  // header length, little-endian: 128 - 10
  CHECK(bytes[9] == 0);
  CHECK(bytes.substr(10, dict_text.size()) == dict_text);
  CHECK(bytes.substr(10 + dict_text.size(), 118 - dict_text.size() - 1) ==
        std::string(118 - dict_text.size() - 1, ' '));
  CHECK(bytes[127] == '\n');
  CHECK(bytes.substr(128, 4) == std::string("\x00\x00\x80\x3f", 4));  // 1.0f

  const std::vector<std::int32_t> scalar{42};
  REQUIRE_FALSE(npy::save(p, scalar, {}));
  CHECK(read_bytes(p).find("'shape': (), }") != std::string::npos);
  REQUIRE_FALSE(npy::save(p, std::vector<std::int32_t>(6), {2, 3}));
  CHECK(read_bytes(p).find("'descr': '<i4'") != std::string::npos);
  CHECK(read_bytes(p).find("'shape': (2, 3), }") != std::string::npos);
}

TEST_CASE("headers are parsed robustly") {
  const temp_dir dir;
  // Each variant describes a [2, 3] float array.
  const std::string_view variants[] = {
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }          \n",
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}\n",  // no trailing comma
      "{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(2,3)}",  // double quotes, no newline
      "{ 'shape' : ( 2 , 3 , ) , 'fortran_order' : False , 'descr' : '<f4' , }\n",  // any order, spaces
      "\t{'descr':'<f4',\r\n'fortran_order':False,\r\n'shape':(2,3,),}\r\n",        // tabs and CRLF
  };
  for (const std::string_view header : variants) {
    CAPTURE(header);
    for (const int major : {1, 2}) {
      const fs::path p = dir.file("h.npy");
      write_bytes(p, raw_npy(header, 24, major));
      npy::array a;
      const auto e = npy::load(p, a);
      CHECK_MESSAGE(!e, (e ? e->message : ""));
      CHECK(a.shape == std::vector<std::int64_t>{2, 3});
      CHECK(a.size() == 6);
    }
  }
  // Shapes of every form.
  CHECK(load_error(dir, raw_npy(dict("<i4", "False", "()"), 4)).empty());
  CHECK(load_error(dir, raw_npy(dict("<i4", "False", "(3,)"), 12)).empty());
  CHECK(load_error(dir, raw_npy(dict("<i4", "False", "(0, 5)"), 0)).empty());
}

TEST_CASE("malformed preambles") {
  const temp_dir dir;
  CHECK(load_error(dir, "") == "bad magic");
  CHECK(load_error(dir, "\x93NUM") == "bad magic");
  CHECK(load_error(dir, raw_npy(dict("<f4", "False", "(1,)"), 4).replace(5, 1, "Z")) == "bad magic");
  CHECK(load_error(dir, "PK\x03\x04 not npy at all") == "bad magic");
  CHECK(load_error(dir, std::string("\x93NUMPY", 6)) == "truncated: no format version");
  CHECK(load_error(dir, std::string("\x93NUMPY\x01\x00\x10", 9)) == "truncated: header length missing");
  CHECK(load_error(dir, std::string("\x93NUMPY\x02\x00\x10\x00\x00", 11)) ==
        "truncated: header length missing");

  std::string v3 = raw_npy(dict("<f4", "False", "(1,)"), 4, 2);
  v3[6] = 3;
  CHECK(load_error(dir, v3) == "unsupported format version 3.0");
  std::string v11 = raw_npy(dict("<f4", "False", "(1,)"), 4);
  v11[7] = 1;
  CHECK(load_error(dir, v11) == "unsupported format version 1.1");

  // A header length beyond the end of the file; version 2.0 allows up to 4 GiB.
  std::string long_header = raw_npy(dict("<f4", "False", "(1,)"), 0, 2);
  long_header[11] = '\x7f';
  CHECK(
      starts_with(load_error(dir, long_header), "truncated: header length is 2130706490 bytes, file holds"));
}

TEST_CASE("truncated and oversized payloads") {
  const temp_dir dir;
  CHECK(load_error(dir, raw_npy(dict("<f4", "False", "(120,)"), 400)) ==
        "truncated: header says 120 elements, file holds 100");
  CHECK(load_error(dir, raw_npy(dict("<i4", "False", "(2, 3)"), 23)) ==
        "truncated: header says 6 elements, file holds 5");
  CHECK(load_error(dir, raw_npy(dict("<f4", "False", "()"), 0)) ==
        "truncated: header says 1 elements, file holds 0");
  CHECK(load_error(dir, raw_npy(dict("<f4", "False", "(2,)"), 11)) ==
        "trailing data: header says 2 elements, file has 3 bytes more");
  // A huge but representable shape must fail on the size check, before anything is allocated.
  CHECK(load_error(dir, raw_npy(dict("<f4", "False", "(1000000000000, 1000)"), 8)) ==
        "truncated: header says 1000000000000000 elements, file holds 2");
}

TEST_CASE("unsupported dtypes and layouts") {
  const temp_dir dir;
  CHECK(load_error(dir, raw_npy(dict("<f8", "False", "(1,)"), 8)) ==
        "unsupported dtype '<f8' (expected <f4 or <i4)");
  CHECK(load_error(dir, raw_npy(dict("<f8", "False", "(1,)"), 8), "<f4") ==
        "unsupported dtype '<f8' (expected <f4)");
  CHECK(load_error(dir, raw_npy(dict("<i4", "False", "(1,)"), 4), "<f4") ==
        "unsupported dtype '<i4' (expected <f4)");
  CHECK(load_error(dir, raw_npy(dict(">f4", "False", "(1,)"), 4)) ==
        "unsupported dtype '>f4' (big-endian; expected <f4 or <i4)");
  CHECK(load_error(dir, raw_npy(dict("|i4", "False", "(1,)"), 4)) ==
        "unsupported dtype '|i4' (expected <f4 or <i4)");
  CHECK(load_error(dir, raw_npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }\n", 4)) ==
        "unsupported dtype: descr is not a string (structured dtypes are not supported)");
  CHECK(load_error(dir, raw_npy(dict("<f4", "True", "(2, 3)"), 24)) ==
        "fortran_order arrays are not supported");
  CHECK(load_error(dir, raw_npy(dict("<f4", "False", "(1,)"), 4), "<f8") ==
        "expected dtype must be <f4 or <i4, not '<f8'");
}

TEST_CASE("garbage and malformed headers") {
  const temp_dir dir;
  const auto err = [&](std::string_view header) { return load_error(dir, raw_npy(header, 4)); };
  CHECK(err("hello world\n") == "malformed header: expected '{' at offset 0, found 'h'");
  CHECK(err("") == "malformed header: expected '{' at end of header");
  CHECK(err("{'descr': '<f4', 'fortran_order': False\n") ==
        "malformed header: expected ',' or '}' at end of header");
  CHECK(err("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } x\n") ==
        "malformed header: unexpected text after '}' at offset 58, found 'x'");
  CHECK(err("{'descr': '<f4', 'fortran_order': False}\n") == "malformed header: missing key 'shape'");
  CHECK(err("{'descr': '<f4', 'shape': (1,)}\n") == "malformed header: missing key 'fortran_order'");
  CHECK(err("{'fortran_order': False, 'shape': (1,)}\n") == "malformed header: missing key 'descr'");
  CHECK(err("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,)}\n") ==
        "malformed header: duplicate key 'descr'");
  CHECK(err("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}\n") ==
        "malformed header: unexpected key 'extra'");
  CHECK(err("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}\n") ==
        "malformed header: expected True or False at offset 34, found '0'");
  CHECK(err("{'descr': '<f4', 'fortran_order': Falsey, 'shape': (1,)}\n") ==
        "malformed header: expected True or False at offset 34, found 'F'");
  CHECK(err("{'descr': '<f4', 'fortran_order': False, 'shape': (1)}\n") ==
        "malformed header: shape (1) is not a tuple");
  CHECK(err("{'descr': '<f4', 'fortran_order': False, 'shape': [1]}\n") ==
        "malformed header: expected a shape tuple at offset 50, found '['");
  CHECK(err("{'descr': '<f4', 'fortran_order': False, 'shape': (1,,)}\n") ==
        "malformed header: expected a dimension at offset 53, found ','");
  // The string closes at the quote meant to open the next key.
  CHECK(err("{'descr': '<f4, 'fortran_order': False, 'shape': (1,)}\n") ==
        "malformed header: expected ',' or '}' at offset 17, found 'f'");
  CHECK(err("{'descr': '<f4") == "malformed header: unterminated string at end of header");
  CHECK(err("{'descr': '<f\\x34', 'fortran_order': False, 'shape': (1,)}\n") ==
        "malformed header: unexpected character in string at offset 13, found '\\'");
  CHECK(err("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}\xff\n") ==
        "malformed header: unexpected text after '}' at offset 55, found byte 0xff");
  CHECK(err(std::string("{'descr': '<f4\0', 'fortran_order': False, 'shape': (1,)}\n", 58)) ==
        "malformed header: unexpected character in string at offset 14, found byte 0x00");
}

TEST_CASE("shapes that overflow or exceed the supported rank") {
  const temp_dir dir;
  const auto err = [&](std::string_view shape) {
    return load_error(dir, raw_npy(dict("<f4", "False", shape), 4));
  };
  CHECK(err("(9223372036854775807,)") == "shape overflow: (9223372036854775807,) has too many elements");
  CHECK(err("(2305843009213693952,)") == "shape overflow: (2305843009213693952,) has too many elements");
  CHECK(err("(4294967296, 4294967296)") == "shape overflow: (4294967296, 4294967296) has too many elements");
  CHECK(err("(99999999999999999999,)") == "shape overflow: a dimension exceeds the 64-bit range");
  CHECK(err("(-1,)") == "negative dimension in shape");
  CHECK(err("(1, 1, 1, 1, 1, 1, 1)") == "rank exceeds the supported maximum of 6");
  // A zero dimension makes the product zero whatever follows; the payload must then be empty.
  CHECK(err("(0, 9223372036854775807)") == "trailing data: header says 0 elements, file has 4 bytes more");
  // Just below the limit: representable, so the size check (not the overflow check) rejects it.
  CHECK(err("(2305843009213693951,)") == "truncated: header says 2305843009213693951 elements, file holds 1");
}

TEST_CASE("files that cannot be read, and a failed load leaves the array alone") {
  const temp_dir dir;
  npy::array a;
  REQUIRE_FALSE(npy::save(dir.file("ok.npy"), std::vector<float>{1.0f, 2.0f}, {2}));
  REQUIRE_FALSE(npy::load(dir.file("ok.npy"), a));

  const auto missing = npy::load(dir.file("missing.npy"), a);
  REQUIRE(missing);
  CHECK(missing->message == "cannot open");
  const auto directory = npy::load(dir.path, a);
  REQUIRE(directory);
  CHECK((directory->message == "read failed" || directory->message == "cannot open"));
  write_bytes(dir.file("bad.npy"), raw_npy(dict("<f4", "True", "(2,)"), 8));
  CHECK(npy::load(dir.file("bad.npy"), a));

  CHECK(a.dtype == "<f4");
  CHECK(a.shape == std::vector<std::int64_t>{2});
  CHECK(a.to_vector<float>() == std::vector<float>{1.0f, 2.0f});
}

TEST_CASE("save rejects inconsistent shapes") {
  const temp_dir dir;
  const fs::path p = dir.file("s.npy");
  const std::vector<float> six(6);
  CHECK(npy::save(p, six, {2, 2})->message == "shape (2, 2) holds 4 elements but 6 values were given");
  CHECK(npy::save(p, six, {6, -1})->message == "negative dimension -1 in shape (6, -1)");
  CHECK(npy::save(p, six, {1, 1, 1, 1, 1, 1, 6})->message == "rank 7 exceeds the supported maximum of 6");
  CHECK(npy::save(p, six, {1LL << 62, 4})->message ==
        "shape overflow: (4611686018427387904, 4) has too many elements");
  CHECK(npy::save(p, std::vector<std::int32_t>{}, {})->message ==
        "shape () holds 1 elements but 0 values were given");
  CHECK(npy::save(dir.file("no/such/dir.npy"), six, {6})->message == "cannot open for writing");
  CHECK_FALSE(fs::exists(p));
}
