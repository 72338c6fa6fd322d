"""The Python surface on the host backend: arrays cross without copies (strided views, out=), the plan calls,
inspection and counters, the slot cache, and the properties a layer reports."""

import numpy as np
import pytest

import nosa
from harness import ReferenceRun, TokenSource, small_layer

HQ, HKV, D = 4, 2, 64


def admit(layer, source, seq, length):
    k, v = source.elements(length, HKV, D), source.elements(length, HKV, D)
    c = source.eviction_scores(length, HKV)
    layer.add_sequence(seq, k, v, c)


def test_the_issue_example_runs_on_the_host():
    """The surface as engines call it, with the paper's parameters, on a NumPy bf16 prompt."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    layer = nosa.DecodeLayer(
        num_q_heads=32,
        num_kv_heads=2,
        head_dim=128,
        dtype="bf16",
        variant="nosa",
        store="offload",
        bias="after_scale",
        block=64,
        window=32,
        stride=16,
        topk=64,
        topk_qa=33,
        init=1,
        local=16,
        budget=None,
        cache_slots=0,
        max_sequences=8,
        max_blocks_per_sequence=2048,
        pool_pages=1024,
        device="cpu",
    )
    rng = np.random.default_rng(0)
    bf16 = ml_dtypes.bfloat16
    prompt = 5000
    layer.add_sequence(
        3,
        rng.standard_normal((prompt, 2, 128)).astype(bf16),
        rng.standard_normal((prompt, 2, 128)).astype(bf16),
        rng.standard_normal((prompt, 2)).astype(np.float32),
    )
    sequences = np.array([3], np.int32)
    for _ in range(3):
        layer.reserve(1)
        o = layer.step(
            sequences,
            rng.standard_normal((1, 32, 128)).astype(bf16),
            rng.standard_normal((1, 2, 128)).astype(bf16),
            rng.standard_normal((1, 2, 128)).astype(bf16),
            rng.standard_normal((1, 2)).astype(np.float32),
        )
        assert o.shape == (1, 32, 128) and o.dtype == np.float32 and np.isfinite(o).all()
    selection = layer.selection(3)
    assert selection.shape == (2, 64) and selection.dtype == np.int32
    for row in selection:
        assert (np.diff(row) > 0).all() and row[0] == 0  # ascending, the sink block first
    assert layer.step_misses(3).shape == (2,)
    counters = layer.counters()
    assert set(counters) == {"steps", "hits", "misses", "bytes_h2d", "bytes_d2h"}
    assert counters["steps"] == 3
    assert counters["hits"] + counters["misses"] == 3 * 2 * 64
    layer.remove_sequence(3)
    assert not layer.is_live(3) and layer.length(3) == 0


def test_arrays_are_read_and_written_in_place():
    """Strided views (any outer strides, innermost 1) are read where they are, and out= is written in place:
    the same numbers as contiguous copies give."""
    source = TokenSource(3, "fp32")
    layers = [small_layer(dtype="fp32", max_sequences=2) for _ in range(2)]
    for layer in layers:
        admit(layer, TokenSource(4, "fp32"), 0, 50)
        admit(layer, TokenSource(5, "fp32"), 1, 20)
    for _ in range(30):
        packed = source.elements(2, HQ + 2 * HKV, D)  # one buffer: q, k and v side by side, as a fused QKV
        q, k, v = packed[:, :HQ], packed[:, HQ : HQ + HKV], packed[:, HQ + HKV :]
        c = source.eviction_scores(4, HKV)[::2]  # every other row
        sequences = np.array([1, 0, 1, 0], np.int32)[:2]
        out = np.full((3, HQ, D), np.nan, np.float32)[1:]  # an offset view
        for layer in layers:
            layer.reserve(1)
        returned = layers[0].step(sequences, q, k, v, c, out=out)
        assert returned is out
        expected = layers[1].step(
            np.ascontiguousarray(sequences),
            np.ascontiguousarray(q),
            np.ascontiguousarray(k),
            np.ascontiguousarray(v),
            np.ascontiguousarray(c),
        )
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(layers[0].selection(0), layers[1].selection(0))


def test_plan_calls_and_inspection():
    source = TokenSource(7, "fp16")
    layer = small_layer(dtype="fp16", max_sequences=3, max_tokens=300)
    assert layer.free_pages == layer.config["pool_pages"]
    admit(layer, source, 2, 33)
    assert layer.is_live(2) and not layer.is_live(0) and layer.length(2) == 33
    used = layer.config["pool_pages"] - layer.free_pages
    assert used == 3  # blocks 0, 1 and the block of token 33
    layer.reserve(2, 100)  # one sequence, 133 tokens: 9 blocks
    assert layer.config["pool_pages"] - layer.free_pages == 9
    layer.reserve(0)
    admit(layer, source, 0, 0)  # an empty prompt is a sequence too
    assert layer.length(0) == 0 and layer.is_live(0)
    assert (layer.selection(0) == -1).all()
    layer.reserve(1)
    sequences = np.array([0, 2], np.int32)
    q, k, v = source.elements(2, HQ, D), source.elements(2, HKV, D), source.elements(2, HKV, D)
    layer.step(sequences, q, k, v, source.eviction_scores(2, HKV))
    assert layer.length(0) == 1 and layer.length(2) == 34
    slots = layer.slots(2)
    assert slots.shape == (HKV, layer.config["topk"] + 1) and slots.dtype == np.int32
    for h in range(HKV):  # the slot cache holds exactly the selection
        selected = sorted(int(m) for m in layer.selection(2)[h] if m >= 0)
        assert sorted(int(m) for m in slots[h] if m >= 0) == selected
    total = layer.counters()
    assert total["steps"] == 1 and total["bytes_d2h"] > 0
    layer.remove_sequence(2)
    assert layer.free_pages == layer.config["pool_pages"] - 1  # sequence 0 keeps its one block
    with pytest.raises(nosa.Error):
        layer.selection(2)


def test_last_query_chooses_the_initial_query_aware_blocks():
    """With the last prompt token's query the initial selection has query-aware picks beyond the forced
    blocks; the step that follows runs from it."""
    source = TokenSource(17, "fp32")
    with_query, without = small_layer(dtype="fp32", variant="infllmv2"), small_layer(dtype="fp32", variant="infllmv2")
    k, v, c = source.elements(300, HKV, D), source.elements(300, HKV, D), source.eviction_scores(300, HKV)
    with_query.add_sequence(0, k, v, c, source.elements(HQ, D))
    without.add_sequence(0, k, v, c)
    forced = 1 + 3 + 1  # init + local + current
    for h in range(HKV):
        assert (with_query.selection(0)[h] >= 0).sum() == with_query.config["topk"]
        assert (without.selection(0)[h] >= 0).sum() == forced


def test_slot_cache_keeps_dropped_blocks():
    """cache_slots keeps blocks beyond k on the device: the same tokens give the same selections and outputs
    and never more misses."""
    runs = {}
    for cache_slots in (0, 6):
        layer = small_layer(dtype="fp32", variant="infllmv2", cache_slots=cache_slots, max_tokens=900)
        r = ReferenceRun(layer, seed=23)
        for seq, length in enumerate((400, 300, 350)):
            r.admit(seq, length)
        outs = []
        for i in range(80):
            layer.reserve(1)
            q, k, v, c = (
                r.source.elements(3, HQ, D),
                r.source.elements(3, HKV, D),
                r.source.elements(3, HKV, D),
                r.source.eviction_scores(3, HKV),
            )
            outs.append(layer.step(np.arange(3, dtype=np.int32), q, k, v, c))
        assert layer.slots(0).shape == (HKV, layer.config["topk"] + 1 + cache_slots)
        runs[cache_slots] = (outs, layer.counters(), layer.selection(1))
    for a, b in zip(runs[0][0], runs[6][0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[0][2], runs[6][2])
    assert runs[6][1]["misses"] < runs[0][1]["misses"]
    assert runs[6][1]["hits"] + runs[6][1]["misses"] == runs[0][1]["hits"] + runs[0][1]["misses"]


def test_full_attention_reports_no_selection():
    layer = small_layer(variant="full", dtype="fp32")
    assert layer.store == "resident" and layer.bias == "none"
    admit(layer, TokenSource(1, "fp32"), 0, 40)
    assert layer.selection(0).shape == (HKV, 0)
    assert layer.slots(0).shape == (HKV, 0)


def test_properties_and_repr():
    layer = small_layer(variant="infllmv2", dtype="fp16", head_dim=128, num_q_heads=6, num_kv_heads=3)
    assert (layer.variant, layer.store, layer.bias, layer.dtype) == ("infllmv2", "offload", "none", "fp16")
    assert (layer.num_q_heads, layer.num_kv_heads, layer.head_dim, layer.device) == (6, 3, 128, "cpu")
    config = layer.config
    assert config["budget"] is None and config["block"] == 16 and config["max_sequences"] == 3
    config["block"] = 99  # a copy
    assert layer.config["block"] == 16
    assert "infllmv2" in repr(layer) and "fp16" in repr(layer)
    assert isinstance(nosa.__version__, str) and nosa.__version__.count(".") == 2
    assert issubclass(nosa.Error, ValueError)
    e = nosa.Error("host_pool_full", "reserve: host_pool_full: ...")
    assert e.status == "host_pool_full" and str(e) == "reserve: host_pool_full: ..."
