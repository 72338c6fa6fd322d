"""nosa as the decode attention of a Hugging Face transformers Llama model.

A Llama model is built from a small config with random weights (nothing is downloaded). Its attention is
replaced, through transformers' attention interface, by one `nosa.DecodeLayer` per model layer, which holds the
KV cache: each prompt is prefilled on its own with the model's own (SDPA) attention and handed to nosa with
`add_sequence`, then all prompts decode together, one `step` per layer per token, ragged (every sequence at its
own length and position). transformers keeps no cache at all (`use_cache=False`): the model sees one new token
per sequence, and nosa attends over everything before it.

The tokens are generated greedily and compared with the model's own attention (`model.generate` with SDPA, one
prompt at a time). While a context has at most `k` blocks, NOSA selects every block and its attention is the
dense attention, so in float32 the tokens must be the same (in bf16 or fp16 the two round differently, and a
near-tie of the logits may flip a token). The model has no eviction head, so its eviction scores are 0
(a NOSA-trained checkpoint computes them in each layer).

    python examples/python/llama_transformers.py                 # on the GPU, float32
    python examples/python/llama_transformers.py --dtype bf16 --context 3000
    python examples/python/llama_transformers.py --device cpu    # the host backend, CPU tensors

Needs: pip install . torch transformers (PyTorch with CUDA for the GPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import nosa

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NosaAttention:
    """The attention function of every layer of a model: dense prefill into nosa, then nosa decode steps.

    `admit(slot)` routes the next forward pass (one prompt, batch 1) to prefill: the model's own attention over
    the prompt, whose post-RoPE keys and values then enter the layer's `DecodeLayer` in `slot`.
    `decode(slots)` routes the next forward passes (one token per sequence) to `DecodeLayer.step`.
    """

    def __init__(
        self,
        config: transformers.LlamaConfig,
        *,
        device: str,
        dtype: str,
        max_sequences: int,
        max_tokens: int,
        variant: str = "nosa",
        block: int = 64,
        topk: int = 64,
        topk_qa: int = 33,
    ):
        self.head_dim = config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.device = torch.device(device)
        blocks = (max_tokens + block - 1) // block + 1
        self.layers = [
            nosa.DecodeLayer(
                num_q_heads=config.num_attention_heads,
                num_kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim,
                dtype=dtype,
                variant=variant,
                block=block,
                topk=topk,
                topk_qa=topk_qa,
                max_sequences=max_sequences,
                max_blocks_per_sequence=blocks,
                pool_pages=max_sequences * blocks,
                device=device,
            )
            for _ in range(config.num_hidden_layers)
        ]
        self.topk = topk
        self.block = block
        self._admitting: int | None = None
        self._sequences: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None

    def admit(self, slot: int) -> None:
        self._admitting = slot

    def decode(self, slots: list[int]) -> None:
        self._admitting = None
        self._sequences = torch.tensor(slots, dtype=torch.int32, device=self.device)
        # No eviction head in this model: every eviction score is 0 (the bias then adds nothing).
        self._scores = torch.zeros(len(slots), self.num_kv_heads, dtype=torch.float32, device=self.device)

    def reserve(self, tokens: int) -> None:
        """The plan call before decode steps: pool pages for `tokens` more tokens of every sequence."""
        for layer in self.layers:
            layer.reserve(tokens)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, H_q, S, D], key and value [B, H_kv, S, D], post-RoPE; returns [B, S, H_q, D].
        assert scaling is None or abs(scaling - self.head_dim**-0.5) < 1e-12, "nosa scales logits by 1/sqrt(D)"
        layer = self.layers[module.layer_idx]
        if self._admitting is not None:
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
            prompt = key.shape[2]
            # [1, H_kv, P, D] -> [P, H_kv, D]: a transposed view (innermost stride 1), read in place.
            layer.add_sequence(
                self._admitting,
                key[0].transpose(0, 1),
                value[0].transpose(0, 1),
                torch.zeros(prompt, self.num_kv_heads, dtype=torch.float32, device=self.device),
            )
            return out, None
        assert query.shape[2] == 1, "decode passes one token per sequence"
        o = layer.step(self._sequences, query[:, :, 0], key[:, :, 0], value[:, :, 0], self._scores)
        return o.to(query.dtype).unsqueeze(1), None


def build_model(args) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.heads * args.head_dim,
        intermediate_size=4 * args.heads * args.head_dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=8192,
        initializer_range=args.init_range,
        # No end-of-sequence token: both generations run the full number of tokens.
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(device=args.device, dtype=TORCH_DTYPES[args.dtype])
    return model.eval()


@torch.no_grad()
def generate_with_model(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The model's own attention (SDPA with its KV cache), greedy, one prompt at a time."""
    model.set_attn_implementation("sdpa")
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        assert tokens.shape[1] == len(prompt) + new_tokens
        out.append(tokens[0, len(prompt) :].tolist())
    return out


@torch.no_grad()
def generate_with_nosa(model, attention: NosaAttention, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Prefill each prompt into its own slot, then decode all of them as one ragged batch, greedily."""
    model.set_attn_implementation("nosa")
    device = model.device
    first = []
    for slot, prompt in enumerate(prompts):
        attention.admit(slot)
        logits = model(input_ids=torch.tensor([prompt], device=device), use_cache=False).logits
        first.append(int(logits[0, -1].argmax()))
    slots = list(range(len(prompts)))
    attention.decode(slots)
    tokens = torch.tensor(first, device=device)
    positions = torch.tensor([len(p) for p in prompts], device=device)
    generated = [tokens]
    for _ in range(new_tokens - 1):
        attention.reserve(1)
        logits = model(input_ids=tokens[:, None], position_ids=positions[:, None], use_cache=False).logits
        tokens = logits[:, -1].argmax(-1)
        positions = positions + 1
        generated.append(tokens)
    return torch.stack(generated, dim=1).tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the CUDA backend) or cpu (the host backend)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(TORCH_DTYPES), help="model and KV storage type")
    parser.add_argument("--variant", default="nosa", choices=["nosa", "infllmv2", "full"])
    parser.add_argument("--context", type=int, default=1500, help="longest prompt, in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=3, help="prompts, of lengths spread up to --context")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64, choices=[64, 128, 256])
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--init-range", type=float, default=0.05, help="std of the random weights")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("llama_transformers: no CUDA device; run with --device cpu for the host backend", file=sys.stderr)
        return 2
    model = build_model(args)
    max_tokens = args.context + args.new_tokens
    attention = NosaAttention(
        model.config,
        device=args.device,
        dtype=args.dtype,
        max_sequences=args.batch,
        max_tokens=max_tokens,
        variant=args.variant,
        block=args.block,
        topk=args.topk,
        topk_qa=min(33, args.topk),
    )
    transformers.AttentionInterface.register("nosa", attention)

    generator = torch.Generator().manual_seed(args.seed + 1)
    lengths = [max(1, args.context * (i + 1) // args.batch - 7 * i) for i in range(args.batch)]
    prompts = [torch.randint(0, args.vocab, (n,), generator=generator).tolist() for n in lengths]

    start = time.perf_counter()
    expected = generate_with_model(model, prompts, args.new_tokens)
    dense_seconds = time.perf_counter() - start
    start = time.perf_counter()
    got = generate_with_nosa(model, attention, prompts, args.new_tokens)
    nosa_seconds = time.perf_counter() - start

    within_k = all(-(-(n + args.new_tokens) // args.block) <= args.topk for n in lengths)
    same = got == expected
    counters = attention.layers[0].counters()
    print(
        f"llama_transformers: {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), head dim "
        f"{args.head_dim}, {args.dtype} on {args.device}; nosa {args.variant}, block {args.block}, k {args.topk}"
    )
    print(
        f"  prompts of {lengths} tokens, {args.new_tokens} new tokens each "
        f"(model's attention {dense_seconds:.2f} s, nosa {nosa_seconds:.2f} s)"
    )
    print(f"  layer 0: {counters['steps']} steps, {counters['hits']} hits, {counters['misses']} misses")
    for i, (a, b) in enumerate(zip(got, expected)):
        agree = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"  sequence {i}: {agree}/{len(a)} tokens as the model's own attention")
    if not within_k:
        print("  contexts beyond k blocks: sparse attention may choose other tokens")
        return 0
    if args.dtype != "fp32":
        # nosa accumulates in fp32 and rounds its output once; the model's 16-bit attention rounds along the way.
        # A logit near-tie can then flip a token, after which the two generations part.
        print(
            "  every context within k blocks, 16-bit: the tokens agree up to a rounding near-tie:",
            "all of them" if same else "until one",
        )
        return 0
    print("  every context within k blocks: the tokens must match:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
