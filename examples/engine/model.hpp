#pragma once
/// \file
/// The model of the engine example: a Llama-style decoder whose every layer carries NOSA's eviction head.
/// Shapes (presets), the tensors of a checkpoint with their safetensors names, seeded random weights and the
/// loader and writer of real weights. Plain C++: the CUDA engine includes it too, and generates its random
/// weights on the device with the same `random_weight` function, so both backends run the same model.

#include "safetensors.hpp"

#include <nosa/core/numeric.hpp>
#include <nosa/core/params.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#ifdef __CUDACC__
#define NOSA_ENGINE_HOST_DEVICE __host__ __device__
#else
#define NOSA_ENGINE_HOST_DEVICE
#endif

namespace nosa_engine {

/// Shape of a model and the selection parameters its layers use.
struct model_config {
  std::string name;
  int layers = 0;
  int hidden = 0;    ///< residual stream width
  int q_heads = 0;   ///< H_q
  int kv_heads = 0;  ///< H_kv
  int head_dim = 0;  ///< D
  int mlp = 0;       ///< intermediate width of the SiLU-gated MLP
  int vocab = 0;     ///< embedding rows and LM-head outputs
  float rope_theta = 500000.0f;
  float norm_eps = 1e-5f;
  nosa::selection_params selection{};

  int q_width() const { return q_heads * head_dim; }
  int kv_width() const { return kv_heads * head_dim; }
  /// Parameters of the model (for memory estimates).
  std::uint64_t parameter_count() const {
    const std::uint64_t h = hidden, per_layer = h * (q_width() + 2ull * kv_width()) +
                                                std::uint64_t(q_width()) * h + 3ull * h * mlp + 2ull * h +
                                                std::uint64_t(kv_heads) * kv_width() + 2ull * kv_heads;
    return 2ull * vocab * h + h + per_layer * layers;
  }
};

/// The presets: `nosa-8b` (the shape of the released NOSA 8B model), `llama3-8b`, and `tiny`, which the host
/// backend runs in seconds. Selection parameters are the paper's for the 8B presets; `tiny` keeps their
/// proportions (window = block/2, stride = block/4) at a block of 16 tokens.
inline std::optional<model_config> find_preset(std::string_view name) {
  model_config c;
  c.name = std::string(name);
  if (name == "nosa-8b" || name == "llama3-8b") {
    c.layers = 32;
    c.hidden = 4096;
    c.q_heads = 32;
    c.kv_heads = name == "nosa-8b" ? 2 : 8;
    c.head_dim = 128;
    c.mlp = name == "nosa-8b" ? 16384 : 14336;
    c.vocab = 128256;
    return c;
  }
  if (name == "tiny") {
    c.layers = 2;
    c.hidden = 256;
    c.q_heads = 8;
    c.kv_heads = 2;
    c.head_dim = 64;
    c.mlp = 512;
    c.vocab = 512;
    c.rope_theta = 10000.0f;
    c.selection.block_size = 16;
    c.selection.window = 8;
    c.selection.stride = 4;
    c.selection.top_k = 12;
    c.selection.top_k_query_aware = 7;
    c.selection.n_init = 1;
    c.selection.n_local = 3;
    return c;
  }
  return std::nullopt;
}

/// The names `find_preset` knows, for help texts.
inline constexpr std::string_view preset_names = "nosa-8b, llama3-8b, tiny";

// ---- Seeded random weights -----------------------------------------------------------------------------

/// A counter-based generator: value `index` of tensor `tensor` for `seed`, uniform in [-1, 1). Any element
/// can be computed on its own, so the host and a GPU fill the same tensors in any order.
NOSA_ENGINE_HOST_DEVICE inline float random_uniform(std::uint64_t seed, std::uint64_t tensor,
                                                    std::uint64_t index) {
  std::uint64_t z =
      seed * 0x9E3779B97F4A7C15ull + tensor * 0xD1B54A32D192ED03ull + index * 0x8CB92BA72F3D8DD7ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

/// How a tensor is initialised when no checkpoint is given.
enum class init_kind : unsigned char {
  uniform,  ///< uniform in [-bound, bound): projections use bound = sqrt(3 / fan_in) (unit-variance outputs)
  ones,     ///< RMSNorm gains and the eviction head's factor A
  zeros,    ///< the eviction head's bias
};

/// Value `index` of a tensor initialised as described (bf16 tensors store it rounded).
NOSA_ENGINE_HOST_DEVICE inline float initial_value(init_kind kind, float bound, std::uint64_t seed,
                                                   std::uint64_t tensor, std::uint64_t index) {
  if (kind == init_kind::ones) return 1.0f;
  if (kind == init_kind::zeros) return 0.0f;
  return bound * random_uniform(seed, tensor, index);
}

// ---- The tensors of a checkpoint
// ---------------------------------------------------------------------------

/// One tensor of the model: its checkpoint name, shape, element type and initialisation.
struct tensor_spec {
  std::string name;
  std::vector<std::int64_t> shape;
  dtype type = dtype::bf16;  ///< bf16 for weights; f32 for the eviction head's bias and factor
  init_kind init = init_kind::uniform;
  float bound = 0.0f;
  std::uint64_t id = 0;  ///< position in `tensor_specs`, the random stream of the tensor

  std::uint64_t elements() const {
    std::uint64_t n = 1;
    for (const std::int64_t d : shape) n *= static_cast<std::uint64_t>(d);
    return n;
  }
};

/// Which tensor of a layer a spec is (the order of `tensor_specs` within a layer).
enum class layer_tensor : int {
  attn_norm,
  wq,
  wk,
  wv,
  evict_w,
  evict_beta,
  evict_scale,
  wo,
  mlp_norm,
  w_gate,
  w_up,
  w_down,
  count
};
/// Which model-level tensor a spec is (`tensor_specs` lists them first).
enum class model_tensor : int { embed, final_norm, lm_head, count };

/// Every tensor of the model, model-level ones first, then layer by layer in `layer_tensor` order.
/// Llama names (as in Hugging Face checkpoints) plus the eviction head of each layer:
/// `model.layers.{i}.self_attn.eviction_head.weight` [H_kv, H_kv*D] (W_delta), `.bias` [H_kv] (beta) and
/// `.scale` [H_kv] (A), the last two in F32.
inline std::vector<tensor_spec> tensor_specs(const model_config& c) {
  std::vector<tensor_spec> s;
  const auto bound = [](std::int64_t fan_in) { return std::sqrt(3.0f / static_cast<float>(fan_in)); };
  const std::int64_t h = c.hidden, q = c.q_width(), kv = c.kv_width();
  s.push_back({"model.embed_tokens.weight", {c.vocab, h}, dtype::bf16, init_kind::uniform, std::sqrt(3.0f)});
  s.push_back({"model.norm.weight", {h}, dtype::bf16, init_kind::ones, 0.0f});
  s.push_back({"lm_head.weight", {c.vocab, h}, dtype::bf16, init_kind::uniform, bound(h)});
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s.push_back({p + "input_layernorm.weight", {h}, dtype::bf16, init_kind::ones, 0.0f});
    s.push_back({p + "self_attn.q_proj.weight", {q, h}, dtype::bf16, init_kind::uniform, bound(h)});
    s.push_back({p + "self_attn.k_proj.weight", {kv, h}, dtype::bf16, init_kind::uniform, bound(h)});
    s.push_back({p + "self_attn.v_proj.weight", {kv, h}, dtype::bf16, init_kind::uniform, bound(h)});
    s.push_back(
        {p + "self_attn.eviction_head.weight", {c.kv_heads, kv}, dtype::bf16, init_kind::uniform, bound(kv)});
    s.push_back({p + "self_attn.eviction_head.bias", {c.kv_heads}, dtype::f32, init_kind::zeros, 0.0f});
    s.push_back({p + "self_attn.eviction_head.scale", {c.kv_heads}, dtype::f32, init_kind::ones, 0.0f});
    s.push_back({p + "self_attn.o_proj.weight", {h, q}, dtype::bf16, init_kind::uniform, bound(q)});
    s.push_back({p + "post_attention_layernorm.weight", {h}, dtype::bf16, init_kind::ones, 0.0f});
    s.push_back({p + "mlp.gate_proj.weight", {c.mlp, h}, dtype::bf16, init_kind::uniform, bound(h)});
    s.push_back({p + "mlp.up_proj.weight", {c.mlp, h}, dtype::bf16, init_kind::uniform, bound(h)});
    s.push_back({p + "mlp.down_proj.weight", {h, c.mlp}, dtype::bf16, init_kind::uniform, bound(c.mlp)});
  }
  for (std::size_t i = 0; i < s.size(); ++i) s[i].id = i;
  return s;
}

/// Index in `tensor_specs` of a model-level tensor.
constexpr std::size_t spec_index(model_tensor t) { return static_cast<std::size_t>(t); }
/// Index in `tensor_specs` of a tensor of layer `layer`.
constexpr std::size_t spec_index(int layer, layer_tensor t) {
  return static_cast<std::size_t>(model_tensor::count) +
         static_cast<std::size_t>(layer) * static_cast<std::size_t>(layer_tensor::count) +
         static_cast<std::size_t>(t);
}

// ---- Weights in host memory ------------------------------------------------------------------------------

/// Every tensor of a model in host memory, in `tensor_specs` order. bf16 tensors live in `bf16_data`, f32
/// ones in `f32_data` (the other vector of the entry is empty).
struct host_weights {
  std::vector<std::vector<nosa::bf16>> bf16_data;
  std::vector<std::vector<float>> f32_data;

  const nosa::bf16* bf16_tensor(std::size_t spec) const { return bf16_data[spec].data(); }
  const float* f32_tensor(std::size_t spec) const { return f32_data[spec].data(); }
};

/// Seeded random weights for `c` (see `tensor_specs` for the initialisation of each tensor).
inline host_weights random_weights(const model_config& c, std::uint64_t seed) {
  const std::vector<tensor_spec> specs = tensor_specs(c);
  host_weights w;
  w.bf16_data.resize(specs.size());
  w.f32_data.resize(specs.size());
  for (const tensor_spec& s : specs) {
    const std::uint64_t n = s.elements();
    if (s.type == dtype::bf16) {
      auto& out = w.bf16_data[s.id];
      out.resize(n);
      for (std::uint64_t i = 0; i < n; ++i)
        out[i] = nosa::bf16(initial_value(s.init, s.bound, seed, s.id, i));
    } else {
      auto& out = w.f32_data[s.id];
      out.resize(n);
      for (std::uint64_t i = 0; i < n; ++i) out[i] = initial_value(s.init, s.bound, seed, s.id, i);
    }
  }
  return w;
}

/// Reads every tensor of `c` from a safetensors file. Each must be present with its exact shape; BF16, F16
/// and F32 are accepted and converted (bf16 for weights, f32 for the eviction head's bias and factor).
/// Tensors the model does not use are ignored. On failure returns nothing and sets `error` to one line that
/// names the file and the tensor.
inline std::optional<host_weights> load_weights(const std::string& path, const model_config& c,
                                                std::string& error) {
  const std::optional<safetensors_file> file = safetensors_file::open(path, error);
  if (!file) return std::nullopt;
  const std::vector<tensor_spec> specs = tensor_specs(c);
  host_weights w;
  w.bf16_data.resize(specs.size());
  w.f32_data.resize(specs.size());
  for (const tensor_spec& s : specs) {
    const tensor_info* t = file->find(s.name);
    if (t == nullptr) {
      error = path + ": " + s.name + ": missing (the " + c.name + " model needs it)";
      return std::nullopt;
    }
    if (t->type == dtype::other) {
      error = path + ": " + s.name + ": unsupported dtype " + t->dtype_name + " (expected BF16, F16 or F32)";
      return std::nullopt;
    }
    if (t->shape != s.shape) {
      error = path + ": " + s.name + ": expected shape " + shape_text(s.shape) + " for the " + c.name +
              " model, found " + shape_text(t->shape);
      return std::nullopt;
    }
    const std::span<const std::byte> bytes = file->data(*t);
    const std::uint64_t n = s.elements();
    const auto value = [&](std::uint64_t i) -> float {
      std::uint16_t u16 = 0;
      float f32 = 0.0f;
      switch (t->type) {
      case dtype::bf16:
        std::memcpy(&u16, bytes.data() + 2 * i, 2);
        return static_cast<float>(nosa::bf16::from_bits(u16));
      case dtype::f16:
        std::memcpy(&u16, bytes.data() + 2 * i, 2);
        return static_cast<float>(nosa::fp16::from_bits(u16));
      default:
        std::memcpy(&f32, bytes.data() + 4 * i, 4);
        return f32;
      }
    };
    if (s.type == dtype::bf16) {
      auto& out = w.bf16_data[s.id];
      out.resize(n);
      if (t->type == dtype::bf16) {
        std::memcpy(out.data(), bytes.data(), 2 * n);
      } else {
        for (std::uint64_t i = 0; i < n; ++i) out[i] = nosa::bf16(value(i));
      }
    } else {
      auto& out = w.f32_data[s.id];
      out.resize(n);
      for (std::uint64_t i = 0; i < n; ++i) out[i] = value(i);
    }
  }
  return w;
}

/// Writes `w` (the weights of `c`) as a safetensors file that `load_weights` reads back.
inline bool save_weights(const std::string& path, const model_config& c, const host_weights& w,
                         std::string& error) {
  std::vector<tensor_to_write> out;
  for (const tensor_spec& s : tensor_specs(c)) {
    const std::span<const std::byte> bytes = s.type == dtype::bf16
                                                 ? std::as_bytes(std::span(w.bf16_data[s.id]))
                                                 : std::as_bytes(std::span(w.f32_data[s.id]));
    out.push_back({s.name, s.type, s.shape, bytes});
  }
  return write_safetensors(path, out, error, {{"format", "pt"}, {"nosa_engine_model", c.name}});
}

}  // namespace nosa_engine
