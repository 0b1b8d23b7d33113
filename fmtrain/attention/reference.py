"""Dense reference: materialises every score a query sees (small ``n`` only).

Built per query from the definitions in :mod:`.hierarchy` (fine neighbours,
``coarse_windows``, summary counts), not from the block tables the fast paths
use, so that the tests compare two independent readings of the definition.
Memory is ``O(n * (n + num_summaries))``.
"""
from __future__ import annotations

import math

import torch

from .hierarchy import Hierarchy, coarse_windows
from .summaries import window_means


def interaction_mask(h: Hierarchy, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fine, coarse)``: which keys and which summaries each query sees.

    fine: (n, n) bool; coarse: (n, num_summaries) float, ``log(count)`` of each
    seen summary (its log-weight) and ``-inf`` elsewhere.
    """
    n, m, p = h.n, h.block_size, h.rank
    i = torch.arange(n, device=device)
    fine = ((i[:, None] // m) - (i[None, :] // m)).abs() <= 1
    if h.causal:
        fine &= i[None, :] <= i[:, None]
    coarse = torch.full((n, h.num_summaries), -math.inf, dtype=torch.float64, device=device)
    for l in range(1, h.n_levels + 1):
        w, nw = h.window_size(l), h.windows[l - 1]
        counts = h.summary_counts(l)
        for c in range(nw):
            rows = slice(c * w, min((c + 1) * w, n))
            for cw in coarse_windows(c, h.causal):
                if not 0 <= cw < nw:
                    continue
                for j in range(p):
                    if counts[cw, j] > 0:
                        coarse[rows, h.offsets[l - 1] + cw * p + j] = math.log(counts[cw, j])
    return fine, coarse


def dense_attention(q, k, v, ks, vs, h: Hierarchy, *, scale: float, weighted: bool,
                    variant: str = "nlogn", level_offset=None) -> torch.Tensor:
    """Multipole attention by one softmax over an ``n x (n + T)`` score matrix.

    q: (B, H, n, d); k, v: (B, Hkv, n, d); ks, vs: (B, Hkv, T, d); ``level_offset``: (H, >= L)
    added to the scores of each coarse level's summaries, or None. Returns (B, H, n, d).
    """
    B, H, n, d = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    ks, vs = ks.repeat_interleave(G, dim=1), vs.repeat_interleave(G, dim=1)
    fine, coarse = interaction_mask(h, q.device)
    if not weighted:
        coarse = torch.where(coarse.isinf(), coarse, torch.zeros_like(coarse))
    s_fine = (q @ k.transpose(-1, -2)) * scale
    s_fine = s_fine.masked_fill(~fine, -math.inf)
    if variant == "nlogn":
        s_coarse = (q @ ks.transpose(-1, -2)) * scale
    else:  # linear: on level l a query uses the mean query of its (causal: previous) window
        qbar = window_means(q, h)
        parts = []
        for l in range(1, h.n_levels + 1):
            qwin = h.query_window(l).to(q.device).clamp(min=0)  # unused rows are masked anyway
            tok_win = qwin[torch.arange(n, device=q.device) // h.window_size(l)]
            ql = qbar[l - 1][:, :, tok_win]  # (B, H, n, d)
            lo = h.offsets[l - 1]
            parts.append((ql @ ks[:, :, lo:lo + h.windows[l - 1] * h.rank].transpose(-1, -2)) * scale)
        s_coarse = torch.cat(parts, dim=-1) if parts else q.new_zeros(B, H, n, 0)
    s_coarse = s_coarse + coarse.to(s_coarse.dtype)
    if level_offset is not None and h.n_levels:
        level_of = torch.cat([torch.full((h.windows[l] * h.rank,), l, device=q.device) for l in range(h.n_levels)])
        s_coarse = s_coarse + level_offset.to(s_coarse.dtype)[:, level_of][None, :, None, :]  # (1, H, 1, T)
    s = torch.cat([s_fine, s_coarse], dim=-1)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    prob = torch.softmax(s, dim=-1).to(v.dtype)
    return prob[..., :n] @ v + prob[..., n:] @ vs
