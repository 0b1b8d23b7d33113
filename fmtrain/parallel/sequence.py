"""Sequence parallelism applied to a built model, from outside.

The model is built for one device (:func:`fmtrain.model.build_model`); this hands each attention
layer the group whose ranks hold the slices of one sequence, as torchtitan applies its
parallelisms to a plain model. The algorithm itself is the attention's
(``fmtrain/attention/sequence_parallel.py``); every other layer is per-token and needs nothing.
"""
from __future__ import annotations

from torch import nn

from ..attention.layers import FullAttention, ProjectedAttention


def apply_sequence_parallel(model: nn.Module, group) -> nn.Module:
    """Make every attention layer of ``model`` attend across ``group`` (``None``: leave it local).
    Returns ``model``; a layer without a sequence-parallel path is refused by name."""
    if group is None:
        return model
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ProjectedAttention)]
    full = [name for name, m in layers if isinstance(m, FullAttention)]
    if full:
        raise ValueError(f"sequence parallelism is implemented for attention 'fma' and 'local', not 'sdpa' "
                         f"(layer {full[0]}); set parallel.sequence=1 or model.attention='fma'")
    for module in model.modules():  # the attention layers, and the trunk (it finds the documents' global bounds)
        if hasattr(type(module), "sp_group"):
            module.sp_group = group
    return model


__all__ = ["apply_sequence_parallel"]
