// The host engine: the forward pass of model.hpp's decoder in plain C++, with nosa's host executor as the
// attention of every layer. Activations are fp32; q, k and v are rounded to bf16 where they enter the KV
// cache, exactly as on the CUDA engine.

#include "host_engine.hpp"

#include <nosa/backend/host/eviction_head.hpp>
#include <nosa/core/math.hpp>
#include <nosa/core/tensor_view.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>

namespace nosa_engine {

void host_linear(const nosa::bf16* w, int out, int in, const float* x, int rows, float* y, bool accumulate) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + std::size_t(r) * in;
    float* yr = y + std::size_t(r) * out;
    for (int o = 0; o < out; ++o) {
      const nosa::bf16* wo = w + std::size_t(o) * in;
      float acc = 0.0f;
      for (int i = 0; i < in; ++i) acc += nosa::to_float(wo[i]) * xr[i];
      yr[o] = accumulate ? yr[o] + acc : acc;
    }
  }
}

void host_rmsnorm(const float* x, const nosa::bf16* g, int width, int rows, float eps, float* y) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + std::size_t(r) * width;
    float sum = 0.0f;
    for (int i = 0; i < width; ++i) sum += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
    for (int i = 0; i < width; ++i) y[std::size_t(r) * width + i] = xr[i] * inv * nosa::to_float(g[i]);
  }
}

void host_rope(float* x, int heads, int head_dim, int pos, float theta) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float inv_freq = std::pow(theta, -2.0f * static_cast<float>(i) / static_cast<float>(head_dim));
    const float angle = static_cast<float>(pos) * inv_freq;
    const float cs = std::cos(angle), sn = std::sin(angle);
    for (int h = 0; h < heads; ++h) {
      float* xh = x + std::size_t(h) * head_dim;
      const float a = xh[i], b = xh[i + half];
      xh[i] = a * cs - b * sn;
      xh[i + half] = b * cs + a * sn;
    }
  }
}

namespace {

std::vector<nosa::bf16> to_bf16(const std::vector<float>& x) {
  std::vector<nosa::bf16> r(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) r[i] = nosa::bf16(x[i]);
  return r;
}

std::vector<float> to_f32(const std::vector<nosa::bf16>& x) {
  std::vector<float> r(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) r[i] = nosa::to_float(x[i]);
  return r;
}

float silu(float x) { return x / (1.0f + std::exp(-x)); }

std::string status_text(const char* call, nosa::status s) {
  return std::string(call) + ": " + std::string(nosa::to_string(s));
}

}  // namespace

std::unique_ptr<host_engine> host_engine::create(const model_config& model, host_weights weights,
                                                 const run_config& run, std::string& error) {
  if (!validate_workload(run, error)) return nullptr;
  if (weights.bf16_data.size() != tensor_specs(model).size()) {
    error = "the weights do not belong to the " + model.name + " model";
    return nullptr;
  }
  std::unique_ptr<host_engine> e(new host_engine());
  e->model_ = model;
  e->run_ = run;
  e->w_ = std::move(weights);
  e->lanes_ = lane_layout(run.batch, run.lanes > 0 ? run.lanes : default_lanes(run.attention, run.batch, false));
  e->stacks_.resize(std::size_t(e->lanes_.lanes));
  for (int i = 0; i < e->lanes_.lanes; ++i) {
    const nosa::layer_config config = layer_config_for(model, e->lanes_.lane_run(run, i));
    if (const nosa::status s =
            make_host_stack(run.attention, model.head_dim, config, model.layers, e->stacks_[std::size_t(i)]);
        !nosa::ok(s)) {
      error = "cannot create the " + std::string(method_name(run.attention)) + " layers (head dim " +
              std::to_string(model.head_dim) + "): " + std::string(nosa::to_string(s));
      return nullptr;
    }
  }
  e->tokens_.assign(std::size_t(run.batch), 0);
  e->positions_.assign(std::size_t(run.batch), 0);
  if (run.trace) {
    e->step_trace_.resize(std::size_t(model.layers));
    e->prompt_trace_.resize(std::size_t(run.distinct_prompts) * model.layers);
  }
  return e;
}

template <class Position>
void host_engine::project_qkv(int l, const std::vector<float>& x, int rows, Position position,
                              std::vector<nosa::bf16>& qb, std::vector<nosa::bf16>& kb,
                              std::vector<nosa::bf16>& vb) const {
  const model_config& m = model_;
  const int hd = m.hidden, qw = m.q_width(), kvw = m.kv_width();
  std::vector<float> h(x.size()), q(std::size_t(rows) * qw), k(std::size_t(rows) * kvw),
      v(std::size_t(rows) * kvw);
  host_rmsnorm(x.data(), w(l, layer_tensor::attn_norm), hd, rows, m.norm_eps, h.data());
  host_linear(w(l, layer_tensor::wq), qw, hd, h.data(), rows, q.data());
  host_linear(w(l, layer_tensor::wk), kvw, hd, h.data(), rows, k.data());
  host_linear(w(l, layer_tensor::wv), kvw, hd, h.data(), rows, v.data());
  for (int r = 0; r < rows; ++r) {
    host_rope(q.data() + std::size_t(r) * qw, m.q_heads, m.head_dim, position(r), m.rope_theta);
    host_rope(k.data() + std::size_t(r) * kvw, m.kv_heads, m.head_dim, position(r), m.rope_theta);
  }
  // The KV cache and the queries are bf16: round once, and use the rounded values everywhere.
  qb = to_bf16(q);
  kb = to_bf16(k);
  vb = to_bf16(v);
}

bool host_engine::eviction_scores(int l, const std::vector<nosa::bf16>& vb, int rows, std::vector<float>& c,
                                  std::string& error) const {
  const model_config& m = model_;
  const nosa::eviction_head_args<nosa::bf16> args{
      nosa::make_contiguous<3>(std::as_const(vb).data(), {rows, m.kv_heads, m.head_dim}),
      nosa::make_contiguous<2>(w(l, layer_tensor::evict_w), {m.kv_heads, m.kv_width()}),
      nosa::make_contiguous<1>(wf(l, layer_tensor::evict_beta), {m.kv_heads}),
      nosa::make_contiguous<1>(wf(l, layer_tensor::evict_scale), {m.kv_heads}),
      nosa::make_contiguous<2>(c.data(), {rows, m.kv_heads})};
  if (const nosa::status s = nosa::compute_eviction_scores(nosa::host_backend{}, args); !nosa::ok(s)) {
    error = status_text("compute_eviction_scores", s);
    return false;
  }
  return true;
}

void host_engine::finish_layer(int l, const std::vector<float>& o, int rows, std::vector<float>& x) const {
  const model_config& m = model_;
  const int hd = m.hidden;
  std::vector<float> h(x.size()), gate(std::size_t(rows) * m.mlp), up(std::size_t(rows) * m.mlp);
  host_linear(w(l, layer_tensor::wo), hd, m.q_width(), o.data(), rows, x.data(), /*accumulate=*/true);
  host_rmsnorm(x.data(), w(l, layer_tensor::mlp_norm), hd, rows, m.norm_eps, h.data());
  host_linear(w(l, layer_tensor::w_gate), m.mlp, hd, h.data(), rows, gate.data());
  host_linear(w(l, layer_tensor::w_up), m.mlp, hd, h.data(), rows, up.data());
  for (std::size_t i = 0; i < gate.size(); ++i) gate[i] = silu(gate[i]) * up[i];
  host_linear(w(l, layer_tensor::w_down), hd, m.mlp, gate.data(), rows, x.data(), /*accumulate=*/true);
}

std::vector<std::int32_t> host_engine::next_tokens(const std::vector<float>& x, int rows) const {
  const int hd = model_.hidden;
  std::vector<float> h(std::size_t(rows) * hd), logits(std::size_t(rows) * model_.vocab);
  host_rmsnorm(x.data(), w_.bf16_tensor(spec_index(model_tensor::final_norm)), hd, rows, model_.norm_eps,
               h.data());
  host_linear(w_.bf16_tensor(spec_index(model_tensor::lm_head)), model_.vocab, hd, h.data(), rows,
              logits.data());
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(rows));
  for (int r = 0; r < rows; ++r) {
    const float* lr = logits.data() + std::size_t(r) * model_.vocab;
    tokens[r] = static_cast<std::int32_t>(std::max_element(lr, lr + model_.vocab) - lr);  // first maximum
  }
  return tokens;
}

template <class Layer>
bool host_engine::compute_prompt(int p, Layer layer, std::int32_t& first_token, std::string& error) const {
  const model_config& m = model_;
  const int P = run_.prompt_tokens, hd = m.hidden, qw = m.q_width(), kvw = m.kv_width(), D = m.head_dim;
  const int G = m.q_heads / m.kv_heads;
  const bool bias = uses_bias(run_.attention);
  const float scale = nosa::softmax_scale(D);
  const nosa::bf16* embed = w_.bf16_tensor(spec_index(model_tensor::embed));
  std::vector<float> x(std::size_t(P) * hd);
  for (int t = 0; t < P; ++t) {
    const std::int32_t tok = prompt_token(run_.prompt_seed, p, t, m.vocab);
    for (int i = 0; i < hd; ++i) x[std::size_t(t) * hd + i] = nosa::to_float(embed[std::size_t(tok) * hd + i]);
  }
  std::vector<float> o(std::size_t(P) * qw), logits(static_cast<std::size_t>(P));
  prefill_layer data;
  data.c.assign(std::size_t(P) * m.kv_heads, 0.0f);
  for (int l = 0; l < m.layers; ++l) {
    std::vector<nosa::bf16> qb;
    project_qkv(
        l, x, P, [](int t) { return t; }, qb, data.k, data.v);
    if (bias && !eviction_scores(l, data.v, P, data.c, error)) return false;
    const std::vector<nosa::bf16>& kb = data.k;
    const std::vector<nosa::bf16>& vb = data.v;
    const std::vector<float>& c = data.c;
    // Dense causal attention, with the method's bias (NOSA's c after the scale, or none).
    for (int t = 0; t < P; ++t) {
      for (int hq = 0; hq < m.q_heads; ++hq) {
        const int hk = hq / G;
        const nosa::bf16* qr = qb.data() + std::size_t(t) * qw + std::size_t(hq) * D;
        float mx = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          const nosa::bf16* kr = kb.data() + std::size_t(j) * kvw + std::size_t(hk) * D;
          float dot = 0.0f;
          for (int d = 0; d < D; ++d) dot += nosa::to_float(qr[d]) * nosa::to_float(kr[d]);
          logits[j] = dot * scale + (bias ? c[std::size_t(j) * m.kv_heads + hk] : 0.0f);
          mx = std::max(mx, logits[j]);
        }
        float sum = 0.0f;
        float* orow = o.data() + std::size_t(t) * qw + std::size_t(hq) * D;
        std::fill_n(orow, D, 0.0f);
        for (int j = 0; j <= t; ++j) {
          const float pj = std::exp(logits[j] - mx);
          sum += pj;
          const nosa::bf16* vr = vb.data() + std::size_t(j) * kvw + std::size_t(hk) * D;
          for (int d = 0; d < D; ++d) orow[d] += pj * nosa::to_float(vr[d]);
        }
        for (int d = 0; d < D; ++d) orow[d] /= sum;
      }
    }
    finish_layer(l, o, P, x);
    data.last_q.assign(qb.begin() + std::ptrdiff_t(P - 1) * qw, qb.end());
    if (!layer(l, data)) return false;
  }
  std::vector<float> last(x.end() - hd, x.end());
  first_token = next_tokens(last, 1)[0];
  return true;
}

bool host_engine::ingest(int p, int l, const prefill_layer& data, std::string& error) {
  const model_config& m = model_;
  const int P = run_.prompt_tokens, D = m.head_dim;
  const bool bias = uses_bias(run_.attention);
  // Ingest (NOSA with full prefill): every sequence with this prompt gets the layer's K, V and c.
  const nosa::prompt_args<nosa::bf16> prompt{
      nosa::make_contiguous<3>(data.k.data(), {P, m.kv_heads, D}),
      nosa::make_contiguous<3>(data.v.data(), {P, m.kv_heads, D}),
      bias ? nosa::make_contiguous<2>(data.c.data(), {P, m.kv_heads}) : nosa::tensor_view<const float, 2>{},
      nosa::make_contiguous<2>(data.last_q.data(), {m.q_heads, D})};
  const int shared = shared_prompt_blocks(run_.attention, run_.share_prompts, P, m.selection.block_size);
  for (int b = p; b < run_.batch; b += run_.distinct_prompts) {
    // The first sequence of the prompt in each lane stores it; the others reference its complete blocks.
    const int source = lanes_.share_source(b, run_.distinct_prompts);
    const nosa::shared_prefix share = source < 0 ? nosa::shared_prefix{} : nosa::shared_prefix{source, shared};
    if (const nosa::status s =
            stacks_[std::size_t(lanes_.lane_of(b))]->add_sequence(l, lanes_.local(b), prompt, share, {});
        !nosa::ok(s)) {
      error = status_text("add_sequence", s);
      return false;
    }
  }
  if (run_.trace) {
    prompt_trace& tr = prompt_trace_[std::size_t(p * m.layers + l)];
    tr.k = to_f32(data.k);
    tr.v = to_f32(data.v);
    tr.c = bias ? data.c : std::vector<float>(data.c.size(), 0.0f);
  }
  return true;
}

bool host_engine::prefill(std::string& error) {
  const model_config& m = model_;
  const int P = run_.prompt_tokens, hd = m.hidden;
  const nosa::bf16* embed = w_.bf16_tensor(spec_index(model_tensor::embed));
  prefill_cached_ = !run_.prefill_cache.empty();
  for (int p = 0; p < run_.distinct_prompts; ++p) {
    const prefill_key key{"host", run_.weight_seed, run_.prompt_seed, p, P, uses_bias(run_.attention)};
    std::int32_t tok = 0;
    prefill_cache_reader reader;
    if (!run_.prefill_cache.empty() && reader.open(run_.prefill_cache, m, key)) {
      prefill_layer data;
      for (int l = 0; l < m.layers; ++l) {
        if (!reader.read_layer(data, error) || !ingest(p, l, data, error)) return false;
      }
      if (!reader.read_token(tok, error)) return false;
    } else {
      prefill_cached_ = false;
      prefill_cache_writer writer;
      const bool caching = !run_.prefill_cache.empty();
      if (caching && !writer.open(run_.prefill_cache, m, key, error)) return false;
      const auto layer = [&](int l, const prefill_layer& data) {
        return (!caching || writer.write_layer(data, error)) && ingest(p, l, data, error);
      };
      if (!compute_prompt(p, layer, tok, error)) return false;
      if (caching && !writer.finish(tok, error)) return false;
    }
    for (int b = p; b < run_.batch; b += run_.distinct_prompts) {
      tokens_[std::size_t(b)] = tok;
      positions_[std::size_t(b)] = P;
    }
  }
  if (run_.drift > 0.0f) {
    drift_state_.resize(std::size_t(run_.batch) * hd);
    for (int b = 0; b < run_.batch; ++b) {
      for (int i = 0; i < hd; ++i)
        drift_state_[std::size_t(b) * hd + i] = nosa::to_float(embed[std::size_t(tokens_[b]) * hd + i]);
    }
  }
  return true;
}

bool host_engine::step(std::string& error) {
  const model_config& m = model_;
  const int B = run_.batch, hd = m.hidden, qw = m.q_width(), D = m.head_dim;
  const bool bias = uses_bias(run_.attention);
  if (steps_done_ >= run_.steps) {
    error = "the run was sized for " + std::to_string(run_.steps) + " steps";
    return false;
  }
  // Plan call: pages for the next steps, once per `reserve_ahead` steps.
  if (steps_done_ % run_.reserve_ahead == 0) {
    const int ahead = std::min(run_.reserve_ahead, run_.steps - steps_done_);
    for (const auto& stack : stacks_) {
      if (const nosa::status s = stack->reserve(ahead, {}); !nosa::ok(s)) {
        error = status_text("reserve", s);
        return false;
      }
    }
  }
  std::vector<float> x(std::size_t(B) * hd);
  const nosa::bf16* embed = w_.bf16_tensor(spec_index(model_tensor::embed));
  for (int b = 0; b < B; ++b) {
    for (int i = 0; i < hd; ++i) {
      x[std::size_t(b) * hd + i] = run_.drift > 0.0f
                                       ? drift_state_[std::size_t(b) * hd + i]
                                       : nosa::to_float(embed[std::size_t(tokens_[b]) * hd + i]);
    }
  }
  // Lane-local sequence ids: lane i's rows are its sequences 0 .. rows(i) - 1.
  std::vector<std::int32_t> rows(static_cast<std::size_t>(B));
  for (int b = 0; b < B; ++b) rows[std::size_t(b)] = lanes_.local(b);
  std::vector<float> c(std::size_t(B) * m.kv_heads), o(std::size_t(B) * qw);
  for (int l = 0; l < m.layers; ++l) {
    std::vector<nosa::bf16> qb, kb, vb;
    project_qkv(
        l, x, B, [&](int b) { return positions_[b]; }, qb, kb, vb);
    if (bias && !eviction_scores(l, vb, B, c, error)) return false;
    for (int i = 0; i < lanes_.lanes; ++i) {
      const int f = lanes_.first(i), n = lanes_.rows(i), kvw = m.kv_width();
      const nosa::step_args<nosa::bf16, float> args{
          nosa::make_contiguous<1>(static_cast<const std::int32_t*>(rows.data() + f), {n}),
          nosa::make_contiguous<3>(std::as_const(qb).data() + std::size_t(f) * qw, {n, m.q_heads, D}),
          nosa::make_contiguous<3>(std::as_const(kb).data() + std::size_t(f) * kvw, {n, m.kv_heads, D}),
          nosa::make_contiguous<3>(std::as_const(vb).data() + std::size_t(f) * kvw, {n, m.kv_heads, D}),
          bias ? nosa::make_contiguous<2>(static_cast<const float*>(c.data()) + std::size_t(f) * m.kv_heads,
                                          {n, m.kv_heads})
               : nosa::tensor_view<const float, 2>{},
          nosa::make_contiguous<3>(o.data() + std::size_t(f) * qw, {n, m.q_heads, D})};
      if (const nosa::status s = stacks_[std::size_t(i)]->step(l, args, {}, nullptr); !nosa::ok(s)) {
        error = "layer " + std::to_string(l) + ": " + status_text("step", s);
        return false;
      }
    }
    if (run_.trace) {
      layer_trace& tr = step_trace_[std::size_t(l)];
      tr.q = to_f32(qb);
      tr.k = to_f32(kb);
      tr.v = to_f32(vb);
      tr.c = bias ? c : std::vector<float>(c.size(), 0.0f);
      tr.o = o;
    }
    finish_layer(l, o, B, x);
  }
  tokens_ = next_tokens(x, B);
  for (int b = 0; b < B; ++b) ++positions_[b];
  if (run_.drift > 0.0f) {
    const float keep = std::sqrt(1.0f - run_.drift * run_.drift);
    for (int b = 0; b < B; ++b) {
      for (int i = 0; i < hd; ++i) {
        float& e = drift_state_[std::size_t(b) * hd + i];
        e = keep * e + run_.drift * drift_noise(run_.prompt_seed, steps_done_, b, B, i);
      }
    }
  }
  ++steps_done_;
  return true;
}

std::vector<std::int32_t> host_engine::selection(int l, int b, int h) const {
  return stacks_[std::size_t(lanes_.lane_of(b))]->selection(l, lanes_.local(b), h, {});
}

nosa::counters host_engine::total_counters() const {
  nosa::counters sum;
  for (const auto& stack : stacks_) {
    for (int l = 0; l < model_.layers; ++l) sum += stack->total_counters(l, {});
  }
  return sum;
}

double host_engine::device_bytes() const {
  double bytes = 0.0;
  for (const auto& stack : stacks_) bytes += static_cast<double>(stack->arena_bytes().device);
  for (const auto& t : w_.bf16_data) bytes += 2.0 * static_cast<double>(t.size());
  for (const auto& t : w_.f32_data) bytes += 4.0 * static_cast<double>(t.size());
  return bytes;
}

double host_engine::host_bytes() const {
  double bytes = 0.0;
  for (const auto& stack : stacks_) bytes += static_cast<double>(stack->arena_bytes().host);
  return bytes;
}

}  // namespace nosa_engine
