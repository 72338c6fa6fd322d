// Tests of the safetensors reader and writer of the engine example: round trips, metadata, escaped names,
// and one precise error for each kind of malformed or mismatched file.

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/safetensors.hpp"
#include "examples/temp_dir.hpp"

namespace {

namespace fs = std::filesystem;
using nosa_engine::dtype;
using nosa_engine::safetensors_file;
using nosa_engine::tensor_to_write;

/// A scratch directory with this test's prefix.
struct temp_dir : nosa_test::temp_dir {
  temp_dir() : nosa_test::temp_dir("nosa_safetensors_test_") {}
};

using nosa_test::read_bytes;
using nosa_test::write_bytes;

/// `n` bytes counting up from `seed`.
std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((seed + i * 7) & 0xff);
  return v;
}

/// A safetensors file with `header` verbatim after its length, then `data_bytes` bytes of payload.
std::string raw_file(std::string_view header, std::size_t data_bytes) {
  std::string s(8, '\0');
  const std::uint64_t n = header.size();
  std::memcpy(s.data(), &n, 8);
  s += header;
  s.append(data_bytes, '\x05');
  return s;
}

/// The error from opening `bytes` written to a file, or "" when it opens.
std::string open_error(const temp_dir& dir, std::string_view bytes) {
  const fs::path p = dir.file("case.safetensors");
  write_bytes(p, bytes);
  std::string error;
  const std::optional<safetensors_file> f = safetensors_file::open(p.string(), error);
  if (f) return std::string();
  CHECK(!error.empty());
  CHECK(error.find('\n') == std::string::npos);
  return error;
}

bool contains(const std::string& s, std::string_view part) { return s.find(part) != std::string::npos; }

const std::string q_proj = "model.layers.0.self_attn.q_proj.weight";

/// A small Llama-style checkpoint with eviction-head tensors, in three dtypes.
struct sample {
  std::vector<std::byte> q = pattern(8 * 8 * 2, 1);    // BF16 [8, 8]
  std::vector<std::byte> k = pattern(2 * 8 * 2, 2);    // F16 [2, 8]
  std::vector<std::byte> w1 = pattern(4 * 16 * 4, 3);  // F32 [4, 16]
  std::vector<std::byte> b1 = pattern(16 * 4, 4);      // F32 [16]
  std::vector<std::byte> norm = pattern(8 * 2, 5);     // BF16 [8]
  std::vector<std::byte> empty;                        // F32 [0, 3]
  std::vector<std::byte> scalar = pattern(4, 6);       // F32 []

  std::vector<tensor_to_write> tensors() const {
    return {
        {q_proj, dtype::bf16, {8, 8}, q},
        {"model.layers.0.self_attn.k_proj.weight", dtype::f16, {2, 8}, k},
        {"model.layers.0.self_attn.eviction_head.w1", dtype::f32, {4, 16}, w1},
        {"model.layers.0.self_attn.eviction_head.b1", dtype::f32, {16}, b1},
        {"model.norm.weight", dtype::bf16, {8}, norm},
        {"model.empty", dtype::f32, {0, 3}, empty},
        {"model.scalar", dtype::f32, {}, scalar},
    };
  }
};

/// The bytes of a valid sample file.
std::string sample_bytes(const temp_dir& dir) {
  const sample s;
  const fs::path p = dir.file("sample.safetensors");
  std::string error;
  REQUIRE(nosa_engine::write_safetensors(p.string(), s.tensors(), error, {{"format", "pt"}}));
  return read_bytes(p);
}

bool same_bytes(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

}  // namespace

TEST_CASE("tensors of three dtypes, metadata and eviction-head tensors round-trip") {
  const temp_dir dir;
  const sample s;
  const std::vector<tensor_to_write> written = s.tensors();
  const fs::path p = dir.file("model.safetensors");
  std::string error;
  REQUIRE_MESSAGE(nosa_engine::write_safetensors(p.string(), written, error,
                                                 {{"format", "pt"}, {"nosa.block_size", "64"}}),
                  error);

  // The data buffer starts 8-byte aligned.
  const std::string bytes = read_bytes(p);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);

  const std::optional<safetensors_file> f = safetensors_file::open(p.string(), error);
  REQUIRE_MESSAGE(f, error);
  REQUIRE(f->tensors().size() == written.size());
  for (std::size_t i = 0; i < written.size(); ++i) {
    const tensor_to_write& w = written[i];
    CAPTURE(w.name);
    CHECK(f->tensors()[i].name == w.name);  // header order is preserved
    const nosa_engine::tensor_info* t = f->find(w.name);
    REQUIRE(t);
    CHECK(t->type == w.type);
    CHECK(t->dtype_name == nosa_engine::dtype_name(w.type));
    CHECK(t->shape == w.shape);
    CHECK(t->size == w.bytes.size());
    CHECK(same_bytes(f->data(*t), w.bytes));
    CHECK(nosa_engine::check_tensor(*f, w.name, w.type, w.shape, error));
  }
  CHECK(f->find("model.layers.1.self_attn.q_proj.weight") == nullptr);
  CHECK(f->metadata().size() == 2);
  CHECK(f->metadata().at("format") == "pt");
  CHECK(f->metadata().at("nosa.block_size") == "64");
}

TEST_CASE("a file with no tensors and no metadata opens") {
  const temp_dir dir;
  const fs::path p = dir.file("empty.safetensors");
  std::string error;
  REQUIRE(nosa_engine::write_safetensors(p.string(), {}, error));
  const std::optional<safetensors_file> f = safetensors_file::open(p.string(), error);
  REQUIRE_MESSAGE(f, error);
  CHECK(f->tensors().empty());
  CHECK(f->metadata().empty());
  CHECK(f->data_size() == 0);
}

TEST_CASE("names with escapes round-trip, and the reader decodes every JSON escape") {
  const temp_dir dir;
  const std::string odd = std::string("quote\" back\\slash tab\t nl\n ctl") + '\x01' + " caf\xc3\xa9";
  const std::vector<std::byte> data = pattern(4, 9);
  const fs::path p = dir.file("names.safetensors");
  std::string error;
  REQUIRE(nosa_engine::write_safetensors(p.string(), {{odd, dtype::f32, {1}, data}}, error,
                                         {{"key \"q\"", "v\\al\nue"}}));
  std::optional<safetensors_file> f = safetensors_file::open(p.string(), error);
  REQUIRE_MESSAGE(f, error);
  REQUIRE(f->find(odd));
  CHECK(same_bytes(f->data(*f->find(odd)), data));
  CHECK(f->metadata().at("key \"q\"") == "v\\al\nue");

  // Escapes a writer might use that ours does not: \/ \b \f \r and \u, including a surrogate pair.
  const std::string header =
      R"({"a\/b\b\f\r\u0041\u00e9\u20ac\ud83d\ude00":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  write_bytes(p, raw_file(header, 4));
  f = safetensors_file::open(p.string(), error);
  REQUIRE_MESSAGE(f, error);
  REQUIRE(f->tensors().size() == 1);
  CHECK(f->tensors()[0].name == "a/b\b\f\rA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80");
}

TEST_CASE("whitespace, unknown dtypes and padding are accepted") {
  const temp_dir dir;
  const std::string header =
      " { \"ids\" : { \"dtype\" : \"I64\" , \"shape\" : [ 2 ] , \"data_offsets\" : [ 0 , 16 ] } ,\n"
      "\t\"x\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[16,18]}}   ";
  const std::string e = open_error(dir, raw_file(header, 18));
  CHECK(e.empty());
  const fs::path p = dir.file("case.safetensors");
  std::string error;
  const std::optional<safetensors_file> f = safetensors_file::open(p.string(), error);
  REQUIRE(f);
  CHECK(f->find("ids")->type == dtype::other);
  CHECK(f->find("ids")->dtype_name == "I64");
  CHECK(f->find("x")->size == 2);  // unknown element size: not checked
  CHECK_FALSE(nosa_engine::check_tensor(*f, "ids", dtype::f32, {2}, error));
  CHECK(error == "ids: expected dtype F32, found I64");
}

TEST_CASE("check_tensor names the tensor and the mismatch") {
  const temp_dir dir;
  const fs::path p = dir.file("model.safetensors");
  const std::vector<std::byte> q = pattern(16 * 4 * 2, 1);
  std::string error;
  REQUIRE(nosa_engine::write_safetensors(p.string(), {{q_proj, dtype::bf16, {16, 4}, q}}, error));
  const std::optional<safetensors_file> f = safetensors_file::open(p.string(), error);
  REQUIRE_MESSAGE(f, error);

  CHECK(nosa_engine::check_tensor(*f, q_proj, dtype::bf16, {16, 4}, error));
  CHECK_FALSE(nosa_engine::check_tensor(*f, q_proj, dtype::bf16, {16, 16}, error));
  CHECK(error == "model.layers.0.self_attn.q_proj.weight: expected shape [16, 16], found [16, 4]");
  CHECK_FALSE(nosa_engine::check_tensor(*f, q_proj, dtype::bf16, {64}, error));
  CHECK(error == "model.layers.0.self_attn.q_proj.weight: expected shape [64], found [16, 4]");
  CHECK_FALSE(nosa_engine::check_tensor(*f, q_proj, dtype::f32, {16, 4}, error));
  CHECK(error == "model.layers.0.self_attn.q_proj.weight: expected dtype F32, found BF16");
  CHECK_FALSE(
      nosa_engine::check_tensor(*f, "model.layers.0.self_attn.k_proj.weight", dtype::bf16, {4, 4}, error));
  CHECK(error == "model.layers.0.self_attn.k_proj.weight: not found in the file");
}

TEST_CASE("a file truncated anywhere is rejected with the reason") {
  const temp_dir dir;
  const std::string full = sample_bytes(dir);
  std::uint64_t n = 0;
  std::memcpy(&n, full.data(), 8);
  REQUIRE(open_error(dir, full).empty());

  for (const std::size_t keep : {std::size_t{0}, std::size_t{1}, std::size_t{7}}) {
    CAPTURE(keep);
    const std::string e = open_error(dir, full.substr(0, keep));
    CHECK(contains(e, "is " + std::to_string(keep) + " bytes, shorter than the 8-byte header length"));
  }
  for (const std::size_t keep :
       {std::size_t{8}, std::size_t{9}, std::size_t(8 + n / 2), std::size_t(8 + n - 1)}) {
    CAPTURE(keep);
    const std::string e = open_error(dir, full.substr(0, keep));
    CHECK(contains(e, "header length " + std::to_string(n) + " exceeds the " + std::to_string(keep - 8) +
                          " bytes that follow the length field"));
  }
  // Cut inside the data buffer: the last tensor (the scalar) no longer fits.
  const std::size_t data = full.size() - 8 - n;
  for (const std::size_t cut : {std::size_t{1}, std::size_t{4}, data / 2, data}) {
    CAPTURE(cut);
    const std::string e = open_error(dir, full.substr(0, full.size() - cut));
    CHECK(contains(e, "is beyond the data buffer of " + std::to_string(data - cut) + " bytes"));
    CHECK(contains(e, "truncated file"));
    CHECK(contains(e, "data_offsets end " + std::to_string(data)));
  }
  // The error names the file.
  CHECK(contains(open_error(dir, full.substr(0, 3)), "case.safetensors: "));
}

TEST_CASE("a corrupt header length is rejected") {
  const temp_dir dir;
  std::string bytes = sample_bytes(dir);
  const std::uint64_t rest = bytes.size() - 8;

  std::uint64_t n = rest + 1;
  std::memcpy(bytes.data(), &n, 8);
  CHECK(contains(open_error(dir, bytes), "header length " + std::to_string(rest + 1) + " exceeds the " +
                                             std::to_string(rest) + " bytes"));
  n = ~std::uint64_t{0};
  std::memcpy(bytes.data(), &n, 8);
  CHECK(contains(open_error(dir, bytes), "header length 18446744073709551615 exceeds"));

  // Shorter than the real header: the JSON is cut off.
  n = 20;
  std::memcpy(bytes.data(), &n, 8);
  CHECK(contains(open_error(dir, bytes), "malformed JSON header at byte 20: "));
  n = 0;
  std::memcpy(bytes.data(), &n, 8);
  CHECK(contains(open_error(dir, bytes), "malformed JSON header at byte 0: the header is not a JSON object"));

  // A header length over the limit, within a file large enough to hold it.
  std::string big(8, '\0');
  n = 100'000'008;
  std::memcpy(big.data(), &n, 8);
  big.resize(8 + n, ' ');
  CHECK(contains(open_error(dir, big), "header length 100000008 exceeds the limit of 100000000 bytes"));
}

TEST_CASE("malformed JSON is rejected with the position and the reason") {
  const temp_dir dir;
  const std::string t = R"("t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  const struct {
    std::string header;
    std::string error;
  } cases[] = {
      {"", "at byte 0: the header is not a JSON object"},
      {"[]", "at byte 0: the header is not a JSON object"},
      {"{" + t, "the header ended inside an object"},
      {"{" + t + "}x", "unexpected text after the top-level object"},
      {"{" + t + "}{}", "unexpected text after the top-level object"},
      {"{" + t + ",}", "expected a string key"},
      {"{" + t + " " + t + "}", "expected ',' or '}'"},
      {R"({"t" {"dtype":"F32"}})", "expected ':'"},
      {R"({"t":{"dtype":"F32","shape":[1,],"data_offsets":[0,4]}})", "unexpected character where a value"},
      {R"({"t":{"dtype":"F32","shape":[1 2],"data_offsets":[0,4]}})", "expected ',' or ']'"},
      {R"({"t":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", "only integers are supported"},
      {R"({"t":{"dtype":"F32","shape":[1e3],"data_offsets":[0,4]}})", "only integers are supported"},
      {R"({"t":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}})", "leading zeros"},
      {R"({"t":{"dtype":"F32","shape":[-],"data_offsets":[0,4]}})", "expected a digit"},
      {R"({"t":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,4]}})",
       "integer exceeds the 64-bit range"},
      {R"({"t":{"dtype":null,"shape":[1],"data_offsets":[0,4]}})", "true, false and null are not supported"},
      {R"({"t":{"dtype":true,"shape":[1],"data_offsets":[0,4]}})", "true, false and null are not supported"},
      {R"({"t":{"dtype":"F32)", "the header ended inside a string"},
      {"{\"t\x01\":{}}", "unescaped control character in a string"},
      {R"({"t\x":{}})", "at byte 4: invalid escape in a string"},
      {R"({"t\u12":{}})", "invalid hex digit in \\u escape"},
      {R"({"t\u12)", "truncated \\u escape"},
      {R"({"t\ud800":{}})", "unpaired high surrogate"},
      {R"({"t\ud800\u0041":{}})", "unpaired high surrogate"},
      {R"({"t\udc00":{}})", "unpaired low surrogate"},
      {"{" + t + "," + t + "}", "duplicate key \"t\""},
      {"{\"t\":" + std::string(20, '[') + std::string(20, ']') + "}", "nesting deeper than 16 levels"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.header);
    const std::string e = open_error(dir, raw_file(c.header, 4));
    CHECK(contains(e, "malformed JSON header at byte "));
    CHECK(contains(e, c.error));
  }
}

TEST_CASE("missing or ill-typed fields are rejected with the tensor's name") {
  const temp_dir dir;
  const struct {
    std::string header;
    std::string error;
  } cases[] = {
      {R"({"w":{"shape":[1],"data_offsets":[0,4]}})", "tensor \"w\": missing field \"dtype\""},
      {R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", "tensor \"w\": missing field \"shape\""},
      {R"({"w":{"dtype":"F32","shape":[1]}})", "tensor \"w\": missing field \"data_offsets\""},
      {R"({"w":[1]})", "tensor \"w\": entry is not an object"},
      {R"({"w":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", "tensor \"w\": dtype is not a string"},
      {R"({"w":{"dtype":"F32","shape":1,"data_offsets":[0,4]}})", "tensor \"w\": shape is not an array"},
      {R"({"w":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}})",
       "tensor \"w\": shape[0] is not an integer"},
      {R"({"w":{"dtype":"F32","shape":[1,-2],"data_offsets":[0,4]}})",
       "tensor \"w\": shape[1] is negative (-2)"},
      {R"({"w":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]}})",
       "tensor \"w\": shape[0] is too large (9223372036854775808)"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})",
       "tensor \"w\": data_offsets is not an array of two integers"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":{}}})",
       "tensor \"w\": data_offsets is not an array of two integers"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-1,4]}})",
       "tensor \"w\": data_offsets begin is negative (-1)"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,"4"]}})",
       "tensor \"w\": data_offsets end is not an integer"},
      {R"({"__metadata__":[],"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       "__metadata__ is not an object"},
      {R"({"__metadata__":{"a":"b","n":1}})", "__metadata__ entry \"n\" is not a string"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.header);
    CHECK(contains(open_error(dir, raw_file(c.header, 4)), c.error));
  }
}

TEST_CASE("offsets out of order, out of the buffer, overlapping or not matching the shape are rejected") {
  const temp_dir dir;
  const struct {
    std::string header;
    std::size_t data;
    std::string error;
  } cases[] = {
      {R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4,
       "tensor \"w\": data_offsets [4, 0] has begin > end"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       12, "tensor \"w\": data_offsets end 16 is beyond the data buffer of 12 bytes"},
      {R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551611,18446744073709551615]}})", 4,
       "tensor \"w\": data_offsets end 18446744073709551615 is beyond the data buffer of 4 bytes"},
      {R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", 16,
       "tensor \"w\": F32 shape [4] needs 16 bytes but data_offsets [0, 12] hold 12"},
      {R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,24]}})", 24,
       "tensor \"w\": BF16 shape [2, 3] needs 12 bytes but data_offsets [0, 24] hold 24"},
      {R"({"w":{"dtype":"F16","shape":[],"data_offsets":[0,0]}})", 4,
       "tensor \"w\": F16 shape [] needs 2 bytes but data_offsets [0, 0] hold 0"},
      {R"({"w":{"dtype":"I64","shape":[3],"data_offsets":[0,16]}})", 16,
       "tensor \"w\": I64 shape [3] needs 24 bytes"},
      {R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}})", 16,
       "tensor \"w\": shape [4294967296, 4294967296] has too many elements"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, "tensors \"a\" [0, 8) and \"b\" [4, 12) overlap in the data buffer"},
      {R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
       16, "tensors \"a\" [0, 16) and \"b\" [4, 8) overlap in the data buffer"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       4, "tensors \"a\" [0, 4) and \"b\" [0, 4) overlap in the data buffer"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.header);
    CHECK(contains(open_error(dir, raw_file(c.header, c.data)), c.error));
  }

  // Adjacent tensors, empty tensors anywhere and unused trailing bytes are fine.
  CHECK(open_error(dir, raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                 R"("e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},)"
                                 R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                 12))
            .empty());
}

TEST_CASE("the writer rejects what it cannot write") {
  const temp_dir dir;
  const std::string p = dir.file("w.safetensors").string();
  const std::vector<std::byte> four = pattern(4, 1);
  std::string error;

  CHECK_FALSE(nosa_engine::write_safetensors(p, {{"w", dtype::f32, {2}, four}}, error));
  CHECK(error == "tensor \"w\": F32 shape [2] does not match the 4 bytes given");
  CHECK_FALSE(nosa_engine::write_safetensors(p, {{"w", dtype::bf16, {-2}, four}}, error));
  CHECK(error == "tensor \"w\": negative dimension in shape [-2]");
  CHECK_FALSE(nosa_engine::write_safetensors(p, {{"w", dtype::other, {1}, four}}, error));
  CHECK(error == "tensor \"w\": cannot write dtype other");
  CHECK_FALSE(
      nosa_engine::write_safetensors(p, {{"w", dtype::f32, {1}, four}, {"w", dtype::f32, {1}, four}}, error));
  CHECK(error == "tensor \"w\": duplicate name");
  CHECK_FALSE(nosa_engine::write_safetensors(p, {{"__metadata__", dtype::f32, {1}, four}}, error));
  CHECK(error == "tensor name \"__metadata__\" is reserved");
  CHECK_FALSE(nosa_engine::write_safetensors((dir.path / "missing" / "w.safetensors").string(),
                                             {{"w", dtype::f32, {1}, four}}, error));
  CHECK(contains(error, ": cannot open for writing"));

  std::string open_err;
  CHECK_FALSE(safetensors_file::open((dir.path / "missing.safetensors").string(), open_err));
  CHECK(contains(open_err, "missing.safetensors: cannot open for reading"));
}
