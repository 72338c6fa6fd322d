#!/usr/bin/env python3
"""Turns the runs of scripts/throughput.sh into docs/throughput.md and its plots.

    scripts/throughput_report.py RUNS.jsonl [MORE.jsonl ...] --out DIR [--image-prefix PREFIX] [--link-gbps X]

Each input line is one nosa-engine report (`--json`) with the study's labels `phase` ("calibration" or
"sweep") and `hbm` (the budget as asked for: a number of GiB or "whole"), or an error line
{"error": ..., "args": ...}. Writes DIR/throughput.md and, when matplotlib is available, three PNGs beside
it: throughput_vs_context.png, throughput_vs_batch.png and ratios.png. Every throughput figure is given with
the measured locality and misses per step of the same run. Only the standard library is needed for the
markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

METHODS = ["full", "infllmv2-offload", "nosa-offload", "nosa-resident", "full-fp8", "infllmv2-offload-fp8",
           "nosa-offload-fp8"]
FP8_SUFFIX = "-fp8"         # a method with complete KV blocks in FP8; its bf16 namesake is the name without it
PAPER_LOCALITY = 0.944
TARGET_VS_FULL = 5.0        # nosa-offload / full at the longest context that fits, 80 GiB
TARGET_VS_INFLLMV2 = 1.9    # nosa-offload / infllmv2-offload, same settings
TARGET_SMALL_BATCH = 0.97   # nosa-resident at least 97% of full at batch 1-4
TARGET_LINK_SHARE = 0.85    # a miss-bound run moves at least 85% of the link's bandwidth
TARGET_FP8 = 1.6            # nosa-offload-fp8 / nosa-offload at 96K tokens, 80 GiB
IMAGES = ["throughput_vs_context.png", "throughput_vs_batch.png", "ratios.png"]
GIB = 1024.0 ** 3


def load_runs(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """The successful runs and the failed ones, from every JSON-lines file."""
    runs, failures = [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{number}: not JSON ({e})")
                (failures if "error" in r else runs).append(r)
    return runs, failures


def budget_label(r: dict) -> str:
    hbm = str(r.get("hbm", ""))
    if hbm in ("", "whole"):
        return f"whole card ({r.get('hbm_budget_bytes', 0) / GIB:.0f} GiB)" if r.get("hbm_budget_bytes") else "whole card"
    return f"{hbm} GiB"


def fmt(x, digits=1):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def locality(r: dict) -> str:
    return "n/a" if r.get("locality") is None else f"{r['locality']:.3f}"


def auto_runs(runs: list[dict]) -> dict:
    """{budget: {context: {method: run}}} of the --batch auto sweep runs (the last one wins)."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    for r in runs:
        if (r.get("phase", "sweep") == "sweep" and r.get("batch_auto") and not r.get("cache_slots")
                and not r.get("cache_slots_auto")):
            table[budget_label(r)][r["context"]][r["method"]] = r
    return table


def link_of(r: dict, link_gbps: float | None) -> tuple[float | None, str]:
    """The host-to-device ceiling to compare run `r` with, and where it comes from."""
    if r.get("link_h2d_gb_per_s"):
        return r["link_h2d_gb_per_s"], "the run's own 64 MiB pinned copy"
    return link_gbps, "--link-gbps"


def link_share(r: dict, link_gbps: float | None) -> float | None:
    link, _ = link_of(r, link_gbps)
    return r["h2d_gb_per_s"] / link if link and r.get("h2d_gb_per_s") else None


def over_roofline(r: dict) -> float | None:
    """The run's step time over its roofline (both measured in the run), or None for runs without one."""
    return r["ms_per_step"] / r["roofline_ms"] if r.get("roofline_ms") else None


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or not b.get("tokens_per_s"):
        return None
    return a["tokens_per_s"] / b["tokens_per_s"]


def bf16_namesake(method: str) -> str | None:
    """The bf16 method an FP8 method is compared with, or None for a bf16 method."""
    return method[:-len(FP8_SUFFIX)] if method.endswith(FP8_SUFFIX) else None


def headline_section(autos: dict, link_gbps: float | None) -> list[str]:
    if not autos:
        return []
    out = ["## Largest batch that fits (--batch auto)", "",
           "Each method at the batch `--batch auto` chose among those whose weights, KV arenas, activations and prefill "
           "workspace fit the HBM budget and whose offloaded KV cache fits host memory: the largest (runs that predate "
           "the engine's prediction), or the one of the highest predicted tokens/s, which without extra cache slots "
           "is the largest too. Ratios compare tokens/s at each method's own batch. "
           "*% of link* is the run's host-to-device rate over the PCIe ceiling measured by the same run; *roofline* is "
           "the step time the hardware allows the run (see the roofline section) and *x roofline* the step over it. "
           "*x bf16* compares an FP8 method (complete KV blocks in FP8 E4M3: half the bytes of every miss and slot) "
           "with its bf16 namesake.",
           ""]
    for budget in sorted(autos):
        out += [f"### HBM budget: {budget}", "",
                "| context | method | batch | tokens/s | x full | x infllmv2-offload | x bf16 | ms/step | misses/step "
                "| locality | PCIe GB/s | HBM GiB | host GiB | lanes | % of link | roofline ms | x roofline |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for context in sorted(autos[budget]):
            row = autos[budget][context]
            for m in METHODS:
                r = row.get(m)
                if not r:
                    continue
                out.append(
                    f"| {context} | {m} | {r['batch']} | {fmt(r['tokens_per_s'])} | {fmt(ratio(r, row.get('full')), 2)} "
                    f"| {fmt(ratio(r, row.get('infllmv2-offload')), 2)} "
                    f"| {fmt(ratio(r, row.get(bf16_namesake(m) or '')), 2)} | {fmt(r['ms_per_step'], 2)} "
                    f"| {fmt(r['misses_per_step'])} | {locality(r)} | {fmt(r['h2d_gb_per_s'], 2)} "
                    f"| {fmt(r['device_bytes'] / GIB)} | {fmt(r['host_bytes'] / GIB)} | {r.get('lanes', 1)} "
                    f"| {percent(link_share(r, link_gbps))} | {fmt(r.get('roofline_ms'), 2)} "
                    f"| {fmt(over_roofline(r), 2)} |")
        out.append("")
    return out


def roofline_section(runs: list[dict]) -> list[str]:
    """Every sweep run's step against its roofline, with the parts and the speeds it was computed from."""
    rows = sorted((r for r in runs if r.get("phase", "sweep") in ("sweep", "lanes") and r.get("roofline_ms")),
                  key=lambda r: (budget_label(r), r["context"], METHODS.index(r["method"]) if r["method"] in METHODS
                                 else 9, r["batch"], r.get("cache_slots", 0)))
    if not rows:
        return []
    out = ["## Roofline", "",
           "Each run's step against what the hardware allows it, all measured in the same run: per layer the longer of "
           "its gather (the bytes its counters gathered per step, over the link speed that random K and V blocks read "
           "by a kernel from pinned memory reach) and its HBM reads (compressed keys and scores of every window, K and "
           "V of the attended blocks and their tokens' scores, over a streaming kernel's read speed) plus its GEMMs "
           "(timed with events at the run's rows per lane), summed over layers, plus the LM head. *gather*, *HBM* and "
           "*GEMM* are the three terms summed over layers; *x roofline* is the step over the roofline.", "",
           "| HBM budget | context | method | batch | cache slots | ms/step | gather ms | HBM ms | GEMM ms | roofline ms "
           "| x roofline | gather GB/s | HBM GB/s |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {budget_label(r)} | {r['context']} | {r['method']} | {r['batch']} | {r.get('cache_slots', 0)} "
                   f"| {fmt(r['ms_per_step'], 2)} | {fmt(r.get('roofline_gather_ms'), 2)} "
                   f"| {fmt(r.get('roofline_hbm_ms'), 2)} | {fmt(r.get('roofline_gemm_ms'), 2)} "
                   f"| {fmt(r['roofline_ms'], 2)} | {fmt(over_roofline(r), 2)} | {fmt(r.get('gather_gb_per_s'))} "
                   f"| {fmt(r.get('hbm_gb_per_s'))} |")
    return out + [""]


def sizing_section(runs: list[dict]) -> list[str]:
    """Runs whose batch or slot-cache size the calibration chose: the prediction beside the measurement."""
    rows = sorted((r for r in runs if r.get("predicted_tokens_per_s")),
                  key=lambda r: (budget_label(r), r["context"], METHODS.index(r["method"]) if r["method"] in METHODS
                                 else 9, bool(r.get("cache_slots_auto"))))
    if not rows:
        return []
    out = ["## Sizing: predicted against measured", "",
           "Runs with `--batch auto` (and `--cache-slots auto`, marked *auto*): a calibration run of a few sequences "
           "times the GEMMs and measures the misses of each slot-cache size from its selections; the engine then "
           "picks the batch and size of the highest predicted tokens/s that fit memory. *sizes tried* lists each "
           "size's best batch and predicted tokens/s.", "",
           "| HBM budget | context | method | cache slots | batch | predicted tokens/s | tokens/s | measured / predicted "
           "| predicted misses/step | misses/step | calibration s | sizes tried |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        slots = f"{r.get('cache_slots', 0)} (auto)" if r.get("cache_slots_auto") else str(r.get("cache_slots", 0))
        tried = ", ".join(f"{t['cache_slots']}: {t['batch']} at {t['tokens_per_s']:,.0f}" for t in r.get("sizing", []))
        out.append(f"| {budget_label(r)} | {r['context']} | {r['method']} | {slots} | {r['batch']} "
                   f"| {fmt(r['predicted_tokens_per_s'])} | {fmt(r['tokens_per_s'])} "
                   f"| {fmt(r['tokens_per_s'] / r['predicted_tokens_per_s'], 2)} "
                   f"| {fmt(r.get('predicted_misses_per_step'))} | {fmt(r['misses_per_step'])} "
                   f"| {fmt(r.get('calibration_s'))} | {tried} |")
    return out + [""]


def targets_section(autos: dict, runs: list[dict], link_gbps: float | None) -> list[str]:
    out = ["## Targets", ""]
    for budget in sorted(autos):
        contexts = [c for c in sorted(autos[budget]) if {"full", "nosa-offload"} <= set(autos[budget][c])]
        if not contexts:
            out.append(f"- {budget}: no context where both full and nosa-offload ran.")
            continue
        c = contexts[-1]
        row = autos[budget][c]
        vs_full = ratio(row["nosa-offload"], row["full"])
        vs_inf = ratio(row["nosa-offload"], row.get("infllmv2-offload"))
        out.append(f"- {budget}, longest context where both ran ({c} tokens): nosa-offload / full = "
                   f"{fmt(vs_full, 2)} (target >= {TARGET_VS_FULL}: {'met' if vs_full and vs_full >= TARGET_VS_FULL else 'missed'}); "
                   f"nosa-offload / infllmv2-offload = {fmt(vs_inf, 2)} (target >= {TARGET_VS_INFLLMV2}: "
                   f"{'met' if vs_inf and vs_inf >= TARGET_VS_INFLLMV2 else 'missed'}).")
    for budget in sorted(autos):
        contexts = [c for c in sorted(autos[budget]) if {"nosa-offload", "nosa-offload-fp8"} <= set(autos[budget][c])]
        if not contexts:
            continue
        c = contexts[-1]
        q = ratio(autos[budget][c]["nosa-offload-fp8"], autos[budget][c]["nosa-offload"])
        out.append(f"- FP8 KV cache, {budget}, longest context where both ran ({c} tokens): nosa-offload-fp8 / "
                   f"nosa-offload = {fmt(q, 2)} (target >= {TARGET_FP8} at 98304 tokens, 80 GiB: "
                   f"{'met' if q and q >= TARGET_FP8 else 'missed'}).")
    small = defaultdict(dict)
    for r in runs:
        if r.get("phase", "sweep") == "sweep" and not r.get("batch_auto") and 1 <= r["batch"] <= 4:
            small[(budget_label(r), r["context"], r["batch"])][r["method"]] = r
    worst = None
    for key, row in sorted(small.items()):
        q = ratio(row.get("nosa-resident"), row.get("full"))
        if q is not None and (worst is None or q < worst[0]):
            worst = (q, key)
    if worst:
        q, (budget, context, batch) = worst
        out.append(f"- Small batches: the lowest nosa-resident / full ratio at batch 1-4 is {q:.3f} ({budget}, context "
                   f"{context}, batch {batch}); target >= {TARGET_SMALL_BATCH}: {'met' if q >= TARGET_SMALL_BATCH else 'missed'}.")
    offloaded = [r for r in runs if r.get("phase", "sweep") in ("sweep", "lanes") and link_share(r, link_gbps)]
    if offloaded:
        top = max(offloaded, key=lambda r: link_share(r, link_gbps))
        share = link_share(top, link_gbps)
        link, source = link_of(top, link_gbps)
        allowed = top["tokens_per_s"] / share
        out.append(f"- PCIe: the most transfer-bound run ({top['method']}, context {top['context']}, batch {top['batch']}, "
                   f"{top.get('lanes', 1)} lane(s), {budget_label(top)}) gathers {top['h2d_gb_per_s']:.1f} GB/s, "
                   f"{share:.0%} of the {link:.1f} GB/s link ({source}): {fmt(top['tokens_per_s'])} tokens/s against the "
                   f"{fmt(allowed)} that the link allows for its {top['h2d_gb_per_s'] * 1e3 / top['tokens_per_s']:.1f} MB "
                   f"per token (target >= {TARGET_LINK_SHARE:.0%} when misses make PCIe the bottleneck: "
                   f"{'met' if share >= TARGET_LINK_SHARE else 'missed'}; a share well below it means the run is not "
                   "PCIe-bound, or the gather is slow).")
    else:
        out.append("- PCIe: the PCIe GB/s column is the gathered bytes per second of decode; give --link-gbps to "
                   "compare it with the link.")
    return out + [""]


PROFILE_PARTS = ["gemm", "scoring", "selection", "gather", "attention", "other"]


def profile_section(autos: dict) -> list[str]:
    """Where one step's time goes, for the auto-batch runs that were profiled (--profile)."""
    rows = [(budget, context, m, autos[budget][context][m]) for budget in sorted(autos) for context in
            sorted(autos[budget]) for m in METHODS if m in autos[budget][context]
            and autos[budget][context][m].get("profile_ms")]
    if not rows:
        return []
    out = ["## Where a step's time goes", "",
           "One more step after the timed ones, run stage by stage on one stream with CUDA events between the stages "
           "(lanes one after the other, gathers not overlapped), ms per step summed over layers and lanes. *gemm* is "
           "every cuBLAS GEMM (projections, MLP, LM head); *scoring* appends the token and scores the windows; "
           "*selection* is the top-k and the set-difference; *gather* loads the misses over PCIe; *attention* is the "
           "attention and its merge; *other* the norms, RoPE, eviction head, embedding and argmax. *graph* is the "
           "timed step as replayed, where lanes and gathers overlap.", "",
           "| HBM budget | context | method | batch | " + " | ".join(PROFILE_PARTS) + " | sum | graph |",
           "|---|---:|---|---:|" + "---:|" * (len(PROFILE_PARTS) + 2)]
    for budget, context, m, r in rows:
        p = r["profile_ms"]
        out.append(f"| {budget} | {context} | {m} | {r['batch']} | "
                   + " | ".join(fmt(p.get(k, 0.0), 2) for k in PROFILE_PARTS)
                   + f" | {fmt(p.get('total', 0.0), 2)} | {fmt(r['ms_per_step'], 2)} |")
    return out + [""]


def lanes_section(runs: list[dict], autos: dict) -> list[str]:
    """Runs at an auto batch with another number of lanes (phase "lanes") against the auto run itself."""
    rows = []
    for r in runs:
        if r.get("phase") != "lanes":
            continue
        base = autos.get(budget_label(r), {}).get(r["context"], {}).get(r["method"])
        if base:
            rows.append((budget_label(r), r["context"], r["method"], r, base))
    if not rows:
        return []
    out = ["## Lanes side by side", "",
           "The same batch with the study's lanes and with another number of lanes: two lanes let one lane's gathers "
           "cross PCIe while the other computes, at the price of reading the weights once per lane.", "",
           "| HBM budget | context | method | batch | lanes | tokens/s | lanes | tokens/s | x | PCIe GB/s | PCIe GB/s |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for budget, context, m, r, base in sorted(rows, key=lambda x: (x[0], x[1], x[2])):
        out.append(f"| {budget} | {context} | {m} | {r['batch']} | {r.get('lanes', 1)} | {fmt(r['tokens_per_s'])} "
                   f"| {base.get('lanes', 1)} | {fmt(base['tokens_per_s'])} | {fmt(ratio(base, r), 2)} "
                   f"| {fmt(r['h2d_gb_per_s'], 2)} | {fmt(base['h2d_gb_per_s'], 2)} |")
    return out + [""]


def batch_section(runs: list[dict]) -> list[str]:
    rows = sorted((r for r in runs if r.get("phase", "sweep") in ("sweep", "lanes")),
                  key=lambda r: (budget_label(r), r["context"], METHODS.index(r["method"]) if r["method"] in METHODS else 9,
                                 r["batch"]))
    out = ["## Every run", "",
           "| HBM budget | context | method | batch | tokens/s | ms/step | ms/layer | misses/step | locality | PCIe GB/s "
           "| prefill s | x roofline |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        batch = f"{r['batch']} (auto)" if r.get("batch_auto") else str(r["batch"])
        if r.get("cache_slots_auto"):
            batch += f", {r.get('cache_slots', 0)} cache slots (auto)"
        elif r.get("cache_slots"):
            batch += f", {r['cache_slots']} cache slots"
        if r.get("lanes", 1) > 1 or r.get("phase") == "lanes":
            batch += f", {r.get('lanes', 1)} lane(s)"
        out.append(f"| {budget_label(r)} | {r['context']} | {r['method']} | {batch} | {fmt(r['tokens_per_s'])} "
                   f"| {fmt(r['ms_per_step'], 2)} | {fmt(r['ms_per_layer'], 3)} | {fmt(r['misses_per_step'])} "
                   f"| {locality(r)} | {fmt(r['h2d_gb_per_s'], 2)} | {fmt(r['prefill_s'])} "
                   f"| {fmt(over_roofline(r), 2)} |")
    return out + [""]


def cache_section(runs: list[dict]) -> list[str]:
    """Auto-batch runs of the offloading methods with and without slots beyond k."""
    rows = defaultdict(dict)
    for r in runs:
        if (r.get("phase", "sweep") == "sweep" and r.get("batch_auto") and "offload" in r["method"]
                and not r.get("cache_slots_auto")):
            rows[(budget_label(r), r["context"], r["method"])][r.get("cache_slots", 0)] = r
    pairs = [(k, v) for k, v in sorted(rows.items()) if 0 in v and len(v) > 1]
    if not pairs:
        return []
    out = ["## Slot cache beyond k", "",
           "Slots per (sequence, KV head) beyond the k + 1 a step needs keep recently dropped blocks resident, so a "
           "block selected again soon is a hit. Each method at its largest batch, without and with the extra slots "
           "(which cost HBM, so the batch may shrink).", "",
           "| HBM budget | context | method | cache slots | batch | tokens/s | x without | misses/step | locality |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (budget, context, method), by_slots in pairs:
        base = by_slots[0]
        for slots in sorted(by_slots):
            r = by_slots[slots]
            out.append(f"| {budget} | {context} | {method} | {slots} | {r['batch']} | {fmt(r['tokens_per_s'])} "
                       f"| {fmt(ratio(r, base), 2)} | {fmt(r['misses_per_step'])} | {locality(r)} |")
    return out + [""]


def calibration_section(runs: list[dict]) -> list[str]:
    cal = [r for r in runs if r.get("phase") == "calibration"]
    if not cal:
        return []
    out = ["## Drift calibration", "",
           f"nosa-offload, batch 4: the drift whose locality is nearest the paper's {PAPER_LOCALITY} is used for the sweep.",
           "", "| context | drift | locality | misses/step | tokens/s |", "|---:|---:|---:|---:|---:|"]
    for r in sorted(cal, key=lambda r: r["drift"]):
        out.append(f"| {r['context']} | {r['drift']:g} | {locality(r)} | {fmt(r['misses_per_step'])} | {fmt(r['tokens_per_s'])} |")
    return out + [""]


def failure_section(failures: list[dict]) -> list[str]:
    if not failures:
        return []
    out = ["## Runs that did not complete", ""]
    for f in failures:
        out.append(f"- `{f.get('args', '')}`: {f['error']}")
    return out + [""]


def plots(runs: list[dict], autos: dict, out_dir: str, prefix: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib is not installed: no plots.)", ""]
    budgets = sorted(autos)
    lines = ["## Plots", ""]
    if budgets:
        fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
        for ax, budget in zip(axes[0], budgets):
            for m in METHODS:
                pts = sorted((c, row[m]["tokens_per_s"]) for c, row in autos[budget].items() if m in row)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("tokens/s (largest batch that fits)")
            ax.set_title(f"HBM {budget}")
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, IMAGES[0]), dpi=120)
        plt.close(fig)
        lines += [f"![throughput vs context]({prefix}{IMAGES[0]})", ""]

        fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False)
        pairs = [("nosa-offload", "full"), ("nosa-offload", "infllmv2-offload"), ("infllmv2-offload", "full"),
                 ("nosa-resident", "full"), ("nosa-offload-fp8", "nosa-offload")]
        width = 0.8 / len(pairs)
        for ax, budget in zip(axes[0], budgets):
            contexts = sorted(autos[budget])
            for i, (m, base) in enumerate(pairs):
                vals = [ratio(autos[budget][c].get(m), autos[budget][c].get(base)) or 0.0 for c in contexts]
                ax.bar([j + (i - (len(pairs) - 1) / 2) * width for j in range(len(contexts))], vals, width,
                       label=f"{m} / {base}")
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("throughput ratio")
            ax.set_title(f"HBM {budget}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, IMAGES[2]), dpi=120)
        plt.close(fig)
        lines += [f"![ratios]({prefix}{IMAGES[2]})", ""]

    # Throughput against batch without the cache-slot runs, which change the memory per sequence.
    sweep = [r for r in runs if r.get("phase", "sweep") == "sweep" and not r.get("cache_slots")]
    keys = sorted({(budget_label(r), r["context"]) for r in sweep})
    if keys:
        cols = min(4, len(keys))
        nrows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
        for ax, (budget, context) in zip(axes.flat, keys):
            for m in METHODS:
                pts = sorted((r["batch"], r["tokens_per_s"]) for r in sweep
                             if r["method"] == m and budget_label(r) == budget and r["context"] == context)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"{context} tokens, HBM {budget}", fontsize=9)
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, IMAGES[1]), dpi=120)
        plt.close(fig)
        lines += [f"![throughput vs batch]({prefix}{IMAGES[1]})", ""]
    return lines


def render(runs: list[dict], failures: list[dict], out_dir: str, prefix: str, link_gbps: float | None = None) -> str:
    autos = auto_runs(runs)
    first = runs[0] if runs else {}
    lines = ["# Decoding throughput: NOSA against full attention and InfLLMv2", "",
             "Generated by `scripts/throughput_report.py` from the runs of `scripts/throughput.sh` (see "
             "[engine.md](engine.md)); do not edit by hand.", "",
             f"Model `{first.get('preset', '?')}` ({first.get('layers', '?')} layers, random weights), backend "
             f"`{first.get('backend', '?')}`, {first.get('steps', '?')} timed decode steps per run after warm-up. "
             "Prompts are shared across the batch: prefill runs once per distinct prompt and its K, V and c are "
             "ingested into every sequence. The offloading methods keep one copy of a prompt's pages per lane in "
             "host memory (reference-counted), which is what lets their large batches fit this machine's host "
             "memory; their slot caches, compressed state, decode blocks and transfers stay per sequence. The "
             "resident methods keep a copy per sequence in HBM. Queries follow the drift workload (the input "
             "embedding of each sequence takes a random-walk step per token), calibrated so that NOSA's locality is "
             "near the paper's 0.944; locality and misses per step are given with every figure.",
             ""]
    lines += targets_section(autos, runs, link_gbps)
    lines += headline_section(autos, link_gbps)
    lines += plots(runs, autos, out_dir, prefix)
    lines += roofline_section(runs)
    lines += sizing_section(runs)
    lines += profile_section(autos)
    lines += lanes_section(runs, autos)
    lines += cache_section(runs)
    lines += batch_section(runs)
    lines += calibration_section(runs)
    lines += failure_section(failures)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON-lines files written by scripts/throughput.sh")
    parser.add_argument("--out", required=True, help="directory for throughput.md and the plots")
    parser.add_argument("--image-prefix", default="", help="prefix of the image links in the markdown")
    parser.add_argument("--link-gbps", type=float, default=None,
                        help="host-to-device bandwidth the gather can reach (GB/s), for the PCIe target")
    parser.add_argument("--analysis", default=None,
                        help="a hand-written markdown file appended to the page (default: throughput-analysis.md "
                             "beside this script's docs/, when it exists)")
    args = parser.parse_args(argv)
    runs, failures = load_runs(args.runs)
    if not runs and not failures:
        print("throughput_report: no runs in the input", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    text = render(runs, failures, args.out, args.image_prefix, args.link_gbps)
    analysis = args.analysis or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                                             "throughput-analysis.md")
    if os.path.exists(analysis):
        with open(analysis, encoding="utf-8") as f:
            text += "\n" + f.read()
    with open(os.path.join(args.out, "throughput.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
