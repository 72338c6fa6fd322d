// The engine's weights: the random weights written as a safetensors file read back bit for bit and drive the
// same decode; a file that lacks a tensor, has a tensor of the wrong shape or dtype, or is truncated is
// rejected with a message naming the file (and the tensor).

#include "engine/host_engine.hpp"
#include "engine/model.hpp"
#include "engine/safetensors.hpp"
#include "examples/temp_dir.hpp"

#include <doctest/doctest.h>

#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <vector>

using namespace nosa_engine;

namespace {

model_config tiny() { return *find_preset("tiny"); }

/// Greedy tokens of a short run of the tiny model with `weights`.
std::vector<std::int32_t> decode(host_weights weights) {
  run_config run;
  run.batch = 2;
  run.distinct_prompts = 2;
  run.prompt_tokens = 40;
  run.steps = 3;
  std::string error;
  const auto engine = host_engine::create(tiny(), std::move(weights), run, error);
  REQUIRE_MESSAGE(engine, error);
  REQUIRE_MESSAGE(engine->prefill(error), error);
  for (int s = 0; s < run.steps; ++s) REQUIRE_MESSAGE(engine->step(error), error);
  return engine->tokens();
}

/// Writes the tiny model's random weights with one tensor changed by `edit` (which may drop it).
template <class Edit>
std::string write_edited(const nosa_test::temp_dir& dir, const std::string& name, Edit edit) {
  const model_config m = tiny();
  const host_weights w = random_weights(m, 5);
  std::vector<tensor_to_write> tensors;
  std::vector<std::vector<std::byte>> storage;
  for (const tensor_spec& s : tensor_specs(m)) {
    tensor_to_write t{s.name, s.type, s.shape,
                      s.type == dtype::bf16 ? std::as_bytes(std::span(w.bf16_data[s.id]))
                                            : std::as_bytes(std::span(w.f32_data[s.id]))};
    if (edit(t, storage)) tensors.push_back(t);
  }
  std::string error;
  const std::string path = dir.file(name).string();
  REQUIRE_MESSAGE(write_safetensors(path, tensors, error), error);
  return path;
}

}  // namespace

TEST_CASE("random weights round trip through a safetensors file and decode the same tokens") {
  const nosa_test::temp_dir dir("nosa_engine_weights_");
  const model_config m = tiny();
  const host_weights w = random_weights(m, 5);
  const std::string path = dir.file("tiny.safetensors").string();
  std::string error;
  REQUIRE_MESSAGE(save_weights(path, m, w, error), error);
  const auto loaded = load_weights(path, m, error);
  REQUIRE_MESSAGE(loaded, error);
  for (const tensor_spec& s : tensor_specs(m)) {
    INFO(s.name);
    if (s.type == dtype::bf16) {
      REQUIRE(loaded->bf16_data[s.id].size() == w.bf16_data[s.id].size());
      CHECK(std::memcmp(loaded->bf16_data[s.id].data(), w.bf16_data[s.id].data(), 2 * s.elements()) == 0);
    } else {
      CHECK(loaded->f32_data[s.id] == w.f32_data[s.id]);
    }
  }
  CHECK(decode(*loaded) == decode(w));
  // A different seed is a different model: the comparison above is not vacuous.
  CHECK(decode(random_weights(m, 6)) != decode(w));
}

TEST_CASE("F32 weights are accepted and rounded to bf16") {
  const nosa_test::temp_dir dir("nosa_engine_weights_");
  const host_weights w = random_weights(tiny(), 5);
  const std::string path = write_edited(dir, "f32.safetensors", [&](tensor_to_write& t, auto& storage) {
    if (t.name == "lm_head.weight") {
      std::vector<float> f(t.bytes.size() / 2);
      const auto* b = reinterpret_cast<const nosa::bf16*>(t.bytes.data());
      for (std::size_t i = 0; i < f.size(); ++i) f[i] = nosa::to_float(b[i]);
      storage.emplace_back(reinterpret_cast<const std::byte*>(f.data()),
                           reinterpret_cast<const std::byte*>(f.data() + f.size()));
      t.type = dtype::f32;
      t.bytes = storage.back();
    }
    return true;
  });
  std::string error;
  const auto loaded = load_weights(path, tiny(), error);
  REQUIRE_MESSAGE(loaded, error);
  const std::size_t head = spec_index(model_tensor::lm_head);
  CHECK(std::memcmp(loaded->bf16_data[head].data(), w.bf16_data[head].data(), 2 * w.bf16_data[head].size()) ==
        0);
}

TEST_CASE("a missing tensor is named") {
  const nosa_test::temp_dir dir("nosa_engine_weights_");
  const std::string path = write_edited(dir, "missing.safetensors", [](tensor_to_write& t, auto&) {
    return t.name != "model.layers.1.self_attn.eviction_head.weight";
  });
  std::string error;
  CHECK_FALSE(load_weights(path, tiny(), error));
  CHECK(error == path + ": model.layers.1.self_attn.eviction_head.weight: missing (the tiny model needs it)");
}

TEST_CASE("a tensor of the wrong shape is named with both shapes") {
  const nosa_test::temp_dir dir("nosa_engine_weights_");
  const std::string path = write_edited(dir, "shape.safetensors", [](tensor_to_write& t, auto&) {
    if (t.name == "model.layers.0.self_attn.k_proj.weight") {
      t.shape = {64, 512};  // same bytes as [128, 256], transposed-looking shape
    }
    return true;
  });
  std::string error;
  CHECK_FALSE(load_weights(path, tiny(), error));
  CHECK(error == path + ": model.layers.0.self_attn.k_proj.weight: expected shape [128, 256] for the tiny "
                        "model, found [64, 512]");
}

TEST_CASE("weights of another preset do not load") {
  const nosa_test::temp_dir dir("nosa_engine_weights_");
  model_config other = tiny();
  other.name = "other";
  other.mlp = 384;
  const std::string path = dir.file("other.safetensors").string();
  std::string error;
  REQUIRE_MESSAGE(save_weights(path, other, random_weights(other, 1), error), error);
  CHECK_FALSE(load_weights(path, tiny(), error));
  CHECK(error.find("mlp.gate_proj.weight: expected shape [512, 256] for the tiny model, found [384, 256]") !=
        std::string::npos);
}

TEST_CASE("a truncated file is rejected by the reader") {
  const nosa_test::temp_dir dir("nosa_engine_weights_");
  const model_config m = tiny();
  const std::string path = dir.file("full.safetensors").string();
  std::string error;
  REQUIRE_MESSAGE(save_weights(path, m, random_weights(m, 1), error), error);
  std::string bytes = nosa_test::read_bytes(path);
  bytes.resize(bytes.size() - 100);
  const auto cut = dir.file("cut.safetensors");
  nosa_test::write_bytes(cut, bytes);
  CHECK_FALSE(load_weights(cut.string(), m, error));
  CHECK(error.rfind(cut.string() + ": ", 0) == 0);
  MESSAGE(error);
}
