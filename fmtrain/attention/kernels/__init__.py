"""Fused Triton kernels of the multipole core (forward and backward): the twin of
``torch_core.BlockAttention`` (same arguments, outputs and gradients).

Triton is imported only by ``function.py``, and that only when a Triton core is
asked for (:func:`fmtrain.attention.cores.select_core`), so that importing
fmtrain never imports it (``TRITON_INTERPRET`` must be set before triton's first
import).
"""
from __future__ import annotations

import functools
import os

__all__ = ["triton_available", "triton_import_error", "triton_interpreting"]


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """Why the Triton core cannot be imported, or None."""
    try:
        from . import function  # noqa: F401  (imports triton)
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        return f"{type(e).__name__}: {e}"
    return None


def triton_available() -> bool:
    return triton_import_error() is None


def triton_interpreting() -> bool:
    """Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``: tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
