"""Drives a nosa.DecodeLayer and the independent reference (nosa._reference, built from tests/reference/) side
by side on a random ragged batch, checking every step as tests/backend/host/harness.hpp does for the C++ API:
the selection (exactly, or up to an fp32 near-tie), the misses and transfer counters, the output (within the
tolerance of fp32 accumulation), and the locality and budget bounds."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

import nosa
from nosa import _reference as ref

try:
    import ml_dtypes
except ImportError:  # bf16 runs are skipped without it
    ml_dtypes = None

#: A small configuration that crosses many block and window boundaries quickly (the C++ tests' too).
SMALL = dict(block=16, window=8, stride=4, topk=12, topk_qa=7, init=1, local=3)

#: Output tolerance: fp32 accumulation over a few thousand terms; inputs are rounded to the storage type before
#: either side sees them.
RTOL = 1e-4
ATOL = 2e-5 + 0.05 * RTOL


def numpy_dtype(dtype: str):
    """The NumPy dtype of a storage type (ml_dtypes' bfloat16 for bf16)."""
    if dtype == "fp32":
        return np.float32
    if dtype == "fp16":
        return np.float16
    if ml_dtypes is None:
        raise RuntimeError("bf16 needs ml_dtypes")
    return ml_dtypes.bfloat16


def default_bias(variant: str) -> str:
    return "after_scale" if variant == "nosa" else "none"


def small_layer(
    *,
    variant: str = "nosa",
    store: Optional[str] = None,
    bias: Optional[str] = None,
    dtype: str = "fp32",
    head_dim: int = 64,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    max_sequences: int = 3,
    max_tokens: int = 600,
    **overrides,
) -> nosa.DecodeLayer:
    """A layer with the SMALL selection parameters and room for `max_sequences` sequences of `max_tokens`."""
    params = dict(SMALL)
    params.update(overrides)
    blocks = (max_tokens + params["block"] - 1) // params["block"] + 1
    params.setdefault("max_blocks_per_sequence", blocks)
    params.setdefault("pool_pages", max_sequences * params["max_blocks_per_sequence"] + 4)
    return nosa.DecodeLayer(
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        variant=variant,
        store=store,
        bias=bias,
        max_sequences=max_sequences,
        **params,
    )


class TokenSource:
    """Random tokens of one run, already rounded to the storage type."""

    def __init__(self, seed: int, dtype: str, scores: str = "gaussian"):
        self.rng = np.random.default_rng(seed)
        self.dtype = numpy_dtype(dtype)
        self.scores = scores

    def elements(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32).astype(self.dtype)

    def eviction_scores(self, *shape: int) -> np.ndarray:
        if self.scores == "quantized":  # multiples of 1/4: window means are exact, so ties are frequent
            return (self.rng.integers(-8, 9, shape) * 0.25).astype(np.float32)
        return self.rng.standard_normal(shape, dtype=np.float32)


@dataclasses.dataclass
class Stats:
    selections: int = 0
    near_ties: int = 0
    misses: int = 0
    max_misses_over_bound: int = -1000
    max_error: float = 0.0
    full_selections: int = 0


def _selected(row: np.ndarray) -> list:
    """The blocks of one row of DecodeLayer.selection (ascending, -1 padded)."""
    return [int(m) for m in row if m >= 0]


class ReferenceRun:
    """One layer and the reference, fed the same tokens.

    `pass_scores=False` leaves out `c` wherever the pipeline does not read it, as an engine without an
    eviction head would.
    """

    def __init__(
        self,
        layer: nosa.DecodeLayer,
        *,
        seed: int = 1,
        scores: str = "gaussian",
        require_exact: bool = False,
        pass_scores: bool = True,
    ):
        self.layer = layer
        self.source = TokenSource(seed, layer.dtype, scores)
        self.require_exact = require_exact
        self.dense = layer.variant == "full"
        self.offloads = layer.store == "offload"
        self.reads_scores = layer.variant == "nosa" or layer.bias != "none"
        self.pass_scores = pass_scores or self.reads_scores
        self.group = layer.num_q_heads // layer.num_kv_heads
        config = layer.config
        budget = config["budget"]
        self.budget = budget if self.offloads else None
        self.cfg = ref.Config(
            block=config["block"],
            window=config["window"],
            stride=config["stride"],
            topk=config["topk"],
            topk_qa=config["topk_qa"],
            n_init=config["init"],
            n_local=config["local"],
            budget=self.budget if self.budget is not None else -1,
            query_agnostic=layer.variant == "nosa",
            bias=layer.bias,
            head_dim=layer.head_dim,
            group=self.group,
            compressed_keys=layer.dtype,
        )
        self.history: dict = {}
        self.resident: dict = {}
        self.stats = Stats()

    # ---- admission -----------------------------------------------------------------------------------------

    def admit(self, seq: int, length: int) -> None:
        hkv, d = self.layer.num_kv_heads, self.layer.head_dim
        k = self.source.elements(length, hkv, d)
        v = self.source.elements(length, hkv, d)
        c = self.source.eviction_scores(length, hkv)
        self.layer.add_sequence(seq, k, v, c if self.pass_scores else None)
        c_seen = c if self.pass_scores else np.zeros_like(c)
        self.history[seq] = []
        self.resident[seq] = []
        got = self.layer.selection(seq)
        for h in range(hkv):
            hist = ref.History(self.cfg)
            hist.append(
                np.ascontiguousarray(k[:, h].astype(np.float64)),
                np.ascontiguousarray(v[:, h].astype(np.float64)),
                np.ascontiguousarray(c_seen[:, h].astype(np.float64)),
            )
            self.history[seq].append(hist)
            if self.dense:
                assert got.shape == (hkv, 0)
                continue
            expected = ref.select(self.cfg, hist, None, None)
            mine = _selected(got[h])
            equal, equivalent, message = expected.compare(mine)
            assert equal, f"initial selection of sequence {seq} head {h}: {message}"
            self.resident[seq].append(mine)

    # ---- one step of the whole batch -----------------------------------------------------------------------

    def step(self, sequences: list, step_index: int = 0) -> np.ndarray:
        layer = self.layer
        hq, hkv, d, g = layer.num_q_heads, layer.num_kv_heads, layer.head_dim, self.group
        batch = len(sequences)
        q = self.source.elements(batch, hq, d)
        k = self.source.elements(batch, hkv, d)
        v = self.source.elements(batch, hkv, d)
        c = self.source.eviction_scores(batch, hkv)
        layer.reserve(1)
        out = layer.step(np.asarray(sequences, dtype=np.int32), q, k, v, c if self.pass_scores else None)
        assert out.dtype == np.float32 and out.shape == (batch, hq, d)
        c_seen = c if self.pass_scores else np.zeros_like(c)

        step_misses = 0
        for b, seq in enumerate(sequences):
            got = layer.selection(seq)
            misses_got = layer.step_misses(seq)
            for h in range(hkv):
                hist = self.history[seq][h]
                hist.append(
                    np.ascontiguousarray(k[b, h : h + 1].astype(np.float64)),
                    np.ascontiguousarray(v[b, h : h + 1].astype(np.float64)),
                    np.array([c_seen[b, h]], dtype=np.float64),
                )
                length = hist.length
                assert layer.length(seq) == length
                qd = np.ascontiguousarray(q[b, h * g : (h + 1) * g].astype(np.float64))
                n_blocks = ref.block_count(length, self.cfg)
                if self.dense:
                    assert got.shape == (hkv, 0)
                    mine = list(range(n_blocks))
                else:
                    mine = _selected(got[h])
                    before = sorted(set(self.resident[seq][h]) | {(length - 1) // self.cfg.block})
                    expected = ref.select(self.cfg, hist, qd, before)
                    self.stats.selections += 1
                    equal, equivalent, message = expected.compare(mine)
                    if not equal:
                        where = f"step {step_index} sequence {seq} head {h}: {message}"
                        assert not self.require_exact, where
                        assert equivalent, where
                        self.stats.near_ties += 1
                    if n_blocks <= self.cfg.topk:
                        self.stats.full_selections += 1
                        assert len(mine) == n_blocks
                    misses = sum(1 for m in mine if m not in before) if self.offloads else 0
                    assert misses_got[h] == misses, f"step {step_index} sequence {seq} head {h}"
                    step_misses += misses
                    if n_blocks > self.cfg.topk and layer.variant == "nosa":
                        forced = forced_block_count(n_blocks, self.cfg)
                        free_qa = self.cfg.topk_qa - forced
                        self.stats.max_misses_over_bound = max(
                            self.stats.max_misses_over_bound, misses - max(free_qa, 0)
                        )
                    if self.budget is not None:
                        assert misses <= self.budget
                    self.resident[seq][h] = mine
                expected_o = ref.attend(self.cfg, hist, qd, mine)
                got_o = out[b, h * g : (h + 1) * g].astype(np.float64)
                error = np.abs(got_o - expected_o) / (ATOL + RTOL * np.abs(expected_o))
                self.stats.max_error = max(self.stats.max_error, float(error.max()))
                assert error.max() <= 1.0, (
                    f"step {step_index} sequence {seq} q heads {h * g}..{h * g + g - 1}: "
                    f"max error {error.max():.3g} x tolerance"
                )
        self.stats.misses += step_misses
        last = layer.counters(last_step=True)
        assert last["steps"] == 1
        if self.offloads and not self.dense:
            itemsize = np.dtype(numpy_dtype(layer.dtype)).itemsize
            assert last["misses"] == step_misses
            assert last["bytes_h2d"] == step_misses * 2 * self.cfg.block * d * itemsize
        return out


def forced_block_count(n_blocks: int, cfg) -> int:
    """Forced blocks of a sequence of `n_blocks` blocks: sinks, locals and the current block, counted once."""
    forced = set(range(min(cfg.n_init, n_blocks)))
    forced |= set(range(max(0, n_blocks - 1 - cfg.n_local), n_blocks))
    return len(forced)
