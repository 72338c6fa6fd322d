// The CUDA engine (see cuda_engine.cuh) and the `nosa-engine --backend cuda` run.

#include "../cuda_engine.hpp"
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

std::unique_ptr<cuda_engine> cuda_engine::create(const model_config& model, const host_weights* weights,
                                                 const run_config& run, std::string& error) {
  if (!validate_workload(run, error)) return nullptr;
  std::unique_ptr<cuda_engine> e(new cuda_engine());
  e->model_ = model;
  e->run_ = run;
  if (!cuda_ok(cudaStreamCreateWithFlags(&e->stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
               error))
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
  const nosa::status s =
      make_cuda_stack(run.attention, model.head_dim, layer_config_for(model, run), model.layers, e->stack_);
  if (!nosa_ok(s, "creating the " + std::string(method_name(run.attention)) + " layers", error))
    return nullptr;
  if (!e->allocate_activations(error)) return nullptr;
  if (run.overlap && offloads(run.attention)) {
    if (!cuda_ok(cudaStreamCreateWithFlags(&e->transfer_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags",
                 error)) {
      return nullptr;
    }
    e->overlap_events_.assign(2 * static_cast<std::size_t>(model.layers), nullptr);
    for (cudaEvent_t& ev : e->overlap_events_) {
      if (!cuda_ok(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags",
                   error)) {
        return nullptr;
      }
    }
  }
  return e;
}

cuda_engine::~cuda_engine() {
  if (graph_ != nullptr) cudaGraphExecDestroy(graph_);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (transfer_ != nullptr) {
    cudaStreamSynchronize(transfer_);
    cudaStreamDestroy(transfer_);
  }
  for (cudaEvent_t ev : overlap_events_) {
    if (ev != nullptr) cudaEventDestroy(ev);
  }
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
  std::vector<std::int32_t> rows(static_cast<std::size_t>(run_.batch));
  for (int b = 0; b < run_.batch; ++b) rows[std::size_t(b)] = b;
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

bool cuda_engine::linear(const nosa::bf16* w, int out, int in, const nosa::bf16* x, int rows, void* y,
                         bool f32_out, bool accumulate, std::string& error) {
  // Row-major Y[rows][out] = X[rows][in] W[out][in]^T is, column-major, Y^T = W^T(as stored) ... i.e.
  // C (out x rows) = op_T(A: in x out) * B (in x rows).
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  return cublas_ok(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w, CUDA_R_16BF, in,
                                x, CUDA_R_16BF, in, &beta, y, f32_out ? CUDA_R_32F : CUDA_R_16BF, out,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx", error);
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
  std::vector<std::int32_t> positions(std::size_t(run_.batch), P);
  for (int p = 0; p < run_.distinct_prompts; ++p) {
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
            !linear(w(l, layer_tensor::wq), qkvw, hd, H, rows, QKV, true, false, error))
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
        if (!linear(w(l, layer_tensor::wo), hd, qw, O, rows, Xc, true, true, error)) return false;
        kernels::rmsnorm<<<rows, kernels::threads, 0, stream_>>>(Xc, w(l, layer_tensor::mlp_norm), hd,
                                                                 m.norm_eps, H);
        if (!launched("rmsnorm", error) ||
            !linear(w(l, layer_tensor::w_gate), 2 * m.mlp, hd, H, rows, GU, true, false, error)) {
          return false;
        }
        kernels::silu_mul<<<rows, kernels::threads, 0, stream_>>>(GU, m.mlp, A);
        if (!launched("silu_mul", error) ||
            !linear(w(l, layer_tensor::w_down), hd, m.mlp, A, rows, Xc, true, true, error)) {
          return false;
        }
      }
      // Ingest (NOSA with full prefill): the layer's K, V and c, all in device memory.
      const nosa::prompt_args<nosa::bf16> prompt_views{
          nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(K), {P, m.kv_heads, D}),
          nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(V), {P, m.kv_heads, D}),
          bias ? nosa::make_contiguous<2>(static_cast<const float*>(Cs), {P, m.kv_heads})
               : nosa::tensor_view<const float, 2>{},
          nosa::make_contiguous<2>(static_cast<const nosa::bf16*>(last_q), {m.q_heads, D})};
      const int shared = shared_prompt_blocks(run_.attention, run_.share_prompts, P, m.selection.block_size);
      for (int b = p; b < run_.batch; b += run_.distinct_prompts) {
        // The first sequence of the prompt stores it; the others reference its complete blocks.
        const nosa::shared_prefix share = b == p ? nosa::shared_prefix{} : nosa::shared_prefix{p, shared};
        if (!nosa_ok(stack_->add_sequence(l, b, prompt_views, share, stream_), "add_sequence", error))
          return false;
      }
      if (run_.trace) {
        prompt_trace& tr = prompt_trace_[std::size_t(p * m.layers + l)];
        std::vector<nosa::bf16> kb(std::size_t(P) * kvw), vb(kb.size());
        tr.c.assign(std::size_t(P) * m.kv_heads, 0.0f);
        if (!cuda_ok(cudaMemcpy(kb.data(), K, kb.size() * 2, cudaMemcpyDeviceToHost), "cudaMemcpy", error) ||
            !cuda_ok(cudaMemcpy(vb.data(), V, vb.size() * 2, cudaMemcpyDeviceToHost), "cudaMemcpy", error) ||
            (bias && !cuda_ok(cudaMemcpy(tr.c.data(), Cs, tr.c.size() * 4, cudaMemcpyDeviceToHost),
                              "cudaMemcpy", error))) {
          return false;
        }
        tr.k.resize(kb.size());
        tr.v.resize(vb.size());
        for (std::size_t i = 0; i < kb.size(); ++i) {
          tr.k[i] = nosa::to_float(kb[i]);
          tr.v[i] = nosa::to_float(vb[i]);
        }
      }
    }
    // The first decode input: argmax after the last prompt token, for every sequence of this prompt.
    std::int32_t* next = ws.at<std::int32_t>(L.next_token);
    kernels::rmsnorm<<<1, kernels::threads, 0, stream_>>>(
        X + std::size_t(P - 1) * hd, w(spec_index(model_tensor::final_norm)), hd, m.norm_eps, H);
    if (!launched("rmsnorm", error) || !linear(w(spec_index(model_tensor::lm_head)), m.vocab, hd, H, 1,
                                               ws.at<float>(L.logits), true, false, error)) {
      return false;
    }
    kernels::argmax<<<1, 1024, 0, stream_>>>(ws.at<float>(L.logits), m.vocab, next);
    if (!launched("argmax", error)) return false;
    for (int b = p; b < run_.batch; b += run_.distinct_prompts) {
      if (!cuda_ok(cudaMemcpyAsync(tokens_ + b, next, 4, cudaMemcpyDeviceToDevice, stream_),
                   "cudaMemcpyAsync", error))
        return false;
    }
  }
  if (!cuda_ok(cudaMemcpyAsync(positions_, positions.data(), positions.size() * 4, cudaMemcpyHostToDevice,
                               stream_),
               "cudaMemcpyAsync", error)) {
    return false;
  }
  if (run_.drift > 0.0f) {
    kernels::embed<<<run_.batch, kernels::threads, 0, stream_>>>(w(spec_index(model_tensor::embed)), tokens_,
                                                                 hd, drift_state_);
    if (!launched("embed", error)) return false;
  }
  // The workspace is freed when `ws` goes out of scope: wait for the work that uses it.
  return cuda_ok(cudaStreamSynchronize(stream_), "prefill", error);
}

bool cuda_engine::enqueue_step(std::string& error) {
  const model_config& m = model_;
  const int B = run_.batch, hd = m.hidden, qw = m.q_width(), kvw = m.kv_width(), D = m.head_dim;
  const bool bias = uses_bias(run_.attention);
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
  for (int l = 0; l < m.layers; ++l) {
    kernels::rmsnorm<<<B, kernels::threads, 0, stream_>>>(x_, w(l, layer_tensor::attn_norm), hd, m.norm_eps,
                                                          h_);
    if (!launched("rmsnorm", error) ||
        !linear(w(l, layer_tensor::wq), qw + 2 * kvw, hd, h_, B, qkv_, true, false, error))
      return false;
    kernels::rope_split<<<B, kernels::threads, 0, stream_>>>(qkv_, positions_, 0, m.q_heads, m.kv_heads, D,
                                                             m.rope_theta, q_, k_, v_);
    if (!launched("rope_split", error)) return false;
    if (bias) {
      const nosa::eviction_head_args<nosa::bf16> args{
          nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(v_), {B, m.kv_heads, D}),
          nosa::make_contiguous<2>(w(l, layer_tensor::evict_w), {m.kv_heads, kvw}),
          nosa::make_contiguous<1>(wf(l, layer_tensor::evict_beta), {m.kv_heads}),
          nosa::make_contiguous<1>(wf(l, layer_tensor::evict_scale), {m.kv_heads}),
          nosa::make_contiguous<2>(c_, {B, m.kv_heads})};
      if (!nosa_ok(nosa::compute_eviction_scores(nosa::cuda_backend{}, args, stream_),
                   "compute_eviction_scores", error))
        return false;
    }
    const nosa::cuda_overlap overlap{
        transfer_, transfer_ != nullptr ? overlap_events_[2 * std::size_t(l)] : nullptr,
        transfer_ != nullptr ? overlap_events_[2 * std::size_t(l) + 1] : nullptr};
    const nosa::cuda_overlap* overlap_ptr = transfer_ != nullptr ? &overlap : nullptr;
    const nosa::step_args<nosa::bf16, nosa::bf16> args{
        nosa::make_contiguous<1>(static_cast<const std::int32_t*>(sequences_), {B}),
        nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(q_), {B, m.q_heads, D}),
        nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(k_), {B, m.kv_heads, D}),
        nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(v_), {B, m.kv_heads, D}),
        bias ? nosa::make_contiguous<2>(static_cast<const float*>(c_), {B, m.kv_heads})
             : nosa::tensor_view<const float, 2>{},
        nosa::make_contiguous<3>(o_, {B, m.q_heads, D})};
    if (!nosa_ok(stack_->step(l, args, stream_, overlap_ptr), "layer " + std::to_string(l) + ": step", error))
      return false;
    if (run_.trace) {
      // q, k, v and o widened to fp32 and c copied, in one buffer per layer: [q | k | v | o | c].
      float* t = trace_[std::size_t(l)];
      const std::int64_t nq = std::int64_t(B) * qw, nkv = std::int64_t(B) * kvw;
      kernels::widen<<<grid_for(nq), kernels::threads, 0, stream_>>>(q_, nq, t);
      kernels::widen<<<grid_for(nkv), kernels::threads, 0, stream_>>>(k_, nkv, t + nq);
      kernels::widen<<<grid_for(nkv), kernels::threads, 0, stream_>>>(v_, nkv, t + nq + nkv);
      kernels::widen<<<grid_for(nq), kernels::threads, 0, stream_>>>(o_, nq, t + nq + 2 * nkv);
      if (!launched("widen", error) ||
          !cuda_ok(cudaMemcpyAsync(t + 2 * nq + 2 * nkv, c_, std::size_t(B) * m.kv_heads * 4,
                                   cudaMemcpyDeviceToDevice, stream_),
                   "cudaMemcpyAsync", error)) {
        return false;
      }
    }
    if (!linear(w(l, layer_tensor::wo), hd, qw, o_, B, x_, true, true, error)) return false;
    kernels::rmsnorm<<<B, kernels::threads, 0, stream_>>>(x_, w(l, layer_tensor::mlp_norm), hd, m.norm_eps,
                                                          h_);
    if (!launched("rmsnorm", error) ||
        !linear(w(l, layer_tensor::w_gate), 2 * m.mlp, hd, h_, B, gu_, true, false, error))
      return false;
    kernels::silu_mul<<<B, kernels::threads, 0, stream_>>>(gu_, m.mlp, a_);
    if (!launched("silu_mul", error) ||
        !linear(w(l, layer_tensor::w_down), hd, m.mlp, a_, B, x_, true, true, error))
      return false;
  }
  kernels::rmsnorm<<<B, kernels::threads, 0, stream_>>>(x_, w(spec_index(model_tensor::final_norm)), hd,
                                                        m.norm_eps, h_);
  if (!launched("rmsnorm", error) ||
      !linear(w(spec_index(model_tensor::lm_head)), m.vocab, hd, h_, B, logits_, true, false, error)) {
    return false;
  }
  kernels::argmax<<<B, 1024, 0, stream_>>>(logits_, m.vocab, tokens_);
  kernels::advance<<<B, kernels::threads, 0, stream_>>>(positions_,
                                                        run_.drift > 0.0f ? drift_state_ : nullptr,
                                                        drift_step_, run_.drift, run_.prompt_seed, hd, B);
  if (run_.drift > 0.0f) kernels::count_step<<<1, 1, 0, stream_>>>(drift_step_);
  return launched("argmax/advance", error);
}

bool cuda_engine::capture(std::string& error) {
  if (!cuda_ok(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture",
               error))
    return false;
  const bool enqueued = enqueue_step(error);
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

bool cuda_engine::step(std::string& error) {
  if (steps_done_ >= run_.steps) {
    error = "the run was sized for " + std::to_string(run_.steps) + " steps";
    return false;
  }
  if (steps_done_ % run_.reserve_ahead == 0) {
    const int ahead = std::min(run_.reserve_ahead, run_.steps - steps_done_);
    if (!nosa_ok(stack_->reserve(ahead, stream_), "reserve", error)) return false;
  }
  if (steps_done_ == 0) {
    // The first step runs eagerly: every kernel it uses (cuBLAS's choices for this batch, nosa's, ours) is
    // loaded before the capture of the second.
    if (!enqueue_step(error)) return false;
  } else {
    if (graph_ == nullptr && !capture(error)) return false;
    if (!cuda_ok(cudaGraphLaunch(graph_, stream_), "cudaGraphLaunch", error)) return false;
  }
  ++steps_done_;
  return !run_.trace || copy_traces(error);
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
  for (int l = 0; l < model_.layers; ++l) {
    if (!nosa_ok(stack_->step_status(l, stream_), "layer " + std::to_string(l) + ": step_status", error))
      return false;
  }
  return true;
}

std::vector<std::int32_t> cuda_engine::tokens() {
  std::vector<std::int32_t> t(static_cast<std::size_t>(run_.batch));
  cudaMemcpyAsync(t.data(), tokens_, t.size() * 4, cudaMemcpyDeviceToHost, stream_);
  cudaStreamSynchronize(stream_);
  return t;
}

nosa::counters cuda_engine::total_counters() {
  nosa::counters sum;
  for (int l = 0; l < model_.layers; ++l) sum += stack_->total_counters(l, stream_);
  return sum;
}

double cuda_engine::device_bytes() const {
  return double(weights_.size() + weights_f32_.size() + act_.size() + cublas_workspace_.size()) +
         double(stack_->arena_bytes().device);
}

double cuda_engine::host_bytes() const { return double(stack_->arena_bytes().host); }

int largest_batch(const model_config& m, const run_config& run, bool distinct_per_sequence, double hbm_bytes,
                  double host_bytes, std::string& error) {
  const double fixed = weight_bytes(m) + double(cublas_workspace_bytes) +
                       double(prefill_workspace_bytes(m, run.prompt_tokens));
  const auto fits = [&](int batch) {
    run_config r = run;
    r.batch = batch;
    r.distinct_prompts = distinct_per_sequence ? batch : std::min(run.distinct_prompts, batch);
    nosa::arena_sizes arenas;
    const nosa::status s =
        cuda_stack_bytes(run.attention, m.head_dim, layer_config_for(m, r), m.layers, arenas);
    if (!nosa::ok(s)) {
      error = "sizing the layers: " + std::string(nosa::to_string(s));
      return false;
    }
    return fixed + double(arenas.device) + double(decode_activation_bytes(m, batch)) <= hbm_bytes &&
           double(arenas.host) <= host_bytes;
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

bool run_cuda_engine(const model_config& model, const options& opt, run_report& r, std::string& error) {
  std::size_t free_bytes = 0, total_bytes = 0;
  if (!cuda_ok(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo", error)) return false;
  // The whole card: what is free now, less 1 GiB for the CUDA context's own growth (graphs, cuBLAS).
  const double gib = 1024.0 * 1024.0 * 1024.0;
  const double hbm = opt.hbm_gib > 0 ? opt.hbm_gib * gib : double(free_bytes) - gib;
  const double host = opt.host_gib > 0
                          ? opt.host_gib * gib
                          : 0.8 * double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGE_SIZE));
  run_config run = opt.run;
  run.steps = opt.run.steps + opt.warmup;
  if (opt.batch_auto) {
    run.batch = largest_batch(model, run, opt.distinct_per_sequence, hbm, host, error);
    if (run.batch == 0) {
      if (error.empty())
        error = "not even one sequence of " + std::to_string(run.prompt_tokens) + " tokens fits the budgets";
      return false;
    }
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
  r.distinct_prompts = run.distinct_prompts;
  r.shared_blocks =
      shared_prompt_blocks(run.attention, run.share_prompts, run.prompt_tokens, model.selection.block_size);
  r.hbm_budget_bytes = hbm;
  std::fprintf(stderr, "nosa-engine: %s, %s, batch %d, context %d\n", model.name.c_str(), r.method.c_str(),
               run.batch, run.prompt_tokens);

  std::optional<host_weights> weights;
  if (!opt.weights.empty()) {
    weights = load_weights(opt.weights, model, error);
    if (!weights) return false;
  } else if (!opt.save_weights.empty()) {
    weights = random_weights(model, run.weight_seed);
  }
  if (weights && !opt.save_weights.empty() && !save_weights(opt.save_weights, model, *weights, error))
    return false;
  const auto engine = cuda_engine::create(model, weights ? &*weights : nullptr, run, error);
  if (!engine) return false;
  weights.reset();

  auto t0 = std::chrono::steady_clock::now();
  if (!engine->prefill(error)) return false;
  r.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int s = 0; s < opt.warmup; ++s) {
    if (!engine->step(error)) return false;
  }
  if (!engine->finish(error)) return false;
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
  r.device_bytes = engine->device_bytes();
  r.host_bytes = engine->host_bytes();
  r.last_tokens = engine->tokens();
  return true;
}

}  // namespace nosa_engine
