"""Fused Triton kernels of the multipole core (forward and backward).

``core(impl, q)`` picks the autograd function that computes
``blocked.BlockAttention``'s contract for ``impl``:
- ``"torch"``: the blocked PyTorch core;
- ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, for tests); float64 goes to the PyTorch core, since
  Triton has no portable fp64 ``tl.dot``;
- ``"auto"``: Triton for CUDA tensors in fp16/bf16/fp32 when Triton imports,
  the PyTorch core otherwise.
Triton is imported only here, lazily, so that importing fmtrain never imports
it (``TRITON_INTERPRET`` must be set before triton's first import).
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

__all__ = ["core", "triton_available"]


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    try:
        from . import function  # noqa: F401  (imports triton)
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        return f"{type(e).__name__}: {e}"
    return None


def triton_available() -> bool:
    return _import_error() is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def core(impl: str, q: torch.Tensor):
    """The core autograd function (``.apply(q, k_ext, v_ext, ks, vs, h, weighted, scale, a0)``) for ``impl``."""
    from ..blocked import BlockAttention

    if impl == "torch":
        return BlockAttention
    if impl == "auto":
        if q.is_cuda and q.dtype != torch.float64 and triton_available():
            from .function import TritonBlockAttention
            return TritonBlockAttention
        return BlockAttention
    if impl != "triton":
        raise ValueError(f"unknown core impl {impl!r}; choose 'auto', 'torch' or 'triton'")
    if not triton_available():
        raise RuntimeError(f"impl='triton' needs Triton, which failed to import ({_import_error()}); "
                           "install triton>=3.4 or use impl='torch'")
    if q.dtype == torch.float64:
        warnings.warn("impl='triton': float64 runs on the PyTorch core (Triton has no portable fp64 dot)",
                      stacklevel=3)
        return BlockAttention
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(f"impl='triton' needs CUDA tensors, got {q.device}; on CPU set TRITON_INTERPRET=1 "
                           "before triton is first imported (slow; tests only) or use impl='torch'")
    from .function import TritonBlockAttention
    return TritonBlockAttention
