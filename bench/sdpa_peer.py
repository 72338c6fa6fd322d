#!/usr/bin/env python3
"""Times PyTorch's scaled_dot_product_attention (the peer an engine would use instead of nosa's attention) at
the decode shapes of bench_cuda_step, on the same GPU and in the same run, and writes one JSON object per
shape and backend.

Decode attention: one query token per sequence, q [B, H_q, 1, D], k and v [B, H_kv, L, D], bf16, GQA through
`enable_gqa=True`. Two families, matching the library's benchmarks:

  dense   every key of a context of L tokens (the FullAttn baseline);
  sparse  L = k x b_s contiguous keys (4,096 for k = 64 blocks of 64 tokens): the bytes nosa's sparse
          attention reads over its selected blocks.

Each backend (cuDNN, FlashAttention, memory-efficient) is forced in turn with `torch.nn.attention.sdpa_kernel`;
a backend that refuses a shape is reported as unsupported. Every timed call is preceded by a 256 MiB memset,
so the keys come from HBM, not from the 60 MB L2 (small shapes would otherwise fit), and so that the GPU never
waits for the host's launch of the timed call; CUDA events around the call, median of the repetitions. The
same run measures the HBM read ceiling (a sum over 2 GiB) so that each figure is also given as a ratio.

PyTorch is a benchmark-only tool: nothing in the library or its tests depends on it.

Usage: sdpa_peer.py [--out FILE.jsonl] [--reps N] [--quick]
"""
import argparse
import json
import statistics
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON lines output (default: stdout only)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    args = ap.parse_args()

    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F
    except ImportError as e:  # the GPU machine has it; a development machine may not
        print(f"sdpa_peer: PyTorch is not available ({e}); nothing to measure", file=sys.stderr)
        return 0
    if not torch.cuda.is_available():
        print("sdpa_peer: no CUDA device; nothing to measure", file=sys.stderr)
        return 0

    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def time_us(fn, reps):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for _ in range(3):
            fn()
        for i in range(reps):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))

    # HBM read ceiling: an int64 sum over 2 GiB (best of three medians).
    big = torch.ones(2 << 30 >> 3, dtype=torch.int64, device=dev)
    read_us = min(time_us(lambda: big.sum(), 10) for _ in range(3))
    ceiling = big.numel() * 8 / (read_us * 1e-6) / 1e9
    del big
    torch.cuda.empty_cache()
    props = torch.cuda.get_device_properties(dev)
    header = {"kind": "ceiling", "gpu": props.name, "torch": torch.__version__, "hbm_read_GBps": ceiling}
    records = [header]
    print(f"# {props.name}, torch {torch.__version__}, HBM read ceiling {ceiling:.0f} GB/s")

    hq, d = 32, 128
    shapes = []
    for hkv in (2, 8):
        batches = (1, 4, 16, 32, 64) if hkv == 2 else (1, 8, 16, 32, 64)
        for ctx in (32768, 131072):
            for b in batches:
                if args.quick and b not in (1, 16, 64):
                    continue
                if b * hkv * ctx * d * 2 * 2 > (24 << 30):  # K and V of more than 24 GiB
                    continue
                shapes.append(("dense", b, hkv, ctx))
        for b in (1, 16, 64, 256):
            shapes.append(("sparse", b, hkv, 4096))

    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    print(f"{'family':7} {'B':>4} {'Hkv':>3} {'L':>7} {'backend':10} {'us':>9} {'GB/s':>7} {'ratio':>6}")
    for family, b, hkv, ctx in shapes:
        g = torch.Generator(device=dev).manual_seed(b * 1000003 + hkv * 101 + ctx)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.bfloat16, generator=g)
        kv_bytes = 2 * k.numel() * k.element_size()
        best = None
        for name, backend in backends:
            rec = {"kind": "sdpa", "family": family, "batch": b, "hkv": hkv, "hq": hq, "head_dim": d,
                   "keys": ctx, "backend": name, "kv_bytes": kv_bytes}
            try:
                with sdpa_kernel([backend]):
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    us = time_us(fn, args.reps)
            except RuntimeError as e:
                rec["unsupported"] = str(e).splitlines()[0][:160]
                torch.cuda.synchronize()
                records.append(rec)
                continue
            gbps = kv_bytes / (us * 1e-6) / 1e9
            rec.update(us=us, GBps=gbps, ratio=gbps / ceiling)
            records.append(rec)
            print(f"{family:7} {b:>4} {hkv:>3} {ctx:>7} {name:10} {us:>9.1f} {gbps:>7.0f} {gbps / ceiling:>6.1%}")
            if best is None or us < best["us"]:
                best = rec
        if best is not None:
            records.append(dict(best, kind="sdpa_best"))
        del q, k, v
        torch.cuda.empty_cache()

    if args.out:
        with open(args.out, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
