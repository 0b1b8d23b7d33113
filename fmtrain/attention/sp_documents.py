"""Sequence parallelism with document masking: packed documents that span ranks.

Each rank of a group of ``P`` holds the tokens ``[r*C, (r+1)*C)`` of every row, as in
:mod:`.sequence_parallel`; the documents (``cu_seqlens`` over the *global* rows, the same
on every rank) are laid out block-aligned as on one device (:class:`.documents.DocHierarchy`
of each row). A document's blocks and windows are aligned to its own first token, not to
the ranks, so a block or a window of any level may straddle a rank boundary. Rank ``r``:

1. owns the layout blocks ``[a0, a1)`` that hold its tokens (an edge block may hold a
   neighbour's tokens too) and runs the core on them, with the global layout's tables;
2. forms *partial* summaries of every window that overlaps its blocks, from its own
   tokens with zeros for everyone else's: the summaries are linear in the tokens
   (``mean``, ``m2m``), so a window's summary is the sum of its ranks' partials;
3. receives, in one exchange with the ranks it needs (``batch_isend_irecv``), the keys
   and values of the tokens in its edge blocks and in the blocks next to them (fewer
   than ``3m`` tokens a side), and the other ranks' partials of exactly the windows
   its blocks' interaction lists name.

Every rank computes every rank's needs from the lengths alone (:func:`rank_plans`), so
there is no request round. Per rank and layer the exchange is ``O(m d)`` tokens plus
``O(L)`` windows per edge of a document that crosses it (``L`` its levels), and partials
of the top windows from each rank they span: ``O((m + P p + L p) d)``, independent of
``n`` but for ``L``. The summary tensor the core indexes is global-sized (memory
``O(n p / m)``, as in :mod:`.sequence_parallel`), filled where the rank's blocks look.
Rows are independent (rows end documents): their pieces travel in the same exchange.

The backward sends each gradient back the way its value came.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cores import select_core
from .documents import DocHierarchy, Documents, doc_hierarchy, doc_summaries, to_layout
from .hierarchy import block_tables, cached_on_device
from .sequence_parallel import _AllGather, refined_blocks, swap
from .summaries import finish


@dataclass(frozen=True)
class RowPlan:
    """What one rank does for one row: its layout blocks, windows and halo tokens.

    ``a0, a1``: the layout blocks holding its tokens; ``e0, e1``: the blocks its core's
    extended keys cover (``a0 - 1`` to ``a1``, bidirectional ``a1 + 1``).
    ``windows[l-1] = (lo, hi)``: the level-``l`` windows (global ids) overlapping
    ``[a0, a1)``. ``needed[l-1]``: the windows its blocks' interaction lists name.
    ``halo``: the row tokens ``[t0, t1)`` of other ranks its extended keys hold.
    """

    a0: int
    a1: int
    e0: int
    e1: int
    windows: tuple[tuple[int, int], ...]
    needed: tuple[tuple[int, ...], ...]
    halo: tuple[tuple[int, int], ...]


def row_documents(docs: Documents) -> list[Documents]:
    """The documents of each row, as a batch of one row each."""
    rows, cur, filled = [], [], 0
    for L in docs.lengths:
        cur.append(L)
        filled += L
        if filled == docs.n:
            rows.append(Documents(1, docs.n, tuple(cur)))
            cur, filled = [], 0
    return rows


def _parents(dh: DocHierarchy, level: int) -> list[int]:
    """For each window of ``level``, its parent on ``level + 1`` (-1: its document has no level above)."""
    out = [-1] * dh.windows[level - 1]
    for i, c in enumerate(dh.children(level, "cpu").tolist()):
        if c < dh.windows[level - 1]:
            out[c] = i // 2
    return out


@functools.lru_cache(maxsize=16)
def rank_plans(docs: Documents, block_size: int, rank: int, causal: bool, max_level: int | None,
               n_ranks: int) -> tuple[DocHierarchy, tuple[RowPlan, ...]]:
    """The layout of one row of documents (``docs.batch == 1``) and every rank's plan for it
    (cached: the layers and the backward share a packing)."""
    dh = doc_hierarchy(docs, block_size, rank, causal, max_level)
    m, p, C = block_size, rank, docs.n // n_ranks
    pos = dh.token_index("cpu").tolist()  # each row token's place in the layout, increasing
    tables = block_tables(dh, False).index
    leaf = dh.leaf_blocks("cpu").tolist() if dh.n_levels else []
    parents = [_parents(dh, l) for l in range(1, dh.n_levels)]
    plans = []
    for r in range(n_ranks):
        a0, a1 = pos[r * C] // m, pos[(r + 1) * C - 1] // m + 1
        e0, e1 = a0 - 1, a1 + (0 if causal else 1)
        # Tokens in the extended blocks, by their place in the layout (which rises with the token).
        t0 = bisect.bisect_left(pos, max(e0, 0) * m)
        t1 = bisect.bisect_left(pos, e1 * m) if not causal else (r + 1) * C  # causal: later keys are masked
        halo = tuple((a, b) for a, b in ((t0, r * C), ((r + 1) * C, t1)) if b > a)
        windows = []
        if dh.n_levels:
            lo, hi = bisect.bisect_left(leaf, a0), bisect.bisect_left(leaf, a1)
            windows.append((lo, hi))
            for up in parents:
                ids = [up[c] for c in range(lo, hi) if up[c] >= 0]
                lo, hi = (min(ids), max(ids) + 1) if ids else (0, 0)
                windows.append((lo, hi))
        needed = []
        idx = tables[a0:a1]
        for l in range(1, dh.n_levels + 1):
            cols = idx[:, (l - 1) * dh.slots_per_level:l * dh.slots_per_level].reshape(-1)
            cols = cols[cols < dh.num_summaries]
            needed.append(tuple(((cols - dh.offsets[l - 1]) // p).unique().tolist()))
        plans.append(RowPlan(a0, a1, e0, e1, tuple(windows), tuple(needed), halo))
    return dh, tuple(plans)


def _owner_range(C: int, src: int, a: int, b: int) -> tuple[int, int]:
    """The part of row tokens ``[a, b)`` rank ``src`` holds."""
    return max(a, src * C), min(b, (src + 1) * C)


def _sends(dh: DocHierarchy, plans, src: int, dst: int, C: int):
    """What ``src`` sends ``dst`` for one row: halo token ranges and, per level, window ids."""
    tokens = [rg for a, b in plans[dst].halo if (rg := _owner_range(C, src, a, b))[1] > rg[0]]
    wins = []
    for l in range(1, dh.n_levels + 1):
        lo, hi = plans[src].windows[l - 1]
        wins.append(tuple(w for w in plans[dst].needed[l - 1] if lo <= w < hi))
    return tokens, wins


# --------------------------------------------------------------------------- the exchange
class _Exchange(torch.autograd.Function):
    """flat sends (one tensor, cut by ``send_cuts``: {peer: (lo, hi)}) -> flat receives (cut by
    ``recv_cuts``) and a 0; the backward returns every gradient to the rank its value came from."""

    @staticmethod
    def forward(ctx, send, send_cuts, recv_cuts, group):
        ctx.send_cuts, ctx.recv_cuts, ctx.group, ctx.numel = send_cuts, recv_cuts, group, send.numel()
        # One more entry, always 0, that the caller adds to its result: a rank that receives
        # nothing must still run this backward, which sends its peers their gradients.
        out = send.new_zeros(max((b for _, b in recv_cuts.values()), default=0) + 1)
        swap({p: send[a:b] for p, (a, b) in send_cuts.items()}, {p: out[a:b] for p, (a, b) in recv_cuts.items()},
             group, "fwd")
        return out

    @staticmethod
    def backward(ctx, g):
        g, out = g.contiguous(), g.new_zeros(ctx.numel)
        swap({p: g[a:b] for p, (a, b) in ctx.recv_cuts.items()}, {p: out[a:b] for p, (a, b) in ctx.send_cuts.items()},
             ctx.group, "bwd")
        return out, None, None, None


# --------------------------------------------------------------------------- summaries
def _partials(summaries, x: torch.Tensor, dh: DocHierarchy, plan: RowPlan, which: int) -> list[torch.Tensor]:
    """Partial ``z`` of the windows overlapping the rank's blocks, from ``x`` (1, Hx, (a1-a0)*m, d),
    its own tokens in place and zeros elsewhere: per level, (1, Hx, hi - lo, p, d)."""
    if not dh.n_levels:
        return []
    _, Hx, _, d = x.shape
    m, nb = dh.block_size, plan.a1 - plan.a0
    z = summaries.leaves(x.view(1, Hx, nb, m, d), dh.rank, which)  # (1, Hx, nb, p, d)
    lo, hi = plan.windows[0]
    leaf = dh.leaf_blocks(x.device)[lo:hi] - plan.a0
    z = z.index_select(2, leaf)
    out = [z]
    for l in range(1, dh.n_levels):
        (clo, chi), (lo, hi) = plan.windows[l - 1], plan.windows[l]
        kids = dh.children(l, x.device)[2 * lo:2 * hi]
        local = torch.where((kids >= clo) & (kids < chi), kids - clo, chi - clo)  # outside: the zero slot
        padded = torch.cat([z, z.new_zeros(1, Hx, 1, *z.shape[3:])], dim=2)
        z = summaries.parents(padded.index_select(2, local), hi - lo, which)
        out.append(z)
    return out


def global_cu_seqlens(doc_positions: torch.Tensor, group) -> torch.Tensor:
    """``cu_seqlens`` of the global rows from this rank's slice of each token's position in its
    document (the loader's ``doc_positions``, (B, C)): a document starts where the position is 0
    and at each row's start. One small all-gather of the ranks' document starts (O(documents)).
    (documents + 1,) int64 on the CPU, the same on every rank."""
    P, me = dist.get_world_size(group), dist.get_rank(group)
    B, C = doc_positions.shape
    n = P * C
    rows, cols = torch.nonzero(doc_positions.detach().cpu() == 0, as_tuple=True)
    mine = (rows * n + me * C + cols).tolist()
    everyone = [None] * P
    dist.all_gather_object(everyone, mine, group=group)
    starts = sorted(set().union(*everyone) | set(range(0, B * n, n)))
    return torch.tensor(starts + [B * n], dtype=torch.int64)


# --------------------------------------------------------------------------- the op
def sp_documents(q, k, v, docs: Documents, group, *, block_size: int, rank: int, causal: bool, weighted: bool,
                 scale: float, summaries, max_level: int | None, impl: str = "torch") -> torch.Tensor:
    """This rank's chunk of ``fma(..., cu_seqlens=...)`` over the rows the group holds: q (B, H, C, d),
    k, v (B, Hkv, C, d) -> (B, H, C, d); ``docs`` over the global rows (``docs.n == P * C``).
    nlogn, bottom-up summaries (the caller checks)."""
    P, me = dist.get_world_size(group), dist.get_rank(group)
    B, H, C, d = q.shape
    m = block_size
    rows = [rank_plans(rd, block_size, rank, causal, max_level, P) for rd in row_documents(docs)]
    for dh, _ in rows:
        if dh.n_levels:
            summaries.check(max(dh.parts, key=lambda h: h.n_levels))
    # This rank's queries on its layout blocks, and its partial summaries of the windows they touch.
    placed_q, partial, own = [], [], []  # own: each row's tokens of this rank, at their places from block a0
    for b, (dh, plans) in enumerate(rows):
        pl = plans[me]
        own.append(dh.token_index(q.device)[me * C:(me + 1) * C] - pl.a0 * m)
        qb, kb, vb = (x.new_zeros(1, x.shape[1], (pl.a1 - pl.a0) * m, d).index_copy(2, own[b], x[b:b + 1])
                      for x in (q, k, v))  # (1, heads, own blocks * m, d)
        placed_q.append(qb)
        partial.append([_partials(summaries, x, dh, pl, which) for which, x in enumerate((kb, vb))])
    got, recv_layout = _exchange(k, v, rows, partial, group)
    core, outs = select_core(impl, q), []
    for b, (dh, plans) in enumerate(rows):
        pl = plans[me]
        k_ext, v_ext, ks, vs = _assemble(k[b:b + 1], v[b:b + 1], dh, pl, partial[b], got,
                                         {peer: recv_layout[(peer, b)] for peer in range(P) if peer != me}, me, C)
        out, _ = core.apply(placed_q[b].contiguous(), k_ext.contiguous(), v_ext.contiguous(), ks.contiguous(),
                            vs.contiguous(), dh, weighted, scale, pl.a0)
        outs.append(out.index_select(2, own[b]))
    return torch.cat(outs) + got[-1]  # + 0: ties the exchange's backward to the result on every rank


def _exchange(k, v, rows, partial, group):
    """One exchange with every peer, for all rows: per peer and row, the halo keys and values it
    needs of this rank's tokens, then this rank's partials of the windows it needs, k's then v's.
    Returns what came back (flat, with a trailing 0: :class:`_Exchange`) and where each (peer,
    row)'s piece starts in it, with the token ranges and window ids it holds."""
    P, me = dist.get_world_size(group), dist.get_rank(group)
    Hkv, C, d = k.shape[1], k.shape[2], k.shape[3]
    per_token, per_window = Hkv * d, Hkv * rows[0][0].rank * d if rows else 0
    send_parts, send_cuts, recv_cuts, recv_layout, at_send, at_recv = [], {}, {}, {}, 0, 0
    for peer in range(P):
        if peer == me:
            continue
        start = at_send
        for b, (dh, plans) in enumerate(rows):
            tokens, wins = _sends(dh, plans, me, peer, C)
            for x in (k, v):
                for a, e in tokens:
                    send_parts.append(x[b:b + 1, :, a - me * C:e - me * C].transpose(1, 2).reshape(-1))
                    at_send += (e - a) * per_token
            for which in range(2):
                for l, ids in enumerate(wins, start=1):
                    if ids:
                        sel = _on_device(ids, k.device, shift=plans[me].windows[l - 1][0])
                        z = partial[b][which][l - 1].index_select(2, sel)  # (1, Hkv, windows, p, d)
                        send_parts.append(z.transpose(1, 2).reshape(-1))
                        at_send += len(ids) * per_window
        send_cuts[peer] = (start, at_send)
        start = at_recv
        for b, (dh, plans) in enumerate(rows):
            tokens, wins = _sends(dh, plans, peer, me, C)
            recv_layout[(peer, b)] = (at_recv, tokens, wins)
            at_recv += 2 * sum(e - a for a, e in tokens) * per_token + 2 * sum(map(len, wins)) * per_window
        recv_cuts[peer] = (start, at_recv)
    # k's empty slice keeps the exchange in k's graph when this rank sends nothing (its backward
    # must still run: it receives the gradients of what its peers sent).
    send = torch.cat(send_parts + [k.reshape(-1)[:0]])
    return _Exchange.apply(send, send_cuts, recv_cuts, group), recv_layout


def _on_device(ids: tuple[int, ...], device, shift: int = 0) -> torch.Tensor:
    """``ids - shift`` as an index tensor on ``device``, made once (a host-to-device copy per
    layer would wait for the stream on a GPU)."""
    return cached_on_device(("sp_documents", ids, shift, torch.device(device)),
                            lambda: (torch.tensor(ids, dtype=torch.long) - shift).to(device))


def _assemble(k, v, dh: DocHierarchy, pl: RowPlan, partial, got, pieces: dict, me: int, C: int):
    """One row's inputs to the core: the extended keys and values (1, Hkv, (e1 - e0) * m, d), this
    rank's tokens and the received halo at their places from block ``e0``, zeros elsewhere; and
    the summaries (1, Hkv, num_summaries, d), each needed window's partials summed (own and
    received). ``pieces[peer] = (start in got, token ranges, window ids per level)``."""
    Hkv, d, m, p = k.shape[1], k.shape[3], dh.block_size, dh.rank
    per_token, per_window = Hkv * d, Hkv * p * d
    base, tok_pos = pl.e0 * m, dh.token_index(k.device)
    ext_idx, ext = [tok_pos[me * C:(me + 1) * C] - base], [[k], [v]]
    zs = [[], []]
    for which in range(2):
        for l in range(1, dh.n_levels + 1):
            lo, hi = pl.windows[l - 1]
            full = k.new_zeros(1, Hkv, dh.windows[l - 1], p, d)
            zs[which].append(full.index_add(2, _on_device(tuple(range(lo, hi)), k.device), partial[which][l - 1])
                             if hi > lo else full)
    for at, tokens, wins in pieces.values():
        for which in range(2):
            for a, e in tokens:
                ext[which].append(got[at:at + (e - a) * per_token].view(1, e - a, Hkv, d).transpose(1, 2))
                if which == 0:
                    ext_idx.append(tok_pos[a:e] - base)
                at += (e - a) * per_token
        for which in range(2):
            for l, ids in enumerate(wins, start=1):
                if ids:
                    z = got[at:at + len(ids) * per_window].view(1, len(ids), Hkv, p, d).transpose(1, 2)
                    zs[which][l - 1] = zs[which][l - 1].index_add(2, _on_device(ids, k.device), z)
                    at += len(ids) * per_window
    idx, n_ext = torch.cat(ext_idx), (pl.e1 - pl.e0) * m
    k_ext, v_ext = (k.new_zeros(1, Hkv, n_ext, d).index_copy(2, idx, torch.cat(parts, dim=2)) for parts in ext)
    if not dh.n_levels:
        empty = k.new_zeros(1, Hkv, 0, d)
        return k_ext, v_ext, empty, empty
    return k_ext, v_ext, finish(zs[0], dh), finish(zs[1], dh)


def sp_documents_refined(q, k, v, docs: Documents, group, *, block_size: int, rank: int, causal: bool,
                         weighted: bool, scale: float, summaries, max_level: int | None, refine: int,
                         impl: str = "torch", level_offset=None, flat_top: bool = False,
                         select_reach=None) -> torch.Tensor:
    """This rank's chunk of ``fma(..., cu_seqlens=..., refine=K)`` (shapes as :func:`sp_documents`'s).

    As :func:`.sequence_parallel.sp_refined` does without documents: a query may open a block
    anywhere before it in its document, so the keys and values are all-gathered (the backward
    reduce-scatters their gradients) and each rank runs the one-device path on its layout
    blocks: the fine core, and the far field (:class:`.refine.FarField`) of its queries over
    the documents' own summaries, which every rank forms whole.
    """
    P, me = dist.get_world_size(group), dist.get_rank(group)
    B, H, C, d = q.shape
    m = block_size
    k_all, v_all = (_AllGather.apply(x, group).permute(1, 2, 0, 3, 4).reshape(B, x.shape[1], -1, d)
                    for x in (k, v))  # (B, Hkv, n, d)
    outs = []
    for b, rd in enumerate(row_documents(docs)):
        dh, plans = rank_plans(rd, block_size, rank, causal, max_level, P)
        if flat_top:  # the same layout and blocks per rank; the lists of the far field's hierarchy
            dh = doc_hierarchy(rd, block_size, rank, causal, max_level, flat_top)
        pl = plans[me]
        ka, va = (to_layout(x[b:b + 1], dh) for x in (k_all, v_all))  # (1, Hkv, n_layout, d)
        ks, vs = doc_summaries(summaries, ka, va, dh)
        pos = dh.token_index(q.device)[me * C:(me + 1) * C] - pl.a0 * m
        qb = q.new_zeros(1, H, (pl.a1 - pl.a0) * m, d).index_copy(2, pos, q[b:b + 1])
        out = refined_blocks(qb, ka, va, ks, vs, dh, pl.a0, refine=refine, weighted=weighted, scale=scale,
                             impl=impl, level_offset=level_offset, select_reach=select_reach)
        outs.append(out.index_select(2, pos))
    return torch.cat(outs)


__all__ = ["sp_documents", "sp_documents_refined", "global_cu_seqlens", "rank_plans", "row_documents"]
