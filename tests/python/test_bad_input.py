"""Every bad input raises nosa.Error (a ValueError) naming its status, and changes nothing: after each rejected
call the layer's state equals that of a twin layer that never saw the call, and both go on decoding to
identical outputs."""

import numpy as np
import pytest

import nosa
from harness import SMALL, TokenSource, small_layer

HQ, HKV, D = 4, 2, 64


def raises(status, call, *args, **kwargs):
    """Runs `call` and checks that it raised nosa.Error with `status`, named in the message."""
    with pytest.raises(nosa.Error) as info:
        call(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    assert info.value.status == status, str(info.value)
    assert status in str(info.value)
    return info.value


class Twins:
    """Two identical layers fed the same tokens; bad calls go to `abused` only."""

    def __init__(self, **kwargs):
        self.abused = small_layer(**kwargs)
        self.twin = small_layer(**kwargs)
        self.source = TokenSource(5, self.abused.dtype)
        self.dtype = self.source.dtype

    def admit(self, seq, length):
        k, v = self.source.elements(length, HKV, D), self.source.elements(length, HKV, D)
        c = self.source.eviction_scores(length, HKV)
        for layer in (self.abused, self.twin):
            layer.add_sequence(seq, k, v, c)

    def tokens(self, batch):
        s = self.source
        return (
            s.elements(batch, HQ, D),
            s.elements(batch, HKV, D),
            s.elements(batch, HKV, D),
            s.eviction_scores(batch, HKV),
        )

    def step(self, sequences, reserve=True):
        q, k, v, c = self.tokens(len(sequences))
        ids = np.asarray(sequences, dtype=np.int32)
        outs = []
        for layer in (self.abused, self.twin):
            if reserve:
                layer.reserve(1)
            outs.append(layer.step(ids, q, k, v, c))
        np.testing.assert_array_equal(outs[0], outs[1])
        self.check_same()

    def check_same(self):
        a, b = self.abused, self.twin
        assert a.free_pages == b.free_pages
        assert a.counters() == b.counters()
        assert a.counters(last_step=True) == b.counters(last_step=True)
        for slot in range(a.config["max_sequences"]):
            assert a.is_live(slot) == b.is_live(slot)
            assert a.length(slot) == b.length(slot)
            if a.is_live(slot):
                np.testing.assert_array_equal(a.selection(slot), b.selection(slot))
                np.testing.assert_array_equal(a.step_misses(slot), b.step_misses(slot))
                np.testing.assert_array_equal(a.slots(slot), b.slots(slot))


@pytest.fixture
def twins():
    t = Twins(variant="nosa", store="offload", dtype="fp32", max_sequences=3, max_tokens=400)
    t.admit(0, 37)
    t.admit(1, 15)  # one token short of a block: its second step starts a new block
    t.step([0, 1])
    return t


def good_step_arrays(t, batch=2):
    q, k, v, c = t.tokens(batch)
    return np.arange(batch, dtype=np.int32), q, k, v, c


def test_bad_step_arrays_raise_and_change_nothing(twins):
    t, a = twins, twins.abused
    seqs, q, k, v, c = good_step_arrays(t)
    a.reserve(1)
    t.twin.reserve(1)
    out = np.zeros((2, HQ, D), np.float32)
    cases = [
        ("shape_mismatch", dict(q=np.zeros((2, HQ, D // 2), np.float32))),  # head dim
        ("shape_mismatch", dict(q=np.zeros((2, HQ + 1, D), np.float32))),  # query heads
        ("shape_mismatch", dict(k=np.zeros((3, HKV, D), np.float32))),  # batch differs from sequences
        ("shape_mismatch", dict(v=np.zeros((2, HKV * 2, D), np.float32))),
        ("shape_mismatch", dict(c=np.zeros((2, HKV + 1), np.float32))),
        ("shape_mismatch", dict(q=np.zeros((2 * HQ, D), np.float32))),  # rank
        ("shape_mismatch", dict(sequences=np.zeros((2, 1), np.int32))),
        ("shape_mismatch", dict(out=np.zeros((2, HQ, D + 1), np.float32))),
        ("invalid_argument", dict(q=q.astype(np.float16))),  # dtype
        ("invalid_argument", dict(k=k.astype(np.float64))),
        ("invalid_argument", dict(sequences=seqs.astype(np.int64))),
        ("invalid_argument", dict(c=c.astype(np.float64))),
        ("invalid_argument", dict(out=np.zeros((2, HQ, D), np.float16))),
        ("invalid_argument", dict(sequences=[0, 1])),  # not an array
        ("invalid_argument", dict(q="q")),
        ("invalid_argument", dict(c=None)),  # nosa reads eviction scores
        ("invalid_argument", dict(k=None)),
        ("bad_layout", dict(q=np.zeros((2, HQ, 2 * D), np.float32)[:, :, ::2])),  # innermost stride 2
        ("bad_layout", dict(q=np.zeros((2, HQ, D), np.float32)[::-1])),  # negative stride
    ]
    read_only = np.zeros((2, HQ, D), np.float32)
    read_only.flags.writeable = False
    cases.append(("invalid_argument", dict(out=read_only)))
    misaligned = np.frombuffer(bytearray(2 * HQ * D * 4 + 2), dtype=np.float32, offset=2, count=2 * HQ * D)
    cases.append(("misaligned_pointer", dict(q=misaligned.reshape(2, HQ, D))))
    for status, bad in cases:
        args = dict(sequences=seqs, q=q, k=k, v=v, c=c, out=out)
        args.update(bad)
        out_arg = args.pop("out")
        raises(
            status,
            a.step,
            args.pop("sequences"),
            args.pop("q"),
            args.pop("k"),
            args.pop("v"),
            args.pop("c"),
            out=out_arg,
        )
        t.check_same()
    # Nothing was written to the output of a rejected step.
    assert not out.any()
    # Both layers took the same reservation; the good step now runs on both alike.
    ids = np.array([0, 1], np.int32)
    np.testing.assert_array_equal(a.step(ids, q, k, v, c), t.twin.step(ids, q, k, v, c))
    t.check_same()
    t.step([0, 1])


def test_bad_sequences_raise_and_change_nothing(twins):
    t, a = twins, twins.abused
    _, q, k, v, c = good_step_arrays(t)
    a.reserve(1)
    t.twin.reserve(1)
    e = raises("unknown_sequence", a.step, np.array([0, 2], np.int32), q, k, v, c)  # slot 2 is free
    assert "row 1 names slot 2" in str(e)
    raises("unknown_sequence", a.step, np.array([0, 9], np.int32), q, k, v, c)  # outside the slots
    raises("unknown_sequence", a.step, np.array([-1, 0], np.int32), q, k, v, c)
    e = raises("duplicate_sequence", a.step, np.array([1, 1], np.int32), q, k, v, c)
    assert "rows 0 and 1" in str(e)
    t.check_same()
    # The failed step's status is kept for check_step; a good step clears it.
    raises("duplicate_sequence", a.check_step)
    t.step([0, 1], reserve=False)
    a.check_step()


def test_unreserved_and_full_sequences(twins):
    t, a = twins, twins.abused
    # Sequence 1 has 16 tokens: its next token starts block 1, whose page no plan call reserved.
    assert a.length(1) == 16
    _, q, k, v, c = good_step_arrays(t)
    e = raises("not_reserved", a.step, np.array([0, 1], np.int32), q, k, v, c)
    assert "reserve()" in str(e)
    t.check_same()
    t.step([0, 1])

    # A sequence that reached max_blocks_per_sequence * block tokens cannot grow.
    layer = small_layer(dtype="fp32", max_sequences=1, max_blocks_per_sequence=3)
    source = TokenSource(9, "fp32")
    layer.add_sequence(0, source.elements(40, HKV, D), source.elements(40, HKV, D), source.eviction_scores(40, HKV))
    for _ in range(8):
        layer.reserve(1)
        layer.step(
            np.array([0], np.int32),
            source.elements(1, HQ, D),
            source.elements(1, HKV, D),
            source.elements(1, HKV, D),
            source.eviction_scores(1, HKV),
        )
    assert layer.length(0) == 48
    raises("sequence_full", layer.reserve, 1)
    raises("sequence_full", layer.reserve, 0, 1)
    before = layer.counters()
    raises(
        "sequence_full",
        layer.step,
        np.array([0], np.int32),
        source.elements(1, HQ, D),
        source.elements(1, HKV, D),
        source.elements(1, HKV, D),
        source.eviction_scores(1, HKV),
    )
    assert layer.length(0) == 48 and layer.counters() == before
    layer.reserve(0)  # reserving nothing is always possible


def test_bad_plan_calls_raise_and_change_nothing(twins):
    t, a = twins, twins.abused
    s = t.source
    k, v, c = s.elements(20, HKV, D), s.elements(20, HKV, D), s.eviction_scores(20, HKV)
    raises("sequence_exists", a.add_sequence, 0, k, v, c)
    raises("unknown_sequence", a.add_sequence, 3, k, v, c)  # max_sequences is 3
    raises("unknown_sequence", a.add_sequence, -1, k, v, c)
    raises("shape_mismatch", a.add_sequence, 2, s.elements(20, HKV + 1, D), v, c)
    raises("shape_mismatch", a.add_sequence, 2, k, s.elements(19, HKV, D), c)
    raises("shape_mismatch", a.add_sequence, 2, k, v, c[:19])
    raises("shape_mismatch", a.add_sequence, 2, k, v, c, s.elements(HQ, D + 1))  # last_query
    raises("invalid_argument", a.add_sequence, 2, k.astype(np.float16), v, c)
    raises("invalid_argument", a.add_sequence, 2, k, v, None)
    raises(
        "sequence_full",
        a.add_sequence,
        2,
        s.elements(500, HKV, D),
        s.elements(500, HKV, D),
        s.eviction_scores(500, HKV),
    )
    raises("invalid_argument", a.add_sequence, "2", k, v, c)
    raises("unknown_sequence", a.remove_sequence, 2)
    raises("unknown_sequence", a.remove_sequence, 17)
    raises("invalid_argument", a.reserve, -1)
    raises("invalid_argument", a.reserve)
    raises("invalid_argument", a.reserve, 1, 2, 3)
    raises("invalid_argument", a.reserve, 1.5)
    raises("unknown_sequence", a.reserve, 2, 1)
    raises("unknown_sequence", a.reserve, -3, 1)
    raises("unknown_sequence", a.selection, 2)
    raises("unknown_sequence", a.step_misses, 5)
    raises("unknown_sequence", a.slots, -1)
    t.check_same()
    t.step([0, 1])
    # A prompt exactly at the capacity is accepted.
    t.admit(2, 400)
    t.step([0, 1, 2])


def test_full_pool_reserves_nothing():
    """A pool too small for a request is host_pool_full: admission and reservation are all or nothing."""
    layer = small_layer(dtype="fp32", max_sequences=2, max_tokens=400, pool_pages=10)
    source = TokenSource(13, "fp32")
    prompt = lambda n: (source.elements(n, HKV, D), source.elements(n, HKV, D), source.eviction_scores(n, HKV))
    layer.add_sequence(0, *prompt(100))  # 7 blocks, 7 pages (the next token's block included)
    assert layer.free_pages == 3
    raises("host_pool_full", layer.add_sequence, 1, *prompt(60))  # needs 4 pages
    assert layer.free_pages == 3 and not layer.is_live(1)
    raises("host_pool_full", layer.reserve, 61)  # 161 tokens: 4 more blocks for sequence 0
    assert layer.free_pages == 3
    layer.reserve(60)  # 160 tokens: 3 more blocks, exactly what is left
    assert layer.free_pages == 0
    raises("host_pool_full", layer.add_sequence, 1, *prompt(1))
    layer.remove_sequence(0)
    assert layer.free_pages == 10
    layer.add_sequence(1, *prompt(60))


@pytest.mark.parametrize(
    "status,kwargs",
    [
        ("invalid_config", dict(topk_qa=13)),  # k_qa > k
        ("invalid_config", dict(topk=4)),  # k below init + local + 1
        ("invalid_config", dict(block=0)),
        ("invalid_config", dict(window=-1)),
        ("invalid_config", dict(budget=-2)),
        ("invalid_argument", dict(num_q_heads=5)),  # not a multiple of num_kv_heads
        ("invalid_argument", dict(num_kv_heads=0)),
        ("invalid_argument", dict(max_sequences=0)),
        ("invalid_argument", dict(pool_pages=0)),
        ("invalid_argument", dict(max_blocks_per_sequence=-1)),
        ("invalid_argument", dict(cache_slots=-1)),
        ("invalid_argument", dict(variant="dense")),
        ("invalid_argument", dict(store="disk")),
        ("invalid_argument", dict(bias="before")),
        ("invalid_argument", dict(dtype="fp8")),
        ("invalid_argument", dict(dtype=np.float32)),
        ("invalid_argument", dict(device="tpu")),
        ("invalid_argument", dict(device="cuda:x")),
        ("invalid_argument", dict(variant="full", store="offload")),
        ("invalid_argument", dict(head_dim="64")),
        ("invalid_argument", dict(topk=12.0)),
        ("invalid_argument", dict(pool_pages=2**40)),
        ("not_supported", dict(head_dim=96)),
        ("not_supported", dict(num_q_heads=130, num_kv_heads=2)),  # GQA group above the host's 64
    ],
)
def test_bad_configurations(status, kwargs):
    params = dict(
        SMALL,
        num_q_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        dtype="fp32",
        max_sequences=2,
        max_blocks_per_sequence=20,
        pool_pages=40,
    )
    params.update(kwargs)
    raises(status, nosa.DecodeLayer, **params)


def test_cuda_layer_without_the_cuda_backend_or_a_gpu():
    if nosa.cuda_available():
        pytest.skip("a GPU is present: tests/python/test_cuda.py covers the CUDA backend")
    raises("not_supported", small_layer, device="cuda")
    raises("not_supported", small_layer, device="cuda:0")
    expected = 5 if nosa._core.cuda_built() else 0  # the CUDA backend's pipelines, when the build has it
    assert len(nosa.pipelines("cuda")) == expected
    raises("invalid_argument", nosa.pipelines, "tpu")
