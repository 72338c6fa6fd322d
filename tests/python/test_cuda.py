"""The CUDA backend through PyTorch CUDA tensors, against the host backend on the same tokens: every compiled
CUDA pipeline and dtype outside a graph, a step captured once by torch.cuda.graph and replayed while the
sequences grow, streams, and bad input. Needs a GPU, PyTorch with CUDA and a build with the CUDA backend;
skipped otherwise."""

import numpy as np
import pytest

import nosa
from harness import ATOL, RTOL, TokenSource, small_layer
from nosa import _reference as ref

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
if not nosa._core.cuda_built():
    pytest.skip("this build of nosa has no CUDA backend (built without nvcc)", allow_module_level=True)
if not torch.cuda.is_available() or not nosa.cuda_available():
    pytest.skip("no CUDA device: the CUDA tests need a GPU", allow_module_level=True)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CUDA = torch.device("cuda", torch.cuda.current_device())


def tensor(array, dtype, device="cpu"):
    """A torch tensor with the values of `array` (rounded to the storage type already)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device=device, dtype=TORCH_DTYPES[dtype])


def scores(array, device="cpu"):
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)


class Pair:
    """A host layer and a CUDA layer of one pipeline, fed the same tokens."""

    def __init__(self, **kwargs):
        self.host = small_layer(**kwargs)
        self.cuda = small_layer(device="cuda", **kwargs)
        self.dtype = self.host.dtype
        self.hq, self.hkv, self.d = self.host.num_q_heads, self.host.num_kv_heads, self.host.head_dim
        self.source = TokenSource(97, self.dtype)
        self.selections = 0
        self.near_ties = 0
        self.cfg = ref.Config(
            block=self.host.config["block"],
            window=self.host.config["window"],
            stride=self.host.config["stride"],
            topk=self.host.config["topk"],
            topk_qa=self.host.config["topk_qa"],
            n_init=self.host.config["init"],
            n_local=self.host.config["local"],
            budget=-1,
            query_agnostic=self.host.variant == "nosa",
            bias=self.host.bias,
            head_dim=self.d,
            group=self.hq // self.hkv,
            compressed_keys=self.dtype,
        )
        self.history = {}

    def admit(self, seq, length):
        s = self.source
        k, v, c = (
            s.elements(length, self.hkv, self.d),
            s.elements(length, self.hkv, self.d),
            s.eviction_scores(length, self.hkv),
        )
        self.host.add_sequence(seq, tensor(k, self.dtype), tensor(v, self.dtype), scores(c))
        self.cuda.add_sequence(seq, tensor(k, self.dtype, CUDA), tensor(v, self.dtype, CUDA), scores(c, CUDA))
        self.history[seq] = []
        for h in range(self.hkv):
            hist = ref.History(self.cfg)
            hist.append(
                np.ascontiguousarray(k[:, h].astype(np.float64)),
                np.ascontiguousarray(v[:, h].astype(np.float64)),
                np.ascontiguousarray(c[:, h].astype(np.float64)),
            )
            self.history[seq].append(hist)
        self.compare_selections(seq, None)

    def tokens(self, batch):
        s = self.source
        return (
            s.elements(batch, self.hq, self.d),
            s.elements(batch, self.hkv, self.d),
            s.elements(batch, self.hkv, self.d),
            s.eviction_scores(batch, self.hkv),
        )

    def record(self, sequences, q, k, v, c):
        """Appends the step's tokens to the reference histories (to judge near-ties)."""
        for b, seq in enumerate(sequences):
            for h in range(self.hkv):
                self.history[seq][h].append(
                    np.ascontiguousarray(k[b, h : h + 1].astype(np.float64)),
                    np.ascontiguousarray(v[b, h : h + 1].astype(np.float64)),
                    np.array([c[b, h]], np.float64),
                )

    def compare_selections(self, seq, q_row):
        """The two backends' selections of `seq`: identical, or both the reference's up to an fp32 near-tie."""
        if self.host.variant == "full":
            return True
        host, cuda = self.host.selection(seq), self.cuda.selection(seq)
        same = True
        for h in range(self.hkv):
            self.selections += 1
            if np.array_equal(host[h], cuda[h]):
                continue
            same = False
            self.near_ties += 1
            g = self.hq // self.hkv
            qd = None if q_row is None else np.ascontiguousarray(q_row[h * g : (h + 1) * g].astype(np.float64))
            expected = ref.select(self.cfg, self.history[seq][h], qd, None)
            for name, got in (("host", host[h]), ("cuda", cuda[h])):
                _, equivalent, message = expected.compare([int(m) for m in got if m >= 0])
                assert equivalent, f"sequence {seq} head {h}, {name}: {message}"
        return same

    def check_outputs(self, sequences, q, host_out, cuda_out):
        cuda_out = cuda_out.cpu().numpy()
        host_out = host_out.numpy()
        for b, seq in enumerate(sequences):
            if not self.compare_selections(seq, q[b]):
                continue  # a near-tie changed the attended blocks
            np.testing.assert_array_equal(self.host.step_misses(seq), self.cuda.step_misses(seq))
            error = np.abs(cuda_out[b] - host_out[b]) / (ATOL + RTOL * np.abs(host_out[b]))
            assert error.max() <= 1.0, f"sequence {seq}: max error {error.max():.3g} x tolerance"


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("variant,store,bias", nosa.pipelines("cuda"))
def test_cuda_matches_host(variant, store, bias, dtype, head_dim):
    pair = Pair(variant=variant, store=store, bias=bias, dtype=dtype, head_dim=head_dim, num_q_heads=8, num_kv_heads=2)
    for seq, length in enumerate((37, 100, 5)):
        pair.admit(seq, length)
    sequences = [0, 1, 2]
    ids_host, ids_cuda = torch.tensor(sequences, dtype=torch.int32), torch.tensor(
        sequences, dtype=torch.int32, device=CUDA
    )
    for i in range(100):
        if i == 60:
            pair.host.remove_sequence(0)
            pair.cuda.remove_sequence(0)
            pair.admit(0, 23)
        q, k, v, c = pair.tokens(3)
        pair.host.reserve(1)
        pair.cuda.reserve(1)
        host_out = pair.host.step(ids_host, tensor(q, dtype), tensor(k, dtype), tensor(v, dtype), scores(c))
        cuda_out = pair.cuda.step(
            ids_cuda, tensor(q, dtype, CUDA), tensor(k, dtype, CUDA), tensor(v, dtype, CUDA), scores(c, CUDA)
        )
        assert cuda_out.device == CUDA and cuda_out.dtype == torch.float32
        pair.cuda.check_step()
        pair.record(sequences, q, k, v, c)
        pair.check_outputs(sequences, q, host_out, cuda_out)
    assert pair.near_ties * 100 <= max(pair.selections, 1)
    if pair.near_ties == 0:
        assert pair.cuda.counters() == pair.host.counters()


@pytest.mark.parametrize(
    "variant,store,dtype", [("nosa", "offload", "bf16"), ("infllmv2", "resident", "fp16"), ("full", "resident", "bf16")]
)
def test_graph_capture_replays_while_sequences_grow(variant, store, dtype):
    """One step captured by torch.cuda.graph, replayed 300 times over fixed buffers while the sequences cross
    block boundaries (the plan call reserve() between replays, outside the capture), with a sequence replaced
    halfway by writing its new slot into the sequences buffer. Every replay matches the host backend."""
    pair = Pair(
        variant=variant,
        store=store,
        dtype=dtype,
        head_dim=128,
        num_q_heads=8,
        num_kv_heads=2,
        max_sequences=4,
        max_tokens=1500,
    )
    for seq, length in enumerate((200, 70, 1000)):
        pair.admit(seq, length)
    tdtype = TORCH_DTYPES[dtype]
    ids = torch.tensor([0, 1, 2], dtype=torch.int32, device=CUDA)
    q = torch.zeros(3, pair.hq, pair.d, dtype=tdtype, device=CUDA)
    k = torch.zeros(3, pair.hkv, pair.d, dtype=tdtype, device=CUDA)
    v = torch.zeros_like(k)
    c = torch.zeros(3, pair.hkv, device=CUDA)
    out = torch.zeros(3, pair.hq, pair.d, device=CUDA)

    pair.cuda.reserve(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the step's kernels on the capture stream; nothing runs yet
        returned = pair.cuda.step(ids, q, k, v, c, out=out)
    assert returned is out
    assert pair.cuda.length(0) == 200  # capturing ran nothing

    sequences = [0, 1, 2]
    for i in range(300):
        if i == 150:  # sequence 0 leaves; a new one joins in slot 3, and the graph reads its id from `ids`
            for layer in (pair.host, pair.cuda):
                layer.remove_sequence(0)
            pair.admit(3, 41)
            sequences = [3, 1, 2]
            ids.copy_(torch.tensor(sequences, dtype=torch.int32))
        tq, tk, tv, tc = pair.tokens(3)
        pair.host.reserve(1)
        pair.cuda.reserve(1)
        q.copy_(tensor(tq, dtype))
        k.copy_(tensor(tk, dtype))
        v.copy_(tensor(tv, dtype))
        c.copy_(scores(tc))
        graph.replay()
        host_out = pair.host.step(
            torch.tensor(sequences, dtype=torch.int32),
            tensor(tq, dtype),
            tensor(tk, dtype),
            tensor(tv, dtype),
            scores(tc),
        )
        pair.record(sequences, tq, tk, tv, tc)
        pair.check_outputs(sequences, tq, host_out, out)
    pair.cuda.check_step()
    assert pair.cuda.length(1) == 70 + 300 and pair.cuda.length(2) == 1000 + 300 and pair.cuda.length(3) == 41 + 150
    assert pair.cuda.counters()["steps"] == 300


def test_streams():
    """A step follows PyTorch's current stream by default, or the stream given (object or handle)."""
    results = []
    for mode in ("default", "current", "object", "handle"):
        layer = small_layer(device="cuda", dtype="bf16", head_dim=64, num_q_heads=8, num_kv_heads=2)
        source = TokenSource(5, "bf16")
        side = torch.cuda.Stream()
        k, v = source.elements(90, 2, 64), source.elements(90, 2, 64)
        layer.add_sequence(0, tensor(k, "bf16", CUDA), tensor(v, "bf16", CUDA), torch.zeros(90, 2, device=CUDA))
        outs = []
        for _ in range(20):
            tq, tk, tv = source.elements(1, 8, 64), source.elements(1, 2, 64), source.elements(1, 2, 64)
            args = (
                torch.zeros(1, dtype=torch.int32, device=CUDA),
                tensor(tq, "bf16", CUDA),
                tensor(tk, "bf16", CUDA),
                tensor(tv, "bf16", CUDA),
                torch.zeros(1, 2, device=CUDA),
            )
            side.wait_stream(torch.cuda.current_stream())
            if mode == "default":
                layer.reserve(1)
                o = layer.step(*args)
            elif mode == "current":
                with torch.cuda.stream(side):
                    layer.reserve(1)
                    o = layer.step(*args)
            elif mode == "object":
                layer.reserve(1, stream=side)
                o = layer.step(*args, out=torch.empty(1, 8, 64, device=CUDA), stream=side)
            else:
                layer.reserve(1, stream=side.cuda_stream)
                o = layer.step(*args, out=torch.empty(1, 8, 64, device=CUDA), stream=side.cuda_stream)
            torch.cuda.current_stream().wait_stream(side)
            outs.append(o.cpu())
        layer.check_step()
        results.append(torch.stack(outs))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


def test_cuda_bad_input():
    layer = small_layer(device="cuda", dtype="bf16", head_dim=64)
    host = small_layer(dtype="bf16", head_dim=64)
    k = torch.zeros(30, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(nosa.Error) as e:  # host memory for a CUDA layer
        layer.add_sequence(0, k, k, torch.zeros(30, 2))
    assert e.value.status == "invalid_argument" and "cuda:" in str(e.value)
    with pytest.raises(nosa.Error) as e:  # device memory for a host layer
        host.add_sequence(0, k.to(CUDA), k.to(CUDA), torch.zeros(30, 2, device=CUDA))
    assert e.value.status == "invalid_argument"
    kc = k.to(CUDA)
    layer.add_sequence(0, kc, kc, torch.zeros(30, 2, device=CUDA))
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16, device=CUDA)
    kv = torch.zeros(1, 2, 64, dtype=torch.bfloat16, device=CUDA)
    c = torch.zeros(1, 2, device=CUDA)
    with pytest.raises(nosa.Error) as e:  # the ids are read on the device: they must be there
        layer.step(torch.zeros(1, dtype=torch.int32), q, kv, kv, c)
    assert e.value.status == "invalid_argument"
    with pytest.raises(nosa.Error) as e:
        layer.step(torch.zeros(1, dtype=torch.int32, device=CUDA), q.float(), kv, kv, c)
    assert e.value.status == "invalid_argument"
    with pytest.raises(nosa.Error) as e:
        layer.step(torch.zeros(1, dtype=torch.int32, device=CUDA), q, kv, kv, c, stream="side")
    assert e.value.status == "invalid_argument"
    # Errors that depend on the state are found on the device: step enqueues, check_step raises, and the
    # failed step changed nothing.
    layer.reserve(1)
    before = (layer.length(0), layer.counters(), layer.selection(0))
    layer.step(torch.ones(1, dtype=torch.int32, device=CUDA), q, kv, kv, c)  # slot 1 is free
    with pytest.raises(nosa.Error) as e:
        layer.check_step()
    assert e.value.status == "unknown_sequence"
    layer.step(
        torch.zeros(2, dtype=torch.int32, device=CUDA),
        q.expand(2, -1, -1),
        kv.expand(2, -1, -1),
        kv.expand(2, -1, -1),
        c.expand(2, -1),
    )
    with pytest.raises(nosa.Error) as e:
        layer.check_step()
    assert e.value.status == "duplicate_sequence"
    after = (layer.length(0), layer.counters(), layer.selection(0))
    assert before[0] == after[0] and before[1] == after[1]
    np.testing.assert_array_equal(before[2], after[2])
    layer.step(torch.zeros(1, dtype=torch.int32, device=CUDA), q, kv, kv, c)
    layer.check_step()
    assert layer.length(0) == 31
