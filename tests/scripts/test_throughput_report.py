#!/usr/bin/env python3
"""Tests of scripts/throughput_report.py on hand-made runs: the ratios, the target lines, the failures, the
calibration table, the roofline and sizing tables, the FP8 methods beside the bf16 ones and the plots."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "throughput_report.py")
GIB = 1024.0 ** 3


def run(method, context, batch, tps, auto, hbm="80", phase="sweep", locality=None, misses=0.0, drift=0.05,
        cache_slots=0):
    return {"preset": "nosa-8b", "method": method, "backend": "cuda", "batch": batch, "batch_auto": auto,
            "context": context, "steps": 64, "layers": 32, "distinct_prompts": 1, "drift": drift,
            "prefill_s": 10.0, "decode_s": 1.0, "tokens_per_s": tps, "ms_per_step": 1e3 * batch / tps,
            "ms_per_layer": 1e3 * batch / tps / 32, "misses_per_step": misses, "misses_per_head": 0.1,
            "locality": locality, "h2d_gb_per_s": 20.0 if "offload" in method else 0.0, "d2h_gb_per_s": 0.1,
            "device_bytes": 70 * GIB, "host_bytes": 100 * GIB, "hbm_budget_bytes": 80 * GIB,
            "phase": phase, "hbm": hbm, "cache_slots": cache_slots, "shared_blocks": 256}


RUNS = [
    run("nosa-offload", 16384, 4, 500.0, False, phase="calibration", locality=0.90, drift=0.02),
    run("nosa-offload", 16384, 4, 520.0, False, phase="calibration", locality=0.95, drift=0.1),
    run("full", 16384, 16, 1000.0, True),
    run("infllmv2-offload", 16384, 128, 2000.0, True, locality=0.88, misses=900.0),
    run("nosa-offload", 16384, 160, 3000.0, True, locality=0.94, misses=400.0),
    run("nosa-resident", 16384, 20, 1100.0, True),
    run("full", 32768, 8, 500.0, True),
    run("infllmv2-offload", 32768, 96, 1300.0, True, locality=0.89),
    run("nosa-offload", 32768, 120, 2600.0, True, locality=0.945),
    run("full", 32768, 1, 50.0, False),
    run("nosa-resident", 32768, 1, 49.0, False),
    run("full", 32768, 4, 180.0, False),
    run("nosa-resident", 32768, 4, 170.0, False),
    run("nosa-offload", 32768, 110, 2860.0, True, locality=0.97, misses=150.0, cache_slots=64),
]
FAILURE = {"error": "nosa-engine: batch 64 does not fit the HBM budget", "args": "--method full --batch 64",
           "phase": "sweep", "hbm": "80"}


class ThroughputReport(unittest.TestCase):
    def render(self, lines, *extra):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "runs.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in lines) + "\n")
        out = os.path.join(tmp.name, "out")
        subprocess.run([sys.executable, SCRIPT, path, "--out", out, *extra], check=True)
        with open(os.path.join(out, "throughput.md")) as f:
            return f.read(), out

    def test_ratios_targets_failures_and_plots(self):
        text, out = self.render(RUNS + [FAILURE])
        # 32768 is the longest context where full and nosa-offload both ran: 2600 / 500 = 5.20, 2600 / 1300 = 2.00.
        self.assertIn("longest context where both ran (32768 tokens): nosa-offload / full = 5.20 (target >= 5.0: met)", text)
        self.assertIn("nosa-offload / infllmv2-offload = 2.00 (target >= 1.9: met)", text)
        # Batch 4: 170 / 180 = 0.944 is the worst small-batch ratio.
        self.assertIn("lowest nosa-resident / full ratio at batch 1-4 is 0.944", text)
        self.assertIn("target >= 0.97: missed", text)
        # The headline row of nosa-offload at 16K: ratio 3.00 to full and 1.50 to InfLLMv2, locality shown.
        self.assertIn("| 16384 | nosa-offload | 160 | 3,000.0 | 3.00 | 1.50 |", text)
        self.assertIn("| 0.940 |", text)
        self.assertIn("batch 64 does not fit the HBM budget", text)
        self.assertIn("| 16384 | 0.1 | 0.950 |", text)  # calibration table, sorted by drift
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        for image in ("throughput_vs_context.png", "throughput_vs_batch.png", "ratios.png"):
            self.assertTrue(os.path.getsize(os.path.join(out, image)) > 0, image)
            self.assertIn(f"]({image})", text)

    def test_cache_slots_have_their_own_table(self):
        text, _ = self.render(RUNS)
        # 2860 / 2600 = 1.10, and the headline row of nosa-offload at 32K is still the run without slots.
        self.assertIn("| 80 GiB | 32768 | nosa-offload | 64 | 110 | 2,860.0 | 1.10 | 150.0 | 0.970 |", text)
        self.assertIn("| 32768 | nosa-offload | 120 | 2,600.0 | 5.20 | 2.00 |", text)

    def test_a_missed_target_is_said(self):
        slow = [r for r in RUNS if not (r["context"] == 32768 and r["method"] == "nosa-offload")]
        slow.append(run("nosa-offload", 32768, 120, 1000.0, True, locality=0.945))
        text, _ = self.render(slow)
        self.assertIn("nosa-offload / full = 2.00 (target >= 5.0: missed)", text)

    def test_pcie_share_of_the_link(self):
        text, _ = self.render(RUNS, "--link-gbps", "25")
        # The runs gather 20 GB/s at most: 80% of a 25 GB/s link; InfLLMv2 at 16K moves 10 MB a token, so the
        # link allows 2,500 of its tokens/s.
        self.assertIn("gathers 20.0 GB/s, 80% of the 25.0 GB/s link (--link-gbps): 2,000.0 tokens/s against the "
                      "2,500.0 that the link allows for its 10.0 MB per token (target >= 85% when misses make PCIe "
                      "the bottleneck: missed", text)
        self.assertIn("| 70.0 | 100.0 | 1 | 80% |", text)

    def test_a_run_s_own_link_measurement_comes_first(self):
        runs = [dict(r) for r in RUNS]
        for r in runs:
            r["link_h2d_gb_per_s"] = 22.0
        fast = run("infllmv2-offload", 16384, 128, 2000.0, True, locality=0.88, misses=900.0)
        fast.update(h2d_gb_per_s=21.0, link_h2d_gb_per_s=22.0, lanes=2, phase="lanes")
        text, _ = self.render(runs + [fast], "--link-gbps", "25")
        self.assertIn("2 lane(s), 80 GiB) gathers 21.0 GB/s, 95% of the 22.0 GB/s link (the run's own 64 MiB pinned "
                      "copy)", text)
        self.assertIn("bottleneck: met", text)

    def test_profile_and_lanes_tables(self):
        runs = [dict(r) for r in RUNS]
        for r in runs:
            if r["method"] == "nosa-offload" and r["context"] == 32768 and r["batch_auto"] and not r["cache_slots"]:
                r.update(lanes=2, profile_ms={"gemm": 10.0, "scoring": 5.0, "selection": 2.0, "gather": 20.0,
                                              "attention": 8.0, "other": 1.0, "total": 46.0})
        one_lane = run("nosa-offload", 32768, 120, 2000.0, True, locality=0.945, phase="lanes")
        one_lane["lanes"] = 1
        text, _ = self.render(runs + [one_lane])
        self.assertIn("| 80 GiB | 32768 | nosa-offload | 120 | 10.00 | 5.00 | 2.00 | 20.00 | 8.00 | 1.00 | 46.00 "
                      "| 46.15 |", text)
        # 2600 tokens/s with two lanes against 2000 with one: 1.30.
        self.assertIn("| 80 GiB | 32768 | nosa-offload | 120 | 1 | 2,000.0 | 2 | 2,600.0 | 1.30 |", text)
        # The lanes run is not taken for the headline row.
        self.assertIn("| 32768 | nosa-offload | 120 | 2,600.0 | 5.20 | 2.00 |", text)

    def test_roofline_columns_and_table(self):
        runs = [dict(r) for r in RUNS]
        for r in runs:
            if r["method"] == "nosa-offload" and r["context"] == 32768 and r["batch_auto"] and not r["cache_slots"]:
                # Step 1e3 * 120 / 2600 = 46.15 ms against a roofline of 30 ms (gather 18, HBM 9 + GEMM 6 per
                # layer, summed).
                r.update(roofline_ms=30.0, roofline_gather_ms=18.0, roofline_hbm_ms=9.0, roofline_gemm_ms=6.0,
                         gather_gb_per_s=50.5, hbm_gb_per_s=4480.0)
        text, _ = self.render(runs)
        self.assertIn("| 32768 | nosa-offload | 120 | 2,600.0 | 5.20 | 2.00 |", text)
        self.assertIn("| 30.00 | 1.54 |", text)  # the headline row ends with the roofline and the step over it
        self.assertIn("## Roofline", text)
        self.assertIn("| 80 GiB | 32768 | nosa-offload | 120 | 0 | 46.15 | 18.00 | 9.00 | 6.00 | 30.00 | 1.54 | 50.5 "
                      "| 4,480.0 |", text)
        # Runs without a roofline (the host backend, older runs) say so.
        self.assertIn("| 16384 | full | 16 | 1,000.0 | 1.00 |", text)
        self.assertIn("| n/a | n/a |", text)

    def test_sizing_prediction_beside_the_measurement(self):
        best = run("nosa-offload", 32768, 150, 3300.0, True, locality=0.97, misses=100.0, cache_slots=32)
        best.update(cache_slots_auto=True, predicted_tokens_per_s=3000.0, predicted_misses_per_step=110.0,
                    predicted_ms_per_step=50.0, calibration_s=12.5,
                    sizing=[{"cache_slots": 0, "batch": 200, "tokens_per_s": 2500.0},
                            {"cache_slots": 32, "batch": 150, "tokens_per_s": 3000.0}])
        text, _ = self.render(RUNS + [best])
        # 3300 measured against 3000 predicted: 1.10.
        self.assertIn("| 80 GiB | 32768 | nosa-offload | 32 (auto) | 150 | 3,000.0 | 3,300.0 | 1.10 | 110.0 | 100.0 "
                      "| 12.5 | 0: 200 at 2,500, 32: 150 at 3,000 |", text)
        # The best-configuration run is neither the headline run nor a row of the fixed cache-slot table.
        self.assertIn("| 32768 | nosa-offload | 120 | 2,600.0 | 5.20 | 2.00 |", text)
        self.assertNotIn("| 80 GiB | 32768 | nosa-offload | 32 | 150 |", text)
        self.assertIn("150 (auto), 32 cache slots (auto)", text)

    def test_fp8_methods_beside_their_bf16_namesakes(self):
        fp8 = [run("nosa-offload-fp8", 32768, 200, 4420.0, True, locality=0.945, misses=150.0),
               run("full-fp8", 32768, 16, 900.0, True),
               run("nosa-offload-fp8", 16384, 300, 4000.0, True, locality=0.94)]
        text, _ = self.render(RUNS + fp8)
        # 4420 / 2600 = 1.70 against nosa-offload, 4420 / 500 = 8.84 against full, 4420 / 1300 = 3.40 against
        # InfLLMv2; full-fp8 against full: 900 / 500 = 1.80.
        self.assertIn("| 32768 | nosa-offload-fp8 | 200 | 4,420.0 | 8.84 | 3.40 | 1.70 |", text)
        self.assertIn("| 32768 | full-fp8 | 16 | 900.0 | 1.80 | 0.69 | 1.80 |", text)
        # A bf16 method has no namesake to compare with.
        self.assertIn("| 32768 | nosa-offload | 120 | 2,600.0 | 5.20 | 2.00 | n/a |", text)
        self.assertIn("FP8 KV cache, 80 GiB, longest context where both ran (32768 tokens): nosa-offload-fp8 / "
                      "nosa-offload = 1.70 (target >= 1.6 at 98304 tokens, 80 GiB: met)", text)
        # The bf16 targets still compare the bf16 methods.
        self.assertIn("nosa-offload / full = 5.20 (target >= 5.0: met)", text)

    def test_malformed_input_is_an_error(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        path = os.path.join(tmp.name, "bad.jsonl")
        with open(path, "w") as f:
            f.write("{not json\n")
        r = subprocess.run([sys.executable, SCRIPT, path, "--out", tmp.name], capture_output=True, text=True)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("bad.jsonl:1: not JSON", r.stderr)


if __name__ == "__main__":
    unittest.main()
