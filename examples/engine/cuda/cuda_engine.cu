// The CUDA engine (see cuda_engine.cuh) and the `nosa-engine --backend cuda` run.

#include "../cuda_engine.hpp"
#include "../prefill_cache.hpp"
#include "../report.hpp"
#include "cuda_engine.cuh"
#include "kernels.cuh"
#include "stack.cuh"

#include <nosa/core/dispatch.hpp>

#include <nosa/backend/cuda/backend.cuh>
#include <nosa/backend/cuda/eviction_head.cuh>
#include <nosa/core/math.hpp>
#include <nosa/core/tensor_view.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace nosa_engine {

namespace {

constexpr std::size_t cublas_workspace_bytes = std::size_t(32) << 20;
/// Query rows of one prefill attention tile (scores [G][rows][P] fp32 and probabilities bf16).
constexpr int prefill_tile_rows = 128;
/// Tokens of one prefill chunk (projections and MLP run chunk by chunk).
constexpr int prefill_chunk = 2048;

/// Offsets of consecutive arrays in one allocation, each aligned to 256 bytes.
struct bump {
  std::size_t size = 0;
  std::size_t add(std::size_t bytes) {
    const std::size_t at = (size + 255) / 256 * 256;
    size = at + bytes;
    return at;
  }
};

bool cuda_ok(cudaError_t e, const char* call, std::string& error) {
  if (e == cudaSuccess) return true;
  cudaGetLastError();
  error = std::string(call) + ": " + cudaGetErrorString(e);
  return false;
}

bool cublas_ok(cublasStatus_t s, const char* call, std::string& error) {
  if (s == CUBLAS_STATUS_SUCCESS) return true;
  error = std::string(call) + ": cuBLAS status " + std::to_string(static_cast<int>(s));
  return false;
}

bool nosa_ok(nosa::status s, const std::string& call, std::string& error) {
  if (nosa::ok(s)) return true;
  error = call + ": " + std::string(nosa::to_string(s));
  return false;
}

bool launched(const char* kernel, std::string& error) { return cuda_ok(cudaGetLastError(), kernel, error); }

unsigned grid_for(std::uint64_t n) {
  return static_cast<unsigned>(std::min<std::uint64_t>((n + 255) / 256, 65535));
}

/// The arrays of the prefill workspace of a prompt of P tokens.
struct prefill_layout {
  std::size_t x, k, v, c, h, qkv, q, o, gu, a, scores, probs, last_q, logits, tokens, next_token, size;
  int chunk = 0;
  prefill_layout(const model_config& m, int P) {
    chunk = std::min(P, prefill_chunk);
    const std::size_t G = std::size_t(m.q_heads / m.kv_heads), C = std::size_t(chunk), p = std::size_t(P);
    bump b;
    x = b.add(p * m.hidden * 4);
    k = b.add(p * m.kv_width() * 2);
    v = b.add(p * m.kv_width() * 2);
    c = b.add(p * m.kv_heads * 4);
    h = b.add(C * m.hidden * 2);
    qkv = b.add(C * (m.q_width() + 2 * m.kv_width()) * 4);
    q = b.add(C * m.q_width() * 2);
    o = b.add(C * m.q_width() * 2);
    gu = b.add(C * 2 * m.mlp * 4);
    a = b.add(C * m.mlp * 2);
    scores = b.add(G * prefill_tile_rows * p * 4);
    probs = b.add(G * prefill_tile_rows * p * 2);
    last_q = b.add(std::size_t(m.q_width()) * 2);
    logits = b.add(std::size_t(m.vocab) * 4);
    tokens = b.add(p * 4);
    next_token = b.add(4);
    size = b.size;
  }
};

/// The decode activations of a batch of B rows, in the order `allocate_activations` assigns them.
struct decode_layout {
  std::size_t x, h, qkv, q, k, v, c, o, gu, a, logits, tokens, positions, sequences, drift, drift_step, size;
  decode_layout(const model_config& m, int batch) {
    const std::size_t B = std::size_t(batch);
    bump b;
    x = b.add(B * m.hidden * 4);
    h = b.add(B * m.hidden * 2);
    qkv = b.add(B * (m.q_width() + 2 * m.kv_width()) * 4);
    q = b.add(B * m.q_width() * 2);
    k = b.add(B * m.kv_width() * 2);
    v = b.add(B * m.kv_width() * 2);
    c = b.add(B * m.kv_heads * 4);
    o = b.add(B * m.q_width() * 2);
    gu = b.add(B * 2 * m.mlp * 4);
    a = b.add(B * m.mlp * 2);
    logits = b.add(B * m.vocab * 4);
    tokens = b.add(B * 4);
    positions = b.add(B * 4);
    sequences = b.add(B * 4);
    drift = b.add(B * m.hidden * 4);
    drift_step = b.add(4);
    size = b.size;
  }
};

/// Bytes of all weights on the device (bf16 and f32 buffers).
double weight_bytes(const model_config& m) {
  double bytes = 0;
  for (const tensor_spec& s : tensor_specs(m))
    bytes += double(s.elements()) * (s.type == dtype::bf16 ? 2 : 4);
  return bytes;
}

}  // namespace

nosa::status make_cuda_stack(method m, int head_dim, const nosa::layer_config& config, int layers,
                             std::unique_ptr<cuda_stack>& out) {
  return nosa::dispatch_value<64, 128>(head_dim, [&](auto d) {
    return make_cuda_stack_for<decltype(d)::value>(m, config, layers, &out, nullptr);
  });
}

nosa::status cuda_stack_bytes(method m, int head_dim, const nosa::layer_config& config, int layers,
                              nosa::arena_sizes& out) {
  return nosa::dispatch_value<64, 128>(head_dim, [&](auto d) {
    return make_cuda_stack_for<decltype(d)::value>(m, config, layers, nullptr, &out);
  });
}

std::size_t decode_activation_bytes(const model_config& m, int batch) { return decode_layout(m, batch).size; }
std::size_t prefill_workspace_bytes(const model_config& m, int tokens) {
  return prefill_layout(m, tokens).size;
}

namespace {

/// What the profile attributes time to.
enum class component : int { gemm, scoring, selection, gather, attention, other, count };
constexpr const char* component_names[] = {"gemm", "scoring", "selection", "gather", "attention", "other"};

component component_of(step_stage_id stage) {
  switch (stage) {
  case step_stage_id::append_score:
    return component::scoring;
  case step_stage_id::select:
  case step_stage_id::diff:
    return component::selection;
  case step_stage_id::gather:
    return component::gather;
  case step_stage_id::attention:
  case step_stage_id::merge:
    return component::attention;
  case step_stage_id::begin:
    break;
  }
  return component::other;
}

}  // namespace

/// Events recorded on one stream between the components of a step; `mark(c)` closes the interval since the
/// previous mark and attributes it to `c`.
struct cuda_engine::step_profile {
  cudaStream_t stream = nullptr;
  std::vector<std::pair<component, cudaEvent_t>> marks;
  bool failed = false;

  void mark(component c) {
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess || cudaEventRecord(e, stream) != cudaSuccess) {
      failed = true;
      return;
    }
    marks.emplace_back(c, e);
  }
  ~step_profile() {
    for (auto& m : marks) cudaEventDestroy(m.second);
  }
};

namespace {

/// The context of a lane's step hooks: which lane and layer, and the profile when one is taken.
struct hook_context {
  cudaEvent_t selected = nullptr;  // recorded once the selection is made (null: none)
  cudaStream_t stream = nullptr;
  void* profile = nullptr;  // cuda_engine::step_profile
  void (*mark)(void* profile, component c) = nullptr;
};

void after_stage(void* context, step_stage_id stage) {
  const auto* ctx = static_cast<const hook_context*>(context);
  if (ctx->profile != nullptr) ctx->mark(ctx->profile, component_of(stage));
  if (stage == step_stage_id::diff && ctx->selected != nullptr) cudaEventRecord(ctx->selected, ctx->stream);
}

}  // namespace

cuda_engine::lane::~lane() {
  if (cublas != nullptr) cublasDestroy(cublas);
  if (transfer != nullptr) {
    cudaStreamSynchronize(transfer);
    cudaStreamDestroy(transfer);
  }
  if (stream != nullptr) {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  for (cudaEvent_t ev : overlap_events) {
    if (ev != nullptr) cudaEventDestroy(ev);
  }
  for (cudaEvent_t ev : selected) {
    if (ev != nullptr) cudaEventDestroy(ev);
  }
  if (done != nullptr) cudaEventDestroy(done);
}

std::unique_ptr<cuda_engine> cuda_engine::create(const model_config& model, const host_weights* weights,
                                                 const run_config& run, std::string& error) {
  if (!validate_workload(run, error)) return nullptr;
  std::unique_ptr<cuda_engine> e(new cuda_engine());
  e->model_ = model;
  e->run_ = run;
  e->layout_ = lane_layout(run.batch, cuda_lanes(run, run.batch));
  if (!cuda_ok(cudaStreamCreateWithFlags(&e->stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
               error) ||
      !cuda_ok(cudaEventCreateWithFlags(&e->fork_, cudaEventDisableTiming), "cudaEventCreateWithFlags", error))
    return nullptr;
  if (!cublas_ok(cublasCreate(&e->cublas_), "cublasCreate", error)) return nullptr;
  if (!cublas_ok(cublasSetStream(e->cublas_, e->stream_), "cublasSetStream", error)) return nullptr;
  // An explicit workspace: cuBLAS then allocates nothing while the decode step is being captured.
  if (!cuda_ok(e->cublas_workspace_.allocate(cublas_workspace_bytes), "cudaMalloc", error)) return nullptr;
  if (!cublas_ok(cublasSetWorkspace(e->cublas_, e->cublas_workspace_.at<void>(0), cublas_workspace_bytes),
                 "cublasSetWorkspace", error)) {
    return nullptr;
  }
  if (!e->upload_weights(weights, error)) return nullptr;
  if (!e->create_lanes(error)) return nullptr;
  if (!e->allocate_activations(error)) return nullptr;
  return e;
}

bool cuda_engine::create_lanes(std::string& error) {
  const bool overlap = run_.overlap && overlaps_gather(run_.attention);
  for (int i = 0; i < layout_.lanes; ++i) {
    auto ln = std::make_unique<lane>();
    ln->first = layout_.first(i);
    ln->rows = layout_.rows(i);
    if (!cuda_ok(cudaStreamCreateWithFlags(&ln->stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
                 error) ||
        !cuda_ok(cudaEventCreateWithFlags(&ln->done, cudaEventDisableTiming), "cudaEventCreateWithFlags", error) ||
        !cublas_ok(cublasCreate(&ln->cublas), "cublasCreate", error) ||
        !cublas_ok(cublasSetStream(ln->cublas, ln->stream), "cublasSetStream", error) ||
        !cuda_ok(ln->workspace.allocate(cublas_workspace_bytes), "cudaMalloc", error) ||
        !cublas_ok(cublasSetWorkspace(ln->cublas, ln->workspace.at<void>(0), cublas_workspace_bytes),
                   "cublasSetWorkspace", error)) {
      return false;
    }
    const nosa::status s = make_cuda_stack(run_.attention, model_.head_dim,
                                           layer_config_for(model_, layout_.lane_run(run_, i)), model_.layers,
                                           ln->stack);
    if (!nosa_ok(s, "creating the " + std::string(method_name(run_.attention)) + " layers", error)) return false;
    const auto events = [&](std::vector<cudaEvent_t>& v, std::size_t n) {
      v.assign(n, nullptr);
      for (cudaEvent_t& ev : v) {
        if (!cuda_ok(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags", error))
          return false;
      }
      return true;
    };
    if (overlap) {
      if (!cuda_ok(cudaStreamCreateWithFlags(&ln->transfer, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
                   error) ||
          !events(ln->overlap_events, 2 * std::size_t(model_.layers))) {
        return false;
      }
    }
    if (layout_.lanes > 1 && !events(ln->selected, std::size_t(model_.layers))) return false;
    lanes_.push_back(std::move(ln));
  }
  return true;
}

cuda_engine::~cuda_engine() {
  if (graph_ != nullptr) cudaGraphExecDestroy(graph_);
  lanes_.clear();
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (fork_ != nullptr) cudaEventDestroy(fork_);
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  for (float* t : trace_) cudaFree(t);
}

bool cuda_engine::upload_weights(const host_weights* weights, std::string& error) {
  const std::vector<tensor_spec> specs = tensor_specs(model_);
  if (weights != nullptr && weights->bf16_data.size() != specs.size()) {
    error = "the weights do not belong to the " + model_.name + " model";
    return false;
  }
  // bf16 tensors packed back to back in spec order, so that q|k|v and gate|up form fused weights.
  offset_.assign(specs.size(), 0);
  std::size_t bf16_bytes = 0, f32_bytes = 0;
  for (const tensor_spec& s : specs) {
    std::size_t& end = s.type == dtype::bf16 ? bf16_bytes : f32_bytes;
    offset_[s.id] = end;
    end += s.elements() * element_size(s.type);
  }
  if (!cuda_ok(weights_.allocate(bf16_bytes), "cudaMalloc (weights)", error)) return false;
  if (!cuda_ok(weights_f32_.allocate(f32_bytes), "cudaMalloc (weights)", error)) return false;
  for (const tensor_spec& s : specs) {
    if (weights != nullptr) {
      const void* src = s.type == dtype::bf16 ? static_cast<const void*>(weights->bf16_data[s.id].data())
                                              : static_cast<const void*>(weights->f32_data[s.id].data());
      void* dst =
          s.type == dtype::bf16 ? weights_.at<void>(offset_[s.id]) : weights_f32_.at<void>(offset_[s.id]);
      if (!cuda_ok(
              cudaMemcpyAsync(dst, src, s.elements() * element_size(s.type), cudaMemcpyHostToDevice, stream_),
              "cudaMemcpyAsync (weights)", error)) {
        return false;
      }
    } else if (s.type == dtype::bf16) {
      kernels::init_tensor<<<grid_for(s.elements()), kernels::threads, 0, stream_>>>(
          weights_.at<nosa::bf16>(offset_[s.id]), s.elements(), s.init, s.bound, run_.weight_seed, s.id);
    } else {
      kernels::init_tensor<<<grid_for(s.elements()), kernels::threads, 0, stream_>>>(
          weights_f32_.at<float>(offset_[s.id]), s.elements(), s.init, s.bound, run_.weight_seed, s.id);
    }
    if (!launched("init_tensor", error)) return false;
  }
  return cuda_ok(cudaStreamSynchronize(stream_), "uploading the weights", error);
}

bool cuda_engine::allocate_activations(std::string& error) {
  const decode_layout d(model_, run_.batch);
  if (!cuda_ok(act_.allocate(d.size), "cudaMalloc (activations)", error)) return false;
  x_ = act_.at<float>(d.x);
  h_ = act_.at<nosa::bf16>(d.h);
  qkv_ = act_.at<float>(d.qkv);
  q_ = act_.at<nosa::bf16>(d.q);
  k_ = act_.at<nosa::bf16>(d.k);
  v_ = act_.at<nosa::bf16>(d.v);
  c_ = act_.at<float>(d.c);
  o_ = act_.at<nosa::bf16>(d.o);
  gu_ = act_.at<float>(d.gu);
  a_ = act_.at<nosa::bf16>(d.a);
  logits_ = act_.at<float>(d.logits);
  tokens_ = act_.at<std::int32_t>(d.tokens);
  positions_ = act_.at<std::int32_t>(d.positions);
  sequences_ = act_.at<std::int32_t>(d.sequences);
  drift_state_ = act_.at<float>(d.drift);
  drift_step_ = act_.at<int>(d.drift_step);
  if (!cuda_ok(cudaMemsetAsync(act_.at<void>(0), 0, d.size, stream_), "cudaMemsetAsync", error)) return false;
  // Row b is sequence local(b) of its lane's layers.
  std::vector<std::int32_t> rows(static_cast<std::size_t>(run_.batch));
  for (int b = 0; b < run_.batch; ++b) rows[std::size_t(b)] = layout_.local(b);
  if (!cuda_ok(cudaMemcpyAsync(sequences_, rows.data(), rows.size() * 4, cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync", error)) {
    return false;
  }
  if (run_.trace) {
    const std::size_t B = std::size_t(run_.batch);
    const std::size_t per_layer = B * (2 * model_.q_width() + 2 * model_.kv_width() + model_.kv_heads);
    step_trace_.resize(std::size_t(model_.layers));
    prompt_trace_.resize(std::size_t(run_.distinct_prompts) * model_.layers);
    for (int l = 0; l < model_.layers; ++l) {
      float* t = nullptr;
      if (!cuda_ok(cudaMalloc(&t, per_layer * 4), "cudaMalloc (trace)", error)) return false;
      trace_.push_back(t);
    }
  }
  return cuda_ok(cudaStreamSynchronize(stream_), "allocating activations", error);
}

bool cuda_engine::linear(cublasHandle_t handle, const nosa::bf16* w, int out, int in, const nosa::bf16* x,
                         int rows, void* y, bool f32_out, bool accumulate, std::string& error) {
  // Row-major Y[rows][out] = X[rows][in] W[out][in]^T is, column-major, Y^T = W^T(as stored) ... i.e.
  // C (out x rows) = op_T(A: in x out) * B (in x rows).
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  return cublas_ok(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w, CUDA_R_16BF, in, x,
                                CUDA_R_16BF, in, &beta, y, f32_out ? CUDA_R_32F : CUDA_R_16BF, out,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx", error);
}

bool cuda_engine::ingest(int p, int l, const nosa::prompt_args<nosa::bf16>& prompt, std::string& error) {
  const int shared = shared_prompt_blocks(run_.attention, run_.share_prompts, run_.prompt_tokens,
                                          model_.selection.block_size);
  for (int b = p; b < run_.batch; b += run_.distinct_prompts) {
    // The first sequence of the prompt in each lane stores it; the others reference its complete blocks.
    const int source = layout_.share_source(b, run_.distinct_prompts);
    const nosa::shared_prefix share = source < 0 ? nosa::shared_prefix{} : nosa::shared_prefix{source, shared};
    if (!nosa_ok(lanes_[std::size_t(layout_.lane_of(b))]->stack->add_sequence(l, layout_.local(b), prompt, share,
                                                                              stream_),
                 "add_sequence", error))
      return false;
  }
  return true;
}

bool cuda_engine::prefill(std::string& error) {
  const model_config& m = model_;
  const int P = run_.prompt_tokens, hd = m.hidden, qw = m.q_width(), kvw = m.kv_width(), D = m.head_dim;
  const int G = m.q_heads / m.kv_heads, qkvw = qw + 2 * kvw;
  const bool bias = uses_bias(run_.attention);
  const float scale = nosa::softmax_scale(D);
  const prefill_layout L(m, P);
  device_memory ws;
  if (!cuda_ok(ws.allocate(L.size), "cudaMalloc (prefill workspace)", error)) return false;
  float* X = ws.at<float>(L.x);
  nosa::bf16 *K = ws.at<nosa::bf16>(L.k), *V = ws.at<nosa::bf16>(L.v), *H = ws.at<nosa::bf16>(L.h);
  nosa::bf16 *Q = ws.at<nosa::bf16>(L.q), *O = ws.at<nosa::bf16>(L.o), *A = ws.at<nosa::bf16>(L.a);
  nosa::bf16 *probs = ws.at<nosa::bf16>(L.probs), *last_q = ws.at<nosa::bf16>(L.last_q);
  float *Cs = ws.at<float>(L.c), *QKV = ws.at<float>(L.qkv), *GU = ws.at<float>(L.gu),
        *S = ws.at<float>(L.scores);
  std::int32_t* tokens = ws.at<std::int32_t>(L.tokens);
  std::int32_t* next = ws.at<std::int32_t>(L.next_token);
  const nosa::prompt_args<nosa::bf16> prompt_views{
      nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(K), {P, m.kv_heads, D}),
      nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(V), {P, m.kv_heads, D}),
      bias ? nosa::make_contiguous<2>(static_cast<const float*>(Cs), {P, m.kv_heads})
           : nosa::tensor_view<const float, 2>{},
      nosa::make_contiguous<2>(static_cast<const nosa::bf16*>(last_q), {m.q_heads, D})};
  const std::size_t kv_elems = std::size_t(P) * kvw, c_elems = std::size_t(P) * m.kv_heads;
  // Copies between the prefill workspace and a host-side layer (prefill cache), on stream_, then waits.
  const auto to_host = [&](prefill_layer& data) {
    data.k.resize(kv_elems);
    data.v.resize(kv_elems);
    data.c.assign(c_elems, 0.0f);
    data.last_q.resize(std::size_t(qw));
    return cuda_ok(cudaMemcpyAsync(data.k.data(), K, kv_elems * 2, cudaMemcpyDeviceToHost, stream_), "cudaMemcpy",
                   error) &&
           cuda_ok(cudaMemcpyAsync(data.v.data(), V, kv_elems * 2, cudaMemcpyDeviceToHost, stream_), "cudaMemcpy",
                   error) &&
           (!bias ||
            cuda_ok(cudaMemcpyAsync(data.c.data(), Cs, c_elems * 4, cudaMemcpyDeviceToHost, stream_), "cudaMemcpy",
                    error)) &&
           cuda_ok(cudaMemcpyAsync(data.last_q.data(), last_q, std::size_t(qw) * 2, cudaMemcpyDeviceToHost, stream_),
                   "cudaMemcpy", error) &&
           cuda_ok(cudaStreamSynchronize(stream_), "copying the prefill", error);
  };
  const auto to_device = [&](const prefill_layer& data) {
    return cuda_ok(cudaMemcpyAsync(K, data.k.data(), kv_elems * 2, cudaMemcpyHostToDevice, stream_), "cudaMemcpy",
                   error) &&
           cuda_ok(cudaMemcpyAsync(V, data.v.data(), kv_elems * 2, cudaMemcpyHostToDevice, stream_), "cudaMemcpy",
                   error) &&
           cuda_ok(cudaMemcpyAsync(Cs, data.c.data(), c_elems * 4, cudaMemcpyHostToDevice, stream_), "cudaMemcpy",
                   error) &&
           cuda_ok(cudaMemcpyAsync(last_q, data.last_q.data(), std::size_t(qw) * 2, cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpy", error) &&
           cuda_ok(cudaStreamSynchronize(stream_), "loading the prefill", error);
  };
  const auto keep_trace = [&](int p, int l) {
    if (!run_.trace) return true;
    prompt_trace& tr = prompt_trace_[std::size_t(p * m.layers + l)];
    prefill_layer data;
    if (!to_host(data)) return false;
    tr.k.resize(kv_elems);
    tr.v.resize(kv_elems);
    for (std::size_t i = 0; i < kv_elems; ++i) {
      tr.k[i] = nosa::to_float(data.k[i]);
      tr.v[i] = nosa::to_float(data.v[i]);
    }
    tr.c = data.c;
    return true;
  };

  std::vector<std::int32_t> first_tokens(std::size_t(run_.batch), 0);
  std::vector<std::int32_t> positions(std::size_t(run_.batch), P);
  prefill_cached_ = !run_.prefill_cache.empty();
  for (int p = 0; p < run_.distinct_prompts; ++p) {
    const prefill_key key{"cuda", run_.weight_seed, run_.prompt_seed, p, P, bias};
    std::int32_t first_token = 0;
    prefill_cache_reader reader;
    if (!run_.prefill_cache.empty() && reader.open(run_.prefill_cache, m, key)) {
      prefill_layer data;
      for (int l = 0; l < m.layers; ++l) {
        if (!reader.read_layer(data, error) || !to_device(data) || !ingest(p, l, prompt_views, error) ||
            !keep_trace(p, l))
          return false;
      }
      if (!reader.read_token(first_token, error)) return false;
    } else {
      prefill_cached_ = false;
      prefill_cache_writer writer;
      const bool caching = !run_.prefill_cache.empty();
      if (caching && !writer.open(run_.prefill_cache, m, key, error)) return false;
      std::vector<std::int32_t> prompt(static_cast<std::size_t>(P));
      for (int t = 0; t < P; ++t) prompt[std::size_t(t)] = prompt_token(run_.prompt_seed, p, t, m.vocab);
      if (!cuda_ok(cudaMemcpyAsync(tokens, prompt.data(), prompt.size() * 4, cudaMemcpyHostToDevice, stream_),
                   "cudaMemcpyAsync", error)) {
        return false;
      }
      kernels::embed<<<P, kernels::threads, 0, stream_>>>(w(spec_index(model_tensor::embed)), tokens, hd, X);
      if (!launched("embed", error)) return false;
      for (int l = 0; l < m.layers; ++l) {
        for (int t0 = 0; t0 < P; t0 += L.chunk) {
          const int rows = std::min(L.chunk, P - t0);
          float* Xc = X + std::size_t(t0) * hd;
          kernels::rmsnorm<<<rows, kernels::threads, 0, stream_>>>(Xc, w(l, layer_tensor::attn_norm), hd,
                                                                   m.norm_eps, H);
          if (!launched("rmsnorm", error) ||
              !linear(cublas_, w(l, layer_tensor::wq), qkvw, hd, H, rows, QKV, true, false, error))
            return false;
          kernels::rope_split<<<rows, kernels::threads, 0, stream_>>>(
              QKV, nullptr, t0, m.q_heads, m.kv_heads, D, m.rope_theta, Q, K + std::size_t(t0) * kvw,
              V + std::size_t(t0) * kvw);
          if (!launched("rope_split", error)) return false;
          if (bias) {
            const nosa::eviction_head_args<nosa::bf16> args{
                nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(V + std::size_t(t0) * kvw),
                                         {rows, m.kv_heads, D}),
                nosa::make_contiguous<2>(w(l, layer_tensor::evict_w), {m.kv_heads, kvw}),
                nosa::make_contiguous<1>(wf(l, layer_tensor::evict_beta), {m.kv_heads}),
                nosa::make_contiguous<1>(wf(l, layer_tensor::evict_scale), {m.kv_heads}),
                nosa::make_contiguous<2>(Cs + std::size_t(t0) * m.kv_heads, {rows, m.kv_heads})};
            if (!nosa_ok(nosa::compute_eviction_scores(nosa::cuda_backend{}, args, stream_),
                         "compute_eviction_scores", error)) {
              return false;
            }
          }
          // Causal attention, one tile of query rows at a time: scores = K q (cuBLAS, batched over the GQA
          // group), softmax with the bias, then O = P V.
          for (int s0 = t0; s0 < t0 + rows; s0 += prefill_tile_rows) {
            const int tile = std::min(prefill_tile_rows, t0 + rows - s0), keys = s0 + tile;
            for (int h = 0; h < m.kv_heads; ++h) {
              const float one = 1.0f, zero = 0.0f;
              const nosa::bf16* q_tile = Q + (std::size_t(s0 - t0) * m.q_heads + std::size_t(h) * G) * D;
              if (!cublas_ok(cublasGemmStridedBatchedEx(
                                 cublas_, CUBLAS_OP_T, CUBLAS_OP_N, keys, tile, D, &one, K + std::size_t(h) * D,
                                 CUDA_R_16BF, kvw, 0, q_tile, CUDA_R_16BF, qw, D, &zero, S, CUDA_R_32F, P,
                                 std::int64_t(tile) * P, G, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                             "cublasGemmStridedBatchedEx (scores)", error)) {
                return false;
              }
              kernels::prefill_softmax<<<dim3(tile, G), kernels::threads, 0, stream_>>>(
                  S, P, tile, s0, keys, scale, bias ? Cs : nullptr, m.kv_heads, h, probs);
              if (!launched("prefill_softmax", error)) return false;
              nosa::bf16* o_tile = O + (std::size_t(s0 - t0) * m.q_heads + std::size_t(h) * G) * D;
              if (!cublas_ok(cublasGemmStridedBatchedEx(
                                 cublas_, CUBLAS_OP_N, CUBLAS_OP_N, D, tile, keys, &one, V + std::size_t(h) * D,
                                 CUDA_R_16BF, kvw, 0, probs, CUDA_R_16BF, P, std::int64_t(tile) * P, &zero,
                                 o_tile, CUDA_R_16BF, qw, D, G, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                             "cublasGemmStridedBatchedEx (values)", error)) {
                return false;
              }
            }
          }
          if (t0 + rows == P &&
              !cuda_ok(cudaMemcpyAsync(last_q, Q + std::size_t(rows - 1) * qw, std::size_t(qw) * 2,
                                       cudaMemcpyDeviceToDevice, stream_),
                       "cudaMemcpyAsync", error)) {
            return false;
          }
          if (!linear(cublas_, w(l, layer_tensor::wo), hd, qw, O, rows, Xc, true, true, error)) return false;
          kernels::rmsnorm<<<rows, kernels::threads, 0, stream_>>>(Xc, w(l, layer_tensor::mlp_norm), hd,
                                                                   m.norm_eps, H);
          if (!launched("rmsnorm", error) ||
              !linear(cublas_, w(l, layer_tensor::w_gate), 2 * m.mlp, hd, H, rows, GU, true, false, error)) {
            return false;
          }
          kernels::silu_mul<<<rows, kernels::threads, 0, stream_>>>(GU, m.mlp, A);
          if (!launched("silu_mul", error) ||
              !linear(cublas_, w(l, layer_tensor::w_down), hd, m.mlp, A, rows, Xc, true, true, error)) {
            return false;
          }
        }
        // Ingest (NOSA with full prefill): the layer's K, V and c, all in device memory.
        if (!ingest(p, l, prompt_views, error) || !keep_trace(p, l)) return false;
        if (caching) {
          prefill_layer data;
          if (!to_host(data) || !writer.write_layer(data, error)) return false;
        }
      }
      // The first decode input: argmax after the last prompt token.
      kernels::rmsnorm<<<1, kernels::threads, 0, stream_>>>(
          X + std::size_t(P - 1) * hd, w(spec_index(model_tensor::final_norm)), hd, m.norm_eps, H);
      if (!launched("rmsnorm", error) || !linear(cublas_, w(spec_index(model_tensor::lm_head)), m.vocab, hd, H, 1,
                                                 ws.at<float>(L.logits), true, false, error)) {
        return false;
      }
      kernels::argmax<<<1, 1024, 0, stream_>>>(ws.at<float>(L.logits), m.vocab, next);
      if (!launched("argmax", error) ||
          !cuda_ok(cudaMemcpyAsync(&first_token, next, 4, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync",
                   error) ||
          !cuda_ok(cudaStreamSynchronize(stream_), "prefill", error)) {
        return false;
      }
      if (caching && !writer.finish(first_token, error)) return false;
    }
    for (int b = p; b < run_.batch; b += run_.distinct_prompts) first_tokens[std::size_t(b)] = first_token;
  }
  if (!cuda_ok(cudaMemcpyAsync(tokens_, first_tokens.data(), first_tokens.size() * 4, cudaMemcpyHostToDevice,
                               stream_),
               "cudaMemcpyAsync", error) ||
      !cuda_ok(cudaMemcpyAsync(positions_, positions.data(), positions.size() * 4, cudaMemcpyHostToDevice,
                               stream_),
               "cudaMemcpyAsync", error)) {
    return false;
  }
  if (run_.drift > 0.0f) {
    kernels::embed<<<run_.batch, kernels::threads, 0, stream_>>>(w(spec_index(model_tensor::embed)), tokens_,
                                                                 hd, drift_state_);
    if (!launched("embed", error)) return false;
  }
  // The workspace is freed when `ws` goes out of scope, and the host vectors with the function: wait.
  return cuda_ok(cudaStreamSynchronize(stream_), "prefill", error);
}

bool cuda_engine::enqueue_layer(int i, int l, cudaStream_t s, step_profile* profile, std::string& error) {
  const model_config& m = model_;
  const lane& ln = *lanes_[std::size_t(i)];
  const int f = ln.first, n = ln.rows, hd = m.hidden, qw = m.q_width(), kvw = m.kv_width(), D = m.head_dim;
  const bool bias = uses_bias(run_.attention);
  cublasHandle_t handle = profile != nullptr ? cublas_ : ln.cublas;
  const auto mark = [&](component c) {
    if (profile != nullptr) profile->mark(c);
  };
  // This lane's rows of every activation.
  float* x = x_ + std::size_t(f) * hd;
  nosa::bf16* h = h_ + std::size_t(f) * hd;
  float* qkv = qkv_ + std::size_t(f) * (qw + 2 * kvw);
  nosa::bf16 *q = q_ + std::size_t(f) * qw, *k = k_ + std::size_t(f) * kvw, *v = v_ + std::size_t(f) * kvw;
  nosa::bf16* o = o_ + std::size_t(f) * qw;
  float* c = c_ + std::size_t(f) * m.kv_heads;
  float* gu = gu_ + std::size_t(f) * 2 * m.mlp;
  nosa::bf16* a = a_ + std::size_t(f) * m.mlp;

  kernels::rmsnorm<<<n, kernels::threads, 0, s>>>(x, w(l, layer_tensor::attn_norm), hd, m.norm_eps, h);
  if (!launched("rmsnorm", error)) return false;
  mark(component::other);
  if (!linear(handle, w(l, layer_tensor::wq), qw + 2 * kvw, hd, h, n, qkv, true, false, error)) return false;
  mark(component::gemm);
  kernels::rope_split<<<n, kernels::threads, 0, s>>>(qkv, positions_ + f, 0, m.q_heads, m.kv_heads, D,
                                                     m.rope_theta, q, k, v);
  if (!launched("rope_split", error)) return false;
  if (bias) {
    const nosa::eviction_head_args<nosa::bf16> args{
        nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(v), {n, m.kv_heads, D}),
        nosa::make_contiguous<2>(w(l, layer_tensor::evict_w), {m.kv_heads, kvw}),
        nosa::make_contiguous<1>(wf(l, layer_tensor::evict_beta), {m.kv_heads}),
        nosa::make_contiguous<1>(wf(l, layer_tensor::evict_scale), {m.kv_heads}),
        nosa::make_contiguous<2>(c, {n, m.kv_heads})};
    if (!nosa_ok(nosa::compute_eviction_scores(nosa::cuda_backend{}, args, s), "compute_eviction_scores", error))
      return false;
  }
  mark(component::other);
  // The gather overlaps attention on the lane's transfer stream, except in the profile (one stream).
  const bool overlap = profile == nullptr && ln.transfer != nullptr;
  const nosa::cuda_overlap overlap_streams{ln.transfer,
                                           overlap ? ln.overlap_events[2 * std::size_t(l)] : nullptr,
                                           overlap ? ln.overlap_events[2 * std::size_t(l) + 1] : nullptr};
  hook_context context;
  context.selected = profile == nullptr && !ln.selected.empty() ? ln.selected[std::size_t(l)] : nullptr;
  context.stream = s;
  context.profile = profile;
  context.mark = [](void* p, component comp) { static_cast<step_profile*>(p)->mark(comp); };
  const cuda_step_hooks hooks{overlap ? &overlap_streams : nullptr, &after_stage, &context};
  const nosa::step_args<nosa::bf16, nosa::bf16> args{
      nosa::make_contiguous<1>(static_cast<const std::int32_t*>(sequences_ + f), {n}),
      nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(q), {n, m.q_heads, D}),
      nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(k), {n, m.kv_heads, D}),
      nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(v), {n, m.kv_heads, D}),
      bias ? nosa::make_contiguous<2>(static_cast<const float*>(c), {n, m.kv_heads})
           : nosa::tensor_view<const float, 2>{},
      nosa::make_contiguous<3>(o, {n, m.q_heads, D})};
  if (!nosa_ok(ln.stack->step(l, args, s, &hooks), "layer " + std::to_string(l) + ": step", error)) return false;
  if (run_.trace) {
    // q, k, v and o widened to fp32 and c copied into the layer's trace, [q | k | v | o | c] over all rows.
    float* t = trace_[std::size_t(l)];
    const std::int64_t B = run_.batch, nq = B * qw, nkv = B * kvw, rq = std::int64_t(n) * qw,
                       rkv = std::int64_t(n) * kvw;
    kernels::widen<<<grid_for(rq), kernels::threads, 0, s>>>(q, rq, t + std::int64_t(f) * qw);
    kernels::widen<<<grid_for(rkv), kernels::threads, 0, s>>>(k, rkv, t + nq + std::int64_t(f) * kvw);
    kernels::widen<<<grid_for(rkv), kernels::threads, 0, s>>>(v, rkv, t + nq + nkv + std::int64_t(f) * kvw);
    kernels::widen<<<grid_for(rq), kernels::threads, 0, s>>>(o, rq, t + nq + 2 * nkv + std::int64_t(f) * qw);
    if (!launched("widen", error) ||
        !cuda_ok(cudaMemcpyAsync(t + 2 * nq + 2 * nkv + std::int64_t(f) * m.kv_heads, c,
                                 std::size_t(n) * m.kv_heads * 4, cudaMemcpyDeviceToDevice, s),
                 "cudaMemcpyAsync", error)) {
      return false;
    }
  }
  if (!linear(handle, w(l, layer_tensor::wo), hd, qw, o, n, x, true, true, error)) return false;
  mark(component::gemm);
  kernels::rmsnorm<<<n, kernels::threads, 0, s>>>(x, w(l, layer_tensor::mlp_norm), hd, m.norm_eps, h);
  if (!launched("rmsnorm", error)) return false;
  mark(component::other);
  if (!linear(handle, w(l, layer_tensor::w_gate), 2 * m.mlp, hd, h, n, gu, true, false, error)) return false;
  mark(component::gemm);
  kernels::silu_mul<<<n, kernels::threads, 0, s>>>(gu, m.mlp, a);
  if (!launched("silu_mul", error)) return false;
  mark(component::other);
  if (!linear(handle, w(l, layer_tensor::w_down), hd, m.mlp, a, n, x, true, true, error)) return false;
  mark(component::gemm);
  return true;
}

bool cuda_engine::enqueue_step(step_profile* profile, std::string& error) {
  const model_config& m = model_;
  const int B = run_.batch, hd = m.hidden, L = layout_.lanes;
  const auto mark = [&](component c) {
    if (profile != nullptr) profile->mark(c);
  };
  mark(component::other);  // the start
  if (run_.drift > 0.0f) {
    if (!cuda_ok(
            cudaMemcpyAsync(x_, drift_state_, std::size_t(B) * hd * 4, cudaMemcpyDeviceToDevice, stream_),
            "cudaMemcpyAsync", error)) {
      return false;
    }
  } else {
    kernels::embed<<<B, kernels::threads, 0, stream_>>>(w(spec_index(model_tensor::embed)), tokens_, hd, x_);
    if (!launched("embed", error)) return false;
  }
  mark(component::other);
  // The lanes fork from the engine's stream (in the profile everything stays on it).
  if (profile == nullptr) {
    if (!cuda_ok(cudaEventRecord(fork_, stream_), "cudaEventRecord", error)) return false;
    for (const auto& ln : lanes_) {
      if (!cuda_ok(cudaStreamWaitEvent(ln->stream, fork_, 0), "cudaStreamWaitEvent", error)) return false;
    }
  }
  for (int l = 0; l < m.layers; ++l) {
    for (int i = 0; i < L; ++i) {
      const lane& ln = *lanes_[std::size_t(i)];
      const cudaStream_t s = profile != nullptr ? stream_ : ln.stream;
      if (profile == nullptr && L > 1) {
        // Half a layer apart: after the previous lane's selection of this layer (lane 0: the last lane's
        // selection of the layer before).
        const cudaEvent_t after = i > 0 ? lanes_[std::size_t(i - 1)]->selected[std::size_t(l)]
                                        : (l > 0 ? lanes_[std::size_t(L - 1)]->selected[std::size_t(l - 1)] : nullptr);
        if (after != nullptr && !cuda_ok(cudaStreamWaitEvent(s, after, 0), "cudaStreamWaitEvent", error))
          return false;
      }
      if (!enqueue_layer(i, l, s, profile, error)) return false;
    }
  }
  if (profile == nullptr) {
    for (const auto& ln : lanes_) {
      if (!cuda_ok(cudaEventRecord(ln->done, ln->stream), "cudaEventRecord", error) ||
          !cuda_ok(cudaStreamWaitEvent(stream_, ln->done, 0), "cudaStreamWaitEvent", error)) {
        return false;
      }
    }
  }
  kernels::rmsnorm<<<B, kernels::threads, 0, stream_>>>(x_, w(spec_index(model_tensor::final_norm)), hd,
                                                        m.norm_eps, h_);
  if (!launched("rmsnorm", error)) return false;
  mark(component::other);
  if (!linear(cublas_, w(spec_index(model_tensor::lm_head)), m.vocab, hd, h_, B, logits_, true, false, error))
    return false;
  mark(component::gemm);
  kernels::argmax<<<B, 1024, 0, stream_>>>(logits_, m.vocab, tokens_);
  kernels::advance<<<B, kernels::threads, 0, stream_>>>(positions_,
                                                        run_.drift > 0.0f ? drift_state_ : nullptr,
                                                        drift_step_, run_.drift, run_.prompt_seed, hd, B);
  if (run_.drift > 0.0f) kernels::count_step<<<1, 1, 0, stream_>>>(drift_step_);
  if (!launched("argmax/advance", error)) return false;
  mark(component::other);
  if (profile != nullptr && profile->failed) {
    error = "profile: cannot record events";
    return false;
  }
  return true;
}

bool cuda_engine::capture(std::string& error) {
  if (!cuda_ok(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture",
               error))
    return false;
  const bool enqueued = enqueue_step(nullptr, error);
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
  if (!enqueued) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    return false;
  }
  if (!cuda_ok(ended, "cudaStreamEndCapture", error)) return false;
  const cudaError_t made = cudaGraphInstantiate(&graph_, graph, 0);
  cudaGraphDestroy(graph);
  return cuda_ok(made, "cudaGraphInstantiate", error);
}

bool cuda_engine::plan(std::string& error) {
  if (steps_done_ >= run_.steps) {
    error = "the run was sized for " + std::to_string(run_.steps) + " steps";
    return false;
  }
  if (steps_done_ % run_.reserve_ahead == 0) {
    const int ahead = std::min(run_.reserve_ahead, run_.steps - steps_done_);
    for (const auto& ln : lanes_) {
      if (!nosa_ok(ln->stack->reserve(ahead, stream_), "reserve", error)) return false;
    }
  }
  return true;
}

bool cuda_engine::step(std::string& error) {
  if (!plan(error)) return false;
  if (steps_done_ == 0) {
    // The first step runs eagerly: every kernel it uses (cuBLAS's choices for this batch, nosa's, ours) is
    // loaded before the capture of the second.
    if (!enqueue_step(nullptr, error)) return false;
  } else {
    if (graph_ == nullptr && !capture(error)) return false;
    if (!cuda_ok(cudaGraphLaunch(graph_, stream_), "cudaGraphLaunch", error)) return false;
  }
  ++steps_done_;
  return !run_.trace || copy_traces(error);
}

bool cuda_engine::profile_step(std::vector<std::pair<std::string, double>>& ms, std::string& error) {
  if (!plan(error) || !cuda_ok(cudaStreamSynchronize(stream_), "profile", error)) return false;
  step_profile profile;
  profile.stream = stream_;
  if (!enqueue_step(&profile, error) || !cuda_ok(cudaStreamSynchronize(stream_), "profile", error)) return false;
  ++steps_done_;
  double sum[static_cast<int>(component::count)] = {};
  for (std::size_t i = 1; i < profile.marks.size(); ++i) {
    float t = 0.0f;
    if (!cuda_ok(cudaEventElapsedTime(&t, profile.marks[i - 1].second, profile.marks[i].second),
                 "cudaEventElapsedTime", error))
      return false;
    sum[static_cast<int>(profile.marks[i].first)] += t;
  }
  ms.clear();
  double total = 0.0;
  for (int c = 0; c < static_cast<int>(component::count); ++c) {
    ms.emplace_back(component_names[c], sum[c]);
    total += sum[c];
  }
  ms.emplace_back("total", total);
  return true;
}

bool cuda_engine::copy_traces(std::string& error) {
  const std::size_t B = std::size_t(run_.batch), nq = B * model_.q_width(), nkv = B * model_.kv_width();
  std::vector<float> all(2 * nq + 2 * nkv + B * model_.kv_heads);
  for (int l = 0; l < model_.layers; ++l) {
    if (!cuda_ok(cudaMemcpyAsync(all.data(), trace_[std::size_t(l)], all.size() * 4, cudaMemcpyDeviceToHost,
                                 stream_),
                 "cudaMemcpyAsync", error) ||
        !cuda_ok(cudaStreamSynchronize(stream_), "copying traces", error)) {
      return false;
    }
    layer_trace& t = step_trace_[std::size_t(l)];
    t.q.assign(all.begin(), all.begin() + nq);
    t.k.assign(all.begin() + nq, all.begin() + nq + nkv);
    t.v.assign(all.begin() + nq + nkv, all.begin() + nq + 2 * nkv);
    t.o.assign(all.begin() + nq + 2 * nkv, all.begin() + 2 * nq + 2 * nkv);
    t.c.assign(all.begin() + 2 * nq + 2 * nkv, all.end());
    if (!uses_bias(run_.attention)) std::fill(t.c.begin(), t.c.end(), 0.0f);
  }
  return true;
}

bool cuda_engine::finish(std::string& error) {
  if (!cuda_ok(cudaStreamSynchronize(stream_), "decode", error)) return false;
  for (std::size_t i = 0; i < lanes_.size(); ++i) {
    for (int l = 0; l < model_.layers; ++l) {
      if (!nosa_ok(lanes_[i]->stack->step_status(l, stream_),
                   "lane " + std::to_string(i) + " layer " + std::to_string(l) + ": step_status", error))
        return false;
    }
  }
  return true;
}

std::vector<std::int32_t> cuda_engine::selection(int l, int b, int h) {
  return lanes_[std::size_t(layout_.lane_of(b))]->stack->selection(l, layout_.local(b), h, stream_);
}

std::vector<std::int32_t> cuda_engine::tokens() {
  std::vector<std::int32_t> t(static_cast<std::size_t>(run_.batch));
  cudaMemcpyAsync(t.data(), tokens_, t.size() * 4, cudaMemcpyDeviceToHost, stream_);
  cudaStreamSynchronize(stream_);
  return t;
}

nosa::counters cuda_engine::total_counters() {
  nosa::counters sum;
  for (const auto& ln : lanes_) {
    for (int l = 0; l < model_.layers; ++l) sum += ln->stack->total_counters(l, stream_);
  }
  return sum;
}

double cuda_engine::device_bytes() const {
  double bytes = double(weights_.size() + weights_f32_.size() + act_.size() + cublas_workspace_.size());
  for (const auto& ln : lanes_) bytes += double(ln->workspace.size()) + double(ln->stack->arena_bytes().device);
  return bytes;
}

double cuda_engine::host_bytes() const {
  double bytes = 0.0;
  for (const auto& ln : lanes_) bytes += double(ln->stack->arena_bytes().host);
  return bytes;
}

namespace {

/// The shortest time of `runs` runs of `enqueue()` on `s`, after `warmups` untimed ones, in ms (events).
template <class Enqueue>
bool best_time_ms(cudaStream_t s, int warmups, int runs, Enqueue&& enqueue, float& best, std::string& error) {
  cudaEvent_t start = nullptr, stop = nullptr;
  bool ok = cuda_ok(cudaEventCreate(&start), "cudaEventCreate", error) &&
            cuda_ok(cudaEventCreate(&stop), "cudaEventCreate", error);
  best = 0.0f;
  for (int i = 0; ok && i < warmups + runs; ++i) {
    ok = cuda_ok(cudaEventRecord(start, s), "cudaEventRecord", error) && enqueue() &&
         cuda_ok(cudaEventRecord(stop, s), "cudaEventRecord", error) &&
         cuda_ok(cudaEventSynchronize(stop), "cudaEventSynchronize", error);
    float t = 0.0f;
    if (ok && i >= warmups && cuda_ok(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime", error) &&
        (best == 0.0f || t < best))
      best = t;
  }
  if (stop != nullptr) cudaEventDestroy(stop);
  if (start != nullptr) cudaEventDestroy(start);
  return ok && best > 0.0f;
}

/// A stream and buffers of a start-up measurement, released however it ends.
struct measurement {
  cudaStream_t stream = nullptr;
  void* host = nullptr;
  void* device = nullptr;
  void* device2 = nullptr;
  measurement() = default;
  measurement(const measurement&) = delete;
  measurement& operator=(const measurement&) = delete;
  ~measurement() {
    if (stream != nullptr) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
    cudaFree(device2);
    cudaFree(device);
    if (host != nullptr) cudaFreeHost(host);
  }
  bool create(std::string& error) {
    return cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate", error);
  }
};

constexpr int measurement_warmups = 2, measurement_runs = 5;

}  // namespace

bool measure_h2d_copy(double& gb_per_s, std::string& error) {
  constexpr std::size_t bytes = std::size_t(64) << 20;
  measurement m;
  float best = 0.0f;
  const bool ok =
      m.create(error) &&
      cuda_ok(cudaHostAlloc(&m.host, bytes, cudaHostAllocDefault), "cudaHostAlloc", error) &&
      cuda_ok(cudaMalloc(&m.device, bytes), "cudaMalloc", error) &&
      best_time_ms(
          m.stream, measurement_warmups, measurement_runs,
          [&] {
            return cuda_ok(cudaMemcpyAsync(m.device, m.host, bytes, cudaMemcpyHostToDevice, m.stream),
                           "cudaMemcpyAsync", error);
          },
          best, error);
  gb_per_s = ok ? double(bytes) / (double(best) * 1e-3) / 1e9 : 0.0;
  return ok;
}

bool measure_gather(std::size_t block_bytes, double& bytes_per_s, std::string& error) {
  constexpr std::size_t pool_bytes = std::size_t(256) << 20, moved = std::size_t(64) << 20;
  const int blocks = static_cast<int>(pool_bytes / block_bytes),
            pairs = static_cast<int>(moved / block_bytes / 2);
  // Random blocks, as the misses of a step are (a fixed seed: the same places in every run).
  std::vector<std::int32_t> ids(2 * std::size_t(pairs));
  std::uint64_t x = 0x9E3779B97F4A7C15ull;
  for (std::int32_t& id : ids) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    id = static_cast<std::int32_t>(x % std::uint64_t(blocks));
  }
  measurement m;
  void* pool = nullptr;
  float best = 0.0f;
  const bool ok =
      m.create(error) &&
      cuda_ok(cudaHostAlloc(&m.host, pool_bytes, cudaHostAllocMapped), "cudaHostAlloc", error) &&
      cuda_ok(cudaHostGetDevicePointer(&pool, m.host, 0), "cudaHostGetDevicePointer", error) &&
      cuda_ok(cudaMalloc(&m.device, moved), "cudaMalloc", error) &&
      cuda_ok(cudaMalloc(&m.device2, ids.size() * 4), "cudaMalloc", error) &&
      cuda_ok(cudaMemcpyAsync(m.device2, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice, m.stream),
              "cudaMemcpyAsync", error) &&
      best_time_ms(
          m.stream, measurement_warmups, measurement_runs,
          [&] {
            kernels::
                gather_pairs<<<nosa::detail::gather_target_ctas, nosa::detail::cuda_threads, 0, m.stream>>>(
                    static_cast<const std::byte*>(pool), static_cast<const std::int32_t*>(m.device2), pairs,
                    block_bytes, static_cast<std::byte*>(m.device));
            return launched("gather_pairs", error);
          },
          best, error);
  bytes_per_s = ok ? double(2 * std::size_t(pairs) * block_bytes) / (double(best) * 1e-3) : 0.0;
  return ok;
}

bool measure_hbm_read(double& bytes_per_s, std::string& error) {
  std::size_t free_bytes = 0, total_bytes = 0;
  if (!cuda_ok(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo", error)) return false;
  const std::size_t bytes = std::min(std::size_t(2) << 30, free_bytes / 4 / 16 * 16);
  int device = 0, sms = 0;
  if (!cuda_ok(cudaGetDevice(&device), "cudaGetDevice", error) ||
      !cuda_ok(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute",
               error))
    return false;
  const int ctas = 4 * sms;
  measurement m;
  float best = 0.0f;
  const bool ok =
      m.create(error) && cuda_ok(cudaMalloc(&m.device, bytes), "cudaMalloc", error) &&
      cuda_ok(cudaMalloc(&m.device2, std::size_t(ctas) * 4), "cudaMalloc", error) &&
      cuda_ok(cudaMemsetAsync(m.device, 1, bytes, m.stream), "cudaMemsetAsync", error) &&
      best_time_ms(
          m.stream, measurement_warmups, measurement_runs,
          [&] {
            kernels::read_words<<<ctas, 512, 0, m.stream>>>(static_cast<const uint4*>(m.device), bytes / 16,
                                                            static_cast<unsigned*>(m.device2));
            return launched("read_words", error);
          },
          best, error);
  bytes_per_s = ok ? double(bytes) / (double(best) * 1e-3) : 0.0;
  return ok;
}

nosa::counters cuda_engine::layer_counters(int l) {
  nosa::counters sum;
  for (const auto& ln : lanes_) sum += ln->stack->total_counters(l, stream_);
  return sum;
}

bool cuda_engine::measure_gemms(const std::vector<int>& rows, gemm_curve& layer, gemm_curve& head,
                                std::string& error) {
  const model_config& m = model_;
  const int most = rows.empty() ? 0 : *std::max_element(rows.begin(), rows.end());
  const int held = std::max(most, run_.batch);
  const decode_layout d(m, held);
  device_memory scratch;
  if (most > run_.batch && !cuda_ok(scratch.allocate(d.size), "cudaMalloc (GEMM measurement)", error))
    return false;
  std::byte* base = most > run_.batch ? scratch.at<std::byte>(0) : act_.at<std::byte>(0);
  const auto at = [&](std::size_t offset) { return base + offset; };
  auto* x = reinterpret_cast<float*>(at(d.x));
  auto* h = reinterpret_cast<nosa::bf16*>(at(d.h));
  auto* qkv = reinterpret_cast<float*>(at(d.qkv));
  auto* o = reinterpret_cast<nosa::bf16*>(at(d.o));
  auto* gu = reinterpret_cast<float*>(at(d.gu));
  auto* a = reinterpret_cast<nosa::bf16*>(at(d.a));
  auto* logits = reinterpret_cast<float*>(at(d.logits));
  // Inputs of unit variance, as the decode step's are (values do not change a GEMM's work, but zeros draw
  // less power than data).
  const std::size_t n = std::size_t(held);
  kernels::init_tensor<<<grid_for(n * m.hidden), kernels::threads, 0, stream_>>>(
      h, n * m.hidden, init_kind::uniform, 1.7f, 7, 1);
  kernels::init_tensor<<<grid_for(n * m.q_width()), kernels::threads, 0, stream_>>>(
      o, n * m.q_width(), init_kind::uniform, 1.7f, 7, 2);
  kernels::init_tensor<<<grid_for(n * m.mlp), kernels::threads, 0, stream_>>>(a, n * m.mlp,
                                                                              init_kind::uniform, 1.7f, 7, 3);
  if (!launched("init_tensor", error)) return false;
  const int qw = m.q_width(), kvw = m.kv_width(), hd = m.hidden;
  layer.points.clear();
  head.points.clear();
  for (const int r : rows) {
    float t = 0.0f;
    if (!best_time_ms(
            stream_, 1, 3,
            [&] {
              return linear(cublas_, w(0, layer_tensor::wq), qw + 2 * kvw, hd, h, r, qkv, true, false,
                            error) &&
                     linear(cublas_, w(0, layer_tensor::wo), hd, qw, o, r, x, true, true, error) &&
                     linear(cublas_, w(0, layer_tensor::w_gate), 2 * m.mlp, hd, h, r, gu, true, false,
                            error) &&
                     linear(cublas_, w(0, layer_tensor::w_down), hd, m.mlp, a, r, x, true, true, error);
            },
            t, error))
      return false;
    layer.points.emplace_back(r, 1e-3 * t);
    if (!best_time_ms(
            stream_, 1, 3,
            [&] {
              return linear(cublas_, w(spec_index(model_tensor::lm_head)), m.vocab, hd, h, r, logits, true,
                            false, error);
            },
            t, error))
      return false;
    head.points.emplace_back(r, 1e-3 * t);
  }
  return cuda_ok(cudaStreamSynchronize(stream_), "measuring the GEMMs", error);
}

int largest_batch(const model_config& m, const run_config& run, bool distinct_per_sequence, double hbm_bytes,
                  double host_bytes, std::string& error) {
  const double fixed = weight_bytes(m) + double(cublas_workspace_bytes) +
                       double(prefill_workspace_bytes(m, run.prompt_tokens));
  const auto fits = [&](int batch) {
    run_config r = run;
    r.batch = batch;
    r.distinct_prompts = distinct_per_sequence ? batch : std::min(run.distinct_prompts, batch);
    const lane_layout lanes(batch, cuda_lanes(r, batch));
    double device = fixed + double(decode_activation_bytes(m, batch)), host = 0.0;
    for (int i = 0; i < lanes.lanes; ++i) {
      nosa::arena_sizes arenas;
      const nosa::status s =
          cuda_stack_bytes(run.attention, m.head_dim, layer_config_for(m, lanes.lane_run(r, i)), m.layers, arenas);
      if (!nosa::ok(s)) {
        error = "sizing the layers: " + std::string(nosa::to_string(s));
        return false;
      }
      device += double(arenas.device) + double(cublas_workspace_bytes);
      host += double(arenas.host);
    }
    return device <= hbm_bytes && host <= host_bytes;
  };
  if (!fits(1)) return 0;
  int lo = 1, hi = 2;
  while (hi <= (1 << 16) && fits(hi)) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const int mid = lo + (hi - lo) / 2;
    (fits(mid) ? lo : hi) = mid;
  }
  return lo;
}

namespace {

/// Sequences of the calibration run of --batch auto and --cache-slots auto.
constexpr int calibration_rows = 4;
/// Row counts at which the calibration times the GEMMs (the prediction interpolates between them).
const std::vector<int> calibration_gemm_rows{1, 16, 64, 256, 1024};

/// --batch auto and --cache-slots auto: a calibration engine of a few sequences times the GEMMs and, for
/// the offloading methods, measures the misses of each slot-cache size from its selections; then the batch
/// and size of the highest predicted tokens/s that fit the budgets go into `run`, and the prediction into
/// the report. The calibration engine is freed before the run's engine is created.
bool size_for_throughput(const model_config& model, const options& opt, const host_weights* weights,
                         const device_speeds& speeds, double hbm, double host, run_config& run, run_report& r,
                         std::string& error) {
  const auto t0 = std::chrono::steady_clock::now();
  run_config cal = run;
  cal.batch = calibration_rows;
  cal.distinct_prompts =
      opt.distinct_per_sequence ? calibration_rows : std::min(run.distinct_prompts, calibration_rows);
  cal.lanes = 1;
  cal.cache_slots = 0;
  cal.steps = opt.warmup + opt.calibration_steps;
  throughput_inputs in;
  in.model = model;
  in.run = run;
  in.first_step = opt.warmup;
  in.steps = opt.run.steps;
  in.speeds = speeds;
  const bool offloaded = offloads(run.attention);
  const std::vector<int> sizes = !offloaded             ? std::vector<int>{0}
                                 : opt.cache_slots_auto ? nosa::cache_slot_candidates(model.selection.top_k)
                                                        : std::vector<int>{run.cache_slots};
  {
    const auto engine = cuda_engine::create(model, weights, cal, error);
    if (!engine || !engine->measure_gemms(calibration_gemm_rows, in.layer_gemm, in.head_gemm, error))
      return false;
    if (offloaded &&
        (!engine->prefill(error) ||
         !calibrate_misses(*engine, sizes, opt.warmup, opt.calibration_steps, in.misses, error) ||
         !engine->finish(error)))
      return false;
  }
  r.calibration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto largest = [&](int size) {
    run_config t = run;
    t.cache_slots = size;
    return largest_batch(model, t, opt.distinct_per_sequence, hbm, host, error);
  };
  const sizing_choice choice = choose_sizing(in, sizes, opt.batch_auto ? 0 : run.batch, largest, error);
  if (!error.empty()) return false;
  if (choice.best.batch == 0) {
    error = opt.batch_auto
                ? "not even one sequence of " + std::to_string(run.prompt_tokens) + " tokens fits the budgets"
                : "batch " + std::to_string(run.batch) + " does not fit the budgets at any cache size";
    return false;
  }
  for (const prediction& p : choice.per_size) r.sizing.push_back({p.cache_slots, p.batch, p.tokens_per_s()});
  run.batch = choice.best.batch;
  run.cache_slots = choice.best.cache_slots;
  r.cache_slots_auto = opt.cache_slots_auto;
  r.predicted_tokens_per_s = choice.best.tokens_per_s();
  r.predicted_ms_per_step = 1e3 * choice.best.bound.step_s;
  r.predicted_misses_per_step = choice.best.misses_per_step;
  return true;
}

/// The roofline of the timed steps into the report: each layer's gathered bytes per step (from `before` and
/// `after`, its counters around the timed steps) against the HBM bytes of its steps and its GEMMs, timed
/// on the run's own engine at each lane's rows before the prefill (`layer_gemm`, `head_gemm`).
bool report_roofline(const cuda_engine& engine, const std::vector<nosa::counters>& before,
                     const std::vector<nosa::counters>& after, const gemm_curve& layer_gemm,
                     const gemm_curve& head_gemm, const device_speeds& speeds, int first_step, int steps,
                     run_report& r, std::string& error) {
  layer_traffic traffic;
  const nosa::status s = traffic_of(engine.model(), engine.run(), first_step, steps, traffic);
  if (!nosa_ok(s, "sizing the layers", error)) return false;
  std::vector<double> gather(before.size());
  for (std::size_t l = 0; l < gather.size(); ++l)
    gather[l] = double((after[l] - before[l]).bytes_h2d) / steps;
  double gemm = 0.0;
  for (int i = 0; i < engine.lanes().lanes; ++i) gemm += layer_gemm.seconds(engine.lanes().rows(i));
  const step_bound b = measured_roofline(gather, engine.run().batch * traffic.hbm_bytes, gemm,
                                         head_gemm.seconds(engine.run().batch), speeds);
  r.roofline_ms = 1e3 * b.step_s;
  r.roofline_gather_ms = 1e3 * b.gather_s;
  r.roofline_hbm_ms = 1e3 * b.hbm_s;
  r.roofline_gemm_ms = 1e3 * b.gemm_s;
  return true;
}

}  // namespace

bool run_cuda_engine(const model_config& model, const options& opt, run_report& r, std::string& error) {
  // The speeds first, while the card is still empty: the copy engine's, the gather's (of blocks of the
  // method's format: half the run in FP8) and HBM's.
  device_speeds speeds;
  layer_traffic blocks;
  if (!nosa_ok(traffic_of(model, opt.run, 0, 0, blocks), "sizing the layers", error)) return false;
  if (!measure_h2d_copy(r.link_h2d_gb_per_s, error) ||
      !measure_gather(blocks.block_run_bytes, speeds.gather, error) || !measure_hbm_read(speeds.hbm, error))
    return false;
  speeds.copy = 1e9 * r.link_h2d_gb_per_s;
  r.gather_gb_per_s = speeds.gather / 1e9;
  r.hbm_gb_per_s = speeds.hbm / 1e9;
  std::size_t free_bytes = 0, total_bytes = 0;
  if (!cuda_ok(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo", error)) return false;
  // The whole card: what is free now, less 1 GiB for the CUDA context's own growth (graphs, cuBLAS).
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const double hbm = opt.hbm_gib > 0 ? opt.hbm_gib * gib : double(free_bytes) - gib;
  const double host = opt.host_gib > 0
                          ? opt.host_gib * gib
                          : 0.8 * double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
  run_config run = opt.run;
  run.steps = opt.run.steps + opt.warmup + (opt.profile ? 1 : 0);

  std::optional<host_weights> weights;
  if (!opt.weights.empty()) {
    weights = load_weights(opt.weights, model, error);
    if (!weights) return false;
  } else if (!opt.save_weights.empty()) {
    weights = random_weights(model, run.weight_seed);
  }
  if (weights && !opt.save_weights.empty() && !save_weights(opt.save_weights, model, *weights, error))
    return false;

  if (opt.batch_auto || opt.cache_slots_auto) {
    if (!size_for_throughput(model, opt, weights ? &*weights : nullptr, speeds, hbm, host, run, r, error))
      return false;
  } else if (largest_batch(model, run, opt.distinct_per_sequence, hbm, host, error) < run.batch) {
    if (error.empty()) {
      error = "batch " + std::to_string(run.batch) + " does not fit the HBM budget (" +
              std::to_string(hbm / gib) + " GiB) and host budget (" + std::to_string(host / gib) +
              " GiB); try --batch auto";
    }
    return false;
  }
  if (opt.distinct_per_sequence) run.distinct_prompts = run.batch;
  run.distinct_prompts = std::min(run.distinct_prompts, run.batch);
  r.batch = run.batch;
  r.cache_slots = offloads(run.attention) ? run.cache_slots : 0;
  r.distinct_prompts = run.distinct_prompts;
  r.shared_blocks =
      shared_prompt_blocks(run.attention, run.share_prompts, run.prompt_tokens, model.selection.block_size);
  r.hbm_budget_bytes = hbm;
  std::fprintf(stderr, "nosa-engine: %s, %s, batch %d, context %d, %d cache slots\n", model.name.c_str(),
               r.method.c_str(), run.batch, run.prompt_tokens, r.cache_slots);

  const auto engine = cuda_engine::create(model, weights ? &*weights : nullptr, run, error);
  if (!engine) return false;
  weights.reset();
  r.lanes = engine->lanes().lanes;
  // The GEMMs at this run's rows (each lane's, and the whole batch for the LM head), for the roofline.
  std::vector<int> gemm_rows{run.batch};
  for (int i = 0; i < r.lanes; ++i) gemm_rows.push_back(engine->lanes().rows(i));
  std::sort(gemm_rows.begin(), gemm_rows.end());
  gemm_rows.erase(std::unique(gemm_rows.begin(), gemm_rows.end()), gemm_rows.end());
  gemm_curve layer_gemm, head_gemm;
  if (!engine->measure_gemms(gemm_rows, layer_gemm, head_gemm, error)) return false;

  auto t0 = std::chrono::steady_clock::now();
  if (!engine->prefill(error)) return false;
  r.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.prefill_cached = engine->prefill_cached();
  for (int s = 0; s < opt.warmup; ++s) {
    if (!engine->step(error)) return false;
  }
  if (!engine->finish(error)) return false;
  const auto layer_counters = [&] {
    std::vector<nosa::counters> c(std::size_t(model.layers));
    for (int l = 0; l < model.layers; ++l) c[std::size_t(l)] = engine->layer_counters(l);
    return c;
  };
  const std::vector<nosa::counters> layers_before = layer_counters();
  const nosa::counters before = engine->total_counters();
  progress_line progress(opt.run.steps);
  t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < opt.run.steps; ++s) {
    if (!engine->step(error)) return false;
    if (progress.due(s + 1)) {
      if (!engine->finish(error)) return false;
      progress.print(s + 1, run.batch, double((engine->total_counters() - before).misses));
    }
  }
  if (!engine->finish(error)) return false;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  finish_report(r, engine->total_counters() - before, seconds, model.kv_heads);
  if (!report_roofline(*engine, layers_before, layer_counters(), layer_gemm, head_gemm, speeds, opt.warmup,
                       opt.run.steps, r, error))
    return false;
  r.device_bytes = engine->device_bytes();
  r.host_bytes = engine->host_bytes();
  r.last_tokens = engine->tokens();
  if (opt.profile && (!engine->profile_step(r.profile_ms, error) || !engine->finish(error))) return false;
  return true;
}

}  // namespace nosa_engine
