"""Rotary position embeddings from explicit (global) positions."""
from __future__ import annotations

import math

import torch


ROPE_SCALINGS = ("llama3", "linear")


def scale_frequencies(inv: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """RoPE's inverse frequencies ``inv`` with a frequency scaling, as transformers defines it:
    ``{"rope_type": "linear", "factor": f}`` divides them all by ``f``; ``"llama3"`` (Llama 3.1)
    divides the low ones by ``factor``, keeps the high ones and interpolates between, by wavelength
    against ``original_max_position_embeddings / {low,high}_freq_factor``."""
    if not scaling:
        return inv
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"RoPE scaling {kind!r} is not one of {ROPE_SCALINGS}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def parse_scaling(text: str, original_len: int) -> dict:
    """``"llama3:F"`` or ``"linear:F"`` (a command-line flag) -> a scaling dict for
    :func:`scale_frequencies`: Llama 3.1's with ``original_max_position_embeddings =
    original_len`` and low/high frequency factors 1 and 4 (its published ones), or position
    interpolation by ``F``. Raises ValueError naming the accepted forms."""
    kind, _, factor = text.partition(":")
    try:
        f = float(factor)
    except ValueError:
        f = 0.0
    if kind not in ROPE_SCALINGS or not f > 0 or not math.isfinite(f):
        raise ValueError(f"{text!r}: give llama3:F or linear:F with a factor F > 0, e.g. llama3:4")
    if kind == "linear":
        return {"rope_type": "linear", "factor": f}
    return {"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_len}


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0, scaling: dict | None = None):
    """cos, sin of shape (..., n, head_dim/2) for integer ``positions`` (..., n).

    Angles are formed in float64 and rounded once, so that positions near 1M
    keep their precision whatever the activation dtype. ``scaling``: see
    :func:`scale_frequencies` (None: plain RoPE).
    """
    inv = inverse_frequencies(head_dim, theta, scaling, positions.device)
    ang = positions.to(torch.float64)[..., None] * inv
    return ang.cos(), ang.sin()


def inverse_frequencies(head_dim: int, theta: float = 10000.0, scaling: dict | None = None,
                        device=None) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim/2,) float64, scaled as :func:`scale_frequencies` says."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    return scale_frequencies(inv, scaling)


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` (..., d) rotated as RoPE rotates a key ``shift`` (...) positions later (halves layout):
    a rotated key at position ``t`` becomes the same key at ``t + shift``."""
    ang = shift.to(torch.float64).unsqueeze(-1) * inv_freq.to(shift.device, torch.float64)  # (..., d/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, n, d) by angles (n, d/2) or (B, n, d/2); halves layout."""
    if cos.dim() == 3:  # per-sample positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
