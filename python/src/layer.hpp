#pragma once
/// \file
/// The seam between the Python module and the library's templates: a layer behind a small virtual interface
/// whose arguments are plain descriptions of the caller's arrays. Nothing here includes nanobind or CUDA
/// headers, so the same interface is implemented by host sources (g++) and CUDA sources (nvcc).

#include <nosa/core/numeric.hpp>
#include <nosa/core/params.hpp>
#include <nosa/core/status.hpp>
#include <nosa/pipeline.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace nosa_python {

/// The selection method of a layer.
enum class variant_kind : unsigned char { nosa, infllmv2, full };
/// Where the KV blocks live: a host pool with a GPU slot cache, or everything in the device tier.
enum class store_kind : unsigned char { offload, resident };
/// The executor of a layer.
enum class backend_kind : unsigned char { host, cuda };

/// The element types of caller arrays the layer understands.
enum class element_kind : unsigned char { f32, f16, bf16, i32, other };
/// Where a caller array lives (DLPack device types 1, 2, 3 and 13).
enum class memory_kind : unsigned char { cpu, cuda, cuda_host, cuda_managed, other };

/// Largest rank of an array the layer takes.
inline constexpr int max_rank = 4;

/// One caller array as DLPack describes it. Only the description crosses the seam: the data stay where the
/// caller put them and are never copied.
struct array_ref {
  bool present = false;  ///< false for an optional argument left out
  void* data = nullptr;  ///< element (0, ..., 0)
  element_kind element = element_kind::other;
  std::string dtype_name;  ///< the DLPack dtype, for messages ("float32", "bfloat16", ...)
  int rank = 0;
  std::int64_t shape[max_rank] = {};
  std::int64_t strides[max_rank] = {};  ///< in elements
  memory_kind memory = memory_kind::other;
  int device_id = 0;  ///< the CUDA device of `cuda` and `cuda_managed` arrays
};

/// The outcome of a call: a status and, when it failed, what exactly was wrong.
struct problem {
  nosa::status status = nosa::status::success;
  std::string detail;  ///< empty on success; otherwise one sentence naming the argument or the cause

  bool failed() const noexcept { return !nosa::ok(status); }
};

/// A failure with its detail.
inline problem fail(nosa::status s, std::string detail) { return {s, std::move(detail)}; }

/// Everything `DecodeLayer(...)` chose.
struct layer_spec {
  variant_kind variant = variant_kind::nosa;
  store_kind store = store_kind::offload;
  nosa::bias_mode bias = nosa::bias_mode::after_scale;
  nosa::dtype element = nosa::dtype::bf16;
  int head_dim = 128;
  nosa::layer_config config{};
  backend_kind backend = backend_kind::host;
  int device = 0;  ///< CUDA device ordinal (CUDA backend only)
};

/// Stable names of the choices, as the Python API spells them.
constexpr std::string_view to_string(variant_kind v) noexcept {
  switch (v) {
    case variant_kind::nosa: return "nosa";
    case variant_kind::infllmv2: return "infllmv2";
    case variant_kind::full: return "full";
  }
  return "?";
}
constexpr std::string_view to_string(store_kind s) noexcept {
  return s == store_kind::offload ? "offload" : "resident";
}
constexpr std::string_view bias_name(nosa::bias_mode b) noexcept {
  switch (b) {
    case nosa::bias_mode::after_scale: return "after_scale";
    case nosa::bias_mode::before_scale: return "before_scale";
    case nosa::bias_mode::none: return "none";
  }
  return "?";
}

/// The enumerator name of a status ("shape_mismatch"), which `nosa.Error.status` carries.
constexpr std::string_view status_name(nosa::status s) noexcept {
  switch (s) {
    case nosa::status::success: return "success";
    case nosa::status::invalid_argument: return "invalid_argument";
    case nosa::status::invalid_config: return "invalid_config";
    case nosa::status::shape_mismatch: return "shape_mismatch";
    case nosa::status::bad_layout: return "bad_layout";
    case nosa::status::null_pointer: return "null_pointer";
    case nosa::status::misaligned_pointer: return "misaligned_pointer";
    case nosa::status::unknown_sequence: return "unknown_sequence";
    case nosa::status::sequence_exists: return "sequence_exists";
    case nosa::status::duplicate_sequence: return "duplicate_sequence";
    case nosa::status::sequence_full: return "sequence_full";
    case nosa::status::host_pool_full: return "host_pool_full";
    case nosa::status::not_reserved: return "not_reserved";
    case nosa::status::insufficient_memory: return "insufficient_memory";
    case nosa::status::not_supported: return "not_supported";
    case nosa::status::backend_error: return "backend_error";
  }
  return "unknown_status";
}

/// One layer, whatever its pipeline and backend. Every call validates first and changes nothing when it
/// fails (the library's rule); `stream` is a `cudaStream_t` on the CUDA backend and ignored on the host.
/// Arrays of plan calls and steps must live where the backend reads them (host memory for the host
/// backend; the layer's GPU for the CUDA backend).
class layer_base {
 public:
  virtual ~layer_base() = default;

  /// Admits sequence `seq` with a prompt: `k`, `v` [P][H_kv][D] of the storage type, `c` [P][H_kv] float32
  /// (may be absent when the pipeline does not read eviction scores), `last_query` [H_q][D] (optional).
  virtual problem add_sequence(int seq, const array_ref& k, const array_ref& v, const array_ref& c,
                               const array_ref& last_query, std::uintptr_t stream) = 0;
  /// Retires sequence `seq`.
  virtual problem remove_sequence(int seq, std::uintptr_t stream) = 0;
  /// Reserves pages for `tokens` more steps of every live sequence (`seq` < 0) or of sequence `seq`.
  virtual problem reserve(int seq, int tokens, std::uintptr_t stream) = 0;
  /// One step: `sequences` int32 [B], `q` [B][H_q][D], `k`, `v` [B][H_kv][D], `c` float32 [B][H_kv],
  /// `o` float32 [B][H_q][D] (written). On the CUDA backend it only enqueues.
  virtual problem step(const array_ref& sequences, const array_ref& q, const array_ref& k, const array_ref& v,
                       const array_ref& c, const array_ref& o, std::uintptr_t stream) = 0;
  /// The status of the most recent step (synchronises `stream` on the CUDA backend).
  virtual problem step_status(std::uintptr_t stream) = 0;
  /// Selected blocks of each KV head of `seq`, ascending, padded with -1: `out` [H_kv][selection_width()].
  virtual problem selection(int seq, std::int32_t* out, std::uintptr_t stream) = 0;
  /// Blocks loaded for each KV head of `seq` by its last step: `out` [H_kv].
  virtual problem step_misses(int seq, std::int32_t* out, std::uintptr_t stream) = 0;
  /// Block held by each slot of each KV head of `seq` (-1 if free): `out` [H_kv][slot_count()].
  virtual problem slots(int seq, std::int32_t* out, std::uintptr_t stream) = 0;
  /// Counters of every step since creation, or of the last step.
  virtual problem counters(bool last_step, nosa::counters& out, std::uintptr_t stream) = 0;
  /// Tokens of `seq`, or -1 when the slot holds no live sequence.
  virtual problem length(int seq, int& out, std::uintptr_t stream) = 0;
  /// Pool pages not referenced by any sequence.
  virtual int free_pages() const = 0;
  /// H_kv, the rows of `selection`, `step_misses` and `slots`.
  virtual int kv_heads() const = 0;
  /// Columns of `selection`: `k`, or 0 for full attention (which reads every block).
  virtual int selection_width() const = 0;
  /// Columns of `slots`: `k + 1 + cache_slots` for the offload store, 0 for the resident store.
  virtual int slot_count() const = 0;
};

/// Builds the layer `spec` describes on the host backend, or says why not (`not_supported` outside the
/// compiled pipelines).
problem make_host_layer(const layer_spec& spec, std::unique_ptr<layer_base>& out);

/// True when this build contains the CUDA backend.
bool cuda_built() noexcept;
/// CUDA devices the runtime sees (0 without a driver or a device, or in a build without CUDA).
int cuda_device_count() noexcept;
/// As `make_host_layer`, on the CUDA backend on device `spec.device`.
problem make_cuda_layer(const layer_spec& spec, std::unique_ptr<layer_base>& out);

}  // namespace nosa_python
