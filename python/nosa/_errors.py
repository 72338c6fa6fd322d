"""The package's one exception type."""


class Error(ValueError):
    """A nosa call failed; nothing was changed.

    ``status`` is the library's status, by its C++ enumerator name (``"shape_mismatch"``,
    ``"unknown_sequence"``, ``"host_pool_full"``, ...); the message names the call, the status and what exactly
    was wrong. The layer that raised it is as it was before the call and stays usable.
    """

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


Error.__module__ = "nosa"  # shown as nosa.Error, where users catch it
