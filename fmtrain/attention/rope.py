"""Rotary position embeddings from explicit (global) positions."""
from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos, sin of shape (..., n, head_dim/2) for integer ``positions`` (..., n).

    Angles are formed in float64 and rounded once, so that positions near 1M
    keep their precision whatever the activation dtype.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    ang = positions.to(torch.float64)[..., None] * inv
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, n, d) by angles (n, d/2) or (B, n, d/2); halves layout."""
    if cos.dim() == 3:  # per-sample positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
