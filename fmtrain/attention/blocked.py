"""The whole-sequence driver of multipole attention on one device.

It pads the sequence to whole blocks, runs a core over all query blocks
(:func:`fmtrain.attention.cores.select_core`: the PyTorch core or the Triton
kernels, one contract) and, for the linear variant, merges in the coarse levels'
per-window partials (:func:`linear_coarse`, shared with sequence parallelism).
"""
from __future__ import annotations

import torch

from .cores import select_core
from .hierarchy import Hierarchy, block_tables, level_slots, pad_to, truncate
from .summaries import window_means
from .torch_core import acc_dtype

# Masked slots of the linear variant's partials get this score rather than -inf: a window
# with an empty list then has a finite lse whose weight underflows to exactly 0 when merged,
# without NaN gradients through logsumexp.
MASKED_SCORE = -1e30


def block_attention(q, k, v, ks, vs, h: Hierarchy, *, scale: float, weighted: bool,
                    fine_only: bool = False, impl: str = "torch"):
    """A core over all query blocks of a whole sequence: ``(out, lse)`` for its ``n`` tokens.

    ``fine_only`` drops the coarse levels (the linear variant adds them itself).
    ``impl``: "torch", "triton" or "auto" (:func:`~.cores.select_core`).
    """
    if fine_only and h.n_levels:
        h = truncate(h, 0)
        ks, vs = ks[:, :, :0], vs[:, :, :0]
    q, k, v = (pad_to(x, h.padded_len).contiguous() for x in (q, k, v))
    core = select_core(impl, q)
    # extended=False: the keys are the sequence's own, zeros beyond it (no padded copy).
    out, lse = core.apply(q, k, v, ks.contiguous(), vs.contiguous(), h, weighted, scale, 0, False)
    return out[:, :, :h.n], lse[:, :, :h.n]


def summarized_attention(q, k, v, summaries, h: Hierarchy, *, scale: float, weighted: bool, impl: str):
    """The nlogn variant over a whole sequence with its summaries formed inside the core's autograd
    node (:class:`.kernels.summaries.SummarizedAttention`: the summaries' gradient reaches the tokens
    in the dk/dv kernel): (B, H, n, d), or None where that path does not serve (not the Triton
    core, summaries without bottom-up maps, no coarse level, ``FMTRAIN_SUMMARY_GRADS=separate``, a
    launch whose dk/dv kernel has no room for the epilogue: :func:`.kernels.function.fuses_summary_grads`)."""
    from .cores import runs_on_triton
    from .summaries import Summaries

    if not (h.n_levels and isinstance(summaries, Summaries) and runs_on_triton(impl, q)):
        return None
    from .kernels.function import fuses_summary_grads

    if not fuses_summary_grads(h.block_size, q.shape[-1]) or (maps := summaries.maps(h, k)) is None:
        return None
    from .kernels.summaries import SummarizedAttention

    summaries.check(h)
    q, k, v = (pad_to(x, h.padded_len).contiguous() for x in (q, k, v))
    return SummarizedAttention.apply(q, k, v, *maps, h, weighted, scale)[:, :, :h.n]


def merge(l1, o1, l2, o2):
    """Merge two softmax partials given as (lse, normalised output); -inf lse = empty."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
    w1 = torch.exp(l1 - safe).unsqueeze(-1)
    w2 = torch.exp(l2 - safe).unsqueeze(-1)
    return lse, w1 * o1 + w2 * o2


def _window_partial(qbar, ks, vs, h: Hierarchy, level: int, windows: torch.Tensor, *, scale: float,
                    weighted: bool, level_offset=None):
    """One partial softmax per window of ``level`` (the indices ``windows``, (W,)) from its
    mean query ``qbar`` (B, H, W, d) over its interaction list: lse (B, H, W), out (B, H, W, d).
    ``level_offset``: (H, >= levels) added to the scores of each level, or None."""
    B, H, W, d = qbar.shape
    Hkv = ks.shape[1]
    idx, bias = level_slots(h, level, weighted)
    idx = idx.to(qbar.device)[windows].clamp(max=h.num_summaries - 1)  # masked slots: any row, weight 0
    bias = bias.to(qbar.device)[windows].clamp(min=MASKED_SCORE).to(qbar.dtype)
    ql = qbar.view(B, Hkv, H // Hkv, W, 1, d)
    kl = ks[:, :, idx].view(B, Hkv, 1, W, -1, d)
    vl = vs[:, :, idx].view(B, Hkv, 1, W, -1, d)
    s = (ql @ kl.transpose(-1, -2)).squeeze(-2) * scale + bias  # (B, Hkv, G, W, S)
    if level_offset is not None:
        s = s + level_offset[:, level - 1].to(s.dtype).view(Hkv, H // Hkv, 1, 1)
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
    out = (torch.exp(s - safe[..., None]).unsqueeze(-2) @ vl).squeeze(-2)  # (B, Hkv, G, W, d)
    return lse.view(B, H, W), out.view(B, H, W, d)


def coarse_top_down(h: Hierarchy, level_queries, ks, vs, *, scale: float, weighted: bool, level_offset=None):
    """The linear variant's coarse term: per-window partials merged from the top level down.

    ``level_queries(l) -> (windows (W,), qbar (B, H, W, d))``: the consecutive windows of
    level ``l`` wanted and their mean queries, in the accumulation dtype (one device: all
    windows; a sequence-parallel rank: the windows its blocks lie in). Each window's partial
    is merged with its parent's; returns level 1's ``(lse, out)``, (B, H, W_1[, d]).
    """
    top, top_first = None, 0
    for l in range(h.n_levels, 0, -1):
        windows, qbar = level_queries(l)
        lse, out = _window_partial(qbar, ks, vs, h, l, windows, scale=scale, weighted=weighted,
                                   level_offset=level_offset)
        if top is not None:
            parent = windows // 2 - top_first
            lse, out = merge(lse, out, top[0][:, :, parent], top[1][:, :, parent])
        top, top_first = (lse, out), int(windows[0])
    return top


def linear_coarse(q, ks, vs, h: Hierarchy, *, scale: float, weighted: bool, level_offset=None):
    """The linear variant's coarse term per fine block: ``(lse, out)``, (B, H, n_blocks[, d]).

    Each window's queries share one mean query per level (causal: the previous
    window's, see :meth:`Hierarchy.query_window`), so each window has one partial
    softmax over its list. O(n/m * p * L) work.
    """
    acc = acc_dtype(q.dtype)
    qbar = window_means(q.to(acc), h)

    def level_queries(l):
        qwin = h.query_window(l).to(q.device).clamp(min=0)  # windows without a list are masked anyway
        return torch.arange(h.windows[l - 1], device=q.device), qbar[l - 1][:, :, qwin]

    return coarse_top_down(h, level_queries, ks.to(acc), vs.to(acc), scale=scale, weighted=weighted,
                           level_offset=level_offset)


def offset_coarse(q, ks, vs, h: Hierarchy, *, scale: float, weighted: bool, level_offset):
    """The nlogn coarse term with per-head level offsets, per query: ``(lse, out)``, (B, H, n[, d]).

    Every query of a fine block sees the same ``coarse_slots`` summaries (the block
    tables), so the scores are a small (B, H, n, coarse_slots) tensor formed by autograd;
    the fused cores keep only the fixed log-weights. Masked slots score ``MASKED_SCORE``.
    """
    acc = acc_dtype(q.dtype)
    B, H, n, d = q.shape
    Hkv, G, m, S = ks.shape[1], H // ks.shape[1], h.block_size, h.coarse_slots
    t = block_tables(h, weighted, q.device, bias_dtype=acc)
    idx = t.index.clamp(max=h.num_summaries - 1)  # masked slots: any row, weight 0
    level = torch.arange(S, device=q.device) // h.slots_per_level  # (S,)
    offset = level_offset[:, :h.n_levels].to(acc)[:, level].view(Hkv, G, 1, 1, S)
    qb = pad_to(q, h.padded_len).to(acc).view(B, Hkv, G, h.n_blocks, m, d)
    kb, vb = ks.to(acc)[:, :, idx], vs.to(acc)[:, :, idx]  # (B, Hkv, n_blocks, S, d)
    s = torch.einsum("bkgnmd,bknsd->bkgnms", qb, kb) * scale + t.bias.clamp(min=MASKED_SCORE)[:, None] + offset
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bkgnms,bknsd->bkgnmd", torch.exp(s - lse[..., None]), vb)
    return lse.reshape(B, H, -1)[:, :, :n], out.reshape(B, H, -1, d)[:, :, :n]


def blocked_multipole(q, k, v, ks, vs, h: Hierarchy, *, scale: float, weighted: bool,
                      variant: str = "nlogn", impl: str = "torch", level_offset=None) -> torch.Tensor:
    """Multipole attention over a whole sequence on one device: (B, H, n, d)."""
    if h.n_levels == 0 or (variant == "nlogn" and level_offset is None):
        out, _ = block_attention(q, k, v, ks, vs, h, scale=scale, weighted=weighted, impl=impl)
        return out
    out, lse = block_attention(q, k, v, ks, vs, h, scale=scale, weighted=weighted, fine_only=True,
                               impl=impl)
    if variant == "nlogn":  # per query (n, d) partials
        c_lse, c_out = offset_coarse(q, ks, vs, h, scale=scale, weighted=weighted, level_offset=level_offset)
        _, merged = merge(lse, out.to(c_out.dtype), c_lse, c_out)
        return merged.to(q.dtype)
    c_lse, c_out = linear_coarse(q, ks, vs, h, scale=scale, weighted=weighted, level_offset=level_offset)
    blk = torch.arange(h.n, device=q.device) // h.block_size
    _, merged = merge(lse, out.to(c_out.dtype), c_lse[:, :, blk], c_out[:, :, blk])
    return merged.to(q.dtype)


__all__ = ["block_attention", "blocked_multipole", "summarized_attention", "linear_coarse", "coarse_top_down", "merge", "MASKED_SCORE"]
