"""The transformers example (examples/python/llama_transformers.py): a Llama model from a small config with
random weights, nosa as its decode attention, greedy tokens equal to the model's own attention while every
context fits in k blocks. On the host backend where PyTorch and transformers are installed; on the GPU where
there is one too."""

import importlib.util
import pathlib

import pytest

import nosa

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "python" / "llama_transformers.py"


def example():
    spec = importlib.util.spec_from_file_location("llama_transformers", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_on_the_host_backend():
    assert example().main(["--device", "cpu", "--context", "500", "--new-tokens", "12"]) == 0


def test_on_the_host_backend_full_attention_and_head_dim_128():
    assert (
        example().main(
            [
                "--device",
                "cpu",
                "--variant",
                "full",
                "--head-dim",
                "128",
                "--heads",
                "4",
                "--context",
                "300",
                "--new-tokens",
                "8",
            ]
        )
        == 0
    )


@pytest.mark.skipif(
    not (torch.cuda.is_available() and nosa.cuda_available()),
    reason="no CUDA device (or a build without the CUDA backend): the GPU run needs one",
)
@pytest.mark.parametrize("variant,head_dim", [("nosa", 64), ("nosa", 128), ("infllmv2", 128), ("full", 64)])
def test_on_the_gpu(variant, head_dim):
    """Contexts of up to 3,000 tokens (48 blocks of 64, within k = 64), float32: the same tokens."""
    heads = 8 if head_dim == 64 else 4
    assert (
        example().main(
            [
                "--device",
                "cuda",
                "--variant",
                variant,
                "--head-dim",
                str(head_dim),
                "--heads",
                str(heads),
                "--context",
                "3000",
                "--new-tokens",
                "32",
                "--batch",
                "4",
            ]
        )
        == 0
    )


@pytest.mark.skipif(
    not (torch.cuda.is_available() and nosa.cuda_available()),
    reason="no CUDA device (or a build without the CUDA backend): the GPU run needs one",
)
def test_on_the_gpu_bf16_and_beyond_k():
    """bf16 (tokens agree up to a rounding near-tie) and contexts beyond k blocks (sparse): both run through."""
    module = example()
    assert module.main(["--device", "cuda", "--dtype", "bf16", "--context", "3000", "--new-tokens", "32"]) == 0
    assert module.main(["--device", "cuda", "--dtype", "bf16", "--context", "12000", "--new-tokens", "64"]) == 0
