"""`DecodeLayer`: one decode layer of NOSA sparse attention with its KV cache, over DLPack arrays."""

from __future__ import annotations

import operator
import sys
from typing import Any, Optional

import numpy

from . import _core
from ._errors import Error

_NO_BUDGET = -1


def _int(call: str, name: str, value: Any) -> int:
    """`value` as a Python int, or nosa.Error(invalid_argument) naming the argument."""
    if isinstance(value, bool):
        raise Error("invalid_argument", f"{call}: invalid_argument: {name} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise Error(
            "invalid_argument", f"{call}: invalid_argument: {name} must be an integer, got {type(value).__name__}"
        ) from None


def _framework(array: Any) -> Optional[str]:
    """The array library an array comes from: "torch", "cupy", "numpy" or None."""
    module = type(array).__module__.split(".", 1)[0]
    return module if module in ("torch", "cupy", "numpy") else None


def _parse_device(device: Any) -> tuple[str, int]:
    """("cpu", 0) or ("cuda", ordinal) from "cpu", "cuda", "cuda:N" or a torch.device."""
    kind = getattr(device, "type", None)
    if kind is not None:  # torch.device
        index = getattr(device, "index", None)
        text = kind if index is None else f"{kind}:{index}"
    elif isinstance(device, str):
        text = device
    else:
        raise Error(
            "invalid_argument", f"DecodeLayer: invalid_argument: device must be 'cpu' or 'cuda[:N]', got {device!r}"
        )
    if text == "cpu":
        return "cpu", 0
    if text == "cuda":
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return "cuda", torch.cuda.current_device()
        return "cuda", 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise Error(
        "invalid_argument", f"DecodeLayer: invalid_argument: device must be 'cpu' or 'cuda[:N]', got {device!r}"
    )


class DecodeLayer:
    """One decode layer: NOSA (or InfLLMv2, or full) attention with its KV cache, for a batch of sequences.

    A layer owns its state: the paged KV pool (in host memory for ``store="offload"``, on the device for
    ``store="resident"``), the per-(sequence, KV head) slot cache, compressed keys and selections. An engine
    makes one per model layer. Sequences occupy slots ``0 .. max_sequences-1``; each is admitted with its
    prompt (``add_sequence``), decoded one token per ``step`` (after a plan call ``reserve`` that takes the
    pool pages the next steps need), and retired (``remove_sequence``).

    Arrays are taken through DLPack (or the buffer protocol) without copies: NumPy arrays and CPU tensors for
    ``device="cpu"`` (the host backend), CUDA tensors (PyTorch, CuPy) on the layer's GPU for
    ``device="cuda"``. q, k and v have the storage ``dtype`` (``torch.bfloat16``, ``numpy.float16``, ...);
    eviction scores ``c`` and the output are float32, sequence ids int32. Innermost strides must be 1; other
    strides are free.

    On the CUDA backend every call takes ``stream=``: an int (a ``cudaStream_t``), a ``torch.cuda.Stream`` or
    a CuPy stream; by default PyTorch's current stream (CuPy's for CuPy arrays), so calls follow the work
    around them and a step can be captured by ``torch.cuda.graph``. ``step`` only enqueues work; plan calls
    and inspection synchronise the stream.

    Every failure raises :class:`nosa.Error` (a ``ValueError``) naming the status, and changes nothing.

    Args:
        num_q_heads, num_kv_heads, head_dim: H_q, H_kv (a divisor of H_q) and D (64, 128 or 256).
        dtype: storage type of q, K and V: ``"fp32"``, ``"bf16"`` or ``"fp16"``; arithmetic is fp32.
        variant: ``"nosa"`` (query-aware plus query-agnostic selection), ``"infllmv2"`` (query-aware only) or
            ``"full"`` (dense attention over every block, the baseline).
        store: ``"offload"`` (host pool plus GPU slot cache; the default for the sparse variants) or
            ``"resident"`` (every block on the device; the only store of ``"full"``).
        bias: how the eviction score ``c`` enters the attention logit: ``"after_scale"`` (``q.k/sqrt(D) + c``,
            the trained semantics; nosa's default), ``"before_scale"`` (``(q.k + c)/sqrt(D)``) or ``"none"``
            (the default of infllmv2 and full).
        block, window, stride: b_s, l_c and s_c of the specification, in tokens.
        topk, topk_qa, init, local: k, k_qa, the sink blocks and the local blocks.
        budget: at most this many blocks loaded per step per (sequence, KV head); None for no cap.
        cache_slots: slots per (sequence, KV head) beyond the ``k + 1`` a step needs (offload store).
        max_sequences, max_blocks_per_sequence, pool_pages: the fixed capacities (sequence slots, blocks of
            the longest sequence, pages of the pool; one page holds one block of every KV head).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
    """

    def __init__(
        self,
        *,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_sequences: int,
        max_blocks_per_sequence: int,
        pool_pages: int,
        dtype: str = "bf16",
        variant: str = "nosa",
        store: Optional[str] = None,
        bias: Optional[str] = None,
        block: int = 64,
        window: int = 32,
        stride: int = 16,
        topk: int = 64,
        topk_qa: int = 33,
        init: int = 1,
        local: int = 16,
        budget: Optional[int] = None,
        cache_slots: int = 0,
        device: Any = "cpu",
    ):
        call = "DecodeLayer"
        backend, index = _parse_device(device)
        if store is None:
            store = "resident" if variant == "full" else "offload"
        if bias is None:
            bias = "after_scale" if variant == "nosa" else "none"
        if budget is None:
            budget_value = _NO_BUDGET
        else:
            budget_value = _int(call, "budget", budget)
            if budget_value < 0:
                raise Error(
                    "invalid_config", f"{call}: invalid_config: budget must be None or >= 0, got {budget_value}"
                )
        for name, value in (("dtype", dtype), ("variant", variant), ("store", store), ("bias", bias)):
            if not isinstance(value, str):
                raise Error("invalid_argument", f"{call}: invalid_argument: {name} must be a string, got {value!r}")
        sizes = {
            name: _int(call, name, value)
            for name, value in (
                ("head_dim", head_dim),
                ("num_q_heads", num_q_heads),
                ("num_kv_heads", num_kv_heads),
                ("block", block),
                ("window", window),
                ("stride", stride),
                ("topk", topk),
                ("topk_qa", topk_qa),
                ("init", init),
                ("local", local),
                ("cache_slots", cache_slots),
                ("max_sequences", max_sequences),
                ("max_blocks_per_sequence", max_blocks_per_sequence),
                ("pool_pages", pool_pages),
            )
        }
        for name, value in sizes.items():
            if not -(2**31) <= value < 2**31:
                raise Error("invalid_argument", f"{call}: invalid_argument: {name} = {value} does not fit in 32 bits")
        self._impl = _core.create_layer(
            backend=backend,
            variant=variant,
            store=store,
            bias=bias,
            dtype=dtype,
            budget=budget_value,
            device=index,
            **sizes,
        )
        self._backend = backend
        self._device_index = index
        self._config = dict(variant=variant, store=store, bias=bias, dtype=dtype, budget=budget, **sizes)

    # ---- properties ----------------------------------------------------------------------------------------

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"``."""
        return "cpu" if self._backend == "cpu" else f"cuda:{self._device_index}"

    @property
    def config(self) -> dict:
        """What the layer was created with: variant, store, bias, dtype, budget and every size, by the names of
        the constructor's arguments (store and bias resolved from their defaults)."""
        return dict(self._config)

    @property
    def variant(self) -> str:
        return self._config["variant"]

    @property
    def store(self) -> str:
        return self._config["store"]

    @property
    def bias(self) -> str:
        return self._config["bias"]

    @property
    def dtype(self) -> str:
        return self._config["dtype"]

    @property
    def head_dim(self) -> int:
        return self._config["head_dim"]

    @property
    def num_q_heads(self) -> int:
        return self._config["num_q_heads"]

    @property
    def num_kv_heads(self) -> int:
        return self._config["num_kv_heads"]

    @property
    def free_pages(self) -> int:
        """Pool pages not referenced by any sequence (host bookkeeping; never waits)."""
        return self._impl.free_pages

    def __repr__(self) -> str:
        return (
            f"nosa.DecodeLayer(variant={self.variant!r}, store={self.store!r}, bias={self.bias!r}, "
            f"dtype={self.dtype!r}, num_q_heads={self.num_q_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, device={self.device!r})"
        )

    # ---- plan calls ----------------------------------------------------------------------------------------

    def add_sequence(
        self, slot: int, k: Any, v: Any, c: Any = None, last_query: Any = None, *, stream: Any = None
    ) -> None:
        """Admits a sequence into ``slot`` with its prompt (the K, V and eviction scores of the engine's prefill).

        Args:
            slot: a free sequence slot in ``[0, max_sequences)``.
            k, v: ``[P, H_kv, D]`` post-RoPE keys and values, P >= 0, of the storage dtype.
            c: ``[P, H_kv]`` float32 eviction scores; required when the pipeline reads them (variant ``nosa``,
                or a bias), optional otherwise.
            last_query: optional ``[H_q, D]`` query of the last prompt token, for the initial selection.

        Stores the prompt in the pool, builds the compressed state, selects and loads the first selection, and
        reserves the page of the next token. Synchronises the stream on the CUDA backend.
        """
        slot = _int("add_sequence", "slot", slot)
        stream = self._stream("add_sequence", stream, k)
        self._impl.add_sequence(slot, _export(k), _export(v), _export(c), _export(last_query), stream)

    def remove_sequence(self, slot: int, *, stream: Any = None) -> None:
        """Retires the sequence in ``slot`` and returns its pages to the pool; other sequences are untouched."""
        slot = _int("remove_sequence", "slot", slot)
        self._impl.remove_sequence(slot, self._stream("remove_sequence", stream, None))

    def reserve(self, *args: int, stream: Any = None) -> None:
        """``reserve(n)``: reserve pool pages so that every live sequence can run ``n`` more steps;
        ``reserve(slot, n)``: the same for one sequence. All or nothing (``host_pool_full``, ``sequence_full``).

        Call it between steps (outside a graph capture): it synchronises the stream on the CUDA backend.
        """
        if len(args) == 1:
            slot, tokens = -1, _int("reserve", "n", args[0])
        elif len(args) == 2:
            slot, tokens = _int("reserve", "slot", args[0]), _int("reserve", "n", args[1])
            if slot < 0:
                raise Error("unknown_sequence", f"reserve: unknown_sequence: slot {slot} is outside [0, max_sequences)")
        else:
            raise Error("invalid_argument", "reserve: invalid_argument: call reserve(n) or reserve(slot, n)")
        self._impl.reserve(slot, tokens, self._stream("reserve", stream, None))

    # ---- the step ------------------------------------------------------------------------------------------

    def step(
        self, sequences: Any, q: Any, k: Any, v: Any, c: Any = None, *, out: Any = None, stream: Any = None
    ) -> Any:
        """One decode step of this layer for a batch of live sequences; returns the attention output.

        Args:
            sequences: int32 ``[B]`` sequence slots, each live and listed once.
            q: ``[B, H_q, D]`` post-RoPE queries of the new tokens.
            k, v: ``[B, H_kv, D]`` post-RoPE keys and values of the new tokens.
            c: float32 ``[B, H_kv]`` eviction scores (required when the pipeline reads them).
            out: float32 ``[B, H_q, D]`` to write; without it a new array of q's library is returned (the one
                allocation of the step: pass ``out=`` to have none).

        Every sequence of the batch advances by one token, or on failure none does. On the CUDA backend the
        step only enqueues kernels on the stream (no allocation, no synchronisation), so it can be captured in a
        CUDA graph; errors that depend on the state (an unknown, duplicate, full or unreserved sequence) are
        then found on the device and raised by :meth:`check_step`.
        """
        if out is None:
            out = self._new_output(q)
        stream_value = self._stream("step", stream, q)
        self._impl.step(_export(sequences), _export(q), _export(k), _export(v), _export(c), _export(out), stream_value)
        return out

    def check_step(self, *, stream: Any = None) -> None:
        """Raises nosa.Error when the most recent step failed (it then changed nothing).

        The host backend raises from ``step`` itself; on the CUDA backend this is where errors found on the
        device are reported. Synchronises the stream on the CUDA backend.
        """
        self._impl.step_status(self._stream("check_step", stream, None))

    # ---- inspection ----------------------------------------------------------------------------------------

    def selection(self, slot: int, *, stream: Any = None) -> numpy.ndarray:
        """The blocks selected for each KV head of ``slot``: int32 ``[H_kv, topk]``, ascending, padded with -1.

        Full attention reads every block and has no selection: ``[H_kv, 0]``.
        """
        slot = _int("selection", "slot", slot)
        return self._impl.selection(slot, self._stream("selection", stream, None))

    def step_misses(self, slot: int, *, stream: Any = None) -> numpy.ndarray:
        """Blocks loaded for each KV head of ``slot`` by its last step: int32 ``[H_kv]``."""
        slot = _int("step_misses", "slot", slot)
        return self._impl.step_misses(slot, self._stream("step_misses", stream, None))

    def slots(self, slot: int, *, stream: Any = None) -> numpy.ndarray:
        """The block held by each slot of each KV head's slot cache (-1 if free): int32 ``[H_kv, slots]``;
        ``[H_kv, 0]`` for the resident store."""
        slot = _int("slots", "slot", slot)
        return self._impl.slots(slot, self._stream("slots", stream, None))

    def counters(self, *, last_step: bool = False, stream: Any = None) -> dict:
        """Traffic counters since creation (or of the last step): steps, hits, misses, bytes_h2d, bytes_d2h."""
        return self._impl.counters(bool(last_step), self._stream("counters", stream, None))

    def length(self, slot: int, *, stream: Any = None) -> int:
        """Tokens of the sequence in ``slot``; 0 for a free slot."""
        slot = _int("length", "slot", slot)
        return max(self._impl.length(slot, self._stream("length", stream, None)), 0)

    def is_live(self, slot: int, *, stream: Any = None) -> bool:
        """True when ``slot`` holds a live sequence."""
        slot = _int("is_live", "slot", slot)
        return self._impl.length(slot, self._stream("is_live", stream, None)) >= 0

    # ---- helpers -------------------------------------------------------------------------------------------

    def _stream(self, call: str, stream: Any, array: Any) -> int:
        """The stream of a call as an int: the one given, or the default of the caller's array library."""
        if self._backend == "cpu":
            return 0
        if stream is None:
            return self._default_stream(array)
        if isinstance(stream, int) and not isinstance(stream, bool):
            return stream
        for attribute in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            value = getattr(stream, attribute, None)
            if isinstance(value, int):
                return value
        raise Error(
            "invalid_argument",
            f"{call}: invalid_argument: stream must be an int (cudaStream_t), a torch.cuda.Stream or a CuPy stream",
        )

    def _default_stream(self, array: Any) -> int:
        framework = _framework(array) if array is not None else None
        cupy = sys.modules.get("cupy")
        torch = sys.modules.get("torch")
        if cupy is not None and (framework == "cupy" or (framework is None and torch is None)):
            with cupy.cuda.Device(self._device_index):
                return cupy.cuda.get_current_stream().ptr
        if torch is not None:
            return torch.cuda.current_stream(self._device_index).cuda_stream
        return 0  # the legacy default stream

    def _new_output(self, q: Any) -> Any:
        shape = getattr(q, "shape", None)
        if shape is None or len(shape) != 3:
            return None  # the step reports q
        shape = (shape[0], self.num_q_heads, self.head_dim)
        framework = _framework(q)
        if framework == "torch":
            torch = sys.modules["torch"]
            return torch.empty(shape, dtype=torch.float32, device=q.device)
        if framework == "cupy":
            cupy = sys.modules["cupy"]
            with cupy.cuda.Device(q.device.id):
                return cupy.empty(shape, dtype=cupy.float32)
        if self._backend == "cpu":
            return numpy.empty(shape, dtype=numpy.float32)
        raise Error("invalid_argument", "step: invalid_argument: pass out= (float32 [B, H_q, D] on the layer's device)")


def _export(array: Any) -> Any:
    """The object handed to the extension for `array`.

    PyTorch CUDA tensors are exported with ``__dlpack__(stream=-1)``: no cross-stream synchronisation (which
    older PyTorch versions would otherwise add, on the legacy default stream, and which a graph capture
    forbids). Tensors that require gradients are detached (a view; the layer computes no gradients).
    """
    if array is None or _framework(array) != "torch":
        return array
    if array.requires_grad:
        array = array.detach()
    if not array.is_cuda:
        return array
    torch = sys.modules["torch"]
    try:
        if array.device.index != torch.cuda.current_device():
            with torch.cuda.device(array.device.index):
                return array.__dlpack__(stream=-1)
        return array.__dlpack__(stream=-1)
    except (BufferError, RuntimeError, TypeError) as e:
        raise Error(
            "invalid_argument", f"invalid_argument: a tensor could not be exported through DLPack: {e}"
        ) from None
