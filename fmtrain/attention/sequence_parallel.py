"""Sequence parallelism over the multipole hierarchy: ``fma`` on a group of ranks that
each hold a contiguous chunk of the sequence.

Rank ``r`` of a group of ``P`` holds the tokens ``[r*C, (r+1)*C)``, ``C = n/P``,
with ``C = m * 2**K`` (a power of two of fine blocks; ``K`` is ``rank_levels`` in
the code), so that every window of
levels ``1..K+1`` lies inside one rank and level ``K+1``'s windows are the
ranks' chunks. Then (see the design page, "Sequence parallelism"):

- the fine level needs one block of keys/values from each neighbour (causal:
  the left one only);
- levels ``1..K`` need, from each neighbour, the one or two windows per level
  that the lists of the rank's edge windows reach (``halo_windows``: 1 for the
  bottom-up kinds ``mean``/``m2m``, whose other window is the parent of two
  windows one level down that the rank already has; 2 for ``conv``);
- levels ``K+1..L`` come from one all-gather of each rank's level-``K+1``
  summary (its whole chunk), coarser levels formed locally by the same
  bottom-up maps (``conv``: each rank's partial window sums for every level
  ``> K``, which add up because the summaries are linear).

All of it travels in two autograd functions: a neighbour exchange whose backward
sends the gradients back the way the values came, and an all-gather whose
backward is a reduce-scatter. Per rank and layer that is ``O((m + halo_windows*p*K) d)``
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

from .blocked import coarse_top_down, merge
from .cores import select_core
from .hierarchy import Hierarchy, call_hierarchy, hierarchy, truncate, window_divisors
from .refine import FarField, use_kernels
from .summaries import MEAN, Summaries, finish
from .torch_core import acc_dtype

# Bytes this process sent/received through the collectives below, by phase.
TRAFFIC = {"fwd_sent": 0, "fwd_recv": 0, "bwd_sent": 0, "bwd_recv": 0}


def reset_traffic() -> None:
    for key in TRAFFIC:
        TRAFFIC[key] = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- collectives
def swap(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], group, phase: str) -> None:
    """Point-to-point in one batch: ``sends[peer]`` (contiguous) goes to group rank ``peer``, and
    ``recvs[peer]`` (a contiguous buffer) is filled from it; empty tensors are skipped. Counted
    in :data:`TRAFFIC` under ``phase`` ("fwd" or "bwd")."""
    ops = []
    for peer, t in sends.items():
        if t.numel():
            ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, peer), group))
            TRAFFIC[phase + "_sent"] += _nbytes(t)
    for peer, t in recvs.items():
        if t.numel():
            ops.append(dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer), group))
            TRAFFIC[phase + "_recv"] += _nbytes(t)
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def _exchange(to_left: torch.Tensor, to_right: torch.Tensor, group, phase: str):
    """Send flat ``to_left`` to rank r-1 and ``to_right`` to r+1; returns what the
    neighbours sent the other way: ``(from_left, from_right)``, shaped like
    ``to_right`` and ``to_left`` (zeros at the ends of the sequence)."""
    r, P = dist.get_rank(group), dist.get_world_size(group)
    from_left, from_right = torch.zeros_like(to_right), torch.zeros_like(to_left)
    sends, recvs = {}, {}
    if r > 0:
        sends[r - 1], recvs[r - 1] = to_left, from_left
    if r < P - 1:
        sends[r + 1], recvs[r + 1] = to_right, from_right
    swap(sends, recvs, group, phase)
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


def layout_ok(chunk: int, block_size: int) -> bool:
    """Whether a rank's ``chunk`` of tokens is ``block_size * 2**j``: then every window of the
    hierarchy lies inside one rank or spans whole ranks (the trainer's config checks this too)."""
    own_blocks = chunk // block_size
    return chunk % block_size == 0 and own_blocks > 0 and own_blocks & (own_blocks - 1) == 0


def check_layout(chunk: int, block_size: int, n_ranks: int) -> int:
    """Raise unless :func:`layout_ok`; returns ``j``, the number of levels whose windows lie
    inside one rank."""
    own_blocks = chunk // block_size
    if not layout_ok(chunk, block_size):
        good = n_ranks * block_size * (1 << max(0, max(1, own_blocks).bit_length() - 1))
        raise ValueError(
            f"fma with sequence parallelism: each rank holds n/P = {chunk} tokens, which must be "
            f"block_size={block_size} times a power of two (so that every window of the hierarchy lies "
            f"inside one rank or spans whole ranks); use a global length that is a multiple of "
            f"{n_ranks}*{block_size}*2**j, e.g. n={good} or {2 * good}")
    return own_blocks.bit_length() - 1


def sp_fma(q, k, v, group, *, block_size: int, rank: int, causal: bool, weighted: bool, scale: float,
           variant: str, summaries: Summaries | None, max_level: int | None,
           impl: str = "torch") -> torch.Tensor:
    """This rank's chunk of ``fma`` over the sequence the group holds: q (B, H, C, d),
    k, v (B, Hkv, C, d) -> (B, H, C, d). Called by :func:`fmtrain.attention.fma`."""
    n_ranks, me = dist.get_world_size(group), dist.get_rank(group)
    B, H, chunk, d = q.shape
    m, p = block_size, rank  # tokens per fine block, summaries per window
    rank_levels = check_layout(chunk, m, n_ranks)  # levels 1..rank_levels: windows inside one rank
    own_blocks = chunk // m
    first_block = me * own_blocks
    h = hierarchy(chunk * n_ranks, m, p, causal)
    if max_level is not None:
        h = truncate(h, max_level)
    summ = summaries or MEAN
    if h.n_levels:
        summ.check(h)
    halo_windows = 1 if summ.bottom_up else 2  # per level and neighbour (module docstring)
    n_levels = h.n_levels
    halo_levels, own_levels = min(rank_levels, n_levels), min(rank_levels + 1, n_levels)
    n_fine = len(h.fine_blocks())
    linear = variant == "linear" and n_levels > 0

    # 1. Own summaries of levels 1..own_levels.
    own = [summ.zs(x, _frame(own_blocks, m, p, causal, own_levels), which) if own_levels else []
           for which, x in enumerate((k, v))]
    # 2. Halo: fine blocks and halo_windows windows per level <= rank_levels; causal sends right only.
    to_right = [k[:, :, chunk - m:], v[:, :, chunk - m:]]
    to_left = [k[:, :, :m], v[:, :, :m]] if not causal else []
    for which in range(2):
        for l in range(1, halo_levels + 1):
            own_windows = own_blocks >> (l - 1)  # >= 2
            to_right.append(own[which][l - 1][:, :, own_windows - 2:own_windows - 2 + halo_windows])
            if not causal:
                to_left.append(own[which][l - 1][:, :, 2 - halo_windows:2])
    q_sums = None
    if linear:  # query window sums per level (causal: the left rank's last window is needed)
        q_sums = _window_sums(q, own_blocks, own_levels)
        if causal:
            to_right += [x[:, :, -1] for x in q_sums]
    # One buffer per direction; its dtype is the widest piece's (the linear variant's
    # query sums stay in the accumulation dtype, as on one device).
    flat_left = _pack(to_left) if to_left else k.new_zeros(0)
    got_left, got_right = _Halo.apply(flat_left, _pack(to_right), group)
    from_left = _unpack(got_left, to_right)
    from_right = _unpack(got_right, to_left)
    # 3. Extended fine keys: blocks first_block-1 .. first_block+own_blocks(+1).
    extended = [torch.cat([from_left[which], x] + ([from_right[which]] if not causal else []), dim=2)
                for which, x in enumerate((k, v))]
    # 4. Levels 1..halo_levels: the windows [c_l - 2, c_l + W + 2) (causal: up to c_l + W), placed globally.
    zs = [[], []]
    for which in range(2):
        left = from_left[2 + which * halo_levels:2 + (which + 1) * halo_levels]
        right = (from_right[2 + which * halo_levels:2 + (which + 1) * halo_levels] if not causal
                 else [None] * halo_levels)
        near = None  # level l's windows from first_window on: the neighbours' and the rank's own
        for l in range(1, halo_levels + 1):
            if summ.bottom_up:  # the windows next to the rank are parents of windows one level down
                mid = (summ.zs(extended[which], _frame(own_blocks + n_fine - 1, m, p, causal, 1), which)[0]
                       if l == 1 else summ.parents(near, near.shape[2] // 2, which))
            else:
                mid = own[which][l - 1]
            near = torch.cat([left[l - 1], mid] + ([right[l - 1]] if right[l - 1] is not None else []), dim=2)
            first_window = (first_block >> (l - 1)) - 2
            n_windows = h.windows[l - 1]
            zs[which].append(F.pad(near, (0, 0, 0, 0, first_window, n_windows - first_window - near.shape[2])))
    # 5. Levels rank_levels+1..n_levels from one all-gather.
    gathered_q = None
    if n_levels > rank_levels:
        top_own = rank_levels  # index of level rank_levels+1: the rank's whole chunk is one window
        if summ.bottom_up:
            mine = [own[which][top_own][:, :, 0] for which in range(2)]  # (B, Hkv, p, d)
        else:  # conv: the chunk's share of its window on every level above
            mine = [torch.stack([own[which][top_own][:, :, 0]] + [
                summ.window_part(x, l, (me * chunk) % (m << (l - 1)), which)
                for l in range(rank_levels + 2, n_levels + 1)], dim=2)
                for which, x in enumerate((k, v))]  # (B, Hkv, levels above, p, d)
        pieces = mine + ([q_sums[top_own].squeeze(2)] if linear and n_levels > rank_levels + 1 else [])
        flat = _AllGather.apply(_pack(pieces), group)  # (n_ranks, ...)
        got = [_unpack(flat[i], pieces) for i in range(n_ranks)]  # per rank: its pieces
        for which in range(2):
            per_rank = torch.stack([g[which] for g in got])  # (n_ranks, B, Hkv, [levels,] p, d)
            if summ.bottom_up:
                z = per_rank.permute(1, 2, 0, 3, 4)  # (B, Hkv, n_ranks, p, d): level rank_levels+1
                zs[which].append(z)
                for l in range(rank_levels + 2, n_levels + 1):
                    z = summ.parents(z, h.windows[l - 1], which)
                    zs[which].append(z)
            else:
                for l in range(rank_levels + 1, n_levels + 1):
                    ranks_per_window, n_windows = 1 << (l - rank_levels - 1), h.windows[l - 1]
                    part = F.pad(per_rank[:, :, :, l - rank_levels - 1],
                                 (0, 0, 0, 0, 0, 0, 0, 0, 0, n_windows * ranks_per_window - n_ranks))
                    zs[which].append(part.view(n_windows, ranks_per_window, *part.shape[1:]).sum(1)
                                     .permute(1, 2, 0, 3, 4))
        if linear and n_levels > rank_levels + 1:
            gathered_q = torch.stack([g[2] for g in got])  # (n_ranks, B, H, d): chunk sums of q
    if n_levels:
        ks, vs = finish(zs[0], h), finish(zs[1], h)
    else:
        ks = vs = k.new_zeros(B, k.shape[1], 0, d)
    # 6. The core on this rank's blocks (the linear variant: fine level only, coarse merged below).
    h_core = truncate(h, 0) if linear else h
    ks_core, vs_core = (ks[:, :, :0], vs[:, :, :0]) if linear else (ks, vs)
    out, lse = select_core(impl, q).apply(q.contiguous(), extended[0].contiguous(), extended[1].contiguous(),
                                          ks_core.contiguous(), vs_core.contiguous(), h_core, weighted, scale,
                                          first_block)
    if not linear:
        return out
    q_left = from_left[2 + 2 * halo_levels:] if causal else None
    c_lse, c_out = _linear_coarse(q, ks, vs, h, q_sums, q_left, gathered_q, rank_levels, first_block, me,
                                  n_ranks, scale=scale, weighted=weighted)
    blk = torch.arange(chunk, device=q.device) // m
    _, merged = merge(lse, out.to(c_out.dtype), c_lse[:, :, blk], c_out[:, :, blk])
    return merged.to(q.dtype)


def sp_refined(q, k, v, group, *, block_size: int, rank: int, causal: bool, weighted: bool, scale: float,
               summaries: Summaries | None, max_level: int | None, refine: int, impl: str = "torch",
               level_offset=None, flat_top: bool = False, select_reach=None) -> torch.Tensor:
    """This rank's chunk of ``fma(..., refine=K)`` over the sequence the group holds (shapes as
    :func:`sp_fma`'s): the keys and values are all-gathered, and the rank runs the one-device
    path (:func:`.refine.refined_multipole`'s fine core and :class:`.refine.FarField`) for its
    own queries over them.

    A query may open a block anywhere before it, so the halos above do not serve: this is
    all-gather context parallelism (as Llama 3 trains at 128k), ``(P-1)/P`` of the keys and
    values received per rank and layer, ring attention's traffic, and ``O(n d)`` memory while
    the layer runs; the backward reduce-scatters their gradients. Every rank forms the
    summaries of the whole sequence itself, so selection, summaries and results are the
    single device's exactly. Sending only the opened blocks (requested from their owners
    after the selection, their gradients returned) would bring the traffic down to what the
    queries open; the selection itself then needs every window's key box and summaries
    (``2(p+1)/m`` of the keys' traffic).
    """
    n_ranks, me = dist.get_world_size(group), dist.get_rank(group)
    B, H, chunk, d = q.shape
    m = block_size
    if chunk % m:
        raise ValueError(f"fma with sequence parallelism: each rank holds n/P = {chunk} tokens, which must be whole "
                         f"fine blocks of block_size={m}; use a global length that is a multiple of {n_ranks}*{m}")
    k_all, v_all = (_AllGather.apply(x, group).permute(1, 2, 0, 3, 4).reshape(B, x.shape[1], -1, d)
                    for x in (k, v))  # (B, Hkv, n, d)
    h = call_hierarchy(chunk * n_ranks, m, rank, causal, max_level, level_offset, flat_top)
    ks, vs = (summaries or MEAN)(k_all, v_all, h)
    return refined_blocks(q, k_all, v_all, ks, vs, h, me * chunk // m, refine=refine, weighted=weighted,
                          scale=scale, impl=impl, level_offset=level_offset, select_reach=select_reach)


def refined_blocks(q, k_all, v_all, ks, vs, h, a0: int, *, refine: int, weighted: bool, scale: float, impl: str,
                   level_offset=None, select_reach=None) -> torch.Tensor:
    """Refined multipole attention of the query blocks ``[a0, a0 + nq)`` of ``h`` (q (B, H, nq*m, d))
    over the whole sequence's keys and values ``k_all, v_all`` (B, Hkv, h.n or more, d) and
    summaries: the fine core over those blocks' extended keys (a slice of ``k_all``, zeros where
    it leaves the sequence) merged with their far field. A rank's share of all-gather context
    parallelism (:func:`sp_refined`; packed documents: :func:`.sp_documents.sp_documents_refined`)."""
    m, n = h.block_size, h.n
    lo = (a0 - 1) * m
    hi = lo + (q.shape[2] // m + len(h.fine_blocks()) - 1) * m
    ext = [F.pad(x[:, :, max(lo, 0):min(hi, n)], (0, 0, max(-lo, 0), max(hi - n, 0))) for x in (k_all, v_all)]
    out, lse = select_core(impl, q).apply(q.contiguous(), ext[0].contiguous(), ext[1].contiguous(),
                                          ks[:, :, :0].contiguous(), vs[:, :, :0].contiguous(), truncate(h, 0),
                                          weighted, scale, a0)
    if not h.n_levels:
        return out
    off = None if level_offset is None else level_offset[:, :h.n_levels]
    c_out, c_lse = FarField.apply(q, k_all, v_all, ks, vs, off, h, refine, weighted, scale, a0 * m,
                                  use_kernels(impl, q), select_reach)
    _, merged = merge(lse.to(c_lse.dtype), out.to(c_out.dtype), c_lse, c_out)
    return merged.to(q.dtype)


def _window_sums(q, own_blocks: int, levels: int) -> list[torch.Tensor]:
    """Sums of q over the rank's windows of levels 1..levels: [(B, H, W_l, d)]."""
    B, H, chunk, d = q.shape
    s = q.to(acc_dtype(q.dtype)).view(B, H, own_blocks, chunk // own_blocks, d).sum(3)
    out = [s]
    for _ in range(1, levels):
        s = s.view(B, H, -1, 2, d).sum(3)
        out.append(s)
    return out


def _linear_coarse(q, ks, vs, h: Hierarchy, q_sums, q_left, gathered_q, rank_levels: int, first_block: int,
                   me: int, n_ranks: int, *, scale: float, weighted: bool):
    """The linear variant's coarse term for this rank's fine blocks: (lse, out) (B, H, own_blocks[, d]).

    :func:`~.blocked.coarse_top_down` over the windows that contain the rank's blocks: its
    own windows on levels <= rank_levels+1, the one window containing it above; their mean
    queries from the rank's query sums, its left neighbour's and the all-gathered ones.
    """
    dev, acc = q.device, acc_dtype(q.dtype)

    def level_queries(l):
        counts = window_divisors(h, l, dev, acc)
        if l <= rank_levels + 1:
            first = first_block >> (l - 1)
            windows = torch.arange(first, first + q_sums[l - 1].shape[2], device=dev)
            if h.causal:  # query window c-1: the previous window's sum comes from the left rank
                sums = torch.cat([q_left[l - 1].unsqueeze(2), q_sums[l - 1][:, :, :-1]], dim=2)
            else:
                sums = q_sums[l - 1]
        else:
            ranks_per_window = 1 << (l - rank_levels - 1)
            window = me // ranks_per_window
            windows = torch.tensor([window], device=dev)
            q_window = max(window - 1 if h.causal else window, 0)
            ranks = range(q_window * ranks_per_window, min((q_window + 1) * ranks_per_window, n_ranks))
            sums = gathered_q[list(ranks)].sum(0).unsqueeze(2)  # (B, H, 1, d)
        q_windows = h.query_window(l).to(dev)[windows].clamp(min=0)
        return windows, (sums / counts[q_windows][:, None]).to(acc)

    return coarse_top_down(h, level_queries, ks.to(acc), vs.to(acc), scale=scale, weighted=weighted)


__all__ = ["sp_fma", "sp_refined", "check_layout", "layout_ok", "TRAFFIC", "reset_traffic"]
