// Tests of the nosa-replay tool, run as a separate process exactly as an engine developer would run it:
// its outputs must match the library called directly on the same inputs, and every malformed input
// directory must fail with exit status 2 and one stderr line naming the file. With --backend cuda it must
// agree with the host backend where a GPU is usable, and refuse with one line where none is.

#include <doctest/doctest.h>

#include <nosa/backend/host/arena.hpp>
#include <nosa/backend/host/decode_layer.hpp>
#include <nosa/pipeline.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numeric>
#include <random>
#include <regex>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/wait.h>

#include "common/npy.hpp"
#include "examples/temp_dir.hpp"

#ifndef NOSA_REPLAY_PATH
#error "NOSA_REPLAY_PATH must name the nosa-replay executable"
#endif

namespace {

namespace fs = std::filesystem;

/// A scratch directory with this test's prefix.
struct temp_dir : nosa_test::temp_dir {
  temp_dir() : nosa_test::temp_dir("nosa_replay_test_") {}
};

/// The selection parameters of the small case: 7 blocks at most, so the top-6 really selects.
nosa::selection_params small_selection() {
  nosa::selection_params p;
  p.block_size = 16;
  p.window = 8;
  p.stride = 4;
  p.top_k = 6;
  p.top_k_query_aware = 4;
  p.n_init = 1;
  p.n_local = 2;
  return p;
}

/// The same parameters as command-line flags.
const std::string small_flags = "--block 16 --window 8 --stride 4 --topk 6 --topk-qa 4 --init 1 --local 2";

/// A recorded input directory held in memory: two ragged prompts and 70 decode steps.
struct replay_case {
  std::int64_t B = 2, P = 40, T = 70, hq = 4, hkv = 2, D = 64;
  std::vector<std::int32_t> prompt_len{40, 23};
  std::vector<float> prompt_k, prompt_v, prompt_c, q, k, v, c;
  std::vector<float> prompt_q;  // [B][P][Hq][D], written only for a prefill

  explicit replay_case(std::int64_t head_dim = 64, std::uint32_t seed = 7) : D(head_dim) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    const auto fill = [&](std::vector<float>& a, std::int64_t n) {
      a.resize(std::size_t(n));
      for (float& x : a) x = unit(rng);
    };
    fill(prompt_k, B * P * hkv * D);
    fill(prompt_v, B * P * hkv * D);
    fill(prompt_c, B * P * hkv);
    fill(q, T * B * hq * D);
    fill(k, T * B * hkv * D);
    fill(v, T * B * hkv * D);
    fill(c, T * B * hkv);
    fill(prompt_q, B * P * hq * D);
  }

  void write(const fs::path& dir, bool with_prompt_queries = false) const {
    const auto save = [&](const char* name, const auto& values, std::vector<std::int64_t> shape) {
      const auto e = npy::save(dir / name, values, shape);
      REQUIRE_MESSAGE(!e, name << ": " << (e ? e->message : ""));
    };
    save("prompt_k.npy", prompt_k, {B, P, hkv, D});
    save("prompt_v.npy", prompt_v, {B, P, hkv, D});
    save("prompt_c.npy", prompt_c, {B, P, hkv});
    save("prompt_len.npy", prompt_len, {B});
    save("q.npy", q, {T, B, hq, D});
    save("k.npy", k, {T, B, hkv, D});
    save("v.npy", v, {T, B, hkv, D});
    save("c.npy", c, {T, B, hkv});
    if (with_prompt_queries) save("prompt_q.npy", prompt_q, {B, P, hq, D});
  }
};

/// What one run of the tool left behind.
struct run_result {
  int exit_status = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

/// `s` quoted for the POSIX shell.
std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (const char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

/// Runs nosa-replay with `args` (already shell-quoted where needed), capturing stdout and stderr.
run_result run_replay(const temp_dir& scratch, const std::string& args) {
  const fs::path out = scratch.path / "stdout.txt", err = scratch.path / "stderr.txt";
  const std::string cmd = shell_quote(NOSA_REPLAY_PATH) + " " + args + " >" + shell_quote(out.string()) +
                          " 2>" + shell_quote(err.string());
  const int raw = std::system(cmd.c_str());
  run_result r;
  if (raw != -1 && WIFEXITED(raw)) r.exit_status = WEXITSTATUS(raw);
  r.out = read_text(out);
  r.err = read_text(err);
  return r;
}

/// Runs nosa-replay on `in` with `flags`, writing to `out`.
run_result run_replay(const temp_dir& scratch, const fs::path& in, const fs::path& out,
                      const std::string& flags) {
  return run_replay(scratch,
                    "--in " + shell_quote(in.string()) + " --out " + shell_quote(out.string()) + " " + flags);
}

template <class T>
std::vector<T> load_output(const fs::path& p, const std::vector<std::int64_t>& shape) {
  npy::array a;
  const auto e = npy::load(p, a, npy::dtype_name<T>);
  REQUIRE_MESSAGE(!e, p.string() << ": " << (e ? e->message : ""));
  CHECK(a.shape == shape);
  return a.to_vector<T>();
}

/// The outputs of the library called directly, laid out as the tool's files.
struct library_outputs {
  std::vector<float> o;
  std::vector<std::int32_t> selected, misses;
  std::vector<float> prompt_o;  // with a prefill
};

/// Replays `in` through one layer of `Pipeline` without the tool, with the capacities the tool documents.
/// With a `Prefill` policy the prompts go through the library's prefill, each in a single call of its own
/// (the tool's chunks and batches must not change a bit of the result), instead of `add_sequence`.
template <class Pipeline, class Prefill = void>
library_outputs replay_directly(const replay_case& in, const nosa::selection_params& sel) {
  using Element = typename Pipeline::element_type;
  using layer_type = nosa::decode_layer<Pipeline, nosa::host_backend>;
  const std::int64_t B = in.B, P = in.P, T = in.T, hq = in.hq, hkv = in.hkv, D = in.D;
  nosa::layer_config config;
  config.selection = sel;
  config.num_q_heads = static_cast<int>(hq);
  config.num_kv_heads = static_cast<int>(hkv);
  config.limits.max_sequences = static_cast<int>(B);
  config.limits.max_blocks_per_sequence = static_cast<int>((P + T + sel.block_size - 1) / sel.block_size + 1);
  config.limits.pool_pages = static_cast<int>(B) * config.limits.max_blocks_per_sequence;
  config.limits.max_prefill_rows = static_cast<int>(P);
  nosa::owning_layer<layer_type> layer;
  REQUIRE(layer.create(config) == nosa::status::success);

  const auto convert = [](const std::vector<float>& src) {
    std::vector<Element> dst(src.size());
    std::transform(src.begin(), src.end(), dst.begin(), [](float x) { return nosa::from_float<Element>(x); });
    return dst;
  };
  const std::vector<Element> pk = convert(in.prompt_k), pv = convert(in.prompt_v);
  const std::vector<Element> q = convert(in.q), k = convert(in.k), v = convert(in.v);

  library_outputs r;
  const std::vector<Element> pq = convert(in.prompt_q);
  r.prompt_o.assign(pq.size(), 0.0f);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = std::is_void_v<Prefill> ? in.prompt_len[std::size_t(b)] : 0;
    nosa::prompt_args<Element> prompt;
    prompt.k = nosa::make_contiguous<3>(pk.data() + b * P * hkv * D, {len, hkv, D});
    prompt.v = nosa::make_contiguous<3>(pv.data() + b * P * hkv * D, {len, hkv, D});
    prompt.c = nosa::make_contiguous<2>(in.prompt_c.data() + b * P * hkv, {len, hkv});
    REQUIRE(layer->add_sequence(static_cast<int>(b), prompt) == nosa::status::success);
    if constexpr (!std::is_void_v<Prefill>) {
      const std::int64_t n = in.prompt_len[std::size_t(b)];
      const std::int32_t seq[1] = {static_cast<std::int32_t>(b)},
                         offsets[2] = {0, static_cast<std::int32_t>(n)};
      REQUIRE(layer->reserve(static_cast<int>(b), static_cast<int>(n)) == nosa::status::success);
      nosa::prefill_args<Element, float> a;
      a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seq), {1});
      a.row_offsets = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(offsets), {2});
      a.q = nosa::make_contiguous<3>(static_cast<const Element*>(pq.data() + b * P * hq * D), {n, hq, D});
      a.k = nosa::make_contiguous<3>(static_cast<const Element*>(pk.data() + b * P * hkv * D), {n, hkv, D});
      a.v = nosa::make_contiguous<3>(static_cast<const Element*>(pv.data() + b * P * hkv * D), {n, hkv, D});
      a.c = nosa::make_contiguous<2>(static_cast<const float*>(in.prompt_c.data() + b * P * hkv), {n, hkv});
      a.o = nosa::make_contiguous<3>(r.prompt_o.data() + b * P * hq * D, {n, hq, D});
      REQUIRE(layer->template prefill<Prefill>(a) == nosa::status::success);
    }
  }

  r.o.resize(std::size_t(T * B * hq * D));
  r.selected.assign(std::size_t(T * B * hkv * sel.top_k), -1);
  r.misses.resize(std::size_t(T * B * hkv));
  std::vector<std::int32_t> seqs(static_cast<std::size_t>(B));
  std::iota(seqs.begin(), seqs.end(), 0);
  for (std::int64_t t = 0; t < T; ++t) {
    REQUIRE(layer->reserve(1) == nosa::status::success);
    nosa::step_args<Element, float> a;
    a.sequences = nosa::make_contiguous<1>(static_cast<const std::int32_t*>(seqs.data()), {B});
    a.q = nosa::make_contiguous<3>(static_cast<const Element*>(q.data() + t * B * hq * D), {B, hq, D});
    a.k = nosa::make_contiguous<3>(static_cast<const Element*>(k.data() + t * B * hkv * D), {B, hkv, D});
    a.v = nosa::make_contiguous<3>(static_cast<const Element*>(v.data() + t * B * hkv * D), {B, hkv, D});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(in.c.data() + t * B * hkv), {B, hkv});
    a.o = nosa::make_contiguous<3>(r.o.data() + t * B * hq * D, {B, hq, D});
    REQUIRE(layer->step(a) == nosa::status::success);
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < hkv; ++h) {
        const std::size_t row = std::size_t((t * B + b) * hkv + h);
        const auto chosen = layer->selection(static_cast<int>(b), static_cast<int>(h));
        std::vector<std::int32_t> sorted(chosen.begin(), chosen.end());
        std::sort(sorted.begin(), sorted.end());
        std::copy(sorted.begin(), sorted.end(),
                  r.selected.begin() + std::ptrdiff_t(row * std::size_t(sel.top_k)));
        r.misses[row] = layer->step_misses(static_cast<int>(b), static_cast<int>(h));
      }
    }
  }
  return r;
}

/// Bitwise equality of two float arrays (NaN-safe and sign-of-zero-exact).
bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

/// The byte counters of a summary line: {bytes h2d, bytes d2h}.
std::vector<std::uint64_t> summary_bytes(const std::string& line) {
  std::smatch m;
  REQUIRE(std::regex_search(line, m, std::regex("bytes h2d ([0-9]+), bytes d2h ([0-9]+)")));
  return {std::stoull(m[1].str()), std::stoull(m[2].str())};
}

/// Number of lines in `s` (a final line without '\n' counts).
int line_count(const std::string& s) {
  const auto n = static_cast<int>(std::count(s.begin(), s.end(), '\n'));
  return n + (!s.empty() && s.back() != '\n');
}

}  // namespace

TEST_CASE("nosa-replay matches the library on a ragged batch") {
  temp_dir scratch;
  const replay_case in;
  const fs::path in_dir = scratch.path / "in";
  fs::create_directory(in_dir);
  in.write(in_dir);
  const nosa::selection_params sel = small_selection();
  const std::int64_t T = in.T, B = in.B, hkv = in.hkv, top_k = sel.top_k;

  const run_result r = run_replay(scratch, in_dir, scratch.path / "offload", small_flags);
  REQUIRE_MESSAGE(r.exit_status == 0, r.err);
  CHECK(r.err.empty());
  CHECK(line_count(r.out) == 1);
  CHECK(r.out.find("70 steps, 2 sequences") != std::string::npos);

  const auto o = load_output<float>(scratch.path / "offload" / "o.npy", {T, B, in.hq, in.D});
  const auto selected =
      load_output<std::int32_t>(scratch.path / "offload" / "selected.npy", {T, B, hkv, top_k});
  const auto misses = load_output<std::int32_t>(scratch.path / "offload" / "misses.npy", {T, B, hkv});

  SUBCASE("selections are ascending sets padded with -1 that hold the current block") {
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t b = 0; b < B; ++b) {
        const std::int64_t length = in.prompt_len[std::size_t(b)] + t + 1;
        const std::int32_t current = static_cast<std::int32_t>((length - 1) / sel.block_size);
        for (std::int64_t h = 0; h < hkv; ++h) {
          const std::int32_t* row = selected.data() + ((t * B + b) * hkv + h) * top_k;
          const std::int64_t n = std::find(row, row + top_k, -1) - row;
          CAPTURE(t);
          CAPTURE(b);
          CAPTURE(h);
          CHECK(n == std::min<std::int64_t>(top_k, current + 1));
          CHECK(std::all_of(row + n, row + top_k, [](std::int32_t x) { return x == -1; }));
          CHECK(std::adjacent_find(row, row + n, [](std::int32_t x, std::int32_t y) { return x >= y; }) ==
                row + n);
          CHECK(std::all_of(row, row + n, [&](std::int32_t x) { return x >= 0 && x <= current; }));
          CHECK(std::find(row, row + n, current) != row + n);
        }
      }
    }
  }

  SUBCASE("outputs equal the library called directly, bitwise") {
    const library_outputs lib = replay_directly<nosa::nosa_pipeline<float, 64>>(in, sel);
    CHECK(bitwise_equal(o, lib.o));
    CHECK(selected == lib.selected);
    CHECK(misses == lib.misses);
  }

  SUBCASE("InfLLMv2 selects by the query alone, so blocks move, and the misses match the library") {
    // With k_qa equal to the forced blocks NOSA picks its free blocks by eviction score alone and may never
    // miss; InfLLMv2 picks them by query, which the random steps change every time.
    const run_result res = run_replay(scratch, in_dir, scratch.path / "infllmv2",
                                      small_flags + " --variant infllmv2 --bias none");
    REQUIRE_MESSAGE(res.exit_status == 0, res.err);
    const library_outputs lib = replay_directly<nosa::infllmv2_pipeline<float, 64>>(in, sel);
    const auto misses_infllm =
        load_output<std::int32_t>(scratch.path / "infllmv2" / "misses.npy", {T, B, hkv});
    CHECK(misses_infllm == lib.misses);
    CHECK(std::accumulate(misses_infllm.begin(), misses_infllm.end(), 0) > 0);
    CHECK(bitwise_equal(load_output<float>(scratch.path / "infllmv2" / "o.npy", {T, B, in.hq, in.D}), lib.o));
    CHECK(load_output<std::int32_t>(scratch.path / "infllmv2" / "selected.npy", {T, B, hkv, top_k}) ==
          lib.selected);
  }

  SUBCASE("the resident store loads nothing and attends identically") {
    const run_result res =
        run_replay(scratch, in_dir, scratch.path / "resident", small_flags + " --store resident");
    REQUIRE_MESSAGE(res.exit_status == 0, res.err);
    const auto misses_resident =
        load_output<std::int32_t>(scratch.path / "resident" / "misses.npy", {T, B, hkv});
    CHECK(std::all_of(misses_resident.begin(), misses_resident.end(), [](std::int32_t m) { return m == 0; }));
    CHECK(bitwise_equal(load_output<float>(scratch.path / "resident" / "o.npy", {T, B, in.hq, in.D}), o));
    CHECK(load_output<std::int32_t>(scratch.path / "resident" / "selected.npy", {T, B, hkv, top_k}) ==
          selected);
  }

  SUBCASE("--kv-format fp8 is the library's FP8 store: bf16's selections and misses, half the bytes") {
    const run_result bf = run_replay(scratch, in_dir, scratch.path / "bf16", small_flags + " --dtype bf16");
    REQUIRE_MESSAGE(bf.exit_status == 0, bf.err);
    const run_result f8 =
        run_replay(scratch, in_dir, scratch.path / "fp8", small_flags + " --dtype bf16 --kv-format fp8");
    REQUIRE_MESSAGE(f8.exit_status == 0, f8.err);
    CHECK(f8.out.find("(nosa, bf16, D=64, bias after_scale, offload, kv fp8)") != std::string::npos);
    const auto o8 = load_output<float>(scratch.path / "fp8" / "o.npy", {T, B, in.hq, in.D});
    const auto selected8 = load_output<std::int32_t>(scratch.path / "fp8" / "selected.npy", {T, B, hkv, top_k});
    const auto misses8 = load_output<std::int32_t>(scratch.path / "fp8" / "misses.npy", {T, B, hkv});
    const library_outputs lib =
        replay_directly<nosa::nosa_pipeline<nosa::bf16, 64, nosa::fp8_offload_store>>(in, sel);
    CHECK(bitwise_equal(o8, lib.o));
    CHECK(selected8 == lib.selected);
    CHECK(misses8 == lib.misses);
    // The compressed keys come from the keys as given: the selections and misses are bf16's.
    CHECK(selected8 == load_output<std::int32_t>(scratch.path / "bf16" / "selected.npy", {T, B, hkv, top_k}));
    CHECK(misses8 == load_output<std::int32_t>(scratch.path / "bf16" / "misses.npy", {T, B, hkv}));
    CHECK_FALSE(bitwise_equal(o8, load_output<float>(scratch.path / "bf16" / "o.npy", {T, B, in.hq, in.D})));
    // Every block moved, either way, is b_s*D + 4 bytes in FP8 against 2*b_s*D in bf16.
    const auto bytes_bf = summary_bytes(bf.out), bytes_f8 = summary_bytes(f8.out);
    const std::uint64_t block = std::uint64_t(sel.block_size) * in.D;
    CHECK(bytes_f8[0] * (2 * block) == bytes_bf[0] * (block + 4));
    CHECK(bytes_f8[1] * (2 * block) == bytes_bf[1] * (block + 4));
    CHECK(bytes_f8[1] > 0);
    // Naming the storage type is the default.
    const run_result named =
        run_replay(scratch, in_dir, scratch.path / "named", small_flags + " --dtype bf16 --kv-format bf16");
    REQUIRE_MESSAGE(named.exit_status == 0, named.err);
    CHECK(named.out == bf.out);
    CHECK(bitwise_equal(load_output<float>(scratch.path / "named" / "o.npy", {T, B, in.hq, in.D}),
                        load_output<float>(scratch.path / "bf16" / "o.npy", {T, B, in.hq, in.D})));
  }

  SUBCASE("--kv-format fp8 with InfLLMv2 and the resident store") {
    const run_result res =
        run_replay(scratch, in_dir, scratch.path / "fp8r",
                   small_flags + " --variant infllmv2 --bias none --store resident --kv-format fp8");
    REQUIRE_MESSAGE(res.exit_status == 0, res.err);
    using pipeline = nosa::infllmv2_pipeline<float, 64, nosa::fp8_resident_store>;
    const library_outputs lib = replay_directly<pipeline>(in, sel);
    CHECK(bitwise_equal(load_output<float>(scratch.path / "fp8r" / "o.npy", {T, B, in.hq, in.D}), lib.o));
    CHECK(load_output<std::int32_t>(scratch.path / "fp8r" / "selected.npy", {T, B, hkv, top_k}) == lib.selected);
  }

  SUBCASE("bf16 storage rounds the inputs as the library's own conversion does") {
    const run_result res = run_replay(scratch, in_dir, scratch.path / "bf16", small_flags + " --dtype bf16");
    REQUIRE_MESSAGE(res.exit_status == 0, res.err);
    const library_outputs lib = replay_directly<nosa::nosa_pipeline<nosa::bf16, 64>>(in, sel);
    CHECK(bitwise_equal(load_output<float>(scratch.path / "bf16" / "o.npy", {T, B, in.hq, in.D}), lib.o));
    CHECK(load_output<std::int32_t>(scratch.path / "bf16" / "selected.npy", {T, B, hkv, top_k}) ==
          lib.selected);
  }
}

TEST_CASE("nosa-replay --prefill runs the library's prefill over the prompts, chunked and batched") {
  temp_dir scratch;
  const replay_case in;
  const fs::path in_dir = scratch.path / "in";
  fs::create_directory(in_dir);
  in.write(in_dir, /*with_prompt_queries=*/true);
  const nosa::selection_params sel = small_selection();
  const std::int64_t T = in.T, B = in.B, P = in.P, hq = in.hq, hkv = in.hkv, D = in.D;

  const auto check = [&](const std::string& mode, const library_outputs& lib, const char* chunk) {
    const fs::path out = scratch.path / mode;
    const run_result r =
        run_replay(scratch, in_dir, out, small_flags + " --prefill " + mode + " --chunk " + chunk);
    REQUIRE_MESSAGE(r.exit_status == 0, r.err);
    CHECK(r.out.find("(nosa, fp32, D=64, bias after_scale, offload, prefill " + mode + ")") !=
          std::string::npos);
    const auto prompt_o = load_output<float>(out / "prompt_o.npy", {B, P, hq, D});
    // Zeros past each prompt; elsewhere the library's prefill of the whole prompt at once, bit for bit.
    for (std::int64_t b = 0; b < B; ++b) {
      const auto first = prompt_o.begin() + std::ptrdiff_t((b * P + in.prompt_len[std::size_t(b)]) * hq * D);
      CHECK(std::all_of(first, prompt_o.begin() + std::ptrdiff_t((b + 1) * P * hq * D),
                        [](float x) { return x == 0.0f; }));
    }
    CHECK(bitwise_equal(prompt_o, lib.prompt_o));
    // Decode starts from the state the prefill left.
    CHECK(bitwise_equal(load_output<float>(out / "o.npy", {T, B, hq, D}), lib.o));
    CHECK(load_output<std::int32_t>(out / "selected.npy", {T, B, hkv, sel.top_k}) == lib.selected);
    CHECK(load_output<std::int32_t>(out / "misses.npy", {T, B, hkv}) == lib.misses);
  };
  check("dense", replay_directly<nosa::nosa_pipeline<float, 64>, nosa::dense_prefill>(in, sel), "7");
  check("sparse", replay_directly<nosa::nosa_pipeline<float, 64>, nosa::sparse_prefill>(in, sel), "9");

  // Without the prompt queries, and with a chunk of nothing: one line each.
  const fs::path bare = scratch.path / "bare";
  fs::create_directory(bare);
  in.write(bare);
  run_result r = run_replay(scratch, bare, scratch.path / "x", small_flags + " --prefill dense");
  CHECK(r.exit_status == 2);
  CHECK(r.err == "nosa-replay: prompt_q.npy: cannot open (--prefill needs the prompts' queries)\n");
  r = run_replay(scratch, in_dir, scratch.path / "x", small_flags + " --prefill dense --chunk 0");
  CHECK(r.exit_status == 2);
  CHECK(r.err == "nosa-replay: --chunk: '0' is not a positive integer\n");
}

TEST_CASE("nosa-replay rejects malformed input directories with one line naming the file") {
  temp_dir scratch;
  const replay_case valid;
  const fs::path in_dir = scratch.path / "in";
  const fs::path out_dir = scratch.path / "out";
  fs::create_directory(in_dir);

  // Each case starts from a valid directory and breaks one thing.
  const auto expect_failure = [&](const std::string& file, const std::string& problem) {
    const run_result r = run_replay(scratch, in_dir, out_dir, small_flags);
    CAPTURE(r.err);
    CHECK(r.exit_status == 2);
    CHECK(line_count(r.err) == 1);
    CHECK(r.err.rfind("nosa-replay: " + file + ": ", 0) == 0);
    CHECK(r.err.find(problem) != std::string::npos);
    CHECK_FALSE(fs::exists(out_dir / "o.npy"));
  };

  SUBCASE("a missing file") {
    valid.write(in_dir);
    fs::remove(in_dir / "prompt_c.npy");
    expect_failure("prompt_c.npy", "cannot open");
  }
  SUBCASE("a wrong rank") {
    valid.write(in_dir);
    REQUIRE_FALSE(npy::save(in_dir / "q.npy", valid.q, {valid.T, valid.B, valid.hq * valid.D}));
    expect_failure("q.npy", "shape [70,2,256] has rank 3, expected [T,B,Hq,D]");
  }
  SUBCASE("T of k disagrees with q") {
    valid.write(in_dir);
    const std::vector<float> shorter(valid.k.begin(), valid.k.end() - valid.B * valid.hkv * valid.D);
    REQUIRE_FALSE(npy::save(in_dir / "k.npy", shorter, {valid.T - 1, valid.B, valid.hkv, valid.D}));
    expect_failure("k.npy", "T=69 disagrees with q.npy (T=70)");
  }
  SUBCASE("a prompt length beyond P") {
    valid.write(in_dir);
    REQUIRE_FALSE(npy::save(in_dir / "prompt_len.npy", std::vector<std::int32_t>{40, 41}, {2}));
    expect_failure("prompt_len.npy", "prompt_len[1]=41 exceeds P=40");
  }
  SUBCASE("a truncated file") {
    valid.write(in_dir);
    fs::resize_file(in_dir / "c.npy", fs::file_size(in_dir / "c.npy") - 6);
    expect_failure("c.npy", "truncated");
  }
  SUBCASE("an unsupported head dimension") {
    replay_case(96).write(in_dir);
    expect_failure("q.npy", "head dim 96 is not supported (64, 128, 256)");
  }
  SUBCASE("Hq not a multiple of Hkv") {
    valid.write(in_dir);
    replay_case odd;
    odd.hkv = 3;
    const std::int64_t kv_rows = odd.T * odd.B * odd.hkv * odd.D;
    REQUIRE_FALSE(
        npy::save(in_dir / "k.npy", std::vector<float>(std::size_t(kv_rows)), {odd.T, odd.B, 3, odd.D}));
    expect_failure("q.npy", "Hq=4 is not a multiple of Hkv=3");
  }
  SUBCASE("a float prompt_len") {
    valid.write(in_dir);
    REQUIRE_FALSE(npy::save(in_dir / "prompt_len.npy", std::vector<float>{40.0f, 23.0f}, {2}));
    expect_failure("prompt_len.npy", "unsupported dtype");
  }
}

TEST_CASE("nosa-replay command line") {
  temp_dir scratch;
  const fs::path in_dir = scratch.path / "in";
  fs::create_directory(in_dir);
  replay_case().write(in_dir);
  const fs::path out_dir = scratch.path / "out";

  const auto expect_error = [&](const std::string& flags, const std::string& message) {
    const run_result r = run_replay(scratch, in_dir, out_dir, flags);
    CAPTURE(flags);
    CAPTURE(r.err);
    CHECK(r.exit_status == 2);
    CHECK(r.err == "nosa-replay: " + message + "\n");
  };

  SUBCASE("--help prints usage and succeeds") {
    const run_result r = run_replay(scratch, "--help");
    CHECK(r.exit_status == 0);
    CHECK(r.out.rfind("usage: nosa-replay", 0) == 0);
    CHECK(r.err.empty());
  }
  SUBCASE("bad flags") {
    expect_error("--block abc", "--block: 'abc' is not an integer");
    expect_error("--budget -1", "--budget: '-1' is not a non-negative integer");
    expect_error("--bias sideways",
                 "--bias: unknown value 'sideways' (expected after_scale, before_scale or none)");
    expect_error("--frobnicate 1", "unknown option '--frobnicate' (see --help)");
    expect_error("--topk", "--topk needs a value");
    expect_error("--backend gpu", "--backend: unknown value 'gpu' (expected host or cuda)");
    expect_error("--kv-format fp4", "--kv-format: unknown value 'fp4' (expected the --dtype name or fp8)");
    expect_error("--kv-format bf16",
                 "--kv-format: 'bf16' is not the storage type (--dtype fp32); expected fp32 or fp8");
    expect_error("--kv-format fp8 --bias before_scale",
                 "--kv-format fp8 builds --variant nosa with --bias after_scale only (got --bias before_scale)");
    expect_error("--variant infllmv2 --kv-format fp8",
                 "--kv-format fp8 builds --variant infllmv2 with --bias none only (got --bias after_scale)");
  }
  SUBCASE("a library status names the call") {
    expect_error("--topk-qa 70 --topk 64", "create: invalid selection configuration");
  }
  SUBCASE("flags reach the layer: a budget of zero loads no block after the prompt") {
    const run_result r =
        run_replay(scratch, in_dir, out_dir, small_flags + " --budget=0 --variant infllmv2 --bias none");
    REQUIRE_MESSAGE(r.exit_status == 0, r.err);
    const auto misses = load_output<std::int32_t>(out_dir / "misses.npy", {70, 2, 2});
    CHECK(std::all_of(misses.begin(), misses.end(), [](std::int32_t m) { return m == 0; }));
  }
}

TEST_CASE("nosa-replay --backend cuda runs on a GPU or says in one line why it cannot") {
  // One test for every build: without CUDA, or without a usable GPU, the tool must refuse with one line
  // and exit status 2; with both it must agree with the host backend on the same inputs.
  temp_dir scratch;
  const replay_case in;
  const fs::path in_dir = scratch.path / "in";
  fs::create_directory(in_dir);
  in.write(in_dir);
  const nosa::selection_params sel = small_selection();
  const std::int64_t T = in.T, B = in.B, hq = in.hq, hkv = in.hkv, D = in.D, top_k = sel.top_k;
  const std::int64_t group = hq / hkv;

  SUBCASE("a bias the CUDA build does not compile for the variant is refused up front") {
    const run_result r =
        run_replay(scratch, in_dir, scratch.path / "out", small_flags + " --backend cuda --variant infllmv2");
    CAPTURE(r.err);
    CHECK(r.exit_status == 2);
    CHECK(r.out.empty());
    const bool refused =
        r.err == "nosa-replay: --backend cuda builds --variant infllmv2 with --bias none only (got --bias "
                 "after_scale)\n";
    const bool not_built = r.err == "nosa-replay: backend 'cuda' is not available in this build\n";
    CHECK((refused || not_built));
  }

  SUBCASE("the FP8 KV format with fp32 storage is refused up front: the CUDA FP8 path is bf16 and fp16") {
    const run_result r =
        run_replay(scratch, in_dir, scratch.path / "out", small_flags + " --backend cuda --kv-format fp8");
    CAPTURE(r.err);
    CHECK(r.exit_status == 2);
    CHECK(r.out.empty());
    const bool refused = r.err ==
                         "nosa-replay: --backend cuda runs --kv-format fp8 with --dtype bf16 or fp16 "
                         "only (got --dtype fp32)\n";
    const bool not_built = r.err == "nosa-replay: backend 'cuda' is not available in this build\n";
    CHECK((refused || not_built));
  }

  SUBCASE("the outputs agree with the host backend, or one line says why the GPU cannot be used") {
    // The FP8 cases compare the two backends' FP8 paths: the same codes and scales, attention summed in
    // different orders (the CUDA kernel applies each block's scales once per tile).
    const char* const cases[] = {
        "", " --variant infllmv2 --bias none --store resident --dtype bf16", " --dtype bf16 --kv-format fp8",
        " --variant infllmv2 --bias none --store resident --dtype fp16 --kv-format fp8"};
    for (const char* extra : cases) {
      const std::string flags = small_flags + extra;
      CAPTURE(flags);
      const fs::path host_dir = scratch.path / "host", cuda_dir = scratch.path / "cuda";
      fs::remove_all(host_dir);
      fs::remove_all(cuda_dir);
      const run_result host = run_replay(scratch, in_dir, host_dir, flags);
      REQUIRE_MESSAGE(host.exit_status == 0, host.err);
      const run_result cuda = run_replay(scratch, in_dir, cuda_dir, flags + " --backend cuda");
      if (cuda.exit_status != 0) {
        CAPTURE(cuda.err);
        CHECK(cuda.exit_status == 2);
        CHECK(line_count(cuda.err) == 1);
        CHECK(cuda.out.empty());
        CHECK(cuda.err.rfind("nosa-replay: backend 'cuda' is not available", 0) == 0);
        CHECK_FALSE(fs::exists(cuda_dir / "o.npy"));
        MESSAGE("the CUDA replay did not run: " << cuda.err);
        continue;
      }
      CHECK(cuda.err.empty());

      const auto host_o = load_output<float>(host_dir / "o.npy", {T, B, hq, D});
      const auto cuda_o = load_output<float>(cuda_dir / "o.npy", {T, B, hq, D});
      const auto host_sel = load_output<std::int32_t>(host_dir / "selected.npy", {T, B, hkv, top_k});
      const auto cuda_sel = load_output<std::int32_t>(cuda_dir / "selected.npy", {T, B, hkv, top_k});
      const auto host_miss = load_output<std::int32_t>(host_dir / "misses.npy", {T, B, hkv});
      const auto cuda_miss = load_output<std::int32_t>(cuda_dir / "misses.npy", {T, B, hkv});

      // The backends sum in different orders, so a selection may differ at an fp32 near-tie (the design's
      // allowance: under 1% of selections). Where the selection agrees the outputs must agree within the
      // fp32 tolerance, and the misses must agree until the selections of that (sequence, head) first part.
      const float rtol = 1e-4f, atol = 2e-5f + 0.05f * rtol;
      std::int64_t differing = 0;
      std::vector<bool> parted(std::size_t(B * hkv), false);
      for (std::int64_t t = 0; t < T; ++t) {
        for (std::int64_t b = 0; b < B; ++b) {
          for (std::int64_t h = 0; h < hkv; ++h) {
            CAPTURE(t);
            CAPTURE(b);
            CAPTURE(h);
            const std::size_t row = std::size_t((t * B + b) * hkv + h);
            const bool same = std::equal(host_sel.begin() + std::ptrdiff_t(row * top_k),
                                         host_sel.begin() + std::ptrdiff_t((row + 1) * top_k),
                                         cuda_sel.begin() + std::ptrdiff_t(row * top_k));
            if (!same) {
              ++differing;
              parted[std::size_t(b * hkv + h)] = true;
              continue;
            }
            if (!parted[std::size_t(b * hkv + h)]) CHECK(cuda_miss[row] == host_miss[row]);
            for (std::int64_t g = 0; g < group; ++g) {
              const std::size_t first = std::size_t(((t * B + b) * hq + h * group + g) * D);
              for (std::size_t i = first; i < first + std::size_t(D); ++i) {
                if (std::abs(cuda_o[i] - host_o[i]) > atol + rtol * std::abs(host_o[i])) {
                  FAIL_CHECK("o[" << i << "]: cuda " << cuda_o[i] << ", host " << host_o[i]);
                  break;
                }
              }
            }
          }
        }
      }
      CHECK(differing * 100 <= T * B * hkv);
      // Same counters, so the same summary line, whenever the selections agree everywhere.
      if (differing == 0) CHECK(cuda.out == host.out);
    }
  }
}
