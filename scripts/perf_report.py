#!/usr/bin/env python3
"""Turns the JSON of bench_cuda_step into docs/performance.md and its plots.

    scripts/perf_report.py perf.json --out DIR [--machine FILE] [--image-prefix PREFIX]
    scripts/perf_report.py --skeleton --out DIR      # the document with an empty Results section

Writes DIR/performance.md and, when matplotlib is available, five PNG plots beside it:
h2d_bandwidth.png, attention_bandwidth.png, step_vs_batch.png, step_vs_context.png and stage_times.png.
Every figure is given as achieved value, ceiling and ratio; the ceilings are the ones the benchmark measured
in the same process (recorded in the JSON's context). With repetitions, the median aggregate of each
benchmark is used; without, the median of its runs. Benchmarks that skipped themselves with an error are
listed, never reported as figures.

Only the standard library is needed for the markdown; the plots need matplotlib (Agg backend, no display).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict

# ----------------------------------------------------------------------------------------------------------
# Targets of the performance issue (H200, bf16, D = 128).
# ----------------------------------------------------------------------------------------------------------

GATHER_MIN_BYTES = 4 << 20       # the gather target applies to steps that move at least this much
GATHER_CEILING_RATIO = 0.92      # of the contiguous H2D copy
NOSI_SAME_BYTES_RATIO = 0.95     # set-difference + gather against a contiguous copy of the same bytes
NOSI_MS, NOSI_GBPS = 0.1256, 48.8  # the released NOSI at its micro-benchmark shape, measured on this GPU
ZERO_MISS_US = 5.0
ATTENTION_RATIO = 0.80           # of the HBM read ceiling, whenever B x H_kv >= 64
ATTENTION_MIN_ROWS = 64
STEP_B1_US = 40.0                # B = 1, 32K, H_kv = 2, resident store, graph-replayed
OTHER_SHARE = 0.15               # non-attention, non-transfer share of the step at 32K and B = 64
EXPOSED_SHARE = 0.25             # transfer time left exposed by the overlapped step
GRAPH_GAP = 0.10                 # graph replay at most 10% above the sum of its kernels (launch gaps)

IMAGES = ["h2d_bandwidth.png", "attention_bandwidth.png", "step_vs_batch.png", "step_vs_context.png",
          "stage_times.png"]


# ----------------------------------------------------------------------------------------------------------
# Reading the JSON.
# ----------------------------------------------------------------------------------------------------------

def load_json(path: str) -> dict:
    """Loads Google Benchmark JSON; a file cut short (a run stopped part-way) keeps its complete entries."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    text = text.replace("-NaN", "NaN")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # Cut after the last complete benchmark entry and close the document.
    start = text.find('"benchmarks"')
    if start < 0:
        raise SystemExit(f"error: {path} holds no benchmarks")
    for end in range(len(text), start, -1):
        if text[end - 1] != "}":
            continue
        candidate = text[:end] + "\n]\n}\n"
        try:
            data = json.loads(candidate)
            print(f"warning: {path} was incomplete; using the {len(data.get('benchmarks', []))} complete entries",
                  file=sys.stderr)
            data.setdefault("context", {})["truncated"] = "yes"
            return data
        except json.JSONDecodeError:
            continue
    raise SystemExit(f"error: cannot read {path} as JSON")


def parse_name(run_name: str) -> tuple[str, dict]:
    """'step/offload/batch:16/context:32768/iterations:50/manual_time' -> ('step/offload', {'batch': 16, ...})."""
    family, params = [], {}
    for part in run_name.split("/"):
        if ":" in part:
            key, _, value = part.partition(":")
            if key in ("iterations", "repeats", "min_time", "min_warmup_time", "threads"):
                continue
            try:
                params[key] = int(value)
            except ValueError:
                try:
                    params[key] = float(value)
                except ValueError:
                    params[key] = value
        elif part not in ("manual_time", "real_time", "process_time"):
            family.append(part)
    return "/".join(family), params


NON_COUNTERS = {"name", "family_index", "per_family_instance_index", "run_name", "run_type", "repetitions",
                "repetition_index", "threads", "iterations", "real_time", "cpu_time", "time_unit",
                "aggregate_name", "aggregate_unit", "error_occurred", "error_message", "label"}

TIME_SCALE_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


class Result:
    def __init__(self, run_name: str, values: dict):
        self.run_name = run_name
        self.family, self.params = parse_name(run_name)
        self.v = values

    def get(self, key: str, default=None):
        return self.v.get(key, default)

    def p(self, key: str, default=None):
        return self.params.get(key, default)


def collect(data: dict) -> tuple[list[Result], list[tuple[str, str]]]:
    """Median figures of every benchmark that ran, and (name, message) of every one that skipped itself."""
    medians, runs, errors, order = {}, defaultdict(list), {}, []
    for b in data.get("benchmarks", []):
        run_name = b.get("run_name") or b.get("name", "")
        if run_name not in order:
            order.append(run_name)
        if b.get("error_occurred"):
            errors[run_name] = b.get("error_message", "error")
            continue
        values = {k: v for k, v in b.items() if k not in NON_COUNTERS and isinstance(v, (int, float))}
        scale = TIME_SCALE_US.get(b.get("time_unit", "us"), 1.0)
        if "real_time" in b:
            values["time_us"] = float(b["real_time"]) * scale
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[run_name] = values
        else:
            runs[run_name].append(values)
    results = []
    for run_name in order:
        if run_name in errors and run_name not in medians and not runs.get(run_name):
            continue
        if run_name in medians:
            values = medians[run_name]
        elif runs.get(run_name):
            keys = set().union(*(r.keys() for r in runs[run_name]))
            values = {k: statistics.median([r[k] for r in runs[run_name] if k in r]) for k in keys}
        else:
            continue
        results.append(Result(run_name, values))
    return results, sorted(errors.items())


# ----------------------------------------------------------------------------------------------------------
# Formatting.
# ----------------------------------------------------------------------------------------------------------

def num(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return "–"
    if x == 0:
        return "0"
    if float(x).is_integer() and abs(x) < 1e7:
        return f"{int(x):,}"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.{digits}f}"


def pct(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%"


def mib(b) -> str:
    return "–" if b is None else num(b / (1 << 20))


def size_text(b: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            v = b / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{b:.0f} B"


def table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_No results._\n"
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def ctx_float(ctx: dict, key: str):
    try:
        return float(ctx[key])
    except (KeyError, TypeError, ValueError):
        return None


def verdict(met: bool, how_much: str = "") -> str:
    return "met" if met else ("**missed**" + (f" ({how_much})" if how_much else ""))


# ----------------------------------------------------------------------------------------------------------
# The document.
# ----------------------------------------------------------------------------------------------------------

INTRO = """# Performance

How fast the CUDA decode step of one layer runs on an NVIDIA H200, stage by stage and whole, measured against
the physical limits of the same GPU in the same run. The benchmarks are `bench/bench_cuda_step.cu` (Google
Benchmark); this page is generated from their JSON by `scripts/perf_report.py`.

All figures are bf16, head dimension 128, `H_q = 32` query heads over `H_kv = 2` KV heads (group 16) or
`H_kv = 8` (group 4), and the paper's selection: blocks of 64 tokens, `k = 64` blocks per (sequence, KV head)
of which 33 query-aware (the sink, 16 local blocks and the current one included), compression windows of 32
tokens with stride 16. "Context" is the prompt length each sequence was admitted with (minus three tokens,
so every sequence has a partial tail block); sequences grow by up to about a thousand tokens during a run.

## Regenerating this page

1. On a machine with Debian's `doctest-dev` and `libbenchmark-dev` (any development machine that runs
   `scripts/test.sh`), stage the two libraries for a GPU machine that has neither and no network:

   ```sh
   scripts/stage-gpu-deps.sh          # writes .deps/doctest and .deps/benchmark (git-ignored)
   ```

2. On the GPU machine, from the repository root, with `.deps` travelling along with the tree (it is
   git-ignored, so it has to be copied or carried explicitly):

   ```sh
   OUT=out scripts/perf.sh            # builds build-perf/, runs the benchmarks (a few minutes), writes the report
   ```

   It writes `$OUT/perf.json` (the raw Google Benchmark JSON), `$OUT/performance.md` (this page) and the PNG
   plots beside it, plus `$OUT/perf.log`. It never changes clocks or any other GPU setting: the card is
   measured as it is found (its clocks and PCIe link are recorded below).

3. Copy `performance.md` and the PNGs into `docs/`.

`scripts/perf_report.py perf.json --out DIR` regenerates the page and the plots from a saved JSON.

## How the figures are measured

- **Ceilings**, measured first in the same process: PCIe host to device is one 256 MiB `cudaMemcpyAsync`
  from pinned memory (best of 7 after two warm-ups); device to host likewise; HBM copy is a 2 GiB
  device-to-device `cudaMemcpyAsync`, counting the bytes read plus the bytes written; HBM read is a kernel
  that sums 2 GiB with 16-byte loads, four in flight per thread. Every "ratio" below is achieved / ceiling.
- **Timing**: CUDA events around each timed region, one region per iteration (Google Benchmark's manual
  time), several repetitions; the tables give the median repetition, and within a repetition every derived
  figure uses the median iteration. A 256 MiB memset precedes every region, so that its data comes from HBM
  and not from the 60 MB L2, then a 100 us spin kernel, so that the host has enqueued the whole region before
  the GPU reaches it: host launch latency is not in any figure.
- **The peer**: `bench/sdpa_peer.py` times PyTorch's `scaled_dot_product_attention` (cuDNN, FlashAttention
  and memory-efficient backends, each forced in turn) at the same decode shapes in the same run, with the
  same memset before every call; the tables compare nosa with the fastest backend.
- **Checked before timed**: every benchmark first re-admits the first and the last sequence of its batch,
  runs one step of the whole batch through exactly the launches it times (the stage kernels, or the captured
  graph), and compares those rows' selections and outputs with the host backend given the same prompts and
  inputs (outputs within rtol 1e-4 + atol 2e-5 + one bf16 ulp; a different selection is accepted only as an
  fp32 near-tie of the host's scores, counted in `near_ties`); the output is poisoned first and must be
  written everywhere. The gather benchmark also checks that the diff found exactly the blocks it evicted and
  that every loaded slot equals its page in the host pool. A benchmark that fails its check reports an
  error instead of a time (listed at the end).
"""

TABLE_NOTES = """## What each table means

- **Beside the peer**: nosa's attention + merge against the fastest SDPA backend: dense rows over the same
  context, sparse rows over 4,096 contiguous keys (the bytes of k = 64 blocks of 64 tokens); then the
  targets of the kernels issue decided against the peer or a ceiling of the same run (scoring is the
  append + scoring stage of the step against the compressed-key bytes it reads).
- **Ceilings**: the reference figures of this run. `h2d_copy` at several sizes shows how a contiguous copy
  ramps up with size (the first plot); the 256 MiB copy is the H2D ceiling.
- **Gather (offload store)**: the set-difference (run by `select_kernel` after the selection) +
  `gather_kernel`, as a step launches them (without the write-back of a completed tail), on a batch whose
  selections are forced to miss a given share of their `k` blocks: before each timed run a small kernel
  evicts that many non-forced selected blocks of every (sequence, KV head) from the slot cache, so the diff
  finds exactly those missing and the gather loads them (K and V, 16 KiB each) from the pinned host pool over
  PCIe. The diff's time is the selection kernel's with the diff less its time without it on the same state.
  *Bytes* = misses x 32 KiB; *GB/s* = bytes / (diff + gather time); *ratio* = GB/s / H2D ceiling; *copy* =
  one contiguous `cudaMemcpyAsync` of the same bytes, and *vs copy* = copy time / (diff +
  gather time), the figure NOSI's 88% is quoted in.
  Zero-miss rows give the cost of a step that moves nothing.
- **Attention**: `attention_kernel` + `merge_kernel` over full selections (`k = 64` blocks, about 2 MiB of
  K and V per (sequence, KV head)). *KV bytes* = the bytes of the selected K and V rows; *GB/s* = KV bytes /
  (attention + merge time); *ratio* to the HBM read ceiling. *Splits* is the number of parts each (sequence,
  KV head) is split into (`attention_splits`); *scratch* the partial results written by the splits and read
  by the merge, which the KV bytes leave out.
- **Step**: one layer's whole step captured once in a CUDA graph and replayed (*step*), with inputs that
  change every step (fresh K, V, c; queries drifting, so the selection moves as in a decode: the offload
  store's misses per step are whatever that drift causes). Then the same number of steps launched kernel by
  kernel with events between the kernels: the per-stage times and their sum (*kernels*); *graph/kernels*
  shows the launch gaps a replay keeps (the events between the kernels cost a little GPU time of their own,
  so the sum slightly overstates the kernels). *Other* is the share of the kernel time that is neither
  attention nor transfer (begin, append + compression + scoring, selection + diff).
- **Targets**: each target of the performance issue with the figure that decides it, its ceiling and ratio.
"""


def section_machine(ctx: dict, machine_text: str | None) -> str:
    rows = []
    for key, label in (("gpu", "GPU"), ("gpu_compute_capability", "compute capability"), ("gpu_sms", "SMs"),
                       ("gpu_memory_gib", "memory (GiB)"), ("cuda_runtime", "CUDA runtime"),
                       ("cuda_driver", "CUDA driver (API version)"), ("nosa_version", "nosa"),
                       ("date", "date"), ("host_name", "host"), ("num_cpus", "host CPUs"),
                       ("library_build_type", "Google Benchmark library build (not the timed code)")):
        if key in ctx:
            rows.append([label, str(ctx[key])])
    if ctx.get("truncated"):
        rows.append(["note", "the JSON was cut short: the run did not finish"])
    out = "### Machine\n\n" + table(["", ""], rows)
    if machine_text:
        out += "\nAs `nvidia-smi` read the card around the run (read-only queries):\n\n```\n" + \
               machine_text.strip() + "\n```\n"
    return out


def section_ceilings(ctx: dict, results: list[Result]) -> str:
    c = {k: ctx_float(ctx, k) for k in ("ceiling_h2d_GBps", "ceiling_h2d_median_GBps", "ceiling_d2h_GBps",
                                         "ceiling_hbm_copy_GBps", "ceiling_hbm_read_GBps")}
    rows = [
        ["PCIe H2D, 256 MiB `cudaMemcpyAsync` from pinned memory", num(c["ceiling_h2d_GBps"]),
         num(c["ceiling_h2d_median_GBps"]), "53.0 – 55.5"],
        ["PCIe D2H, 256 MiB", num(c["ceiling_d2h_GBps"]), "–", "55.2 – 55.3"],
        ["HBM device-to-device copy, 2 GiB (read + write)", num(c["ceiling_hbm_copy_GBps"]), "–", "4277 (4 GiB)"],
        ["HBM read kernel, 2 GiB, 16-byte loads", num(c["ceiling_hbm_read_GBps"]), "–", "~4680; 4476"],
    ]
    out = "### Ceilings\n\n" + table(["ceiling", "best GB/s", "median GB/s", "earlier measurement (limits-h200.md)"],
                                      rows)
    ceil_rows = []
    for r in results:
        if not r.family.startswith("ceiling/"):
            continue
        ceil_rows.append([r.family.split("/", 1)[1], size_text(r.get("bytes", r.p("bytes", 0))), num(r.get("median_us")),
                          num(r.get("GBps")), num(r.get("ceiling_GBps")), pct(r.get("ratio"))])
    out += "\nThe same transfers as benchmarks (median of their iterations):\n\n"
    out += table(["transfer", "bytes moved", "time (us)", "GB/s", "ceiling GB/s", "ratio"], ceil_rows)
    return out


def gather_rows(results):
    return [r for r in results if r.family == "gather"]


def attention_rows(results):
    return [r for r in results if r.family.startswith("attention/")]


def step_rows(results):
    return [r for r in results if r.family.startswith("step/")]


def section_gather(results) -> str:
    rows = []
    for r in gather_rows(results):
        rows.append([str(r.p("batch")), str(r.p("hkv")), str(r.p("group")), str(r.p("context")), str(r.p("miss_pct")),
                     num(r.get("misses")), mib(r.get("bytes_h2d")), num(r.get("median_us")),
                     num(r.get("diff_us", r.get("select_diff_us"))), num(r.get("gather_us")), num(r.get("GBps")),
                     num(r.get("ceiling_GBps")), pct(r.get("ratio")) if r.get("bytes_h2d") else "–",
                     num(r.get("copy_same_bytes_us")) if r.get("bytes_h2d") else "–",
                     pct(r.get("ratio_same_bytes")) if r.get("bytes_h2d") else "–"])
    return "### Gather (set-difference + gather, offload store)\n\n" + table(
        ["batch", "H_kv", "group", "context", "miss %", "misses", "MiB", "diff+gather (us)", "diff (us)",
         "gather (us)", "GB/s", "ceiling GB/s", "ratio", "copy (us)", "vs copy"], rows)


def section_attention(results) -> str:
    rows = []
    for r in attention_rows(results):
        rows.append([r.family.split("/")[1], str(r.p("context")), str(r.p("hkv")), str(r.p("group")), str(r.p("batch")),
                     num(r.get("rows", (r.p("batch") or 0) * (r.p("hkv") or 0))), num(r.get("splits")),
                     mib(r.get("kv_bytes")), mib(r.get("scratch_bytes")), num(r.get("median_us")),
                     num(r.get("attention_us")), num(r.get("merge_us")), num(r.get("GBps")),
                     num(r.get("ceiling_GBps")), pct(r.get("ratio"))])
    return "### Attention (attention + merge over full selections)\n\n" + table(
        ["store", "context", "H_kv", "group", "batch", "B x H_kv", "splits", "KV MiB", "scratch MiB", "time (us)",
         "attention (us)", "merge (us)", "GB/s", "ceiling GB/s", "ratio"], rows)


def section_step(results) -> str:
    rows = []
    for r in step_rows(results):
        rows.append([r.family.split("/")[1], str(r.p("context")), str(r.p("hkv")), str(r.p("batch")),
                     num(r.get("median_us")), num(r.get("step_ms"), 4), num(r.get("kernels_us")),
                     num(r.get("graph_over_kernels")), num(r.get("begin_us")), num(r.get("append_score_us")),
                     num(r.get("select_diff_us")), num(r.get("gather_us")), num(r.get("attention_us")),
                     num(r.get("merge_us")), pct(r.get("other_share")), num(r.get("misses_per_step")),
                     mib(r.get("h2d_bytes_per_step")), num(r.get("attention_GBps")), pct(r.get("attention_ratio"))])
    return "### Whole step (graph replay) and time per stage\n\n" + table(
        ["store", "context", "H_kv", "batch", "step (us)", "ms/step", "kernels (us)", "graph/kernels", "begin",
         "append+score", "select+diff", "gather", "attention", "merge", "other", "misses/step", "H2D MiB/step",
         "attention GB/s", "attention ratio"], rows) + \
        "\nStage columns are microseconds (median of the kernel-by-kernel steps). The attention ratio is to " \
        "the HBM read ceiling, for the bytes of the selected K and V.\n"


def section_targets(ctx: dict, results) -> str:
    h2d = ctx_float(ctx, "ceiling_h2d_GBps")
    hbm = ctx_float(ctx, "ceiling_hbm_read_GBps")
    rows, notes = [], []

    # Gather at >= 4 MiB per step: >= 92% of the contiguous copy.
    for r in gather_rows(results):
        b = r.get("bytes_h2d") or 0
        if b < GATHER_MIN_BYTES or r.get("ratio") is None:
            continue
        ratio = r.get("ratio")
        share = (r.get("diff_us", r.get("select_diff_us")) or 0) / r.get("median_us") if r.get("median_us") else None
        how = f"{100 * (GATHER_CEILING_RATIO - ratio):.1f} points short"
        rows.append([f"gather >= {GATHER_CEILING_RATIO:.0%} of H2D copy (>= 4 MiB/step)",
                     f"B {r.p('batch')}, H_kv {r.p('hkv')}, {r.p('context')} ctx, {r.p('miss_pct')}% misses, "
                     f"{mib(b)} MiB", f"{num(r.get('GBps'))} GB/s", f"{num(h2d)} GB/s", pct(ratio),
                     verdict(ratio >= GATHER_CEILING_RATIO, how)])
        if ratio < GATHER_CEILING_RATIO and share is not None:
            notes.append(f"gather B {r.p('batch')}, H_kv {r.p('hkv')}, {r.p('miss_pct')}%: the diff takes "
                         f"{pct(share)} of the time; the gather alone reaches {num(r.get('gather_GBps'))} GB/s "
                         f"({pct((r.get('gather_GBps') or 0) / h2d) if h2d else '–'} of the ceiling).")

    # NOSI's micro-benchmark shape.
    for r in gather_rows(results):
        if r.p("batch") == 16 and r.p("hkv") == 2 and r.p("miss_pct") == 10 and r.p("context") == 32768:
            ratio = r.get("ratio_same_bytes")
            if ratio is None:
                continue
            rows.append(["diff + gather >= 95% of a copy of the same bytes (NOSI shape)",
                         f"B 16, H_kv 2, 10% misses, {mib(r.get('bytes_h2d'))} MiB",
                         f"{num(r.get('median_us'))} us ({num(r.get('GBps'))} GB/s)",
                         f"copy {num(r.get('copy_same_bytes_us'))} us", pct(ratio),
                         verdict(ratio >= NOSI_SAME_BYTES_RATIO, f"{100 * (NOSI_SAME_BYTES_RATIO - ratio):.1f} points short")])
            notes.append(f"NOSI at its micro-benchmark shape: {NOSI_MS} ms per step, {NOSI_GBPS} GB/s (88% of its "
                         f"copy); here {num((r.get('median_us') or 0) / 1000, 4)} ms, {num(r.get('GBps'))} GB/s.")

    # Zero misses.
    for r in gather_rows(results):
        if r.p("miss_pct") == 0:
            us = r.get("median_us")
            rows.append([f"step with zero misses <= {ZERO_MISS_US:.0f} us (diff + gather)",
                         f"B {r.p('batch')}, H_kv {r.p('hkv')}, {r.p('context')} ctx", f"{num(us)} us",
                         f"{ZERO_MISS_US:.0f} us", num(us / ZERO_MISS_US) + "x" if us else "–",
                         verdict(us is not None and us <= ZERO_MISS_US,
                                 f"{num(us - ZERO_MISS_US)} us over" if us else "")])

    # Attention at B x H_kv >= 64.
    for r in attention_rows(results):
        rows_ = r.get("rows", (r.p("batch") or 0) * (r.p("hkv") or 0))
        if rows_ < ATTENTION_MIN_ROWS or r.get("ratio") is None:
            continue
        ratio = r.get("ratio")
        kind = "dense attention, whole cache" if r.family.endswith("/full") else "sparse attention"
        rows.append([f"{kind} >= {ATTENTION_RATIO:.0%} of HBM read (B x H_kv >= 64)",
                     f"{r.family.split('/')[1]}, {r.p('context')} ctx, H_kv {r.p('hkv')}, B {r.p('batch')}",
                     f"{num(r.get('GBps'))} GB/s", f"{num(hbm)} GB/s", pct(ratio),
                     verdict(ratio >= ATTENTION_RATIO, f"{100 * (ATTENTION_RATIO - ratio):.1f} points short")])
        if ratio < ATTENTION_RATIO and r.get("median_us"):
            merge_share = (r.get("merge_us") or 0) / r.get("median_us")
            scratch = r.get("scratch_bytes") or 0
            kv = r.get("kv_bytes") or 1
            notes.append(f"attention {r.family.split('/')[1]}, {r.p('context')} ctx, H_kv {r.p('hkv')}, "
                         f"B {r.p('batch')}: {num(r.get('splits'))} splits, merge {pct(merge_share)} of the time, "
                         f"split scratch {pct(scratch / kv)} of the KV bytes.")

    # B = 1, 32K, H_kv 2, resident, graph-replayed.
    for r in step_rows(results):
        if r.family == "step/resident" and r.p("batch") == 1 and r.p("context") == 32768 and r.p("hkv") == 2:
            us = r.get("median_us")
            rows.append([f"B = 1, 32K, H_kv 2, resident step <= {STEP_B1_US:.0f} us (graph)", "one layer",
                         f"{num(us)} us", f"{STEP_B1_US:.0f} us", num(us / STEP_B1_US) + "x" if us else "–",
                         verdict(us is not None and us <= STEP_B1_US, f"{num(us - STEP_B1_US)} us over" if us else "")])
            if us and us > STEP_B1_US:
                stages = ", ".join(f"{k.replace('_us', '')} {num(r.get(k))}" for k in
                                   ("begin_us", "append_score_us", "select_diff_us", "attention_us", "merge_us"))
                notes.append(f"B = 1 resident step: {stages} us (kernel by kernel); cuDNN's dense decode alone "
                             f"takes 31.5 us at this shape.")

    # Non-attention, non-transfer share at 32K, B = 64.
    for r in step_rows(results):
        if r.p("context") == 32768 and r.p("batch") == 64 and r.get("other_share") is not None:
            share = r.get("other_share")
            rows.append([f"append + compression + scoring + selection + diff <= {OTHER_SHARE:.0%} of the step",
                         f"{r.family.split('/')[1]}, 32K, H_kv {r.p('hkv')}, B 64",
                         f"{num((r.get('begin_us') or 0) + (r.get('append_score_us') or 0) + (r.get('select_diff_us') or 0))} us",
                         f"{num(r.get('kernels_us'))} us", pct(share),
                         verdict(share <= OTHER_SHARE, f"{100 * (share - OTHER_SHARE):.1f} points over")])

    # Exposed transfer time of the overlapped step (offload store), at the run's own miss rate.
    for r in step_rows(results):
        if r.get("exposed_share") is None or not r.get("gather_us"):
            continue
        share = r.get("exposed_share")
        rows.append([f"exposed transfer <= {EXPOSED_SHARE:.0%} of the transfer time (overlapped step)",
                     f"{r.p('context')} ctx, H_kv {r.p('hkv')}, B {r.p('batch')}, hit rate {pct(r.get('hit_rate'))}, "
                     f"{num(r.get('misses_per_step'))} misses/step",
                     f"{num(r.get('exposed_transfer_us'))} us exposed ({num(r.get('overlap_us'))} us step)",
                     f"{num(r.get('gather_us'))} us gather", pct(share),
                     verdict(share <= EXPOSED_SHARE, f"{100 * (share - EXPOSED_SHARE):.1f} points over")])

    # Graph replay against the kernels: one row for the worst configuration, one for every miss.
    graphed = [r for r in step_rows(results) if r.get("graph_over_kernels") is not None]
    if graphed:
        def where(r):
            return f"{r.family.split('/')[1]}, {r.p('context')} ctx, H_kv {r.p('hkv')}, B {r.p('batch')}"

        def row(r, label):
            g = r.get("graph_over_kernels")
            return [label, where(r), f"{num(r.get('median_us'))} us", f"{num(r.get('kernels_us'))} us", num(g) + "x",
                    verdict(g <= 1.0 + GRAPH_GAP, f"{100 * (g - 1.0):+.1f}%")]

        # A launch gap makes the replay slower than its kernels; kernels timed one by one carry the events
        # between them, so a replay below their sum has no gaps at all.
        worst = max(graphed, key=lambda r: r.get("graph_over_kernels"))
        within = sum(r.get("graph_over_kernels") <= 1.0 + GRAPH_GAP for r in graphed)
        rows.append(row(worst, f"graph replay at most 10% above the sum of its kernels: {within} of {len(graphed)} "
                               "configurations; the slowest"))
        for r in graphed:
            if r is not worst and r.get("graph_over_kernels") > 1.0 + GRAPH_GAP:
                rows.append(row(r, "graph replay at most 10% above the sum of its kernels"))

    out = "### Targets\n\n" + table(["target", "where", "achieved", "ceiling / reference", "ratio", "verdict"], rows)
    out += ("\nNot measured by this suite yet: how many SMs the gather occupies at a time (its grid is about "
            "512 CTAs, of which only the misses copy).\n")
    if notes:
        out += "\nFigures that explain the misses (from the same run):\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return out


def load_peer(path: str | None) -> list[dict]:
    """The JSON lines of bench/sdpa_peer.py (PyTorch SDPA timed in the same run), or nothing."""
    if not path or not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def section_peer(ctx: dict, results, peer: list[dict]) -> str:
    """nosa's attention beside PyTorch SDPA's best backend at the same decode shape, and the targets of the
    kernels issue that are decided against a peer or a ceiling of the same run."""
    if not peer:
        return ""
    best = {(r["family"], r["batch"], r["hkv"], r["keys"]): r for r in peer if r.get("kind") == "sdpa_best"}
    ceiling = ctx_float(ctx, "ceiling_hbm_read_GBps")
    rows, targets = [], []
    for r in attention_rows(results):
        store = r.family.split("/")[1]
        family = "dense" if store == "full" else "sparse"
        keys = r.p("context") if family == "dense" else 4096  # k = 64 blocks of 64 tokens
        b, hkv = r.p("batch"), r.p("hkv")
        sdpa = best.get((family, b, hkv, keys))
        us = r.get("median_us")
        ratio = us / sdpa["us"] if sdpa and us else None
        rows.append([store, str(r.p("context")), str(hkv), str(b), num(us), num(r.get("GBps")),
                     pct(r.get("ratio")), (sdpa["backend"] if sdpa else "–"), num(sdpa["us"] if sdpa else None),
                     num(ratio) + ("x" if ratio else "")])
        if ratio is None:
            continue
        if family == "sparse" and b in (16, 64, 256):
            targets.append([f"sparse attention <= SDPA over {keys} contiguous keys", f"{store}, B {b}, H_kv {hkv}",
                            f"{num(us)} us", f"{num(sdpa['us'])} us ({sdpa['backend']})", num(ratio) + "x",
                            verdict(ratio <= 1.0, f"{num(ratio)}x")])
        if family == "dense" and (16 <= b <= 64 or b == 1):
            bound = 1.1 if b == 1 else 1.05
            targets.append([f"dense attention <= {bound} x SDPA", f"B {b}, H_kv {hkv}, {r.p('context')} ctx",
                            f"{num(us)} us", f"{num(sdpa['us'])} us ({sdpa['backend']})", num(ratio) + "x",
                            verdict(ratio <= bound, f"{num(ratio)}x")])
        if family == "sparse" and b * hkv >= 64 and r.get("ratio") is not None:
            targets.append(["sparse attention >= 85% of HBM read", f"{store}, B {b}, H_kv {hkv}",
                            f"{num(r.get('GBps'))} GB/s", f"{num(ceiling)} GB/s", pct(r.get("ratio")),
                            verdict(r.get("ratio") >= 0.85, f"{pct(r.get('ratio'))}")])
    for r in step_rows(results):
        store = r.family.split("/")[1]
        if store != "full" and r.p("batch") * r.p("hkv") >= 64 and r.get("score_ratio") is not None:
            targets.append(["scoring (append + logits + pooling) >= 80% of HBM read",
                            f"{store}, B {r.p('batch')}, H_kv {r.p('hkv')}, {r.p('context')} ctx",
                            f"{num(r.get('score_GBps'))} GB/s", f"{num(ceiling)} GB/s", pct(r.get("score_ratio")),
                            verdict(r.get("score_ratio") >= 0.80, pct(r.get("score_ratio")))])
        if r.p("batch") == 1 and r.p("context") == 32768 and r.p("hkv") == 2 and store != "full":
            bound = 35.0 if store == "resident" else 40.0
            # The offload target is the step without misses: the replay on unchanged inputs (`steady_us`).
            key, what = ("median_us", "") if store == "resident" else ("steady_us", ", no misses")
            if r.get(key) is not None:
                targets.append([f"whole step, B 1, graph <= {bound:.0f} us{what}",
                                f"{store}, 32768 ctx, H_kv 2" + (
                                    f" ({num(r.get('steady_misses_per_step'))} misses/step)" if what else ""),
                                f"{num(r.get(key))} us", f"{bound:.0f} us", num(r.get(key) / bound) + "x",
                                verdict(r.get(key) <= bound, f"{num(r.get(key) - bound)} us over")])
        if r.p("batch") == 64 and r.p("context") == 32768 and store != "full":
            targets.append(["not attention or transfer <= 15% of the step", f"{store}, B 64, H_kv {r.p('hkv')}",
                            pct(r.get("other_share")), "15%", pct(r.get("other_share")),
                            verdict(r.get("other_share") <= 0.15, pct(r.get("other_share")))])
    head = peer[0] if peer and peer[0].get("kind") == "ceiling" else {}
    note = (f"PyTorch {head.get('torch', '?')} on {head.get('gpu', '?')}, timed by `bench/sdpa_peer.py` in the same "
            f"run (its own HBM read ceiling: {num(head.get('hbm_read_GBps'))} GB/s); every timed call of either "
            "side follows a 256 MiB memset that evicts the L2.\n")
    return ("### Beside the peer: PyTorch SDPA\n\n" + note + "\n" + table(
        ["store", "context", "H_kv", "batch", "nosa attention + merge (us)", "nosa GB/s", "ratio to HBM read",
         "SDPA backend", "SDPA (us)", "nosa / SDPA"], rows) +
        "\nSparse rows are compared with SDPA over 4,096 contiguous keys (the bytes of k = 64 blocks of 64 tokens), "
        "dense rows with SDPA over the same context.\n\n### Targets of the kernels issue\n\n" + table(
            ["target", "where", "achieved", "peer / ceiling", "ratio", "verdict"], targets))


def section_errors(errors) -> str:
    if not errors:
        return ""
    rows = [[name, msg.replace("|", "\\|")] for name, msg in errors]
    return "### Benchmarks that reported an error\n\n" + table(["benchmark", "error"], rows)


def section_plots(prefix: str, made: list[str]) -> str:
    captions = {
        "h2d_bandwidth.png": "Achieved host-to-device bandwidth against bytes per transfer: contiguous copies, and "
                             "diff + gather (and gather alone) per step",
        "attention_bandwidth.png": "Attention + merge bandwidth on the selected K/V against B x H_kv",
        "step_vs_batch.png": "Step time (graph replay) against batch",
        "step_vs_context.png": "Step time (graph replay) against context",
        "stage_times.png": "Time per stage of the step (kernel by kernel)",
    }
    if not made:
        return ""
    return "### Plots\n\n" + "\n\n".join(f"![{captions[m]}]({prefix}{m})" for m in made) + "\n"


def document(data: dict | None, machine_text: str | None, prefix: str, made: list[str],
             peer: list[dict] | None = None) -> str:
    parts = [INTRO, TABLE_NOTES, "## Results\n"]
    if data is None:
        parts.append("_No results yet._ This section is written by `scripts/perf_report.py` from the JSON that\n"
                     "`scripts/perf.sh` produces on the GPU machine: the machine and its ceilings, then tables for\n"
                     "the gather, the attention and the whole step, the targets with achieved value, ceiling and\n"
                     "ratio, and the plots.\n")
        return "\n".join(parts)
    ctx = data.get("context", {})
    results, errors = collect(data)
    parts += [section_machine(ctx, machine_text), section_ceilings(ctx, results), section_peer(ctx, results, peer or []),
              section_targets(ctx, results),
              section_gather(results), section_attention(results), section_step(results),
              section_plots(prefix, made), section_errors(errors)]
    return "\n".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------------------------------------

def make_plots(data: dict, out_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not available: no plots", file=sys.stderr)
        return []
    ctx = data.get("context", {})
    results, _ = collect(data)
    h2d = ctx_float(ctx, "ceiling_h2d_GBps")
    hbm = ctx_float(ctx, "ceiling_hbm_read_GBps")
    made = []

    from matplotlib.ticker import FuncFormatter, NullFormatter

    def plain_ticks(ax, values, axis="x", fmt=str):
        values = sorted(set(v for v in values if v))
        if not values:
            return
        target = ax.xaxis if axis == "x" else ax.yaxis
        (ax.set_xticks if axis == "x" else ax.set_yticks)(values)
        target.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
        target.set_minor_formatter(NullFormatter())

    def short_size(v):
        for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if v >= scale:
                return f"{v / scale:g}{unit}"
        return f"{v:g}"

    def finish(fig, ax, name, xlabel, ylabel, title, legend_size=8, y_from_zero=False):
        """Labels, grid and legend of a line plot, then `save`."""
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if y_from_zero:
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=legend_size)
        save(fig, name)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made.append(name)

    # 1. H2D bandwidth against transfer size.
    copies = sorted((r.get("bytes"), r.get("GBps")) for r in results if r.family == "ceiling/h2d_copy"
                    and r.get("bytes") and r.get("GBps"))
    gathers = [r for r in gather_rows(results) if r.get("bytes_h2d")]
    if copies or gathers:
        fig, ax = plt.subplots(figsize=(8, 5))
        if copies:
            ax.plot([c[0] for c in copies], [c[1] for c in copies], "o-", label="contiguous cudaMemcpyAsync")
        for hkv, marker in ((2, "s"), (8, "^")):
            sel = [r for r in gathers if r.p("hkv") == hkv]
            if sel:
                ax.scatter([r.get("bytes_h2d") for r in sel], [r.get("GBps") for r in sel], marker=marker, s=50,
                           label=f"diff + gather, H_kv {hkv}", zorder=3)
                ax.scatter([r.get("bytes_h2d") for r in sel], [r.get("gather_GBps") for r in sel], marker=marker,
                           s=50, facecolors="none", edgecolors="gray", label=f"gather alone, H_kv {hkv}", zorder=3)
        if h2d:
            ax.axhline(h2d, color="k", ls="--", lw=1, label=f"H2D ceiling {h2d:.1f} GB/s")
            ax.axhline(GATHER_CEILING_RATIO * h2d, color="r", ls=":", lw=1, label="92% of the ceiling")
        ax.set_xscale("log", base=2)
        plain_ticks(ax, [float(4 ** i) * 65536 for i in range(8)], fmt=short_size)
        finish(fig, ax, "h2d_bandwidth.png", "bytes per transfer (per step for the gather)", "GB/s",
               "Host-to-device bandwidth", y_from_zero=True)

    # 2. Attention bandwidth against B x H_kv.
    att = attention_rows(results)
    if att:
        fig, ax = plt.subplots(figsize=(8, 5))
        series = defaultdict(list)
        for r in att:
            series[(r.family.split("/")[1], r.p("context"), r.p("hkv"))].append(r)
        for (store, context, hkv), rs in sorted(series.items()):
            rs.sort(key=lambda r: r.get("rows", 0))
            ax.plot([r.get("rows") for r in rs], [r.get("GBps") for r in rs], "o-",
                    label=f"{store}, {context // 1024}K, H_kv {hkv}")
        if hbm:
            ax.axhline(hbm, color="k", ls="--", lw=1, label=f"HBM read ceiling {hbm:.0f} GB/s")
            ax.axhline(ATTENTION_RATIO * hbm, color="r", ls=":", lw=1, label="80% of the ceiling")
        ax.axvline(ATTENTION_MIN_ROWS, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        plain_ticks(ax, [r.get("rows") for r in att], fmt=lambda v: f"{v:g}")
        finish(fig, ax, "attention_bandwidth.png", "B x H_kv", "GB/s of attended K/V",
               "Attention + merge (sparse: selected blocks; full: whole cache)", y_from_zero=True)

    steps = step_rows(results)
    if steps:
        # 3. Step time against batch.
        fig, ax = plt.subplots(figsize=(8, 5))
        series = defaultdict(list)
        for r in steps:
            series[(r.family.split("/")[1], r.p("context"), r.p("hkv"))].append(r)
        for (store, context, hkv), rs in sorted(series.items()):
            rs.sort(key=lambda r: r.p("batch"))
            ls = "-" if store == "resident" else "--"
            ax.plot([r.p("batch") for r in rs], [r.get("median_us") for r in rs], "o" + ls,
                    label=f"{store}, {context // 1024}K, H_kv {hkv}")
        ax.axhline(STEP_B1_US, color="r", ls=":", lw=1, label="40 us (B = 1 target)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_ticks(ax, [r.p("batch") for r in steps], fmt=lambda v: f"{v:g}")
        finish(fig, ax, "step_vs_batch.png", "batch (sequences)", "step time, us (one layer)",
               "Whole step, graph-replayed, against batch", legend_size=7)

        # 4. Step time against context.
        fig, ax = plt.subplots(figsize=(8, 5))
        series = defaultdict(list)
        for r in steps:
            if r.p("hkv") == 2:
                series[(r.family.split("/")[1], r.p("batch"))].append(r)
        for (store, batch), rs in sorted(series.items()):
            if len(rs) < 2:
                continue
            rs.sort(key=lambda r: r.p("context"))
            ls = "-" if store == "resident" else "--"
            ax.plot([r.p("context") for r in rs], [r.get("median_us") for r in rs], "o" + ls,
                    label=f"{store}, B {batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        plain_ticks(ax, [r.p("context") for r in steps], fmt=lambda v: f"{v / 1024:g}K")
        finish(fig, ax, "step_vs_context.png", "context (tokens)", "step time, us (one layer)",
               "Whole step, graph-replayed, against context (H_kv 2)", legend_size=7)

        # 5. Time per stage, as shares of the kernel time, the total in the label.
        stages = [("begin_us", "begin"), ("append_score_us", "append + compress + score"),
                  ("select_diff_us", "select + diff"), ("gather_us", "gather"), ("attention_us", "attention"),
                  ("merge_us", "merge")]
        ordered = sorted(steps, key=lambda r: (r.family, r.p("hkv"), r.p("context"), r.p("batch")))
        labels = [f"{r.family.split('/')[1][:3]} {r.p('context') // 1024}K h{r.p('hkv')} B{r.p('batch')} "
                  f"({num(r.get('kernels_us'))} us)" for r in ordered]
        fig, ax = plt.subplots(figsize=(11, max(3.0, 0.28 * len(ordered) + 1.5)))
        left = [0.0] * len(ordered)
        for key, name in stages:
            shares = [(r.get(key) or 0) / r.get("kernels_us") if r.get("kernels_us") else 0 for r in ordered]
            ax.barh(range(len(ordered)), shares, left=left, label=name)
            left = [a + b for a, b in zip(left, shares)]
        ax.set_yticks(range(len(ordered)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the kernel-by-kernel step time (total in brackets)")
        ax.set_title("Time per stage")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, "stage_times.png")
    return made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", help="bench_cuda_step --benchmark_out JSON")
    ap.add_argument("--out", required=True, help="folder for performance.md and the PNGs")
    ap.add_argument("--machine", help="text file with nvidia-smi readings to include")
    ap.add_argument("--image-prefix", default="", help="prefix of the image links in the markdown")
    ap.add_argument("--skeleton", action="store_true", help="write the page without results")
    ap.add_argument("--analysis", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                                                       "performance-analysis.md"),
                    help="hand-written analysis of the misses, appended to the page when the file exists")
    ap.add_argument("--peer", help="JSON lines of bench/sdpa_peer.py from the same run")
    ap.add_argument("--fail-on-errors", action="store_true",
                    help="exit with 2 when a benchmark reported an error (the page is written all the same)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.skeleton:
        text = document(None, None, args.image_prefix, [])
    else:
        if not args.json:
            ap.error("a JSON file is needed (or --skeleton)")
        data = load_json(args.json)
        machine = None
        if args.machine and os.path.exists(args.machine):
            with open(args.machine, encoding="utf-8", errors="replace") as f:
                machine = f.read()
        made = make_plots(data, args.out)
        text = document(data, machine, args.image_prefix, made, load_peer(args.peer))
        results, errors = collect(data)
        if args.analysis and os.path.exists(args.analysis):
            with open(args.analysis, encoding="utf-8") as f:
                text = text.rstrip("\n") + "\n\n" + f.read()
    path = os.path.join(args.out, "performance.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    if args.skeleton:
        print(f"perf_report: wrote {path}")
        return 0
    # The targets table, short, for a terminal.
    targets = text.split("### Targets", 1)[-1].split("\n\n", 2)[1] if "### Targets" in text else ""
    for line in targets.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("target", "---"):
            print(f"  {cells[5].replace('**', ''):<26} {cells[4]:>8}  {cells[2]:<22} {cells[0]}: {cells[1]}")
    for name, message in errors:
        print(f"  ERROR {name}: {message}")
    print(f"perf_report: {len(results)} benchmarks, {len(errors)} with errors, {len(made)} plots; wrote {path}")
    return 2 if errors and args.fail_on_errors else 0


if __name__ == "__main__":
    sys.exit(main())
