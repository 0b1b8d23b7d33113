"""Adaptive refinement of the far field: the few far blocks that matter, at full resolution.

Plain multipole attention lets a query see a window of ``m * 2**(l-1)`` tokens only
through ``p`` summaries, so one relevant token far away is blurred into them. The
fast multipole method's answer is adaptive refinement: where a far interaction is
strong, descend the tree. ``refine = K`` does that per query (shared by the query
heads of one key/value head, as NSA shares its selection across a GQA group):

1. Every coarse window of the query's interaction list is a candidate, scored by a
   bound on its best key's score: per channel, the window's keys lie in a box
   ``centre +- radius`` (:func:`window_boxes`, as Quest bounds a page of keys), and no key
   in it scores above ``(q . centre + |q| . radius) * scale``; averaged over the group's
   query heads.
2. ``K`` times: take the best candidate and descend from it to a fine block, at each
   level keeping the better-scoring child and leaving its sibling as a candidate;
   the fine block reached is *opened*.
3. The query then attends, in one joint softmax, to its fine neighbours, to the
   tokens of its opened blocks, and to the summaries of every candidate still
   unopened (the interaction list's windows and the siblings left on the way down).

Why a bound and not the summaries: a summary is a (learned) average, and one key that
matches a query is diluted in it by the window's size, so summaries rank windows by their
bulk, not by their best key. Measured on a model trained with summary selection
(``bench/selection.py``, README "Adaptive refinement"): at the last query the summaries
ranked the needle's fine block about 87th of 126, its box first, at every level and
distance; rescored by boxes, recall within the training length went from chance to 1.00.
The bound is monotone (a window's is at least each child's), so windows of every size are
compared on one scale: a large window wins only if its box could hold a better key than
the smaller ones'. The learned summaries are still what the unopened windows are attended
through.

So the sequence stays partitioned exactly (every key counts once, itself or inside
one summary), ``K = 0`` is plain multipole attention and ``K >= n_blocks`` is exact
softmax attention; every candidate of a causal query lies before its own window,
so nothing after it is seen. The selection is discrete (no gradient); scores,
keys, values and the summaries that stay get gradients as usual.

The design page states the rule as "open the best window into its two children until
``K`` fine blocks are open"; descending straight to a fine block from the best window
makes the work per query fixed, ``K * (L - 1)`` two-window steps, where the open-ended
rule can split windows without reaching a block.

Cost per query: selection ``O(L + K L)`` box scores (two products of ``d`` numbers each),
attention ``O(m + p L + K (m + p L))`` keys (``L ~ log2(n/m)`` levels): causal, ``2m + K m +
(2L + K (L - 1)) p`` scores. At ``m = 64``, ``p = 2``, per query head (:func:`keys_per_query`):

    n     levels   K=0   K=2   K=4   K=8   full attention
    16k      7     156   308   460   764        16,384
    128k    10     168   332   496   824       131,072
    1M      13     180   356   532   884     1,048,576

Implementation here: the selection runs vectorised over chunks of queries, and the
far field (opened blocks plus candidates) is one autograd function, :class:`FarField`,
that keeps only ``(out, lse)`` and recomputes its scores in the backward, so memory
beyond inputs and outputs is one chunk. The opened blocks are attended by block, not by
query (:class:`OpenedTiles`: the queries that opened a block, in tiles, against it as
matrix products; in Triton kernels where the core runs in Triton, :func:`use_kernels`); the
candidates' summaries are read per fine block of queries (:class:`SummaryColumns`: the union of
what its queries read, gathered once, as the columns of matrix products). The two are separate
softmaxes merged by their log-sum-exp, as the fine neighbours are merged with the far field. The fine neighbours
come from the core (``block_attention(fine_only=True)``), merged by their log-sum-exp.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .hierarchy import Hierarchy, all_summary_counts, cached_on_device
from .rope import rotate
from .torch_core import Scratch, acc_dtype

# Elements of the largest per-chunk gather (queries x keys x head_dim, 32 MB in fp32): bounds the
# scratch memory of selection and of the far field whatever n.
CHUNK_ELEMENTS = 1 << 23


def keys_per_query(h: Hierarchy, refine: int) -> int:
    """Scores one query head computes with ``refine`` opened blocks, at most: fine neighbours,
    opened blocks' tokens, and the candidates' summaries (causal: two windows per level)."""
    fine = len(h.fine_blocks()) * h.block_size
    return fine + refine * h.block_size + num_candidates(h, refine) * h.rank


def num_candidates(h: Hierarchy, refine: int) -> int:
    """Candidate slots per query: the interaction list's windows plus one sibling per descent step."""
    return sum(h.list_width(l) for l in range(1, h.n_levels + 1)) + refine * max(h.n_levels - 1, 0)


class Tables(NamedTuple):
    """What refinement reads of a hierarchy (:func:`_tables`)."""

    has: torch.Tensor  # (T,) bool: each summary has real tokens
    logc: torch.Tensor  # (T,) float64: their log counts (the weighted scores' bias)
    offsets: torch.Tensor  # (L + 1,): level l's first summary at offsets[l]
    windows: torch.Tensor  # (L + 1,): level l's window count at windows[l]
    lv: torch.Tensor  # (n_blocks, W0): each block's interaction list, as levels ...
    win: torch.Tensor  # ... and windows (-1: none)
    kids: torch.Tensor  # (windows of all levels, 2): each window's children on the level below
    kid_base: torch.Tensor  # (L + 1,): level l's first row of ``kids``
    leaf: torch.Tensor  # (windows[1],): each level-1 window's fine block
    ends: torch.Tensor  # (n_blocks,): the first position past each block's sequence (or document)
    starts: torch.Tensor  # (windows of all levels,): each window's first position, rows as ``kids``
    centres: torch.Tensor  # (T,): each summary's window's centre (first position plus half its nominal length)


class SelectionReach(NamedTuple):
    """``fma(select_reach=...)``: the farthest distance refinement's selection scores at.

    A window whose centre lies more than ``distance`` tokens before (or after) the query is
    scored as if it were ``distance`` away: its keys rotated by RoPE (``inv_freq``, the layer's
    (head_dim/2,) frequencies) as far forward (back) as it lies beyond (the query rotated back
    instead, which bounds the same scores). Past a model's
    training length, plain scores of far windows drift with distances it never saw and win the
    selection whatever their content; so clamped, windows are compared by content (measured:
    ``bench/recall.py``, README "Adaptive refinement"). A ``distance`` at least the sequence's
    length changes nothing.

    ``attend``: the far field's attention too (as ReRoPE clamps distances): an opened block
    lying beyond is attended with the query rotated back as far as the block's centre lies
    beyond (its tokens keep their distances to each other), and a candidate's summaries with
    their keys rotated forward as far as its window's centre lies beyond. The fine neighbours
    read real positions. False: the attention reads the real positions.
    """

    distance: int
    inv_freq: torch.Tensor
    attend: bool = False


@functools.lru_cache(maxsize=256)
def _tables_cpu(h: Hierarchy) -> Tables:
    counts = all_summary_counts(h)
    has = counts > 0
    logc = torch.where(has, counts.clamp(min=1).double().log(), 0.0)
    offsets = torch.tensor((0,) + h.offsets, dtype=torch.long)  # level l at offsets[l]
    windows = torch.tensor((0,) + h.windows, dtype=torch.long)
    widths = torch.tensor([h.list_width(l) for l in range(1, h.n_levels + 1)], dtype=torch.long)
    blocks = torch.arange(h.n_blocks)
    lv = torch.arange(1, h.n_levels + 1).repeat_interleave(widths).expand(h.n_blocks, -1).contiguous()
    if isinstance(h, Hierarchy):
        win = torch.cat([h.window_lists(l)[blocks >> (l - 1)] for l in range(1, h.n_levels + 1)], dim=1)
        # window c's children are 2c and 2c+1 (past the level's end: none, as _summary_slots finds)
        kids = torch.cat([torch.arange(nw).unsqueeze(1) * 2 + torch.tensor([0, 1]) for nw in h.windows]) \
            if h.n_levels else torch.zeros(0, 2, dtype=torch.long)
        leaf, ends = blocks, torch.full((h.n_blocks,), h.n, dtype=torch.long)
        starts = torch.cat([torch.arange(nw) * h.window_size(l) for l, nw in enumerate(h.windows, 1)]) \
            if h.n_levels else torch.zeros(0, dtype=torch.long)
    else:  # packed documents (.documents.DocHierarchy): their own lists, children, blocks and ends
        win, kids, leaf, ends = h.refine_tables_cpu()
        starts = h.window_starts_cpu()
    kid_base = torch.cumsum(torch.tensor((0, 0) + h.windows[:-1], dtype=torch.long), 0)[:h.n_levels + 1] \
        if h.n_levels else torch.zeros(1, dtype=torch.long)
    half = torch.cat([torch.full((nw,), (h.block_size << l) // 2, dtype=torch.long)
                      for l, nw in enumerate(h.windows)]) if h.n_levels else torch.zeros(0, dtype=torch.long)
    centres = (starts + half).repeat_interleave(h.rank)  # summaries lie as windows do, p a window
    return Tables(has, logc, offsets, windows, lv, win, kids, kid_base, leaf, ends, starts,
                  centres)


def _tables(h: Hierarchy, device) -> Tables:
    """:func:`_tables_cpu` on ``device`` (cached per device, as the block tables)."""
    return cached_on_device(("refine", h, torch.device(device)), lambda: Tables(*(t.to(device) for t in _tables_cpu(h))))


def _flat_gather(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, Hkv, T, r), idx (B, Hkv, *s) in [0, T) -> (B, Hkv, *s, r), one index_select of rows
    (into ``out``, a reused buffer, where given: fresh megabyte buffers cost their page faults)."""
    B, Hkv, T, d = x.shape
    base = (torch.arange(B * Hkv, device=x.device) * T).view(B, Hkv, *([1] * (idx.dim() - 2)))
    flat = (idx + base).reshape(-1)
    if out is None:
        return x.reshape(-1, d).index_select(0, flat).view(*idx.shape, d)
    return torch.index_select(x.reshape(-1, d), 0, flat, out=out.view(-1, d)).view(*idx.shape, d)


def _summary_slots(h: Hierarchy, tabs, lv: torch.Tensor, win: torch.Tensor):
    """Candidates (level, window), any shape ``s`` -> their summaries' indices (s, p), clamped to
    a real slot, and whether each summary exists (window in range, real tokens)."""
    has, offsets, windows = tabs.has, tabs.offsets, tabs.windows
    lvc = lv.clamp(min=0)
    ok_win = (win >= 0) & (lv >= 1) & (win < windows[lvc])
    idx = (offsets[lvc] + win.clamp(min=0) * h.rank).unsqueeze(-1) + torch.arange(h.rank, device=lv.device)
    idx = idx.clamp(max=max(h.num_summaries - 1, 0))
    return idx, ok_win.unsqueeze(-1) & has[idx]


class WindowBoxes(NamedTuple):
    """Refinement's selection keys (:func:`window_boxes`): each window's keys bounded per channel by a
    box ``centre +- radius``, (B, Hkv, R, d) each, a row per window of every level as ``Tables.kids``
    lays them out (window ``w`` of level ``l`` at ``kid_base[l] + w``); zeros for a window without keys."""

    centre: torch.Tensor
    radius: torch.Tensor


@torch.no_grad()
def window_boxes(k: torch.Tensor, h: Hierarchy, limit=None) -> WindowBoxes:
    """k (B, Hkv, n, d), laid out as ``h`` -> the box of every window's keys (:class:`WindowBoxes`).

    Keys at positions from ``limit`` on (an int, or per block (n_blocks,); default the sequence's
    end, or each block's document's) are no window's. Built bottom-up in O(n d): a fine block's box
    from its keys, a window's from its two children's.
    """
    tabs = _tables(h, k.device)
    B, Hkv, n, d = k.shape
    m, L = h.block_size, h.n_levels
    if not L:
        empty = k.new_zeros(B, Hkv, 0, d)
        return WindowBoxes(empty, empty)
    limit = _key_limit(h, k) if limit is None else limit
    x = F.pad(k, (0, 0, 0, h.padded_len - n)).view(B, Hkv, h.n_blocks, m, d)
    pos = torch.arange(h.n_blocks * m, device=k.device).view(h.n_blocks, m)
    real = (pos < (limit if isinstance(limit, int) else limit.unsqueeze(-1))).unsqueeze(-1)  # (n_blocks, m, 1)
    hi = x.masked_fill(~real, -math.inf).amax(3).index_select(2, tabs.leaf)  # (B, Hkv, windows_1, d)
    lo = x.masked_fill(~real, math.inf).amin(3).index_select(2, tabs.leaf)
    his, los = [hi], [lo]
    for l in range(2, L + 1):
        nw, below = h.windows[l - 1], h.windows[l - 2]
        kids = tabs.kids[tabs.kid_base[l]:tabs.kid_base[l] + nw].clamp(max=below).reshape(-1)  # past: the empty row
        hi = torch.cat([hi, hi.new_full((B, Hkv, 1, d), -math.inf)], 2).index_select(2, kids)
        lo = torch.cat([lo, lo.new_full((B, Hkv, 1, d), math.inf)], 2).index_select(2, kids)
        hi, lo = hi.view(B, Hkv, nw, 2, d).amax(3), lo.view(B, Hkv, nw, 2, d).amin(3)
        his.append(hi)
        los.append(lo)
    # Bounds of half keys are exact; their centre and radius are formed in float32 at least, so the
    # boxes (and the selection) are the same from half blocks as from their float32 copy.
    hi, lo = (torch.cat(x, 2).to(torch.promote_types(k.dtype, torch.float32)) for x in (his, los))
    empty = hi < lo  # no key: -inf < inf
    return WindowBoxes(torch.where(empty, 0.0, (hi + lo) / 2), torch.where(empty, 0.0, (hi - lo) / 2))


class _BoxQuery(NamedTuple):
    """What :func:`_window_scores` reads of a chunk's queries and the boxes: without a reach the
    bound averaged over the group is linear in the group's mean query and mean ``|query|``, so
    those two (B, Hkv, nq, 2d) meet each window's centre and radius side by side (B, Hkv, R, 2d):
    one gathered row and one dot product a window, whatever the group's size."""

    qg: torch.Tensor  # (B, Hkv, nq, G, d)
    boxes: WindowBoxes
    mean: torch.Tensor | None  # (B, Hkv, nq, 2d), without a reach
    rows: torch.Tensor | None  # (B, Hkv, R, 2d), without a reach


def _box_query(qg: torch.Tensor, boxes: WindowBoxes, reach: SelectionReach | None) -> _BoxQuery:
    if reach is not None:  # turned per window: |q| of each head's turned query
        return _BoxQuery(qg, boxes, None, None)
    return _BoxQuery(qg, boxes, torch.cat([qg.mean(3), qg.abs().mean(3)], -1), torch.cat(boxes, -1))


def _window_scores(bq: _BoxQuery, h: Hierarchy, tabs, lv, win, scale: float,
                   reach: SelectionReach | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Queries (:func:`_box_query`); candidates lv, win (B, Hkv, nq, X) -> scores (B, Hkv, nq, X):
    for each query head, the bound ``q . centre + |q| . radius`` on the best score of a key in the
    window's box, times ``scale``, averaged over the group; -inf where the window does not exist
    or has no key. ``reach``: windows whose centre lies farther than its distance from the queries
    (at positions ``pos`` (nq,)) scored as if that far (the query turned back, which turns the keys
    forward)."""
    _, has = _summary_slots(h, tabs, lv, win)  # (B, Hkv, nq, X, p)
    lvc = lv.clamp(min=1)
    row = (tabs.kid_base[lvc] + win.clamp(min=0)).clamp(max=max(bq.boxes.centre.shape[2] - 1, 0))
    if reach is None:
        s = (bq.mean.unsqueeze(-2) @ _flat_gather(bq.rows, row).transpose(-1, -2)).squeeze(-2)  # (B, Hkv, nq, X)
    else:
        c, r = (_flat_gather(x, row) for x in bq.boxes)  # (B, Hkv, nq, X, d)
        # A window within the reach turns by 0 (exactly itself); no test for it, which would sync the device.
        shift = _beyond_reach(h, tabs, lv, win, reach.distance, pos)  # (B, Hkv, nq, X)
        qr = rotate(bq.qg.unsqueeze(3), -shift.unsqueeze(-1), reach.inv_freq)  # (B, Hkv, nq, X, G, d)
        s = ((qr * c.unsqueeze(-2)).sum(-1) + (qr.abs() * r.unsqueeze(-2)).sum(-1)).mean(-1)
    return (s * scale).masked_fill(~has.any(-1), -math.inf)


def _block_beyond(h: Hierarchy, opened: torch.Tensor, distance: int, pos: torch.Tensor) -> torch.Tensor:
    """Opened blocks (B, Hkv, nq, K) of queries at ``pos`` (nq,) -> (B, Hkv, nq, K) int64: how far each
    block's centre lies beyond ``distance`` (:func:`_beyond_reach` of its level-1 window); 0 for no block."""
    dist = pos.view(1, 1, -1, 1) - (opened.clamp(min=0) * h.block_size + h.block_size // 2)
    return torch.where(opened >= 0, _beyond(dist, distance), 0)


def _beyond_reach(h: Hierarchy, tabs, lv, win, distance: int, pos: torch.Tensor) -> torch.Tensor:
    """Candidates lv, win (B, Hkv, nq, X) of queries at ``pos`` (nq,) -> (B, Hkv, nq, X) int64: how far
    each window's centre (its first position plus half its nominal length, rounded down) lies beyond
    ``distance`` from its query (negative after a query: bidirectional), 0 within it."""
    lvc = lv.clamp(min=1)
    row = (tabs.kid_base[lvc] + win.clamp(min=0)).clamp(max=max(tabs.starts.numel() - 1, 0))  # none: masked anyway
    centre = tabs.starts[row] + (h.block_size << (lvc - 1)) // 2
    return _beyond(pos.view(1, 1, -1, 1) - centre, distance)


def _beyond(dist: torch.Tensor, distance: int) -> torch.Tensor:
    """Signed distances -> how far each lies beyond ``distance`` (negative after a query), 0 within."""
    return dist - dist.clamp(min=-distance, max=distance)


@torch.no_grad()
def select(q: torch.Tensor, boxes: WindowBoxes, h: Hierarchy, refine: int, scale: float, i0: int = 0,
           reach: SelectionReach | None = None):
    """The refinement of queries ``[i0, i0 + nq)`` (q: (B, H, nq, d); ``boxes``: :func:`window_boxes`).

    Returns ``opened`` (B, Hkv, nq, refine): the fine blocks opened, -1 where none was left to
    open; ``lv, win`` (B, Hkv, nq, C): the candidates left unopened as (level, window),
    ``win = -1`` in unused slots (C = :func:`num_candidates`). ``reach``: see :class:`SelectionReach`.
    """
    B, H, nq, d = q.shape
    Hkv, G, L = boxes.centre.shape[1], H // boxes.centre.shape[1], h.n_levels
    tabs = _tables(h, q.device)
    qg = q.view(B, Hkv, G, nq, d).transpose(2, 3).to(boxes.centre.dtype)  # (B, Hkv, nq, G, d)
    blk = torch.arange(i0, i0 + nq, device=q.device) // h.block_size
    lv0, win0 = tabs.lv[blk], tabs.win[blk]  # (nq, W0)
    W0, C = lv0.shape[1], num_candidates(h, refine)
    lv = torch.zeros(B, Hkv, nq, C, dtype=torch.long, device=q.device)
    win = torch.full((B, Hkv, nq, C), -1, dtype=torch.long, device=q.device)
    lv[..., :W0], win[..., :W0] = lv0, win0
    score = torch.full((B, Hkv, nq, C), -math.inf, dtype=boxes.centre.dtype, device=q.device)
    pos = torch.arange(i0, i0 + nq, device=q.device)
    bq = _box_query(qg, boxes, reach)
    score[..., :W0] = _window_scores(bq, h, tabs, lv[..., :W0], win[..., :W0], scale, reach, pos)
    opened = torch.full((B, Hkv, nq, refine), -1, dtype=torch.long, device=q.device)
    for t in range(refine):
        best = score.argmax(-1, keepdim=True)  # (B, Hkv, nq, 1)
        ok = score.gather(-1, best) > -math.inf
        cur_l, cur_w = lv.gather(-1, best), win.gather(-1, best)
        score.scatter_(-1, best, -math.inf)  # taken: no longer a candidate
        for s in range(L - 1):
            split = ok & (cur_l > 1)
            if not bool(split.any()):
                break
            kids = tabs.kids[tabs.kid_base[cur_l.clamp(max=L)] + cur_w.clamp(min=0)].squeeze(-2)  # (B, Hkv, nq, 2)
            kid_l = (cur_l - 1).clamp(min=1).expand(-1, -1, -1, 2)
            kid_score = _window_scores(bq, h, tabs, kid_l, kids, scale, reach, pos)
            right = kid_score[..., 1:] > kid_score[..., :1]  # ties keep the left child
            keep = torch.where(right, kids[..., 1:], kids[..., :1])
            slot = W0 + t * (L - 1) + s
            lv[..., slot:slot + 1] = kid_l[..., :1]
            win[..., slot:slot + 1] = torch.where(split, torch.where(right, kids[..., :1], kids[..., 1:]), -1)
            sibling = torch.where(right, kid_score[..., :1], kid_score[..., 1:])
            score[..., slot:slot + 1] = torch.where(split, sibling, -math.inf)
            cur_w = torch.where(split, keep, cur_w)
            cur_l = torch.where(split, cur_l - 1, cur_l)
        opened[..., t:t + 1] = torch.where(ok, tabs.leaf[cur_w.clamp(min=0)], -1)  # the level-1 window's block
    win = torch.where(score > -math.inf, win, -1)  # siblings without tokens are no candidates
    return opened, lv, win


def _far_inputs(q, off, h: Hierarchy, tabs, lv, win, weighted: bool, acc):
    """One chunk's candidates (the opened blocks are :class:`OpenedTiles`' part).

    Returns qg (B, Hkv, nq, G, d); the candidates' summaries (B, Hkv, nq, C*p), clamped to a
    real slot; whether each exists (B, Hkv, nq, C*p); their score bias (B, Hkv, nq, G or 1, C*p),
    -inf where masked; and each summary slot's level.
    """
    B, H, nq, d = q.shape
    Hkv = lv.shape[1]
    G = H // Hkv
    qg = q.view(B, Hkv, G, nq, d).transpose(2, 3).to(acc).contiguous()
    sidx, s_ok = _summary_slots(h, tabs, lv, win)  # (B, Hkv, nq, C, p)
    s_ok = s_ok & (win >= 0).unsqueeze(-1)
    logc = tabs.logc[sidx] if weighted else torch.zeros((), dtype=torch.float64, device=q.device)
    bias = torch.where(s_ok, logc, -math.inf).flatten(-2).to(acc).unsqueeze(3)  # (B, Hkv, nq, 1, C*p)
    slv = lv.unsqueeze(-1).expand(sidx.shape).flatten(-2)  # level of each summary slot
    if off is not None:  # (H, L) per-head level offsets on the summaries' scores
        offg = off.to(acc).reshape(Hkv, G, -1).transpose(1, 2)  # (Hkv, L, G)
        head = torch.arange(Hkv, device=q.device).view(1, Hkv, 1, 1)
        bias = bias + offg[head, (slv - 1).clamp(min=0)].transpose(-1, -2)  # (B, Hkv, nq, G, C*p)
    return qg, sidx.flatten(-2), s_ok.flatten(-2), bias, slv


def _block_dtype(q: torch.Tensor, acc, kernels: bool, reach) -> torch.dtype:
    """The dtype the far field holds the keys' and values' blocks in: the inputs' own where only the
    Triton kernels read them (they multiply in it anyway: half the bytes, and registers for two
    programs per SM), else the accumulation dtype."""
    only_kernels = kernels and (reach is None or not reach.attend)  # (reach.attend: the PyTorch tiles)
    return q.dtype if only_kernels and q.dtype in (torch.float16, torch.bfloat16) else acc


def _blocks(x: torch.Tensor, h: Hierarchy, acc) -> torch.Tensor:
    """Keys or values (B, Hkv, n, d) -> whole fine blocks as rows (B, Hkv, n_blocks, m*d), zero-padded,
    so that an opened block is gathered as one row."""
    B, Hkv, n, d = x.shape
    return F.pad(x.to(acc), (0, 0, 0, h.padded_len - n)).reshape(B, Hkv, h.n_blocks, h.block_size * d)


# Query rows (query heads of a group included) of one tile: enough for a matrix product to pay off.
TILE_ROWS = 64


class OpenedTiles:
    """A chunk's (query, opened block) pairs regrouped by block, in tiles of ``T`` queries.

    Each query opens its own ``K`` blocks, so gathering every query's blocks moves ``K m d``
    numbers a query and leaves rank-one products. Regrouped by block (as MoBA regroups the
    queries that chose a block), a tile's queries share one block: its scores, values and
    gradients are matrix products ``(T G, d) x (d, m)``, and a query moves ``K d`` numbers.
    Tiles of one block are consecutive; the last tile of a block is padded with zero rows.

    opened: (B, Hkv, nq, K), a fine block per slot or -1; ``n_blocks`` blocks per head; ``G``
    query heads share a slot's block.
    """

    def __init__(self, opened: torch.Tensor, n_blocks: int, G: int):
        B, Hkv, nq, K = opened.shape
        dev = opened.device
        self.shape, self.G = (B, Hkv, nq, K), G
        head = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1) * n_blocks
        flat = torch.where(opened >= 0, opened + head, -1).reshape(-1)  # a global block per pair
        pair = torch.nonzero(flat >= 0).squeeze(1)
        blk, order = torch.sort(flat[pair], stable=True)
        pair = pair[order]  # pairs ordered by block
        counts = torch.bincount(blk, minlength=B * Hkv * n_blocks)
        used = max(int((counts > 0).sum()), 1)
        # tile height: the mean number of queries per opened block, in powers of two, at most a tile's rows
        self.T = T = min(max(TILE_ROWS // G, 1), 1 << max(pair.numel() // used, 1).bit_length() - 1)
        tiles = (counts + T - 1) // T
        self.block = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), tiles)  # (n_tiles,)
        first_pair = torch.cumsum(counts, 0) - counts
        first_row = (torch.cumsum(tiles, 0) - tiles) * T
        self.row = first_row[blk] + torch.arange(pair.numel(), device=dev) - first_pair[blk]  # pair -> tile row
        self.query, self.slot = pair // K, pair % K  # pair -> (flattened query, slot)
        self.n_tiles = int(self.block.numel())

    def _empty(self, c: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(self.n_tiles * self.T, self.G, c)

    def of_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Per query x (B, Hkv, nq, G, c) -> each pair's copy in its tile: (n_tiles, T*G, c)."""
        out = self._empty(x.shape[-1], x)
        out[self.row] = x.reshape(-1, self.G, x.shape[-1])[self.query]
        return out.view(self.n_tiles, self.T * self.G, x.shape[-1])

    def of_pairs(self, x: torch.Tensor) -> torch.Tensor:
        """Per pair x (B, Hkv, nq, G, K*c), slot-major in the last dim -> (n_tiles, T*G, c)."""
        B, Hkv, nq, K = self.shape
        c = x.shape[-1] // K
        out = self._empty(c, x)
        out[self.row] = x.reshape(-1, self.G, K, c)[self.query, :, self.slot]
        return out.view(self.n_tiles, self.T * self.G, c)

    def to_pairs(self, y: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Inverse of :meth:`of_pairs`: (n_tiles, T*G, c) -> (B, Hkv, nq, G, K*c), ``fill`` in slots
        with no block."""
        B, Hkv, nq, K = self.shape
        c = y.shape[-1]
        out = y.new_full((B * Hkv * nq, self.G, K, c), fill)
        out[self.query, :, self.slot] = y.reshape(-1, self.G, c)[self.row]
        return out.view(B, Hkv, nq, self.G, K * c)

    def to_queries(self, y: torch.Tensor) -> torch.Tensor:
        """(n_tiles, T*G, c) summed over each query's pairs -> (B, Hkv, nq, G, c)."""
        B, Hkv, nq, K = self.shape
        c = y.shape[-1]
        out = y.new_zeros(B * Hkv * nq, K, self.G, c)
        out[self.query, self.slot] = y.reshape(-1, self.G, c)[self.row]
        return out.sum(1).view(B, Hkv, nq, self.G, c)  # a fixed order: deterministic

    def _kernel_args(self):
        """The tiles as the Triton kernels read them: each tile row's query (-1: padding), each
        tile's block, int32."""
        rowq = torch.full((self.n_tiles * self.T,), -1, dtype=torch.int32, device=self.block.device)
        rowq[self.row] = self.query.to(torch.int32)
        return rowq, self.block.to(torch.int32)

    def turns(self, shift: torch.Tensor, inv_freq: torch.Tensor):
        """Per pair shifts (B, Hkv, nq, K) (:func:`_block_beyond`) -> what :meth:`attend` and
        :meth:`grads` take as ``turn``: each tile row's (n_tiles, T*G), and the frequencies."""
        K = self.shape[3]
        rows = shift.new_zeros(self.n_tiles * self.T)
        rows[self.row] = shift.reshape(-1)[self.query * K + self.slot]
        return rows.view(self.n_tiles, self.T).repeat_interleave(self.G, dim=1), inv_freq

    def _tile_queries(self, qg, turn):
        """Each pair's query in its tile (n_tiles, T*G, d), rotated back by its block's shift with ``turn``."""
        qt = self.of_queries(qg)
        return qt if turn is None else rotate(qt, -turn[0], turn[1])

    def attend(self, qg, kb, vb, n: int, scale: float, kernels: bool = False, inputs=None, turn=None):
        """Each pair's softmax over its block's tokens (those before ``n``): out (n_tiles, T*G, d)
        and lse (n_tiles, T*G), per tile row. qg (B, Hkv, nq, G, d); kb, vb block rows.
        ``kernels``: by the Triton kernels (:func:`.kernels.function.opened_forward`), their
        products in ``inputs``, the attention inputs' dtype. ``turn``: :meth:`turns` (PyTorch only)."""
        d = qg.shape[-1]
        if kernels and turn is None:
            from .kernels.function import opened_forward
            return opened_forward(qg, kb, vb, *self._kernel_args(), n, self.T, scale, inputs or qg.dtype)
        qt, kt, vt = self._tile_queries(qg, turn), self.blocks(kb, d), self.blocks(vb, d)
        s = torch.baddbmm(self._key_bias(kb, n, d), qt, kt.transpose(-1, -2), alpha=scale)  # (tiles, T*G, m)
        lse = torch.logsumexp(s, dim=-1)
        return torch.exp(s - lse.unsqueeze(-1)) @ vt, lse

    def grads(self, qg, do, lse, delta, kb, vb, n: int, scale: float, kernels: bool = False, inputs=None,
              turn=None):
        """The pairs' share of the gradients, given each query's final ``lse`` and ``delta`` (B, Hkv,
        nq, G, 1): dq per tile row (n_tiles, T*G, d), dk and dv per tile (n_tiles, m, d)."""
        d = qg.shape[-1]
        if kernels and turn is None:
            from .kernels.function import opened_backward
            return opened_backward(qg, do, lse, delta, kb, vb, *self._kernel_args(), n, self.T, scale,
                                   inputs or qg.dtype)
        qt, dot, kt, vt = self._tile_queries(qg, turn), self.of_queries(do), self.blocks(kb, d), self.blocks(vb, d)
        s = torch.baddbmm(self._key_bias(kb, n, d), qt, kt.transpose(-1, -2), alpha=scale)
        p = torch.exp(s - self.of_queries(lse))  # padding rows: lse 0, do 0, so no share
        ds = p * (dot @ vt.transpose(-1, -2) - self.of_queries(delta)) * scale
        dq = ds @ kt  # to the turned query: turned forward again, to the query
        dq = dq if turn is None else rotate(dq, turn[0], turn[1])
        return dq, ds.transpose(-1, -2) @ qt, p.transpose(-1, -2) @ dot

    def _key_bias(self, kb: torch.Tensor, n, d: int) -> torch.Tensor:
        """(n_tiles, 1, m): 0 for a tile's block's tokens before ``n``, -inf after (the last block).
        ``n``: the sequence's length, or each block's end (n_blocks,) (packed documents)."""
        m = kb.shape[-1] // d
        block = self.block % kb.shape[2]
        end = n if isinstance(n, int) else n[block].unsqueeze(-1)
        pos = block.unsqueeze(-1) * m + torch.arange(m, device=kb.device)
        return torch.where(pos < end, 0.0, -math.inf).to(kb.dtype).unsqueeze(1)

    def blocks(self, xb: torch.Tensor, d: int) -> torch.Tensor:
        """Block rows xb (B, Hkv, n_blocks, m*d) -> each tile's block (n_tiles, m, d)."""
        return xb.reshape(-1, xb.shape[-1])[self.block].view(self.n_tiles, xb.shape[-1] // d, d)

    def add_to_blocks(self, dxb: torch.Tensor, y: torch.Tensor) -> None:
        """dxb (B, Hkv, n_blocks, m*d) += each tile's y (n_tiles, m, d) at its block."""
        dxb.view(-1, dxb.shape[-1]).index_add_(0, self.block, y.reshape(self.n_tiles, dxb.shape[-1]))


class SummaryColumns:
    """A chunk's candidate summaries as the columns of matrix products, per group of queries.

    Each query reads its own ``S`` candidates' summaries (:func:`_far_inputs`). Gathered per
    query, they move ``S d`` numbers a query and leave products of one row against ``S``: memory
    bound, and most of a refined step on CPU (measured: 2.5x slower at 8k than this). The queries
    of one fine block share their interaction list and differ only in what refinement opened, so
    the ``U`` summaries any of a group's ``g`` queries reads (a few hundred) are gathered once, and
    every score, weighted sum and gradient is a matrix product ``(g G, d) x (d, U)``. A query's own
    slots are read from and written to its row at their column (``local``); a slot that does not
    exist points at a spare last column (row 0 of the table), read as anything (its bias is -inf)
    and written as 0.

    rows: (B, Hkv, nq, S) each slot's row of the table it reads (``n_rows`` rows); ok: (B, Hkv, nq,
    S), whether the slot exists; ``group`` queries a group (the last group padded). ``by_sort``:
    find each group's rows by sorting its slots rather than in a table of every (group, row);
    default: whichever is cheaper.
    """

    def __init__(self, rows: torch.Tensor, ok: torch.Tensor, n_rows: int, group: int, by_sort: bool | None = None):
        B, Hkv, nq, S = rows.shape
        dev = rows.device
        self.shape, self.g = (B, Hkv, nq, S), min(group, nq)
        self.nb = nb = -(-nq // self.g)  # groups a head
        grp = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1, 1) * nb + torch.arange(nq, device=dev).view(nq, 1) // self.g
        if by_sort is None:  # a table of every (group, row) is faster than a sort, but grows as n^2 / (m g)
            by_sort = B * Hkv * nb * n_rows > 4 * rows.numel()
        if not by_sort:
            seen = torch.zeros(B * Hkv * nb, n_rows + 1, dtype=torch.int32, device=dev)  # + the slots that do not exist
            seen[grp.expand_as(rows), torch.where(ok, rows, n_rows)] = 1
            seen = seen[:, :n_rows]
            at = torch.cumsum(seen, 1) - 1  # (groups, rows): the column of each row its group reads
            owner, row = torch.nonzero(seen, as_tuple=True)
            col, counts = at[owner, row], seen.sum(1)
            slot_col = at[grp.expand_as(rows), rows]
        else:  # long sequences: the group's slots sorted
            key, where = torch.unique(torch.where(ok, grp * n_rows + rows, -1), return_inverse=True)
            drop = int(key.numel() > 0 and bool(key[0] < 0))  # the slots that do not exist
            key, where = key[drop:], where - drop
            owner, row = key // n_rows, key % n_rows
            counts = torch.bincount(owner, minlength=B * Hkv * nb)
            col = torch.arange(key.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[owner]
            slot_col = col[where.clamp(min=0)] if key.numel() else where
        # columns a group: the widest group's and the spare; padding columns read row 0, with weight 0
        self.U = U = (int(counts.max()) if counts.numel() else 0) + 1
        cols = torch.zeros(B * Hkv * nb, U, dtype=torch.long, device=dev)
        cols[owner, col] = row
        self.cols = cols.view(B, Hkv, nb, U)  # each column's row
        self.local = torch.where(ok, slot_col, U - 1)

    def table(self, x: torch.Tensor, modulo: int | None = None) -> torch.Tensor:
        """Each group's columns of x (B, Hkv, R, d) (at their row ``% modulo`` where given): (B*Hkv*nb, U, d)."""
        cols = self.cols if modulo is None else self.cols % modulo
        return _flat_gather(x, cols).view(-1, self.U, x.shape[-1])

    def _group_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per query (B, Hkv, nq, G, c) -> per group (B*Hkv*nb, g*G, c), the last group padded with zeros."""
        B, Hkv, nq, G, c = x.shape
        pad = self.nb * self.g - nq
        return (F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).reshape(-1, self.g * G, c)

    def _per_query(self, y: torch.Tensor, G: int) -> torch.Tensor:
        """Inverse of :meth:`_group_rows`: (B*Hkv*nb, g*G, c) -> (B, Hkv, nq, G, c)."""
        B, Hkv, nq, _ = self.shape
        return y.view(B, Hkv, self.nb * self.g, G, -1)[:, :, :nq]

    def _slots(self, G: int) -> torch.Tensor:
        return self.local.unsqueeze(-2).expand(*self.shape[:3], G, self.shape[3])  # (B, Hkv, nq, G, S)

    def scores(self, x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """``x . tab[slot]`` for each query's slots: x (B, Hkv, nq, G, d), tab (:meth:`table`) -> (B, Hkv, nq, G, S)."""
        G = x.shape[-2]
        full = self._per_query(self._group_rows(x) @ tab.transpose(-1, -2), G)  # (B, Hkv, nq, G, U)
        return full.gather(-1, self._slots(G))

    def spread(self, w: torch.Tensor, ws: Scratch, name: str) -> torch.Tensor:
        """Per slot weights w (B, Hkv, nq, G, S) -> per column, in group rows (B*Hkv*nb, g*G, U), 0 elsewhere."""
        B, Hkv, nq, _ = self.shape
        G = w.shape[-2]
        full = ws(name, (B, Hkv, self.nb * self.g, G, self.U), w).zero_()
        full[:, :, :nq].scatter_(-1, self._slots(G), w)
        return full.view(-1, self.g * G, self.U)

    def weighted_sum(self, w: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
        """``sum_slot w[slot] tab[slot]``: w from :meth:`spread` -> (B, Hkv, nq, G, d)."""
        return self._per_query(w @ tab, w.shape[1] // self.g)

    def add_outer(self, dst: torch.Tensor, w: torch.Tensor, x: torch.Tensor, modulo: int | None = None) -> None:
        """``dst[row] += sum_query w[query, slot] x[query]`` over the group's query heads: dst (B, Hkv,
        R, d), w from :meth:`spread`, x (B, Hkv, nq, G, d)."""
        y = w.transpose(-1, -2) @ self._group_rows(x)  # (B*Hkv*nb, U, d)
        _flat_add(dst, self.cols if modulo is None else self.cols % modulo, y.view(*self.cols.shape, -1))


class FarField(torch.autograd.Function):
    """(q, k, v, ks, vs, off) -> (out, lse) over each query's opened blocks and candidates.

    q: (B, H, nq, d), the queries at positions ``[start, start + nq)``; k, v: (B, Hkv, n, d),
    the whole sequence; ks, vs: (B, Hkv, T, d); off: (H, L) per-head level offsets or None.
    out: (B, H, nq, d) in the accumulation dtype, lse: (B, H, nq) (-inf where a query has no
    far field). Selection per chunk (:func:`select`) is kept for the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, ks, vs, off, h: Hierarchy, refine: int, weighted: bool, scale: float,
                start: int = 0, kernels: bool = False, reach: SelectionReach | None = None):
        acc = acc_dtype(q.dtype)
        B, H, nq_all, d = q.shape
        n = _key_limit(h, k)
        kdt = _block_dtype(q, acc, kernels, reach)
        kb, vb, ksa, vsa = _blocks(k, h, kdt), _blocks(v, h, kdt), ks.to(acc).contiguous(), vs.to(acc).contiguous()
        out = torch.empty(B, H, nq_all, d, dtype=acc, device=q.device)
        lse = torch.empty(B, H, nq_all, dtype=acc, device=q.device)
        boxes = window_boxes(kb.view(B, kb.shape[1], -1, d), h, limit=n)  # from the padded blocks already made
        sels, ws = _select_all(q, boxes, h, refine, scale, start, reach), Scratch()
        turned = _turned_summaries(ksa, _tables(h, q.device), reach)
        for i0, i1, *sel in _far_chunks(sels, q, ks, h, refine, turned is not None):
            o, l = far_attention(q[:, :, i0:i1], n, off, h, sel, kb, vb, ksa, vsa, weighted, scale, ws, kernels,
                                 reach, _positions(start, i0, i1, q.device), turned)
            nq = i1 - i0
            out[:, :, i0:i1] = o.transpose(2, 3).reshape(B, H, nq, d)
            lse[:, :, i0:i1] = l.squeeze(-1).transpose(2, 3).reshape(B, H, nq)
        ctx.save_for_backward(q, k, v, ks, vs, off, out, lse)
        ctx.sels, ctx.h, ctx.weighted, ctx.scale, ctx.refine, ctx.kernels = sels, h, weighted, scale, refine, kernels
        ctx.reach, ctx.start = reach, start
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, ks, vs, off, out, lse = ctx.saved_tensors
        h, scale, acc = ctx.h, ctx.scale, acc_dtype(q.dtype)
        B, H, nq_all, d = q.shape
        Hkv, n = k.shape[1], _key_limit(h, k)
        G = H // Hkv
        tabs = _tables(h, q.device)
        kdt = _block_dtype(q, acc, ctx.kernels, ctx.reach)
        kb, vb, ksa, vsa = _blocks(k, h, kdt), _blocks(v, h, kdt), ks.to(acc).contiguous(), vs.to(acc).contiguous()
        dq = torch.empty(B, H, nq_all, d, dtype=acc, device=q.device)
        dkb, dvb, dks, dvs = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (kb, vb, ksa, vsa))
        doff = torch.zeros(off.shape, dtype=acc, device=q.device) if off is not None else None
        ws, turned = Scratch(), _turned_summaries(ksa, tabs, ctx.reach)
        dturned = None if turned is None else torch.zeros_like(turned)
        for i0, i1, *sel in _far_chunks(ctx.sels, q, ks, h, ctx.refine, turned is not None):
            qg, sidx, ok, bias, slv = _far_inputs(q[:, :, i0:i1], off, h, tabs, *sel[1:], ctx.weighted, acc)
            nq = i1 - i0
            l = lse[:, :, i0:i1].view(B, Hkv, G, nq).transpose(2, 3).unsqueeze(-1)  # (B, Hkv, nq, G, 1)
            l = torch.where(l.isinf(), 0.0, l)  # a query with no far field: every p is 0 anyway
            do = (dout[:, :, i0:i1] if dout is not None else torch.zeros_like(out[:, :, i0:i1])).to(acc)
            do = do.view(B, Hkv, G, nq, d).transpose(2, 3).contiguous()  # (B, Hkv, nq, G, d)
            o = out[:, :, i0:i1].view(B, Hkv, G, nq, d).transpose(2, 3)
            delta = (do * o).sum(-1, keepdim=True)
            if dlse is not None:
                delta = delta - dlse[:, :, i0:i1].to(acc).view(B, Hkv, G, nq).transpose(2, 3).unsqueeze(-1)
            tiles = OpenedTiles(sel[0], h.n_blocks, G)
            pos = _positions(ctx.start, i0, i1, q.device)
            turn_o, turn_s = _turns(h, tabs, tiles, sel, ctx.reach, pos)
            dq_t, dk_t, dv_t = tiles.grads(qg, do, l, delta, kb, vb, n, scale, ctx.kernels, q.dtype, turn_o)
            tiles.add_to_blocks(dkb, dk_t)
            tiles.add_to_blocks(dvb, dv_t)
            T = ksa.shape[2]
            cols, kt, far = _summary_columns(h, sidx, ok, turn_s, ksa, turned)
            vt = cols.table(vsa, T)
            # each query turned back by its own position, for the slots beyond the reach
            qt = None if far is None else rotate(qg, -pos.unsqueeze(-1), ctx.reach.inv_freq)
            p = torch.exp(_summary_scores(cols, qg, qt, kt, far) * scale + bias - l)  # (B, Hkv, nq, G, C*p)
            ds = p * (cols.scores(do, vt) - delta)
            if doff is not None:  # each summary slot's score gradient to its (head, level)
                dsum = ds.permute(1, 3, 0, 2, 4)  # (Hkv, G, B, nq, C*p)
                lvl = (slv - 1).clamp(min=0).permute(1, 0, 2, 3).unsqueeze(1).expand_as(dsum)
                doff.view(Hkv, G, -1).scatter_add_(2, lvl.reshape(Hkv, G, -1), dsum.reshape(Hkv, G, -1))
            ds.mul_(scale)  # the score scale, applied to the small factor of every product below
            if far is None:
                ds_w = cols.spread(ds, ws, "ds")
                dq_s = cols.weighted_sum(ds_w, kt)
                cols.add_outer(dks, ds_w, qg)
            else:  # the slots beyond were scored by the turned query: its share turned forward again
                ds_far = torch.where(far, ds, 0.0)
                ds.sub_(ds_far)
                ds_w, far_w = cols.spread(ds, ws, "ds"), cols.spread(ds_far, ws, "ds_far")
                dq_s = cols.weighted_sum(ds_w, kt) + rotate(cols.weighted_sum(far_w, kt), pos.unsqueeze(-1),
                                                            ctx.reach.inv_freq)
                cols.add_outer(dturned, ds_w, qg)
                cols.add_outer(dturned, far_w, qt)
            dq[:, :, i0:i1] = (tiles.to_queries(dq_t) + dq_s).transpose(2, 3).reshape(B, H, nq, d)
            cols.add_outer(dvs, cols.spread(p, ws, "p"), do, T)
        if dturned is not None:
            dks += _turned_back(dturned, tabs, ctx.reach)
        dk = dkb.view(B, Hkv, -1, d)[:, :, :k.shape[2]]
        dv = dvb.view(B, Hkv, -1, d)[:, :, :k.shape[2]]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dks.to(ks.dtype), dvs.to(vs.dtype),
                None if doff is None else doff.to(off.dtype), None, None, None, None, None, None, None)


def _key_limit(h: Hierarchy, k: torch.Tensor):
    """The keys a refined query may open: the sequence's ``n`` tokens, or for packed documents
    (.documents.DocHierarchy) each block's document's end, (n_blocks,)."""
    return k.shape[2] if isinstance(h, Hierarchy) else _tables(h, k.device).ends


def far_attention(q, n: int, off, h: Hierarchy, sel, kb, vb, ksa, vsa, weighted: bool, scale: float, ws,
                  kernels: bool = False, reach: SelectionReach | None = None, pos: torch.Tensor | None = None,
                  turned: torch.Tensor | None = None):
    """Softmax attention of queries q (B, H, nq, d) over their far field: the opened blocks'
    tokens (rows of ``kb, vb`` (B, Hkv, blocks, m*d), as :func:`_blocks` lays them out) and the
    candidates' summaries (``ksa, vsa`` (B, Hkv, T, d)); ``sel = (opened, lv, win)`` from
    :func:`select`, ``n`` the tokens that exist. Returns ``(out (B, Hkv, nq, G, d), lse
    (B, Hkv, nq, G, 1))`` in the accumulation dtype; lse is -inf where a query has no far field.
    The opened blocks and the summaries are two softmaxes merged by their log-sum-exp.
    ``reach`` with ``attend``: windows beyond its distance from the queries (at positions ``pos``
    (nq,)) are attended as at it (:class:`SelectionReach`): the summaries from ``turned``
    (:func:`_turned_summaries`) where given (many queries), else each slot's key rotated (one query).
    Shared by :class:`FarField` and the decoding cache (:mod:`.cache`)."""
    d, Hkv, T = ksa.shape[-1], ksa.shape[1], ksa.shape[2]
    tabs = _tables(h, q.device)
    qg, sidx, ok, bias, _ = _far_inputs(q, off, h, tabs, *sel[1:], weighted, ksa.dtype)
    tiles = OpenedTiles(sel[0], kb.shape[2], q.shape[1] // Hkv)
    turn_o, turn_s = _turns(h, tabs, tiles, sel, reach, pos)
    o_t, l_t = tiles.attend(qg, kb, vb, n, scale, kernels, q.dtype, turn_o)  # per tile row
    K = sel[0].shape[-1]
    lse_o = tiles.to_pairs(l_t.unsqueeze(-1), fill=-math.inf)  # (B, Hkv, nq, G, K)
    out_o = tiles.to_pairs(o_t).unflatten(-1, (K, d))  # (B, Hkv, nq, G, K, d)
    cols, kt, far = _summary_columns(h, sidx, ok, turn_s, ksa, turned)
    if turned is None and turn_s is not None:  # one query: each column's key as far forward as its window lies beyond
        assert q.shape[2] == 1, "far_attention: many queries beyond the reach read the turned summaries"
        kt = rotate(kt, _beyond(pos - tabs.centres[cols.cols.view(-1, cols.U)], reach.distance), reach.inv_freq)
    qt = None if far is None else rotate(qg, -pos.unsqueeze(-1), reach.inv_freq)
    s = _summary_scores(cols, qg, qt, kt, far) * scale + bias  # (B, Hkv, nq, G, C*p)
    lse_s = torch.logsumexp(s, dim=-1, keepdim=True)
    safe_s = torch.where(lse_s.isinf(), 0.0, lse_s)
    out_s = cols.weighted_sum(cols.spread(torch.exp(s - safe_s), ws, "p"), cols.table(vsa, T))
    parts = torch.cat([lse_o, lse_s], dim=-1)  # (B, Hkv, nq, G, K + 1)
    lse = torch.logsumexp(parts, dim=-1, keepdim=True)
    w = torch.exp(parts - torch.where(lse.isinf(), 0.0, lse))
    out = (w[..., :K].unsqueeze(-1) * out_o).sum(-2) + w[..., K:] * out_s
    return out, lse


def _positions(start: int, i0: int, i1: int, device) -> torch.Tensor:
    """The positions of a chunk's queries ``[i0, i1)`` of queries starting at ``start``: (nq,)."""
    return torch.arange(start + i0, start + i1, device=device)


def _turns(h: Hierarchy, tabs, tiles: OpenedTiles, sel, reach: SelectionReach | None, pos: torch.Tensor):
    """With ``reach.attend``: the opened blocks' turns (:meth:`OpenedTiles.turns`) and each summary
    slot's shift (B, Hkv, nq, C*p) (how far its window's centre lies beyond the reach); else None, None."""
    if reach is None or not reach.attend:
        return None, None
    opened, lv, win = sel
    turn_o = tiles.turns(_block_beyond(h, opened, reach.distance, pos), reach.inv_freq)
    turn_s = _beyond_reach(h, tabs, lv, win, reach.distance, pos).repeat_interleave(h.rank, dim=-1)
    return turn_o, turn_s


def _turned_summaries(ksa: torch.Tensor, tabs, reach: SelectionReach | None) -> torch.Tensor | None:
    """With ``reach.attend``: the summaries' keys ksa (B, Hkv, T, d), then the same turned back by
    RoPE as far as their window's centre ``c`` plus the reach's distance ``D``, then ``c - D``: (B,
    Hkv, 3T, d). A window lying beyond the reach before query ``i`` is scored as its keys turned
    forward by ``i - c - D``, and ``q_i . rot(k, i - c - D) = rot(q_i, -i) . rot(k, -(c + D))``
    (after it, bidirectional: ``c - D``): a rotation per query and per summary, not per pair."""
    if reach is None or not reach.attend:
        return None
    c, D = tabs.centres, reach.distance
    return torch.cat([ksa, rotate(ksa, -(c + D), reach.inv_freq), rotate(ksa, -(c - D), reach.inv_freq)], dim=2)


def _turned_back(dturned: torch.Tensor, tabs, reach: SelectionReach) -> torch.Tensor:
    """The gradient to :func:`_turned_summaries`' rows (B, Hkv, 3T, d) -> to the summaries (B, Hkv, T, d)."""
    plain, before, after = dturned.chunk(3, dim=2)
    c, D = tabs.centres, reach.distance
    return plain + rotate(before, c + D, reach.inv_freq) + rotate(after, c - D, reach.inv_freq)


def _summary_rows(sidx: torch.Tensor, turn_s: torch.Tensor | None, T: int):
    """Summary slots sidx (B, Hkv, nq, C*p) and their shifts -> their rows of
    :func:`_turned_summaries` (the turned copies for slots beyond the reach) and which lie beyond,
    (B, Hkv, nq, 1, C*p) bool; ``sidx, None`` without shifts."""
    if turn_s is None:
        return sidx, None
    part = (turn_s > 0).long() + 2 * (turn_s < 0).long()
    return sidx + part * T, (part > 0).unsqueeze(-2)


def _summary_columns(h: Hierarchy, sidx, ok, turn_s, ksa, turned):
    """A chunk's slots sidx, ok (B, Hkv, nq, C*p) -> their :class:`SummaryColumns`, its keys' table,
    and which slots lie beyond the reach (:func:`_summary_rows`): with ``turned``, the slots beyond
    read its turned copies; without, the plain summaries ``ksa``."""
    rows, far = _summary_rows(sidx, None if turned is None else turn_s, ksa.shape[2])
    keys = ksa if turned is None else turned
    cols = SummaryColumns(rows, ok, keys.shape[2], h.block_size)
    return cols, cols.table(keys), far


def _summary_scores(cols: SummaryColumns, qg, qt, kt, far):
    """Scores (B, Hkv, nq, G, C*p) of the queries qg (turned back by their positions: qt) against
    their slots' keys (``kt``, :meth:`SummaryColumns.table`), unscaled: the turned query where a
    slot lies beyond."""
    s = cols.scores(qg, kt)
    return s if far is None else torch.where(far, cols.scores(qt, kt), s)


def _flat_add(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """dst (B, Hkv, T, r) += src (B, Hkv, *s, r) at rows idx (B, Hkv, *s)."""
    B, Hkv, T, r = dst.shape
    base = (torch.arange(B * Hkv, device=dst.device) * T).view(B, Hkv, *([1] * (idx.dim() - 2)))
    dst.view(-1, r).index_add_(0, (idx + base).reshape(-1), src.reshape(-1, r))


def _chunks(n: int, per_query: int, h: Hierarchy):
    """Query ranges whose largest temporary (``per_query`` elements a query) stays within
    CHUNK_ELEMENTS, in whole fine blocks. Python's cost per chunk is fixed, so chunks are as
    large as that allows."""
    step = max(h.block_size, CHUNK_ELEMENTS // max(per_query, 1) // h.block_size * h.block_size)
    for i0 in range(0, n, step):
        yield i0, min(i0 + step, n)


def _select_all(q, boxes: WindowBoxes, h: Hierarchy, refine: int, scale: float, start: int = 0,
                reach: SelectionReach | None = None) -> list[tuple]:
    """:func:`select` over queries at ``[start, start + nq)`` in chunks of its own size (its
    temporaries are the initial candidates' boxes, and with a reach each one's turned queries), as
    ``(i0, i1, opened, lv, win)`` in int32, ``i0, i1`` relative to ``start``."""
    B, H, n, d = q.shape
    Hkv = boxes.centre.shape[1]
    per_query = B * Hkv * d * max(num_candidates(h, 0), 2) * (2 if reach is None else 2 + 2 * H // Hkv)
    return [(i0, i1) + tuple(x.to(torch.int32) for x in select(q[:, :, i0:i1], boxes, h, refine, scale, start + i0, reach))
            for i0, i1 in _chunks(n, per_query, h)]


def _far_chunks(sels: list[tuple], q, ks, h: Hierarchy, refine: int, turned: bool = False):
    """The selection re-cut into the far field's chunks (its largest temporaries: each query's copies
    in the tiles and its slots' scores, and its row of its group's columns, :class:`SummaryColumns`,
    at most every summary (three copies of each with ``turned``) or every slot of the group):
    ``(i0, i1, opened, lv, win)`` in int64."""
    B, H, n, d = q.shape
    Hkv, sums = ks.shape[1], num_candidates(h, refine) * h.rank
    columns = min(h.block_size * sums, ks.shape[2] * (3 if turned else 1))
    per_query = B * H * max(columns, d * refine + refine * h.block_size + sums)
    opened, lv, win = (torch.cat([s[k] for s in sels], dim=2) for k in (2, 3, 4))
    for i0, i1 in _chunks(n, per_query, h):
        yield (i0, i1) + tuple(x[:, :, i0:i1].long() for x in (opened, lv, win))


def use_kernels(impl: str, q: torch.Tensor) -> bool:
    """Whether the far field's opened blocks run in the Triton kernels: where the core does
    (:func:`~.cores.select_core`), float64 never."""
    from .cores import select_core
    from .torch_core import BlockAttention
    return impl != "torch" and q.dtype != torch.float64 and select_core(impl, q) is not BlockAttention


def refined_multipole(q, k, v, ks, vs, h: Hierarchy, *, scale: float, weighted: bool, refine: int,
                      impl: str = "torch", level_offset=None, select_reach: SelectionReach | None = None) -> torch.Tensor:
    """Multipole attention with ``refine`` opened blocks per query, on one device: (B, H, n, d)."""
    from .blocked import block_attention, merge
    out, lse = block_attention(q, k, v, ks, vs, h, scale=scale, weighted=weighted, fine_only=True, impl=impl)
    off = None if level_offset is None else level_offset[:, :h.n_levels]
    c_out, c_lse = FarField.apply(q, k, v, ks, vs, off, h, refine, weighted, scale, 0, use_kernels(impl, q),
                                  select_reach)
    _, merged = merge(lse.to(c_lse.dtype), out.to(c_out.dtype), c_lse, c_out)
    return merged.to(q.dtype)


__all__ = ["refined_multipole", "select", "SelectionReach", "far_attention", "FarField", "OpenedTiles", "SummaryColumns",
           "use_kernels", "keys_per_query",
           "num_candidates"]
