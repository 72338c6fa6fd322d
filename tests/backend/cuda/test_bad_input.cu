// Bad input through the CUDA layer. Bad views are rejected by step() itself; errors that depend on the state
// (unknown, duplicate, full or unreserved sequences) are found on the device, so step() succeeds and
// step_status() reports them. Either way the failed call changes nothing: both arenas are byte-identical
// afterwards (apart from the status word), and the layer then decodes exactly like a host twin that ran the
// same calls. Every bad call also goes to the host twin, which must return the same status.
#include "twin.cuh"

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

namespace {

using nosa::status;
using nosa_cuda_test::batch;
using nosa_cuda_test::random_batch;
using nosa_cuda_test::random_prompt;
using nosa_cuda_test::random_source;
using nosa_cuda_test::scaled;

using P = nosa::nosa_pipeline<float, 64>;
using twin_type = nosa_cuda_test::twin<P>;
using cuda_layer = nosa::decode_layer<P, nosa::cuda_backend>;
constexpr int D = 64;

// Four sequence slots of up to 25 blocks of 16 tokens, a pool of 30 pages.
nosa::layer_config config() {
  nosa::layer_config c = nosa_cuda_test::make_config(16, 4, 2, 4, 400);
  c.selection.window = 8;
  c.selection.stride = 4;
  c.limits.pool_pages = 30;
  return c;
}

std::vector<std::int32_t> live_slots(const twin_type& t) {
  std::vector<std::int32_t> seqs;
  for (int seq = 0; seq < t.cfg.limits.max_sequences; ++seq) {
    if (t.host.layer.is_live(seq)) seqs.push_back(seq);
  }
  return seqs;
}

// Both layers decode `steps` more steps of every live sequence, compared as usual.
void decode(twin_type& t, random_source& rng, int steps) {
  for (int i = 0; i < steps; ++i) {
    REQUIRE(t.reserve(1) == status::success);
    REQUIRE(t.step<float>(random_batch<P>(rng, t.cfg, live_slots(t))) == status::success);
  }
}

// A twin with live sequences 0, 1 and 3 that have decoded 20 steps.
struct fixture {
  nosa_cuda_test::stream st;
  random_source rng{7};
  twin_type t{config(), st};
  fixture() {
    t.context = "bad input: ";
    REQUIRE(t.admit(0, random_prompt<P>(rng, t.cfg, 37, true)) == status::success);
    REQUIRE(t.admit(1, random_prompt<P>(rng, t.cfg, 64, false)) == status::success);
    REQUIRE(t.admit(3, random_prompt<P>(rng, t.cfg, 5, true)) == status::success);
    decode(t, rng, scaled(20, 4));
  }

  // A step whose views `bend` spoils on both layers: each rejects it at once with `expected`, changes
  // nothing and enqueues nothing (the CUDA layer's step status stays as it was). Then both decode on.
  template <class Bend>
  void expect_rejected_views(status expected, std::vector<std::int32_t> seqs, Bend&& bend) {
    const int rows = static_cast<int>(seqs.size()), hq = t.cfg.num_q_heads, hkv = t.cfg.num_kv_heads;
    const batch<float> in = random_batch<P>(rng, t.cfg, std::move(seqs));
    std::vector<float> host_o(std::size_t(rows) * hq * D);
    nosa::step_args<float, float> ha;
    ha.sequences = nosa::make_contiguous<1>(in.seqs.data(), {rows});
    ha.q = nosa::make_contiguous<3>(in.q.data(), {rows, hq, D});
    ha.k = nosa::make_contiguous<3>(in.k.data(), {rows, hkv, D});
    ha.v = nosa::make_contiguous<3>(in.v.data(), {rows, hkv, D});
    ha.c = nosa::make_contiguous<2>(in.c.data(), {rows, hkv});
    ha.o = nosa::make_contiguous<3>(host_o.data(), {rows, hq, D});
    t.upload(in);
    nosa::step_args<float, float> ga = t.device_args<float>(rows);
    bend(ha);
    bend(ga);
    const auto host_before = t.host.snapshot();
    const auto gpu_before = t.gpu.snapshot(st);
    const status status_before = t.gpu.layer.step_status(st);
    CHECK(t.host.layer.step(ha) == expected);
    CHECK(t.gpu.layer.step(ga, st) == expected);
    CHECK(t.gpu.layer.step_status(st) == status_before);
    CHECK(t.host.snapshot() == host_before);
    CHECK(t.gpu.snapshot(st) == gpu_before);
    decode(t, rng, scaled(30, 3));
  }

  // A step with valid views that the device rejects: step() succeeds, step_status() says `expected`, and
  // nothing changed (the twin checks all of it). Then both decode on.
  void expect_rejected_on_device(status expected, std::vector<std::int32_t> seqs) {
    REQUIRE(t.step<float>(random_batch<P>(rng, t.cfg, std::move(seqs)), expected) == expected);
    decode(t, rng, scaled(30, 3));
  }
};

template <class T>
const T* misaligned(const T* p) {
  return reinterpret_cast<const T*>(reinterpret_cast<const char*>(p) + 2);
}

}  // namespace

TEST_CASE("bad views are rejected by step() at once and change nothing") {
  NOSA_REQUIRE_GPU();
  fixture f;
  SUBCASE("wrong query head count") {
    f.expect_rejected_views(status::shape_mismatch, {0, 1}, [](auto& a) { a.q.extents[1] = 2; });
  }
  SUBCASE("batch extents disagree") {
    f.expect_rejected_views(status::shape_mismatch, {0, 1}, [](auto& a) { a.k.extents[0] = 1; });
  }
  SUBCASE("output of the wrong head dim") {
    f.expect_rejected_views(status::shape_mismatch, {0, 1, 3}, [](auto& a) { a.o.extents[2] = 32; });
  }
  SUBCASE("null key pointer") {
    f.expect_rejected_views(status::null_pointer, {0, 1}, [](auto& a) { a.k.data = nullptr; });
  }
  SUBCASE("null sequence ids") {
    f.expect_rejected_views(status::null_pointer, {0, 1}, [](auto& a) { a.sequences.data = nullptr; });
  }
  SUBCASE("null eviction scores when the pipeline reads them") {
    f.expect_rejected_views(status::null_pointer, {0, 1}, [](auto& a) { a.c.data = nullptr; });
  }
  SUBCASE("null output") {
    f.expect_rejected_views(status::null_pointer, {3}, [](auto& a) { a.o.data = nullptr; });
  }
  SUBCASE("misaligned query pointer") {
    f.expect_rejected_views(status::misaligned_pointer, {0, 1}, [](auto& a) { a.q.data = misaligned(a.q.data); });
  }
  SUBCASE("non-unit innermost stride") {
    f.expect_rejected_views(status::bad_layout, {0}, [](auto& a) {
      a.q = nosa::make_strided<3>(a.q.data, {1, 4, D}, {4 * D, D / 2, 2});
    });
  }
  SUBCASE("negative stride") {
    f.expect_rejected_views(status::bad_layout, {0, 1}, [](auto& a) { a.v.strides[0] = -a.v.strides[0]; });
  }
}

TEST_CASE("a batch too large for one launch is rejected at once") {
  NOSA_REQUIRE_GPU();
  fixture f;
  // Views of 2^20 + 1 rows over small buffers: step() must refuse before reading anything. (The host backend
  // has no such limit and would read the rows, so only the CUDA layer sees this call.)
  const std::int64_t rows = (std::int64_t{1} << 20) + 1;
  nosa::step_args<float, float> a = f.t.device_args<float>(1);
  a.sequences.extents[0] = rows;
  a.q.extents[0] = a.k.extents[0] = a.v.extents[0] = a.c.extents[0] = a.o.extents[0] = rows;
  const auto before = f.t.gpu.snapshot(f.st);
  CHECK(f.t.gpu.layer.step(a, f.st) == status::invalid_argument);
  CHECK(f.t.gpu.layer.step_status(f.st) == status::success);
  CHECK(f.t.gpu.snapshot(f.st) == before);
  decode(f.t, f.rng, scaled(30, 3));
}

TEST_CASE("state errors are found on the device: step() succeeds, step_status() reports, nothing changes") {
  NOSA_REQUIRE_GPU();
  fixture f;
  SUBCASE("a slot that is not live, after valid rows") { f.expect_rejected_on_device(status::unknown_sequence, {0, 1, 2}); }
  SUBCASE("an id out of range") { f.expect_rejected_on_device(status::unknown_sequence, {0, 7}); }
  SUBCASE("a negative id") { f.expect_rejected_on_device(status::unknown_sequence, {-1}); }
  SUBCASE("a sequence listed twice") { f.expect_rejected_on_device(status::duplicate_sequence, {0, 1, 0}); }
  SUBCASE("the first bad row decides: a duplicate before an unknown id") {
    f.expect_rejected_on_device(status::duplicate_sequence, {3, 3, 9});
  }
  SUBCASE("the first bad row decides: an unknown id before a duplicate") {
    f.expect_rejected_on_device(status::unknown_sequence, {1, 2, 1});
  }
  SUBCASE("a rejected step leaves its status until the next step succeeds") {
    REQUIRE(f.t.step<float>(random_batch<P>(f.rng, f.t.cfg, {3, 0, 3}), status::duplicate_sequence) ==
            status::duplicate_sequence);
    CHECK(f.t.gpu.layer.step_status(f.st) == status::duplicate_sequence);
    CHECK(f.t.gpu.layer.step_status(f.st) == status::duplicate_sequence);  // reading does not clear it
    decode(f.t, f.rng, 1);
    CHECK(f.t.gpu.layer.step_status(f.st) == status::success);
  }
  SUBCASE("plan calls right after a rejected step work as usual") {
    // The failed step's status is still set while these run: admission must still compute and load the
    // initial selection (the twin compares it), and removal and reservation must still apply.
    REQUIRE(f.t.step<float>(random_batch<P>(f.rng, f.t.cfg, {0, 9}), status::unknown_sequence) ==
            status::unknown_sequence);
    REQUIRE(f.t.admit(2, random_prompt<P>(f.rng, f.t.cfg, 150, true)) == status::success);
    REQUIRE(f.t.remove(1) == status::success);
    REQUIRE(f.t.reserve(1) == status::success);
    CHECK(f.t.gpu.layer.step_status(f.st) == status::unknown_sequence);
    decode(f.t, f.rng, scaled(30, 3));
  }
}

TEST_CASE("a step that needs an unreserved page is rejected on the device") {
  NOSA_REQUIRE_GPU();
  nosa_cuda_test::stream st;
  random_source rng(11);
  twin_type t(config(), st);
  t.context = "not reserved: ";
  REQUIRE(t.admit(0, random_prompt<P>(rng, t.cfg, 31, true)) == status::success);  // token 31 ends block 1
  REQUIRE(t.admit(1, random_prompt<P>(rng, t.cfg, 10, false)) == status::success);
  REQUIRE(t.step<float>(random_batch<P>(rng, t.cfg, {0, 1})) == status::success);  // reserved at admission
  // Sequence 0 now starts block 2, which no plan call reserved.
  REQUIRE(t.step<float>(random_batch<P>(rng, t.cfg, {1, 0}), status::not_reserved) == status::not_reserved);
  REQUIRE(t.reserve(0, 1) == status::success);
  REQUIRE(t.step<float>(random_batch<P>(rng, t.cfg, {1, 0})) == status::success);
  decode(t, rng, scaled(40, 4));
}

TEST_CASE("a sequence at capacity is rejected on the device and the others keep decoding") {
  NOSA_REQUIRE_GPU();
  nosa_cuda_test::stream st;
  random_source rng(13);
  nosa::layer_config c = config();
  c.limits.max_blocks_per_sequence = 3;  // 48 tokens
  twin_type t(c, st);
  t.context = "capacity: ";
  REQUIRE(t.admit(0, random_prompt<P>(rng, c, 47, true)) == status::success);
  REQUIRE(t.admit(1, random_prompt<P>(rng, c, 3, false)) == status::success);
  REQUIRE(t.step<float>(random_batch<P>(rng, c, {0, 1})) == status::success);  // sequence 0 reaches 48 tokens
  REQUIRE(t.reserve(1, status::sequence_full) == status::sequence_full);
  REQUIRE(t.step<float>(random_batch<P>(rng, c, {1, 0}), status::sequence_full) == status::sequence_full);
  REQUIRE(t.remove(0) == status::success);
  for (int i = 0, n = scaled(20, 3); i < n; ++i) {
    REQUIRE(t.reserve(1) == status::success);
    REQUIRE(t.step<float>(random_batch<P>(rng, c, {1})) == status::success);
  }
  REQUIRE(t.admit(0, random_prompt<P>(rng, c, 0, false)) == status::success);  // an empty prompt is fine
  for (int i = 0, n = scaled(20, 3); i < n; ++i) {
    REQUIRE(t.reserve(1) == status::success);
    REQUIRE(t.step<float>(random_batch<P>(rng, c, {0, 1})) == status::success);
  }
}

TEST_CASE("rejected plan calls change nothing") {
  NOSA_REQUIRE_GPU();
  fixture f;
  twin_type& t = f.t;
  const int max_tokens = t.cfg.max_tokens();
  SUBCASE("admitting into a live slot") {
    REQUIRE(t.admit(1, random_prompt<P>(f.rng, t.cfg, 10, true), status::sequence_exists) == status::sequence_exists);
    decode(t, f.rng, scaled(30, 3));
  }
  SUBCASE("admitting out of range") {
    REQUIRE(t.admit(4, random_prompt<P>(f.rng, t.cfg, 10, true), status::unknown_sequence) ==
            status::unknown_sequence);
    REQUIRE(t.admit(-1, random_prompt<P>(f.rng, t.cfg, 10, true), status::unknown_sequence) ==
            status::unknown_sequence);
    decode(t, f.rng, scaled(30, 3));
  }
  SUBCASE("a prompt longer than a sequence may be") {
    REQUIRE(t.admit(2, random_prompt<P>(f.rng, t.cfg, max_tokens + 1, false), status::sequence_full) ==
            status::sequence_full);
    decode(t, f.rng, scaled(30, 3));
  }
  SUBCASE("a prompt that needs more pages than are free") {
    const int free_pages = t.gpu.layer.free_page_count();
    REQUIRE(free_pages == t.host.layer.free_page_count());
    // free_pages blocks, plus the page of the block the next token starts.
    REQUIRE(t.admit(2, random_prompt<P>(f.rng, t.cfg, free_pages * 16, false), status::host_pool_full) ==
            status::host_pool_full);
    decode(t, f.rng, scaled(30, 3));
  }
  SUBCASE("a prompt with the wrong KV head count, or without eviction scores") {
    std::vector<float> k(std::size_t(10) * 3 * D);
    nosa_cuda_test::device_buffer<float> dk(k.size());
    dk.upload(k.data(), k.size(), f.st);
    const auto make = [](const float* data, int heads) {
      nosa::prompt_args<float> p;
      p.k = nosa::make_contiguous<3>(data, {10, heads, D});
      p.v = p.k;
      p.c.extents[0] = 10;
      p.c.extents[1] = heads;
      return p;
    };
    t.plan("a prompt with 3 KV heads", status::shape_mismatch,
           [&](auto& l) { return l.add_sequence(2, make(k.data(), 3)); },
           [&](auto& l) { return l.add_sequence(2, make(dk.data(), 3), f.st); });
    t.plan("a prompt without eviction scores", status::null_pointer,
           [&](auto& l) { return l.add_sequence(2, make(k.data(), 2)); },
           [&](auto& l) { return l.add_sequence(2, make(dk.data(), 2), f.st); });
    decode(t, f.rng, scaled(30, 3));
  }
  SUBCASE("removing a sequence that is not there") {
    REQUIRE(t.remove(2, status::unknown_sequence) == status::unknown_sequence);
    REQUIRE(t.remove(4, status::unknown_sequence) == status::unknown_sequence);
    REQUIRE(t.remove(-1, status::unknown_sequence) == status::unknown_sequence);
    decode(t, f.rng, scaled(30, 3));
  }
  SUBCASE("a reservation beyond the pool is all or nothing") {
    REQUIRE(t.reserve(200, status::host_pool_full) == status::host_pool_full);
    // With a fourth sequence taking pages, sequence 1 up to its capacity needs more pages than are free.
    REQUIRE(t.admit(2, random_prompt<P>(f.rng, t.cfg, 100, false)) == status::success);
    REQUIRE(t.reserve(1, max_tokens - t.host.layer.length(1), status::host_pool_full) == status::host_pool_full);
    decode(t, f.rng, scaled(30, 3));
  }
  SUBCASE("a reservation beyond a sequence's capacity, negative or for a free slot") {
    REQUIRE(t.reserve(max_tokens, status::sequence_full) == status::sequence_full);
    REQUIRE(t.reserve(3, max_tokens, status::sequence_full) == status::sequence_full);
    REQUIRE(t.reserve(-1, status::invalid_argument) == status::invalid_argument);
    REQUIRE(t.reserve(0, -1, status::invalid_argument) == status::invalid_argument);
    REQUIRE(t.reserve(2, 1, status::unknown_sequence) == status::unknown_sequence);
    REQUIRE(t.reserve(9, 1, status::unknown_sequence) == status::unknown_sequence);
    decode(t, f.rng, scaled(30, 3));
  }
}

TEST_CASE("configurations the kernels do not support are refused") {
  NOSA_REQUIRE_GPU();
  nosa::arena_sizes sizes;
  nosa::layer_config c = config();
  CHECK(cuda_layer::required_bytes(c, sizes) == status::success);
  c.num_q_heads = 34;  // group 17
  CHECK(cuda_layer::required_bytes(c, sizes) == status::not_supported);
  c = config();
  c.num_q_heads = 32;  // group 16 is the largest
  CHECK(cuda_layer::required_bytes(c, sizes) == status::success);
  c = config();
  c.selection.top_k = 257;
  CHECK(cuda_layer::required_bytes(c, sizes) == status::not_supported);
  c.selection.top_k = 256;
  CHECK(cuda_layer::required_bytes(c, sizes) == status::success);
  c = config();
  c.selection.block_size = 12;
  CHECK(cuda_layer::required_bytes(c, sizes) == status::not_supported);
  c = config();
  c.selection.top_k_query_aware = c.selection.top_k + 1;
  CHECK(cuda_layer::required_bytes(c, sizes) == status::invalid_config);
  c = config();
  c.num_q_heads = 5;
  CHECK(cuda_layer::required_bytes(c, sizes) == status::invalid_argument);
}

// This case makes CUDA API calls fail on purpose (pointer queries on memory CUDA does not know), which the
// sanitizer runs would report: scripts/gpu-suite.sh leaves it out of them by name ("wrong kind of memory").
TEST_CASE("create() refuses arenas in the wrong kind of memory") {
  NOSA_REQUIRE_GPU();
  nosa_cuda_test::stream st;
  const nosa::layer_config c = config();
  nosa::arena_sizes sizes;
  REQUIRE(cuda_layer::required_bytes(c, sizes) == status::success);
  nosa::cuda_device_arena dev;
  nosa::cuda_pinned_arena pinned, pinned_dev;
  nosa::host_arena pageable_dev, pageable_host;
  REQUIRE(dev.allocate(sizes.device + nosa::arena_alignment) == status::success);
  REQUIRE(pinned.allocate(sizes.host + nosa::arena_alignment) == status::success);
  REQUIRE(pinned_dev.allocate(sizes.device) == status::success);
  REQUIRE(pageable_dev.allocate(sizes.device) == status::success);
  REQUIRE(pageable_host.allocate(sizes.host) == status::success);
  cuda_layer layer;
  // Host memory that is not pinned and mapped as the host arena.
  CHECK(cuda_layer::create(c, dev.span(), pageable_host.span(), layer, st) == status::invalid_argument);
  // Host memory as the device arena, pageable or pinned.
  CHECK(cuda_layer::create(c, pageable_dev.span(), pinned.span(), layer, st) == status::invalid_argument);
  CHECK(cuda_layer::create(c, pinned_dev.span(), pinned.span(), layer, st) == status::invalid_argument);
  // The checks every backend makes.
  CHECK(cuda_layer::create(c, dev.span().first(sizes.device - 1), pinned.span(), layer, st) ==
        status::insufficient_memory);
  CHECK(cuda_layer::create(c, dev.span(), pinned.span().first(sizes.host - 1), layer, st) ==
        status::insufficient_memory);
  CHECK(cuda_layer::create(c, dev.span().subspan(8), pinned.span(), layer, st) == status::misaligned_pointer);
  CHECK(cuda_layer::create(c, std::span<std::byte>(static_cast<std::byte*>(nullptr), sizes.device), pinned.span(),
                           layer, st) == status::null_pointer);
  NOSA_CUDA_REQUIRE(cudaGetLastError());  // create() leaves no sticky error behind
  CHECK(cuda_layer::create(c, dev.span(), pinned.span(), layer, st) == status::success);
  CHECK(layer.free_page_count() == c.limits.pool_pages);
  CHECK(layer.step_status(st) == status::success);  // before the first step

  // owning_layer allocates device memory and mapped pinned memory for the CUDA backend.
  nosa::owning_layer<cuda_layer> owned;
  REQUIRE(owned.create(c) == status::success);
  CHECK(owned->free_page_count() == c.limits.pool_pages);
  CHECK_FALSE(owned->is_live(0));
}
