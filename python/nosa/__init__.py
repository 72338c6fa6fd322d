"""nosa: NOSA sparse attention and NOSI-style KV-cache offloading for Python inference engines.

The package wraps the nosa C++ library: :class:`DecodeLayer` is one decode layer (selection, slot cache,
transfers and attention) that takes the engine's tensors through DLPack, NumPy and CPU tensors on the host
backend, CUDA tensors on the CUDA backend. Failures raise :class:`Error`.
"""

from . import _core
from ._errors import Error
from ._layer import DecodeLayer

__all__ = ["DecodeLayer", "Error", "DTYPES", "HEAD_DIMS", "cuda_available", "pipelines", "__version__"]

__version__ = _core.library_version

#: Storage dtypes every compiled pipeline exists for.
DTYPES = tuple(_core.dtypes)
#: Head dims every compiled pipeline exists for.
HEAD_DIMS = tuple(_core.head_dims)


def pipelines(device: str = "cpu") -> list:
    """The (variant, store, bias) triples compiled for a backend, ``"cpu"`` or ``"cuda"``; each exists for
    every dtype of :data:`DTYPES` and head dim of :data:`HEAD_DIMS`. Empty for ``"cuda"`` in a build without
    the CUDA backend."""
    return list(_core.pipelines(device))


def cuda_available() -> bool:
    """True when this build has the CUDA backend and the CUDA runtime sees a device."""
    return bool(_core.cuda_built()) and _core.cuda_device_count() > 0
