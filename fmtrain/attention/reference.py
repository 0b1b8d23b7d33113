"""Dense reference: materialises every score a query sees (small ``n`` only).

Built per query from the definitions in :mod:`.hierarchy` (fine neighbours,
``coarse_windows``, summary counts), not from the block tables the fast paths
use, so that the tests compare two independent readings of the definition.
Memory is ``O(n * (n + num_summaries))``.
"""
from __future__ import annotations

import math

import torch

from .rope import rotate
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
    return _joint_softmax(s_fine, s_coarse + coarse.to(s_coarse.dtype), v, vs, h, level_offset)


def _joint_softmax(s_fine, s_coarse, v, vs, h: Hierarchy, level_offset=None) -> torch.Tensor:
    """One softmax over fine scores (B, H, n, n) and summary scores (B, H, n, T), masked and
    log-weighted already, plus each level's ``level_offset`` (H, >= L); v, vs with H heads."""
    n = s_fine.shape[-1]
    if level_offset is not None and h.n_levels:
        level_of = torch.cat([torch.full((h.windows[l] * h.rank,), l, device=v.device) for l in range(h.n_levels)])
        s_coarse = s_coarse + level_offset.to(s_coarse.dtype)[:, level_of][None, :, None, :]  # (1, H, 1, T)
    s = torch.cat([s_fine, s_coarse], dim=-1)
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    prob = torch.softmax(s, dim=-1).to(v.dtype)
    return prob[..., :n] @ v + prob[..., n:] @ vs


def refined_masks(q, k, ks, h: Hierarchy, refine: int, scale: float, select_reach=None):
    """Adaptive refinement read per query (see :mod:`.refine`): ``(fine, coarse)`` masks per key/value
    head, fine (B, Hkv, n, n) bool (fine neighbours and the opened blocks' tokens), coarse
    (B, Hkv, n, T) float64 log-weights of the summaries of the windows left unopened, -inf elsewhere.

    A loop over queries with a dictionary of candidate windows, written from the rule rather
    than from the vectorised selection, so that the tests compare two readings of it. A window
    scores, per query head, ``sum_c max(q_c hi_c, q_c lo_c) * scale`` over channels ``c``, where
    ``hi, lo`` are the largest and smallest of its keys' channel ``c`` (the bound on its best
    key's score), averaged over the group. ``select_reach``: a window whose centre (its first
    position plus half its length, rounded down) lies more than its distance from the query is
    scored with the query rotated back by RoPE as far as the window lies beyond.
    """
    B, H, n, d = q.shape
    Hkv, m, p = ks.shape[1], h.block_size, h.rank
    G = H // Hkv
    base_fine, _ = interaction_mask(h, q.device)
    fine = base_fine.expand(B, Hkv, n, n).clone()
    coarse = torch.full((B, Hkv, n, h.num_summaries), -math.inf, dtype=torch.float64, device=q.device)
    counts = {l: h.summary_counts(l) for l in range(1, h.n_levels + 1)}

    def summaries(l, c):  # the (index, count) of window c's summaries with real tokens
        if not 0 <= c < h.windows[l - 1]:
            return []
        return [(h.offsets[l - 1] + c * p + j, int(counts[l][c, j])) for j in range(p) if counts[l][c, j] > 0]

    for b in range(B):
        for g in range(Hkv):
            qs = q[b, g * G:(g + 1) * G].detach().double()  # (G, n, d)
            kg = k[b, g].detach().double()  # (n, d)

            def score(i, l, c):
                w = h.window_size(l)
                keys = kg[c * w:min((c + 1) * w, n)] if 0 <= c < h.windows[l - 1] else kg[:0]
                if not len(keys):
                    return -math.inf
                hi, lo = keys.amax(0), keys.amin(0)  # (d,)
                qi = qs[:, i]  # (G, d)
                if select_reach is not None:
                    dist, D = i - (c * w + w // 2), select_reach.distance
                    beyond = dist - D if dist > D else dist + D if dist < -D else 0
                    qi = rotate(qi, torch.tensor(-beyond), select_reach.inv_freq)
                return float(torch.maximum(qi * hi, qi * lo).sum(-1).mul(scale).mean())

            for i in range(n):
                cand = {}
                for l in range(1, h.n_levels + 1):
                    c_i = i // h.window_size(l)
                    listed = coarse_windows(c_i, h.causal)
                    if h.flat_top and l == h.n_levels:  # every window of the top level but c_i's neighbours
                        listed = [c for c in range(h.windows[l - 1]) if c < c_i - 1 or (not h.causal and c > c_i + 1)]
                    for c in listed:
                        if (s := score(i, l, c)) > -math.inf:
                            cand[(l, c)] = s
                for _ in range(refine):
                    if not cand:
                        break
                    l, c = max(cand, key=cand.get)
                    del cand[(l, c)]
                    while l > 1:
                        left, right = score(i, l - 1, 2 * c), score(i, l - 1, 2 * c + 1)
                        keep, other, s_other = (2 * c + 1, 2 * c, left) if right > left else (2 * c, 2 * c + 1, right)
                        if s_other > -math.inf:
                            cand[(l - 1, other)] = s_other
                        l, c = l - 1, keep
                    fine[b, g, i, c * m:min((c + 1) * m, n)] = True
                for (l, c) in cand:
                    for t, cnt in summaries(l, c):
                        coarse[b, g, i, t] = math.log(cnt)
    return fine, coarse


def dense_refined(q, k, v, ks, vs, h: Hierarchy, *, scale: float, weighted: bool, refine: int,
                  level_offset=None, select_reach=None) -> torch.Tensor:
    """Multipole attention with adaptive refinement by one dense softmax per query: (B, H, n, d)."""
    B, H, n, d = q.shape
    G = H // k.shape[1]
    fine, coarse = refined_masks(q, k, ks, h, refine, scale, select_reach)
    fine, coarse = fine.repeat_interleave(G, dim=1), coarse.repeat_interleave(G, dim=1)  # (B, H, n, .)
    if not weighted:
        coarse = torch.where(coarse.isinf(), coarse, torch.zeros_like(coarse))
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    ks, vs = ks.repeat_interleave(G, dim=1), vs.repeat_interleave(G, dim=1)
    if select_reach is not None and select_reach.attend:
        s_fine, s_coarse = _reached_scores(q, k, ks, h, scale, select_reach)
    else:
        s_fine, s_coarse = (q @ k.transpose(-1, -2)) * scale, (q @ ks.transpose(-1, -2)) * scale
    s_fine = s_fine.masked_fill(~fine, -math.inf)
    return _joint_softmax(s_fine, s_coarse + coarse.to(q.dtype), v, vs, h, level_offset)


def _reached_scores(q, k, ks, h: Hierarchy, scale: float, reach):
    """Scores (B, H, n, n) and (B, H, n, T) with every fine block beyond ``reach.distance`` from a
    query scored with the query rotated back by RoPE as far as the block's centre (first position
    plus half its length, rounded down) lies beyond, every summary likewise by its window's centre;
    the fine neighbours at real positions. One rotation of all queries per window: tests only."""
    n, D = q.shape[2], reach.distance
    pos = torch.arange(n, device=q.device)
    base_fine, _ = interaction_mask(h, q.device)  # (n, n): the fine neighbours

    def turned(centre):  # the queries rotated back as far as ``centre`` lies beyond the reach
        dist = pos - centre
        return rotate(q, -(dist - dist.clamp(min=-D, max=D)), reach.inv_freq)

    m, p = h.block_size, h.rank
    s_fine = torch.empty(*q.shape[:3], n, dtype=q.dtype, device=q.device)
    for b in range(h.n_blocks):
        keys = slice(b * m, min((b + 1) * m, n))
        s_fine[..., keys] = turned(b * m + m // 2) @ k[..., keys, :].transpose(-1, -2) * scale
    s_fine = torch.where(base_fine, (q @ k.transpose(-1, -2)) * scale, s_fine)
    s_coarse = torch.empty(*q.shape[:3], h.num_summaries, dtype=q.dtype, device=q.device)
    for l in range(1, h.n_levels + 1):
        w = h.window_size(l)
        for c in range(h.windows[l - 1]):
            t = slice(h.offsets[l - 1] + c * p, h.offsets[l - 1] + (c + 1) * p)
            s_coarse[..., t] = turned(c * w + w // 2) @ ks[..., t, :].transpose(-1, -2) * scale
    return s_fine, s_coarse
