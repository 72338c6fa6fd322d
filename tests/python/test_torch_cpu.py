"""CPU PyTorch tensors on the host backend: the same numbers as NumPy arrays, bf16 included, read in place
(views of a fused QKV projection), outputs as tensors. Skipped where PyTorch is not installed."""

import numpy as np
import pytest

import nosa
from harness import TokenSource, small_layer

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

HQ, HKV, D = 4, 2, 64
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_torch(array, dtype):
    """A torch tensor with the values of `array` (bf16 through float32, which holds every bf16 exactly)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(TORCH_DTYPES[dtype])


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", ["nosa", "infllmv2", "full"])
def test_tensors_give_the_numbers_arrays_give(variant, dtype):
    source = TokenSource(31, dtype)
    from_numpy, from_torch = small_layer(variant=variant, dtype=dtype), small_layer(variant=variant, dtype=dtype)
    for seq, length in enumerate((37, 100, 5)):
        k, v, c = source.elements(length, HKV, D), source.elements(length, HKV, D), source.eviction_scores(length, HKV)
        from_numpy.add_sequence(seq, k, v, c)
        from_torch.add_sequence(seq, to_torch(k, dtype), to_torch(v, dtype), torch.from_numpy(c))
    for _ in range(40):
        q, k, v = source.elements(3, HQ, D), source.elements(3, HKV, D), source.elements(3, HKV, D)
        c = source.eviction_scores(3, HKV)
        for layer in (from_numpy, from_torch):
            layer.reserve(1)
        expected = from_numpy.step(np.arange(3, dtype=np.int32), q, k, v, c)
        got = from_torch.step(
            torch.arange(3, dtype=torch.int32),
            to_torch(q, dtype),
            to_torch(k, dtype),
            to_torch(v, dtype),
            torch.from_numpy(c),
        )
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and got.device.type == "cpu"
        np.testing.assert_array_equal(got.numpy(), expected)
    for seq in range(3):
        np.testing.assert_array_equal(from_torch.selection(seq), from_numpy.selection(seq))
    assert from_torch.counters() == from_numpy.counters()


def test_views_of_a_fused_projection_and_out_in_place():
    """q, k and v as views of one [B, (H_q + 2 H_kv) * D] projection, gradients on: read where they are."""
    layer, twin = small_layer(dtype="bf16"), small_layer(dtype="bf16")
    source = TokenSource(37, "bf16")
    for seq, length in ((0, 50), (1, 21)):
        k, v = to_torch(source.elements(length, HKV, D), "bf16"), to_torch(source.elements(length, HKV, D), "bf16")
        for l in (layer, twin):
            l.add_sequence(seq, k, v, torch.zeros(length, HKV))
    sequences = torch.tensor([1, 0], dtype=torch.int32)
    out = torch.empty(2, HQ, D)
    for _ in range(20):
        qkv = to_torch(source.elements(2, (HQ + 2 * HKV) * D), "bf16").requires_grad_()
        q, k, v = qkv.view(2, HQ + 2 * HKV, D).split([HQ, HKV, HKV], dim=1)
        assert not k.is_contiguous()  # a view with the projection's strides
        c = torch.zeros(2, HKV)
        for l in (layer, twin):
            l.reserve(1)
        returned = layer.step(sequences, q, k, v, c, out=out)
        assert returned is out
        expected = twin.step(sequences, q.detach().contiguous(), k.detach().contiguous(), v.detach().contiguous(), c)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_wrong_tensors_raise():
    layer = small_layer(dtype="bf16")
    k = torch.zeros(10, HKV, D, dtype=torch.float16)
    with pytest.raises(nosa.Error, match="k has dtype float16; expected bfloat16") as e:
        layer.add_sequence(0, k, k, torch.zeros(10, HKV))
    assert e.value.status == "invalid_argument"
    k = torch.zeros(10, HKV, D, dtype=torch.bfloat16)
    with pytest.raises(nosa.Error) as e:
        layer.add_sequence(0, k, k, torch.zeros(10, HKV, dtype=torch.float64))
    assert e.value.status == "invalid_argument"
    with pytest.raises(nosa.Error) as e:
        layer.add_sequence(0, k.transpose(1, 2), k, torch.zeros(10, HKV))
    assert e.value.status == "shape_mismatch"
    wide = torch.zeros(10, HKV, 2 * D, dtype=torch.bfloat16)
    with pytest.raises(nosa.Error) as e:
        layer.add_sequence(0, wide[:, :, ::2], k, torch.zeros(10, HKV))
    assert e.value.status == "bad_layout"
    assert not layer.is_live(0)
    layer.add_sequence(0, k, k, torch.zeros(10, HKV))
    assert layer.length(0) == 10
