"""Sequence parallelism over the multipole hierarchy.

Rank ``r`` of a group of ``P`` holds the tokens ``[r*C, (r+1)*C)``, ``C = n/P``,
with ``C = m * 2**K`` (a power of two of fine blocks), so that every window of
levels ``1..K+1`` lies inside one rank and level ``K+1``'s windows are the
ranks' chunks. Then (see the design page, "Sequence parallelism"):

- the fine level needs one block of keys/values from each neighbour (causal:
  the left one only);
- levels ``1..K`` need, from each neighbour, the one or two windows per level
  that the lists of the rank's edge windows reach (``s`` per level: 1 for the
  bottom-up kinds ``mean``/``m2m``, whose other window is the parent of two
  windows one level down that the rank already has; 2 for ``conv``);
- levels ``K+1..L`` come from one all-gather of each rank's level-``K+1``
  summary (its whole chunk), coarser levels formed locally by the same
  bottom-up maps (``conv``: each rank's partial window sums for every level
  ``> K``, which add up because the summaries are linear).

All of it travels in two autograd functions: a neighbour exchange whose backward
sends the gradients back the way the values came, and an all-gather whose
backward is a reduce-scatter. Per rank and layer that is ``O((m + s*p*K) d)``
numbers for the halo plus ``O(P p d)`` for the gather: independent of ``n``
except through ``K = log2(C/m)``. The core (:class:`BlockAttention`) then runs
on the rank's query blocks with the global hierarchy's tables; the summary
tensor it indexes is global-sized (``O(n p / m)`` rows: memory, not traffic) but
filled only where the rank's blocks look. The core is the one ``impl`` picks on
one device (the PyTorch core, or the Triton kernels on CUDA: same contract).

:data:`TRAFFIC` counts the bytes the collectives here send and receive
(``bench/sp.py`` reads it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..attention.blocked import BlockAttention, _merge, _acc_dtype, _MASKED
from ..attention.hierarchy import Hierarchy, hierarchy, level_slots, truncate
from ..attention.summaries import MEAN, Summaries, finish

# Bytes this process sent/received through the collectives below, by phase.
TRAFFIC = {"fwd_sent": 0, "fwd_recv": 0, "bwd_sent": 0, "bwd_recv": 0}


def reset_traffic() -> None:
    for key in TRAFFIC:
        TRAFFIC[key] = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- collectives
def _exchange(to_left: torch.Tensor, to_right: torch.Tensor, group, phase: str):
    """Send flat ``to_left`` to rank r-1 and ``to_right`` to r+1; returns what the
    neighbours sent the other way: ``(from_left, from_right)``, shaped like
    ``to_right`` and ``to_left`` (zeros at the ends of the sequence)."""
    r, P = dist.get_rank(group), dist.get_world_size(group)
    from_left, from_right = torch.zeros_like(to_right), torch.zeros_like(to_left)
    ops = []

    def peer(i):
        return dist.get_global_rank(group, i)

    for nb, send, recv in ((r - 1, to_left, from_left), (r + 1, to_right, from_right)):
        if 0 <= nb < P:
            if send.numel():
                ops.append(dist.P2POp(dist.isend, send, peer(nb), group))
                TRAFFIC[phase + "_sent"] += _nbytes(send)
            if recv.numel():
                ops.append(dist.P2POp(dist.irecv, recv, peer(nb), group))
                TRAFFIC[phase + "_recv"] += _nbytes(recv)
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return from_left, from_right


class _Halo(torch.autograd.Function):
    """Neighbour exchange; the backward sends each gradient back to where its value came from."""

    @staticmethod
    def forward(ctx, to_left, to_right, group):
        ctx.group = group
        return _exchange(to_left.contiguous(), to_right.contiguous(), group, "fwd")

    @staticmethod
    def backward(ctx, g_from_left, g_from_right):
        # My from_left was the left rank's to_right: its gradient goes back left, and so on.
        d_left, d_right = _exchange(g_from_left.contiguous(), g_from_right.contiguous(), ctx.group, "bwd")
        return d_left, d_right, None


# torch 2.13 renamed the flat-buffer collectives (the old names warn).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """x -> (P, *x.shape) over the group; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        P = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty(P * x.numel())  # gloo wants flat buffers
        _all_gather(out, x.reshape(-1), group=group)
        # Ring all-gather: each rank sends and receives P-1 pieces.
        TRAFFIC["fwd_sent"] += (P - 1) * _nbytes(x)
        TRAFFIC["fwd_recv"] += (P - 1) * _nbytes(x)
        return out.view(P, *x.shape)

    @staticmethod
    def backward(ctx, g):
        P = dist.get_world_size(ctx.group)
        g = g.contiguous()  # gloo scatters wrongly into non-contiguous buffers
        out = g.new_empty(g[0].numel())
        _reduce_scatter(out, g.reshape(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        TRAFFIC["bwd_sent"] += (P - 1) * _nbytes(out)
        TRAFFIC["bwd_recv"] += (P - 1) * _nbytes(out)
        return out.view(g.shape[1:]), None


def _pack(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _unpack(flat, like):
    out, i = [], 0
    for t in like:
        out.append(flat[i:i + t.numel()].view(t.shape))
        i += t.numel()
    return out


# --------------------------------------------------------------------------- summaries
def _frame(n_blocks: int, m: int, p: int, causal: bool, levels: int) -> Hierarchy:
    """A hierarchy over ``n_blocks`` local blocks with ``levels`` aligned levels (window
    counts halve per level): the summary kinds' ``zs`` then summarise a slice of tokens."""
    windows = tuple(max(1, n_blocks >> (l - 1)) for l in range(1, levels + 1))
    offsets = tuple(sum(w * p for w in windows[:i]) for i in range(levels))
    return Hierarchy(n=n_blocks * m, block_size=m, rank=p, causal=causal, n_blocks=n_blocks,
                     n_levels=levels, windows=windows, offsets=offsets,
                     num_summaries=sum(w * p for w in windows))


def _check_layout(C: int, m: int, P: int) -> int:
    nq = C // m
    if C % m or nq & (nq - 1):
        good = P * m * (1 << max(0, (max(1, C // m)).bit_length() - 1))
        raise ValueError(
            f"fma with sequence parallelism: each rank holds n/P = {C} tokens, which must be "
            f"block_size={m} times a power of two (so that every window of the hierarchy lies inside "
            f"one rank or spans whole ranks); use a global length that is a multiple of {P}*{m}*2**j, "
            f"e.g. n={good} or {2 * good}")
    return nq.bit_length() - 1


def sp_fma(q, k, v, group, *, block_size: int, rank: int, causal: bool, weighted: bool, scale: float,
           variant: str, summaries: Summaries | None, max_level: int | None,
           impl: str = "torch") -> torch.Tensor:
    """This rank's chunk of ``fma`` over the sequence the group holds: q (B, H, C, d),
    k, v (B, Hkv, C, d) -> (B, H, C, d). Called by :func:`fmtrain.attention.fma`."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    B, H, C, d = q.shape
    m, p = block_size, rank
    K = _check_layout(C, m, P)
    nq, a0 = C // m, r * (C // m)
    h = hierarchy(C * P, m, p, causal)
    if max_level is not None:
        h = truncate(h, max_level)
    summ = summaries or MEAN
    if h.n_levels:
        summ.check(h)
    s = 1 if summ.bottom_up else 2  # halo windows per level (module docstring)
    L = h.n_levels
    Lh, Lo = min(K, L), min(K + 1, L)  # halo levels; levels summarised from own tokens
    Fb = len(h.fine_blocks())
    linear = variant == "linear" and L > 0

    # 1. Own summaries of levels 1..Lo (and conv's partial window sums above K+1).
    own = [summ.zs(x, _frame(nq, m, p, causal, Lo), w) if Lo else [] for w, x in enumerate((k, v))]
    # 2. Halo: fine blocks and s windows per level <= K; causal sends right only.
    to_r, to_l = [k[:, :, C - m:], v[:, :, C - m:]], ([k[:, :, :m], v[:, :, :m]] if not causal else [])
    for w in range(2):
        for l in range(1, Lh + 1):
            W = nq >> (l - 1)  # own windows on level l (>= 2)
            to_r.append(own[w][l - 1][:, :, W - 2:W - 2 + s])
            if not causal:
                to_l.append(own[w][l - 1][:, :, 2 - s:2])
    qsum = None
    if linear:  # query window sums per level (causal: the left rank's last window is needed)
        qsum = _window_sums(q, nq, Lo)
        if causal:
            to_r += [x[:, :, -1] for x in qsum]
    # One buffer per direction; its dtype is the widest piece's (the linear variant's
    # query sums stay in the accumulation dtype, as on one device).
    flat_l = _pack(to_l) if to_l else k.new_zeros(0)
    fl, fr = _Halo.apply(flat_l, _pack(to_r), group)
    from_l = _unpack(fl, to_r)
    from_r = _unpack(fr, to_l)
    # 3. Extended fine keys: blocks a0-1 .. a0+nq(+1).
    ext = [torch.cat([from_l[w], x] + ([from_r[w]] if not causal else []), dim=2) for w, x in enumerate((k, v))]
    # 4. Levels 1..Lh: the windows [c_l - 2, c_l + W + 2) (causal: up to c_l + W), placed globally.
    zs = [[], []]
    for w in range(2):
        left = from_l[2 + w * Lh:2 + (w + 1) * Lh]
        right = from_r[2 + w * Lh:2 + (w + 1) * Lh] if not causal else [None] * Lh
        prev = None
        for l in range(1, Lh + 1):
            if s == 1:  # the windows next to the rank are parents of windows one level down
                mid = (summ.zs(ext[w], _frame(nq + Fb - 1, m, p, causal, 1), w)[0] if l == 1
                       else summ.parents(prev, prev.shape[2] // 2, w))
            else:
                mid = own[w][l - 1]
            prev = torch.cat([left[l - 1], mid] + ([right[l - 1]] if right[l - 1] is not None else []), dim=2)
            c0 = (a0 >> (l - 1)) - 2  # first window of prev
            nw = h.windows[l - 1]
            zs[w].append(F.pad(prev, (0, 0, 0, 0, c0, nw - c0 - prev.shape[2])))
    # 5. Levels K+1..L from one all-gather.
    gathered_q = None
    if L > K:
        if s == 1:
            mine = [own[w][K][:, :, 0] for w in range(2)]  # (B, Hkv, p, d): the rank's whole chunk
        else:
            mine = [torch.stack([own[w][K][:, :, 0]] + [summ.window_part(x, l, (r * C) % (m << (l - 1)), w)
                                                       for l in range(K + 2, L + 1)], dim=2)
                    for w, x in enumerate((k, v))]  # (B, Hkv, L-K, p, d)
        pieces = mine + ([qsum[K].squeeze(2)] if linear and L > K + 1 else [])
        flat = _AllGather.apply(_pack(pieces), group)  # (P, ...)
        got = [_unpack(flat[i], pieces) for i in range(P)]  # per rank: its pieces
        for w in range(2):
            per_rank = torch.stack([g[w] for g in got])  # (P, B, Hkv, [L-K,] p, d)
            if s == 1:
                z = per_rank.permute(1, 2, 0, 3, 4)  # (B, Hkv, P, p, d): level K+1
                zs[w].append(z)
                for l in range(K + 2, L + 1):
                    z = summ.parents(z, h.windows[l - 1], w)
                    zs[w].append(z)
            else:
                for l in range(K + 1, L + 1):
                    R, nw = 1 << (l - K - 1), h.windows[l - 1]  # ranks per window
                    part = F.pad(per_rank[:, :, :, l - K - 1], (0, 0, 0, 0, 0, 0, 0, 0, 0, nw * R - P))
                    zs[w].append(part.view(nw, R, *part.shape[1:]).sum(1).permute(1, 2, 0, 3, 4))
        if linear and L > K + 1:
            gathered_q = torch.stack([g[2] for g in got])  # (P, B, H, d): chunk sums of q
    if L:
        ks, vs = finish(zs[0], h), finish(zs[1], h)
    else:
        ks = vs = k.new_zeros(B, k.shape[1], 0, d)
    # 6. The core on this rank's blocks (the linear variant: fine level only, coarse merged below).
    hc = truncate(h, 0) if linear else h
    kc, vc = (ks[:, :, :0], vs[:, :, :0]) if linear else (ks, vs)
    from ..attention.kernels import core as select_core  # impl: the same cores as one device (Triton on CUDA)

    core = BlockAttention if impl == "torch" else select_core(impl, q)
    out, lse = core.apply(q.contiguous(), ext[0].contiguous(), ext[1].contiguous(),
                          kc.contiguous(), vc.contiguous(), hc, weighted, scale, a0)
    if not linear:
        return out
    qleft = from_l[2 + 2 * Lh:] if causal else None
    c_lse, c_out = _linear_coarse(q, ks, vs, h, qsum, qleft, gathered_q, K, a0, r, P,
                                  scale=scale, weighted=weighted)
    blk = torch.arange(C, device=q.device) // m
    _, merged = _merge(lse, out.to(c_out.dtype), c_lse[:, :, blk], c_out[:, :, blk])
    return merged.to(q.dtype)


def _window_sums(q, nq: int, levels: int) -> list[torch.Tensor]:
    """Sums of q over the rank's windows of levels 1..levels: [(B, H, W_l, d)]."""
    B, H, C, d = q.shape
    acc = _acc_dtype(q.dtype)
    s = q.to(acc).view(B, H, nq, C // nq, d).sum(3)
    out = [s]
    for _ in range(1, levels):
        s = s.view(B, H, -1, 2, d).sum(3)
        out.append(s)
    return out


def _linear_coarse(q, ks, vs, h: Hierarchy, qsum, qleft, gathered_q, K: int, a0: int, r: int, P: int,
                   *, scale: float, weighted: bool):
    """The linear variant's coarse term for this rank's fine blocks: (lse, out) (B, H, nq[, d]).

    :func:`fmtrain.attention.blocked.linear_coarse` restricted to the windows that
    contain the rank's blocks: its own windows on levels <= K+1, the one window
    containing it above.
    """
    B, H, _, d = q.shape
    Hkv, G, dev = ks.shape[1], H // ks.shape[1], q.device
    acc = _acc_dtype(q.dtype)
    ks, vs = ks.to(acc), vs.to(acc)
    top, top_c0 = None, 0
    for l in range(h.n_levels, 0, -1):
        counts_w = h.window_counts(l).to(dev).clamp(min=1).to(acc)
        if l <= K + 1:
            c0 = a0 >> (l - 1)
            W = qsum[l - 1].shape[2]
            sel = torch.arange(c0, c0 + W, device=dev)
            if h.causal:  # query window c-1: the previous window's sum comes from the left rank
                sums = torch.cat([qleft[l - 1].unsqueeze(2), qsum[l - 1][:, :, :-1]], dim=2)
            else:
                sums = qsum[l - 1]
        else:
            R = 1 << (l - K - 1)  # ranks per window
            c0 = r // R
            sel = torch.tensor([c0], device=dev)
            qc = c0 - 1 if h.causal else c0
            ranks = range(max(qc, 0) * R, min((max(qc, 0) + 1) * R, P))
            sums = gathered_q[list(ranks)].sum(0).unsqueeze(2)  # (B, H, 1, d)
        qwin = h.query_window(l).to(dev)[sel].clamp(min=0)
        qbar = sums / counts_w[qwin][:, None]
        idx, bias = level_slots(h, l, weighted)  # masked slots: any row, weight exp(_MASKED) = 0
        idx = idx.to(dev)[sel].clamp(max=h.num_summaries - 1)
        bias = bias.to(dev)[sel].clamp(min=_MASKED).to(acc)
        nsel = len(sel)
        ql = qbar.to(acc).view(B, Hkv, G, nsel, 1, d)
        kl = ks[:, :, idx].view(B, Hkv, 1, nsel, -1, d)
        vl = vs[:, :, idx].view(B, Hkv, 1, nsel, -1, d)
        s = (ql @ kl.transpose(-1, -2)).squeeze(-2) * scale + bias
        lse = torch.logsumexp(s, dim=-1)
        safe = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
        o = (torch.exp(s - safe[..., None]).unsqueeze(-2) @ vl).squeeze(-2)
        lse, o = lse.view(B, H, nsel), o.view(B, H, nsel, d)
        if top is not None:
            up_l, up_o = top
            parent = sel // 2 - top_c0
            lse, o = _merge(lse, o, up_l[:, :, parent], up_o[:, :, parent])
        top, top_c0 = (lse, o), int(sel[0])
    return top


__all__ = ["sp_fma", "TRAFFIC", "reset_traffic"]
