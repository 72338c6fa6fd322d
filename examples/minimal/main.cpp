#include <nosa/nosa.hpp>

#include <cstdio>
#include <vector>

int main() {
  // NOSA with offloading, bf16 storage, head dim 128, on the host backend.
  using pipeline = nosa::nosa_pipeline<nosa::bf16, 128>;
  using layer_type = nosa::decode_layer<pipeline, nosa::host_backend>;

  nosa::layer_config config;  // the paper's selection defaults: b_s 64, k 64, k_qa 33, ...
  config.num_q_heads = 32;
  config.num_kv_heads = 2;
  config.limits = {/*max_sequences=*/2, /*max_blocks_per_sequence=*/128, /*pool_pages=*/256};

  nosa::owning_layer<layer_type> layer;
  if (nosa::status s = layer.create(config); !nosa::ok(s)) return std::puts(nosa::to_string(s).data()), 1;

  // Admit a sequence with a 1000-token prompt (K, V and eviction scores from the engine's prefill).
  const int prompt = 1000, hq = 32, hkv = 2, d = 128;
  std::vector<nosa::bf16> k(prompt * hkv * d, nosa::bf16(0.01f)), v(k);
  std::vector<float> c(prompt * hkv, 0.0f);
  nosa::prompt_args<nosa::bf16> p;
  p.k = nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(k.data()), {prompt, hkv, d});
  p.v = nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(v.data()), {prompt, hkv, d});
  p.c = nosa::make_contiguous<2>(static_cast<const float*>(c.data()), {prompt, hkv});
  if (nosa::status s = layer->add_sequence(/*seq=*/0, p); !nosa::ok(s)) return 1;

  // Decode: a plan call (reserve pages ahead), then one step per layer per token.
  const std::int32_t batch[] = {0};
  std::vector<nosa::bf16> q(hq * d, nosa::bf16(0.02f)), kt(hkv * d, nosa::bf16(0.01f)), vt(kt);
  std::vector<float> ct(hkv, 0.0f), o(hq * d);
  for (int t = 0; t < 100; ++t) {
    if (nosa::status s = layer->reserve(/*tokens_ahead=*/1); !nosa::ok(s)) return 1;
    nosa::step_args<nosa::bf16, float> a;
    a.sequences = nosa::make_contiguous<1>(batch, {1});
    a.q = nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(q.data()), {1, hq, d});
    a.k = nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(kt.data()), {1, hkv, d});
    a.v = nosa::make_contiguous<3>(static_cast<const nosa::bf16*>(vt.data()), {1, hkv, d});
    a.c = nosa::make_contiguous<2>(static_cast<const float*>(ct.data()), {1, hkv});
    a.o = nosa::make_contiguous<3>(o.data(), {1, hq, d});
    if (nosa::status s = layer->step(a); !nosa::ok(s)) return 1;
  }
  const nosa::counters n = layer->total_counters();
  std::printf("length %d, hits %llu, misses %llu\n", layer->length(0), static_cast<unsigned long long>(n.hits),
              static_cast<unsigned long long>(n.misses));
  return layer->length(0) == prompt + 100 ? 0 : 1;
}
