"""The one place that picks the core of multipole attention for a device and ``impl``.

A core computes :class:`~.torch_core.BlockAttention`'s contract,
``.apply(q, k, v, ks, vs, h, weighted, scale, a0, extended) -> (out, lse)``:
- ``"torch"``: the PyTorch core;
- ``"triton"``: the Triton kernels (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, for tests); float64 goes to the PyTorch core, since
  Triton has no portable fp64 ``tl.dot``;
- ``"auto"``: Triton for CUDA tensors in fp16/bf16/fp32 when Triton imports,
  the PyTorch core otherwise.
"""
from __future__ import annotations

import warnings

import torch

from .kernels import triton_available, triton_import_error, triton_interpreting
from .torch_core import BlockAttention

CORE_IMPLS = ("auto", "torch", "triton")


def select_core(impl: str, q: torch.Tensor):
    """The core autograd function for ``impl`` and tensors like ``q``."""
    if impl == "torch":
        return BlockAttention
    if impl == "auto":
        if q.is_cuda and q.dtype != torch.float64 and triton_available():
            from .kernels.function import TritonBlockAttention
            return TritonBlockAttention
        return BlockAttention
    if impl != "triton":
        raise ValueError(f"unknown core impl {impl!r}; choose one of {CORE_IMPLS}")
    if not triton_available():
        raise RuntimeError(f"impl='triton' needs Triton, which failed to import ({triton_import_error()}); "
                           "install triton>=3.4 or use impl='torch'")
    if q.dtype == torch.float64:
        warnings.warn("impl='triton': float64 runs on the PyTorch core (Triton has no portable fp64 dot)",
                      stacklevel=3)
        return BlockAttention
    if not q.is_cuda and not triton_interpreting():
        raise RuntimeError(f"impl='triton' needs CUDA tensors, got {q.device}; on CPU set TRITON_INTERPRET=1 "
                           "before triton is first imported (slow; tests only) or use impl='torch'")
    from .kernels.function import TritonBlockAttention
    return TritonBlockAttention


def runs_on_triton(impl: str, x: torch.Tensor) -> bool:
    """Whether :func:`select_core` picks the Triton kernels for ``impl`` and tensors like ``x``."""
    if impl not in ("auto", "triton") or (impl == "auto" and not x.is_cuda) or x.dtype == torch.float64:
        return False  # ("dense": the reference, which builds its summaries in PyTorch too)
    return select_core(impl, x) is not BlockAttention


__all__ = ["select_core", "runs_on_triton", "CORE_IMPLS"]
