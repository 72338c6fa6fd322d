"""Shared settings of the Python tests: the bf16 runs need ml_dtypes (NumPy has no bfloat16 of its own)."""

import pytest

from harness import ml_dtypes


def pytest_collection_modifyitems(config, items):
    if ml_dtypes is not None:
        return
    skip = pytest.mark.skip(reason="bf16 arrays in NumPy need ml_dtypes (pip install ml_dtypes)")
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and "bf16" in params.params.values():
            item.add_marker(skip)
