#pragma once
/// \file
/// The engine on the CUDA backend: bf16 weights, cuBLAS GEMMs with fp32 accumulation, the small kernels of
/// `kernels.cuh`, nosa's CUDA decode layers, and the whole decode step of all layers captured once in a CUDA
/// graph and replayed for every token. Plan calls (`reserve`) run between replays.

#include "../attention_stack.hpp"
#include "../model.hpp"
#include "../run_config.hpp"
#include "../throughput_model.hpp"

#include <nosa/backend/cuda/decode_layer.cuh>
#include <nosa/core/numeric.hpp>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace nosa_engine {

/// The stages of a layer's step, as `nosa::decode_layer<P, cuda_backend>::step_stage` numbers them (checked
/// where the layers are instantiated, `stack.cuh`).
enum class step_stage_id : int { begin, append_score, select, diff, gather, attention, merge };

/// How the CUDA engine shapes one layer's step: the gather beside attention (`overlap`, may be null), and a
/// callback right after each stage's kernels are enqueued, with the stage (`step_stage_id`). The lanes use
/// it to record an event once a layer's selection is known; the profile to time each stage.
struct cuda_step_hooks {
  const nosa::cuda_overlap* overlap = nullptr;
  void (*after_stage)(void* context, step_stage_id stage) = nullptr;
  void* context = nullptr;

  template <class Layer, class Args>
  nosa::status enqueue(Layer& layer, const Args& args, cudaStream_t stream) const {
    using stage = typename Layer::step_stage;
    return layer.enqueue_step(
        args, stream,
        [this](stage s) {
          if (after_stage != nullptr) after_stage(context, static_cast<step_stage_id>(s));
        },
        stage::begin, stage::merge, overlap);
  }
};

using cuda_stack = attention_stack<nosa::bf16, cudaStream_t, cuda_step_hooks>;

/// The attention of `layers` layers for method `m` at head dim 64 or 128 (`cuda/stack_*.cu`).
nosa::status make_cuda_stack(method m, int head_dim, const nosa::layer_config& config, int layers,
                             std::unique_ptr<cuda_stack>& out);
/// The arena bytes `make_cuda_stack` would allocate, without allocating.
nosa::status cuda_stack_bytes(method m, int head_dim, const nosa::layer_config& config, int layers,
                              nosa::arena_sizes& out);

/// Device memory owned by the engine (one allocation, freed on destruction).
class device_memory {
 public:
  device_memory() = default;
  device_memory(const device_memory&) = delete;
  device_memory& operator=(const device_memory&) = delete;
  ~device_memory() {
    if (p_ != nullptr) cudaFree(p_);
  }
  cudaError_t allocate(std::size_t bytes) {
    bytes_ = bytes;
    return bytes == 0 ? cudaSuccess : cudaMalloc(&p_, bytes);
  }
  template <class T>
  T* at(std::size_t offset) const {
    return reinterpret_cast<T*>(static_cast<std::byte*>(p_) + offset);
  }
  std::size_t size() const { return bytes_; }

 private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Device memory the engine needs besides weights and arenas, for a batch of `batch` rows.
std::size_t decode_activation_bytes(const model_config& m, int batch);
/// Device memory of the prefill of one prompt of `tokens` tokens (freed before decoding).
std::size_t prefill_workspace_bytes(const model_config& m, int tokens);

/// A model, its weights and the state of one batch of sequences on the current CUDA device. The batch is
/// split into lanes (`run_config::lanes`): each lane has its own attention layers, stream, cuBLAS handle and
/// gather stream, and runs every layer for its rows; the decode step forks into the lanes after the
/// embedding and joins them before the LM head. With two or more lanes, lane i starts a layer once lane
/// i - 1 has selected (and launched the gather of) the same layer, and lane 0 once the last lane has
/// selected the layer before: the lanes stay half a layer apart, so one lane's gather crosses PCIe while
/// another lane computes.
class cuda_engine {
 public:
  /// Uploads `weights` (or, when null, generates the seeded random weights on the device), creates the
  /// lanes, their layers, cuBLAS handles and streams. On failure returns nothing and sets `error`.
  static std::unique_ptr<cuda_engine> create(const model_config& model, const host_weights* weights,
                                             const run_config& run, std::string& error);
  ~cuda_engine();
  cuda_engine(const cuda_engine&) = delete;
  cuda_engine& operator=(const cuda_engine&) = delete;

  /// Dense prefill of each distinct prompt (chunked, cuBLAS attention tiles), or its layers read from the
  /// prefill cache, then ingest into its sequences.
  bool prefill(std::string& error);
  /// One decode step of every sequence: a plan call when due, then one launch of the captured graph (the
  /// first step runs eagerly, the second captures the graph). Returns once enqueued; with `run.trace` it
  /// waits and copies the traces.
  bool step(std::string& error);
  /// One decode step run eagerly with every component on the engine's stream, one after the other (lanes
  /// in turn, gathers not overlapped), timed by events between components: fills `ms` with the ms of each
  /// component (GEMMs, scoring, selection, gather, attention, the rest), summed over layers and lanes.
  bool profile_step(std::vector<std::pair<std::string, double>>& ms, std::string& error);
  /// Waits for the work enqueued so far and checks every layer's step status.
  bool finish(std::string& error);

  const model_config& model() const { return model_; }
  const run_config& run() const { return run_; }
  const lane_layout& lanes() const { return layout_; }
  cudaStream_t stream() const { return stream_; }
  const std::vector<layer_trace>& last_step() const { return step_trace_; }
  const prompt_trace& prompt(int p, int l) const {
    return prompt_trace_[static_cast<std::size_t>(p * model_.layers + l)];
  }
  /// True when the last `prefill` read the prompts from the prefill cache.
  bool prefill_cached() const { return prefill_cached_; }
  /// The current selection of row `b`'s KV head `h` in layer `l`, in rank order (waits).
  std::vector<std::int32_t> selection(int l, int b, int h);
  /// Argmax tokens of the last step (waits).
  std::vector<std::int32_t> tokens();
  /// Counters of all layers of all lanes summed (waits).
  nosa::counters total_counters();
  /// Counters of layer `l`, summed over the lanes (waits).
  nosa::counters layer_counters(int l);
  /// Times the GEMMs of one layer (QKV, output projection, gate and up, down, with layer 0's weights) and
  /// the LM head at each row count of `rows`, with events on the engine's stream (best of a few runs, after
  /// one warm-up), into `layer` and `head`. Uses the decode activations when they hold the rows, otherwise
  /// a scratch of the same layout for the duration of the call; call it before `prefill` (it overwrites
  /// activations that the decode step recomputes).
  bool measure_gemms(const std::vector<int>& rows, gemm_curve& layer, gemm_curve& head, std::string& error);
  /// HBM the engine holds: weights, arenas, activations, cuBLAS workspaces.
  double device_bytes() const;
  /// Pinned host memory of the arenas.
  double host_bytes() const;

 private:
  /// One lane: a stack of layers for rows [first, first + rows) and what runs them.
  struct lane {
    int first = 0, rows = 0;
    cudaStream_t stream = nullptr;
    cudaStream_t transfer = nullptr;  // the gathers, beside attention (offloading methods, run.overlap)
    cublasHandle_t cublas = nullptr;
    device_memory workspace;                  // the cuBLAS handle's
    std::unique_ptr<cuda_stack> stack;
    std::vector<cudaEvent_t> overlap_events;  // per layer: fork, join
    std::vector<cudaEvent_t> selected;        // per layer: the selection is made (two lanes or more)
    cudaEvent_t done = nullptr;
    lane() = default;
    lane(const lane&) = delete;
    lane& operator=(const lane&) = delete;
    ~lane();
  };
  struct step_profile;

  cuda_engine() = default;

  model_config model_;
  run_config run_;
  lane_layout layout_{1, 1};
  cudaStream_t stream_ = nullptr;  // embedding, LM head, plan calls, prefill; the lanes fork from it
  cudaEvent_t fork_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cudaGraphExec_t graph_ = nullptr;
  std::vector<std::unique_ptr<lane>> lanes_;
  device_memory weights_;            // every bf16 tensor, in tensor_specs order
  device_memory weights_f32_;        // the f32 tensors
  std::vector<std::size_t> offset_;  // byte offset of each tensor in its buffer
  device_memory act_;                // decode activations, fixed addresses for the graph
  device_memory cublas_workspace_;
  int steps_done_ = 0;
  bool prefill_cached_ = false;
  std::vector<layer_trace> step_trace_;
  std::vector<prompt_trace> prompt_trace_;

  // Decode activations (pointers into act_), rows of every lane.
  float* x_ = nullptr;                 // [B][hidden] residual stream
  nosa::bf16* h_ = nullptr;            // [B][hidden] normed
  float* qkv_ = nullptr;               // [B][qw + 2 kvw]
  nosa::bf16* q_ = nullptr;            // [B][H_q][D]
  nosa::bf16* k_ = nullptr;            // [B][H_kv][D]
  nosa::bf16* v_ = nullptr;            // [B][H_kv][D]
  float* c_ = nullptr;                 // [B][H_kv]
  nosa::bf16* o_ = nullptr;            // [B][H_q][D]
  float* gu_ = nullptr;                // [B][2 mlp]
  nosa::bf16* a_ = nullptr;            // [B][mlp]
  float* logits_ = nullptr;            // [B][vocab]
  std::int32_t* tokens_ = nullptr;     // [B]
  std::int32_t* positions_ = nullptr;  // [B]
  std::int32_t* sequences_ = nullptr;  // [B] row b: its sequence in its lane's layers
  float* drift_state_ = nullptr;       // [B][hidden] (drift > 0)
  int* drift_step_ = nullptr;          // [1]
  std::vector<float*> trace_;          // per layer: q, k, v (as f32), c, o (as f32), contiguous (trace only)

  const nosa::bf16* w(std::size_t spec) const { return weights_.at<const nosa::bf16>(offset_[spec]); }
  const float* wf(std::size_t spec) const { return weights_f32_.at<const float>(offset_[spec]); }
  const nosa::bf16* w(int layer, layer_tensor t) const { return w(spec_index(layer, t)); }
  const float* wf(int layer, layer_tensor t) const { return wf(spec_index(layer, t)); }

  bool upload_weights(const host_weights* weights, std::string& error);
  bool allocate_activations(std::string& error);
  bool create_lanes(std::string& error);
  /// y[rows][out] (+)= x[rows][in] . W[out][in]^T, bf16 inputs, fp32 accumulate; `Out` is float or bf16.
  bool linear(cublasHandle_t handle, const nosa::bf16* w, int out, int in, const nosa::bf16* x, int rows,
              void* y, bool f32_out, bool accumulate, std::string& error);
  /// Hands layer `l` of prompt `p` (K, V, c and last query in the prefill workspace) to its sequences.
  bool ingest(int p, int l, const nosa::prompt_args<nosa::bf16>& prompt, std::string& error);
  /// The plan call due before the next step (reserve, every `reserve_ahead` steps).
  bool plan(std::string& error);
  /// Enqueues the whole decode step (what the graph holds); with `profile`, serially on `stream_`.
  bool enqueue_step(step_profile* profile, std::string& error);
  /// Enqueues layer `l` of lane `i` on `s`.
  bool enqueue_layer(int i, int l, cudaStream_t s, step_profile* profile, std::string& error);
  bool capture(std::string& error);
  bool copy_traces(std::string& error);
};

/// The PCIe ceiling: a 64 MiB host-to-device copy from pinned memory, best of five after two warm-ups.
bool measure_h2d_copy(double& gb_per_s, std::string& error);
/// The link as nosa's gather uses it: 64 MiB of K and V block pairs of `block_bytes` each, at random places
/// of a 256 MiB pinned, mapped host buffer, read by a kernel with the library's copy loop and as many CTAs
/// as its gather targets; bytes per second, best of five after two warm-ups.
bool measure_gather(std::size_t block_bytes, double& bytes_per_s, std::string& error);
/// HBM read speed: a streaming read of up to 2 GiB (a quarter of the free memory at most) by a kernel with
/// 16-byte loads; bytes per second, best of five after two warm-ups.
bool measure_hbm_read(double& bytes_per_s, std::string& error);

/// Largest batch whose weights, arenas (of every lane), activations and prefill workspace fit `hbm_bytes`
/// and whose host arenas fit `host_bytes` (0 when not even one sequence fits).
int largest_batch(const model_config& m, const run_config& run, bool distinct_per_sequence, double hbm_bytes,
                  double host_bytes, std::string& error);

}  // namespace nosa_engine
