"""Blocked PyTorch path: per fine query block, one joint softmax over its
fine neighbours and its coarse summaries, never an ``n x n`` tensor.

The core (:class:`BlockAttention`) is a FlashAttention-style autograd function:
the forward walks chunks of query blocks and keeps only the output and the
log-sum-exp; the backward recomputes each chunk's scores from them. Peak memory
beyond inputs, outputs and gradients is one chunk of scores, whatever ``n``.

The core returns ``(out, lse)`` and accepts a gradient for ``lse``, so partial
results over disjoint key sets can be merged exactly outside it (the linear
variant's coarse term here; sequence parallelism's remote terms later).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .hierarchy import BlockTables, Hierarchy, block_tables, fine_mask, truncate
from .summaries import window_means

# Scores per chunk (elements); the backward holds about four tensors this size.
CHUNK_SCORES = 1 << 21
_MASKED = -1e30


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_blocks(h: Hierarchy, rows_per_block: int, batch_heads: int, width: int) -> int:
    return max(1, CHUNK_SCORES // max(1, batch_heads * rows_per_block * width))


class _Layout:
    """Views of padded q, k, v and summaries in the per-block layout the core uses."""

    def __init__(self, q, k, v, ks, vs, h: Hierarchy):
        B, H, N, d = q.shape  # N == h.padded_len
        Hkv = k.shape[1]
        self.B, self.H, self.Hkv, self.G, self.d = B, H, Hkv, H // Hkv, d
        self.m, self.nblk = h.block_size, h.n_blocks
        self.F = len(h.fine_blocks())
        # Fine keys of block a are tokens [(a-1)m, (a-1+F)m): pad one block in front
        # (and one behind when the block after is seen) so that every block has them.
        back = self.F - 2
        self.kp = F.pad(k, (0, 0, self.m, back * self.m))
        self.vp = F.pad(v, (0, 0, self.m, back * self.m))
        # Dummy zero summary at index T for masked slots.
        self.ks = F.pad(ks, (0, 0, 0, 1))
        self.vs = F.pad(vs, (0, 0, 0, 1))

    def q_blocks(self, q):
        """(B, H, N, *t) -> (B, Hkv, nblk, G*m, *t): the G query heads of a kv head share keys."""
        B, Hkv, G, m = self.B, self.Hkv, self.G, self.m
        tail = q.shape[3:]
        q = q.reshape(B, Hkv, G, self.nblk, m, *tail).permute(0, 1, 3, 2, 4, *range(5, 5 + len(tail)))
        return q.reshape(B, Hkv, self.nblk, G * m, *tail)

    def from_q_blocks(self, x):
        """Inverse of :meth:`q_blocks` for (..., d) tensors and for (...,) rows."""
        B, Hkv, G, m = self.B, self.Hkv, self.G, self.m
        tail = x.shape[4:]
        x = x.reshape(B, Hkv, self.nblk, G, m, *tail).permute(0, 1, 3, 2, 4, *range(5, 5 + len(tail)))
        return x.reshape(B, Hkv * G, self.nblk * m, *tail)

    def keys(self, a0, a1, index, dtype):
        """Keys and values of blocks [a0, a1): (B, Hkv, nb, F*m + S, d) each."""
        m, Fm = self.m, self.F * self.m
        kf = self.kp[:, :, a0 * m:(a1 - 1) * m + Fm].unfold(2, Fm, m).transpose(-1, -2)
        vf = self.vp[:, :, a0 * m:(a1 - 1) * m + Fm].unfold(2, Fm, m).transpose(-1, -2)
        idx = index[a0:a1].reshape(-1)
        nb = a1 - a0
        kc = self.ks[:, :, idx].view(self.B, self.Hkv, nb, -1, self.d)
        vc = self.vs[:, :, idx].view(self.B, self.Hkv, nb, -1, self.d)
        return torch.cat([kf, kc], dim=3).to(dtype), torch.cat([vf, vc], dim=3).to(dtype)


def _bias(h: Hierarchy, tables: BlockTables, a0: int, a1: int, dtype, device) -> torch.Tensor:
    """Additive score bias of blocks [a0, a1): (nb, 1, m, F*m + S)."""
    blocks = torch.arange(a0, a1, device=device)
    fine = fine_mask(h, blocks)  # (nb, m, F*m)
    zero = torch.zeros((), dtype=dtype, device=device)
    fine = torch.where(fine, zero, -math.inf)
    coarse = tables.bias[a0:a1].to(dtype)[:, None, :].expand(-1, h.block_size, -1)
    return torch.cat([fine, coarse], dim=-1).unsqueeze(1)


def _scores(qc, kc, bias, scale, L: _Layout):
    s = (qc @ kc.transpose(-1, -2)) * scale  # (B, Hkv, nb, G*m, W)
    B, Hkv, nb, _, W = s.shape
    return (s.view(B, Hkv, nb, L.G, L.m, W) + bias).view(B, Hkv, nb, L.G * L.m, W)


class BlockAttention(torch.autograd.Function):
    """(q, k, v, ks, vs) -> (out, lse) over the hierarchy's blocks; sizes padded to whole blocks."""

    @staticmethod
    def forward(ctx, q, k, v, ks, vs, h: Hierarchy, weighted: bool, scale: float):
        acc = _acc_dtype(q.dtype)
        L = _Layout(q, k, v, ks, vs, h)
        tables = block_tables(h, weighted, q.device)
        qb = L.q_blocks(q)
        W = L.F * L.m + h.coarse_slots
        step = _chunk_blocks(h, L.G * L.m, L.B * L.Hkv, W)
        out = torch.empty(qb.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(qb.shape[:-1], dtype=acc, device=q.device)
        for a0 in range(0, L.nblk, step):
            a1 = min(a0 + step, L.nblk)
            kc, vc = L.keys(a0, a1, tables.index, acc)
            s = _scores(qb[:, :, a0:a1].to(acc), kc, _bias(h, tables, a0, a1, acc, q.device), scale, L)
            m_ = s.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(acc).min)  # rows fully masked: no NaN
            p = torch.exp(s - m_)
            l_ = p.sum(dim=-1, keepdim=True)
            out[:, :, a0:a1] = ((p @ vc) / l_.clamp(min=torch.finfo(acc).tiny)).to(q.dtype)
            lse[:, :, a0:a1] = (m_ + l_.log()).squeeze(-1)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, ks, vs, out, lse)
        ctx.h, ctx.weighted, ctx.scale = h, weighted, scale
        return L.from_q_blocks(out), L.from_q_blocks(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, ks, vs, out, lse = ctx.saved_tensors
        h, scale = ctx.h, ctx.scale
        acc = _acc_dtype(q.dtype)
        L = _Layout(q, k, v, ks, vs, h)
        tables = block_tables(h, ctx.weighted, q.device)
        qb = L.q_blocks(q)
        dob = L.q_blocks(dout.contiguous()) if dout is not None else torch.zeros_like(qb)
        # delta_i = dO_i . O_i - dlse_i: the softmax-backward row term (lse's gradient folds in here).
        delta = (dob.to(acc) * out.to(acc)).sum(-1)
        if dlse is not None:
            delta = delta - L.q_blocks(dlse).to(acc)
        m, Fm = L.m, L.F * L.m
        dq = torch.empty_like(qb)
        dkp = torch.zeros(L.kp.shape, dtype=acc, device=q.device)
        dvp = torch.zeros(L.vp.shape, dtype=acc, device=q.device)
        dks = torch.zeros(L.ks.shape, dtype=acc, device=q.device)
        dvs = torch.zeros(L.vs.shape, dtype=acc, device=q.device)
        W = Fm + h.coarse_slots
        step = _chunk_blocks(h, L.G * m, L.B * L.Hkv, W)
        safe_lse = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
        for a0 in range(0, L.nblk, step):
            a1 = min(a0 + step, L.nblk)
            nb = a1 - a0
            kc, vc = L.keys(a0, a1, tables.index, acc)
            qc = qb[:, :, a0:a1].to(acc)
            do = dob[:, :, a0:a1].to(acc)
            s = _scores(qc, kc, _bias(h, tables, a0, a1, acc, q.device), scale, L)
            p = torch.exp(s - safe_lse[:, :, a0:a1, :, None])  # (B, Hkv, nb, G*m, W)
            dv = p.transpose(-1, -2) @ do  # (B, Hkv, nb, W, d)
            ds = p * ((do @ vc.transpose(-1, -2)) - delta[:, :, a0:a1, :, None])
            dq[:, :, a0:a1] = ((ds @ kc) * scale).to(q.dtype)
            dk = (ds.transpose(-1, -2) @ qc) * scale  # (B, Hkv, nb, W, d)
            # Fine slots: block a's slot f is padded block a + f.
            for f in range(L.F):
                sl = slice(f * m, (f + 1) * m)
                dkp.view(L.B, L.Hkv, -1, m, L.d)[:, :, a0 + f:a1 + f] += dk[:, :, :, sl]
                dvp.view(L.B, L.Hkv, -1, m, L.d)[:, :, a0 + f:a1 + f] += dv[:, :, :, sl]
            # Coarse slots: scatter-add into the summaries they came from.
            idx = tables.index[a0:a1].reshape(-1)
            dks.index_add_(2, idx, dk[:, :, :, Fm:].reshape(L.B, L.Hkv, nb * h.coarse_slots, L.d))
            dvs.index_add_(2, idx, dv[:, :, :, Fm:].reshape(L.B, L.Hkv, nb * h.coarse_slots, L.d))
        N = q.shape[2]
        dk = dkp[:, :, m:m + N].to(k.dtype)
        dv = dvp[:, :, m:m + N].to(v.dtype)
        T = ks.shape[2]
        return (L.from_q_blocks(dq), dk, dv, dks[:, :, :T].to(ks.dtype), dvs[:, :, :T].to(vs.dtype),
                None, None, None)


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    n = x.shape[2]
    return x if n == length else F.pad(x, (0, 0, 0, length - n))


def block_attention(q, k, v, ks, vs, h: Hierarchy, *, scale: float, weighted: bool,
                    fine_only: bool = False):
    """Padded call of :class:`BlockAttention`; returns ``(out, lse)`` for the real ``n`` tokens.

    ``fine_only`` drops the coarse levels (the linear variant adds them itself).
    """
    n, N = h.n, h.padded_len
    hh = h
    if fine_only and h.n_levels:
        hh = truncate(h, 0)
        ks, vs = ks[:, :, :0], vs[:, :, :0]
    q, k, v = _pad_seq(q, N), _pad_seq(k, N), _pad_seq(v, N)
    out, lse = BlockAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                    ks.contiguous(), vs.contiguous(), hh, weighted, scale)
    return out[:, :, :n], lse[:, :, :n]


def _merge(l1, o1, l2, o2):
    """Merge two softmax partials given as (lse, normalised output); -inf lse = empty."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
    w1 = torch.exp(l1 - safe).unsqueeze(-1)
    w2 = torch.exp(l2 - safe).unsqueeze(-1)
    return lse, w1 * o1 + w2 * o2


def linear_coarse(q, ks, vs, h: Hierarchy, *, scale: float, weighted: bool):
    """The linear variant's coarse term per fine block: ``(lse, out)``, (B, H, n_blocks[, d]).

    Each window's queries share one mean query per level, so each window has one
    partial softmax over its list; partials are merged top-down (parent into
    children) and the level-1 result is per fine block. O(n/m * p * L) work.
    """
    B, H, _, d = q.shape
    Hkv, G, p = ks.shape[1], H // ks.shape[1], h.rank
    acc = _acc_dtype(q.dtype)
    qbar = window_means(q.to(acc), h)
    ks, vs = ks.to(acc), vs.to(acc)
    top = None
    for l in range(h.n_levels, 0, -1):
        nw, lo = h.windows[l - 1], h.offsets[l - 1]
        lists = h.window_lists(l).to(q.device)  # (nw, S/p)
        counts = h.summary_counts(l).to(q.device)
        j = torch.arange(p, device=q.device)
        win = lists[:, :, None].expand(-1, -1, p)
        cnt = torch.where(win >= 0, counts[win.clamp(min=0), j], torch.zeros_like(win)).reshape(nw, -1)
        idx = (lo + win.clamp(min=0) * p + j).reshape(nw, -1)  # (nw, S)
        # Masked slots get a large finite negative score, not -inf: windows with an
        # empty list must give a finite lse whose weight underflows to exactly 0
        # when merged, without NaN gradients through logsumexp.
        bias = torch.where(cnt > 0, cnt.to(acc).log() if weighted else torch.zeros_like(cnt, dtype=acc),
                           torch.full_like(cnt, _MASKED, dtype=acc))
        qwin = h.query_window(l).to(q.device).clamp(min=0)
        ql = qbar[l - 1][:, :, qwin].view(B, Hkv, G, nw, 1, d)
        kl = ks[:, :, idx].view(B, Hkv, 1, nw, -1, d)
        vl = vs[:, :, idx].view(B, Hkv, 1, nw, -1, d)
        s = (ql @ kl.transpose(-1, -2)).squeeze(-2) * scale + bias  # (B, Hkv, G, nw, S)
        lse = torch.logsumexp(s, dim=-1)
        safe = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
        o = (torch.exp(s - safe[..., None]).unsqueeze(-2) @ vl).squeeze(-2)  # (B, Hkv, G, nw, d)
        lse, o = lse.view(B, H, nw), o.view(B, H, nw, d)
        if top is not None:
            up_l, up_o = top
            parent = torch.arange(nw, device=q.device) // 2
            lse, o = _merge(lse, o, up_l[:, :, parent], up_o[:, :, parent])
        top = (lse, o)
    return top


def blocked_multipole(q, k, v, ks, vs, h: Hierarchy, *, scale: float, weighted: bool,
                      variant: str = "nlogn") -> torch.Tensor:
    """Multipole attention by the blocked PyTorch path: (B, H, n, d)."""
    if variant == "nlogn" or h.n_levels == 0:
        out, _ = block_attention(q, k, v, ks, vs, h, scale=scale, weighted=weighted)
        return out
    out, lse = block_attention(q, k, v, ks, vs, h, scale=scale, weighted=weighted, fine_only=True)
    c_lse, c_out = linear_coarse(q, ks, vs, h, scale=scale, weighted=weighted)
    blk = torch.arange(h.n, device=q.device) // h.block_size
    _, merged = _merge(lse, out.to(c_out.dtype), c_lse[:, :, blk], c_out[:, :, blk])
    return merged.to(q.dtype)
