"""Document masking: packed documents attend only within themselves.

A packed row holds several documents back to back. With document boundaries given,
multipole attention over the row equals ``fma`` run on each document alone: its own
hierarchy, its blocks and windows aligned to its own first token, summaries formed only
from its own tokens.

Boundaries arrive as ``cu_seqlens``, FlashAttention's varlen convention: the cumulative
document lengths over the batch flattened to one stream of ``B * n`` tokens (each row's
end is a boundary whether listed or not). Lengths, not a per-token document id, because
every table below is built on the host from them once per distinct packing, and because
they describe a sequence-parallel rank's neighbours in O(documents), not O(n).

:class:`Documents` lays the documents out *block-aligned*: each starts at a multiple of the
block size, its tail zero-padded to a whole block. In that layout a document's fine blocks
and the fine blocks of the layout coincide, so a core runs over it as over one sequence,
reading per block the key range its document spans (:meth:`Documents.key_bounds`), and its
coarse tables from :class:`DocHierarchy`, which concatenates each document's own
:func:`~.hierarchy.hierarchy`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .hierarchy import BlockTables, Hierarchy, _block_tables_cpu, cached_on_device, hierarchy, pad_to, truncate


@dataclass(frozen=True)
class Documents:
    """The documents of a packed batch of ``batch`` rows of ``n`` tokens.

    ``lengths``: each document's tokens, in order over the flattened batch (a document
    never crosses a row: rows end documents).
    """

    batch: int
    n: int
    lengths: tuple[int, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        """Each document's first token in the flattened batch."""
        out, s = [], 0
        for L in self.lengths:
            out.append(s)
            s += L
        return tuple(out)

    def __len__(self) -> int:
        return len(self.lengths)


def as_documents(cu_seqlens, batch: int, n: int) -> Documents:
    """:class:`Documents` from ``cu_seqlens`` (a 1-D integer tensor or sequence: 0, then each
    document's end in the flattened batch, ending at ``batch * n``); rows' ends are added.
    Raises a ValueError that says what is wrong."""
    if isinstance(cu_seqlens, Documents):
        if (cu_seqlens.batch, cu_seqlens.n) != (batch, n):
            raise ValueError(f"fma: documents were laid out for {cu_seqlens.batch} rows of {cu_seqlens.n} "
                             f"tokens, q has {batch} rows of {n}")
        return cu_seqlens
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"fma: cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} of shape "
                             f"{tuple(cu_seqlens.shape)}")
        ends = cu_seqlens.tolist()  # a device tensor synchronises here: pass the loader's CPU tensor
    else:
        ends = [int(x) for x in cu_seqlens]
    total = batch * n
    if not ends or ends[0] != 0 or ends[-1] != total:
        raise ValueError(f"fma: cu_seqlens must start at 0 and end at batch * n = {total} (the flattened batch), "
                         f"got {ends[:3]}...{ends[-3:]}" if len(ends) > 6 else
                         f"fma: cu_seqlens must start at 0 and end at batch * n = {total} (the flattened batch), "
                         f"got {ends}")
    if any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError("fma: cu_seqlens must be non-decreasing (cumulative document lengths)")
    cuts = sorted(set(ends) | set(range(0, total + 1, n)))
    return Documents(batch, n, tuple(b - a for a, b in zip(cuts, cuts[1:])))


def cu_seqlens_from_doc_positions(doc_positions: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` of a batch from each token's position in its document (the loader's
    ``doc_positions``, (B, n)): a document starts where the position is 0 (and at each row's
    start). (documents + 1,) int64 on the CPU."""
    B, n = doc_positions.shape
    starts = (doc_positions.detach().cpu() == 0)
    starts[:, 0] = True
    flat = torch.nonzero(starts.reshape(-1)).squeeze(1)
    return torch.cat([flat, torch.tensor([B * n])]).to(torch.int64)


@dataclass(frozen=True)
class DocHierarchy:
    """The hierarchies of packed documents, laid out block-aligned, read by a core as one.

    The layout holds the documents in order, document ``d`` from block ``first_block[d]``
    (``ceil(length / m)`` blocks, its tail zero-padded). Summaries are laid out level by
    level, and within a level document by document: level ``l`` occupies
    ``[offsets[l-1], offsets[l-1] + windows[l-1] * p)``, document ``d``'s windows of it
    from ``first_window[d][l-1]``. A document with fewer levels than ``n_levels`` has no
    windows on the levels above its own; its queries' slots there are masked.

    It offers what the cores read of a :class:`~.hierarchy.Hierarchy` (sizes, the block
    tables, :meth:`fine_edges`, the summary counts); ``n`` is the layout's length.
    """

    docs: Documents
    parts: tuple[Hierarchy, ...]
    first_block: tuple[int, ...]
    first_window: tuple[tuple[int, ...], ...]
    block_size: int
    rank: int
    causal: bool
    n_blocks: int
    n_levels: int
    windows: tuple[int, ...]
    offsets: tuple[int, ...]
    num_summaries: int

    # what a core reads, as a Hierarchy has it
    n = property(lambda self: self.n_blocks * self.block_size)
    padded_len = n
    slots_per_level = Hierarchy.slots_per_level
    coarse_slots = Hierarchy.coarse_slots
    fine_blocks = Hierarchy.fine_blocks
    window_size = Hierarchy.window_size

    def __hash__(self) -> int:
        # Hashed at every table lookup of every layer: once per object, not once per lookup.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.docs, self.block_size, self.rank, self.causal, self.n_levels))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def flat_top(self) -> bool:
        return any(part.flat_top for part in self.parts)

    def list_width(self, level: int) -> int:
        """Windows in one interaction list of ``level``, at most, over the documents."""
        return max(part.list_width(level) for part in self.parts if part.n_levels >= level)

    def fine_edges(self) -> tuple[tuple[int, int, int], ...]:
        """Each document's edge blocks (:meth:`Hierarchy.fine_edges`) in the layout, with the
        document's own keys as the range they may see."""
        out = []
        for part, a0 in zip(self.parts, self.first_block):
            t0 = a0 * self.block_size
            out += [(a0 + a, t0 + lo, t0 + hi) for a, lo, hi in part.fine_edges()]
        return tuple(out)

    def summary_counts(self, level: int) -> torch.Tensor:
        """Real tokens behind each summary of ``level``: (windows, p) int64, documents in order."""
        return torch.cat([part.summary_counts(level) for part in self.parts if part.n_levels >= level])

    def tables_cpu(self, weighted: bool) -> BlockTables:
        """Each document's own block tables, their summary indices moved to this layout and
        their slots padded with masked ones up to ``n_levels``."""
        S, p = self.slots_per_level, self.rank
        index = torch.full((self.n_blocks, self.coarse_slots), self.num_summaries, dtype=torch.long)
        bias = torch.full((self.n_blocks, self.coarse_slots), -math.inf, dtype=torch.float64)
        for part, a0, wins in zip(self.parts, self.first_block, self.first_window):
            if not min(part.n_levels, self.n_levels):  # (the fine level alone: a refined layout's core)
                continue
            t = _block_tables_cpu(part, weighted)
            rows = slice(a0, a0 + part.n_blocks)
            for l in range(1, min(part.n_levels, self.n_levels) + 1):
                cols = slice((l - 1) * S, l * S)
                shift = self.offsets[l - 1] + wins[l - 1] * p - part.offsets[l - 1]
                idx = t.index[:, cols]
                index[rows, cols] = torch.where(idx == part.num_summaries, self.num_summaries, idx + shift)
                bias[rows, cols] = t.bias[:, cols]
        return BlockTables(index, bias)

    def seen_by_cpu(self) -> torch.Tensor:
        """Each document's :func:`~.hierarchy.seen_by` rows, moved to this layout."""
        from .hierarchy import _seen_by_cpu

        rows = []
        for part, a0, wins in zip(self.parts, self.first_block, self.first_window):
            if not part.n_levels or part.n_levels > self.n_levels:
                continue
            t = _seen_by_cpu(part).clone()  # (level, window, first, 0, n_blocks, seers...)
            level = t[:, 0].long()
            shift = torch.tensor([self.offsets[l - 1] + wins[l - 1] * self.rank - part.offsets[l - 1]
                                  for l in range(1, part.n_levels + 1)])[level - 1]
            t[:, 1] += torch.tensor(wins)[level - 1].to(t.dtype)
            t[:, 2] += shift.to(t.dtype)
            t[:, 3] += a0
            t[:, 4] += a0
            rows.append(t)
        from .hierarchy import SEEN_BY_COLS
        return torch.cat(rows) if rows else torch.zeros(0, SEEN_BY_COLS, dtype=torch.int32)

    def refine_tables_cpu(self) -> tuple[torch.Tensor, ...]:
        """What adaptive refinement (:mod:`.refine`) reads of the layout, as a
        :class:`~.hierarchy.Hierarchy` gives it by arithmetic: each block's interaction lists,
        ``(n_blocks, n_levels * windows per list)`` global window ids, -1 where none (a
        document's levels only); each window's two children on the level below, levels
        concatenated from level 1 (whose rows are -1), ``windows[l-2]`` (none) where a
        document's window has one child; each level-1 window's block; each block's end (its
        document's end in the layout: the refined keys stop there)."""
        L, m = self.n_levels, self.block_size
        widths = [self.list_width(l) for l in range(1, L + 1)]
        first = [sum(widths[:l]) for l in range(L)]  # each level's first column
        win = torch.full((self.n_blocks, sum(widths)), -1, dtype=torch.long)
        ends = torch.empty(self.n_blocks, dtype=torch.long)
        for part, a0, wins, length in zip(self.parts, self.first_block, self.first_window, self.docs.lengths):
            blocks = torch.arange(part.n_blocks)
            ends[a0:a0 + part.n_blocks] = a0 * m + length
            for l in range(1, min(part.n_levels, L) + 1):
                lists = part.window_lists(l)[blocks >> (l - 1)]
                cols = slice(first[l - 1], first[l - 1] + lists.shape[1])
                win[a0:a0 + part.n_blocks, cols] = torch.where(lists >= 0, lists + wins[l - 1], -1)
        kids = [torch.full((self.windows[0], 2), -1, dtype=torch.long)] if L else []
        kids += [self.children(l, "cpu").view(-1, 2) for l in range(1, L)]
        leaf = self.leaf_blocks("cpu") if L else torch.zeros(0, dtype=torch.long)
        return win, (torch.cat(kids) if kids else torch.zeros(0, 2, dtype=torch.long)), leaf, ends

    def window_starts_cpu(self) -> torch.Tensor:
        """Each window's first position in the layout, levels concatenated from level 1, each
        level's windows in their global order (documents in order): (windows of all levels,)."""
        rows = []
        for l in range(1, self.n_levels + 1):
            for part, a0 in zip(self.parts, self.first_block):
                if part.n_levels >= l:
                    rows.append((a0 + (torch.arange(part.windows[l - 1]) << (l - 1))) * self.block_size)
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)

    def key_bounds(self, device) -> torch.Tensor:
        """(n_blocks, 2) int32: the keys ``[lo, hi)`` each block's queries may see, their
        document's (cached per device; the Triton kernels' fine mask)."""
        def make():
            m, out = self.block_size, torch.empty(self.n_blocks, 2, dtype=torch.int32)
            for L, a0, part in zip(self.docs.lengths, self.first_block, self.parts):
                out[a0:a0 + part.n_blocks, 0] = a0 * m
                out[a0:a0 + part.n_blocks, 1] = a0 * m + L
            return out.to(device)
        return cached_on_device(("key_bounds", self, torch.device(device)), make)

    def children(self, level: int, device) -> torch.Tensor:
        """For the windows of ``level + 1``, their two children on ``level``, pairwise:
        (2 * windows[level],) indices into level ``level``'s windows, ``windows[level - 1]``
        (a zero window) where a child is missing (cached per device)."""
        def make():
            idx = []
            for part, wins in zip(self.parts, self.first_window):
                if part.n_levels > level:
                    nw = part.windows[level - 1]
                    c = torch.arange(2 * part.windows[level])
                    idx.append(torch.where(c < nw, wins[level - 1] + c, self.windows[level - 1]))
            return torch.cat(idx).to(device)
        return cached_on_device(("children", self, level, torch.device(device)), make)

    def leaf_blocks(self, device) -> torch.Tensor:
        """The layout's blocks that are level-1 windows (those of documents with coarse levels),
        in level 1's order: (windows[0],) (cached per device)."""
        def make():
            return torch.cat([torch.arange(a0, a0 + part.n_blocks)
                              for part, a0 in zip(self.parts, self.first_block) if part.n_levels]).to(device)
        return cached_on_device(("leaf_blocks", self, torch.device(device)), make)

    def padding_index(self, device) -> torch.Tensor:
        """The layout's positions that hold no token (each document's padded tail) (cached)."""
        def make():
            return torch.cat([torch.arange(dst + length, dst + length + pad)
                              for _, dst, length, pad in self.moves]).to(device)
        return cached_on_device(("padding_index", self, torch.device(device)), make)

    def token_index(self, device) -> torch.Tensor:
        """Each token of the flattened batch's position in the layout: (B*n,) (cached per device)."""
        def make():
            out = torch.empty(self.docs.batch * self.docs.n, dtype=torch.long)
            for src, dst, length, _ in self.moves:
                out[src:src + length] = torch.arange(dst, dst + length)
            return out.to(device)
        return cached_on_device(("token_index", self, torch.device(device)), make)

    @functools.cached_property
    def moves(self) -> tuple[tuple[int, int, int, int], ...]:
        """The layout as runs of tokens that move together: ``(first token in the flattened
        batch, its place in the layout, tokens, padding after them)``; documents that end on a
        block boundary share a run with the next. The one description of where tokens go: the
        slice copies read it, and the index tensors (:meth:`token_index`, :meth:`padding_index`)
        are made from it."""
        m, out = self.block_size, []
        for s, L, a0, part in zip(self.docs.starts, self.docs.lengths, self.first_block, self.parts):
            pad = part.n_blocks * m - L
            if out and out[-1][3] == 0 and out[-1][0] + out[-1][2] == s and out[-1][1] + out[-1][2] == a0 * m:
                src, dst, length, _ = out.pop()
                out.append((src, dst, length + L, pad))
            else:
                out.append((s, a0 * m, L, pad))
        return tuple(out)


@functools.lru_cache(maxsize=8)
def doc_hierarchy(docs: Documents, block_size: int, rank: int, causal: bool,
                  max_level: int | None, flat_top: bool = False) -> DocHierarchy:
    """The :class:`DocHierarchy` of ``docs`` (cached: a packing repeats across layers and in
    the backward); each document's own hierarchy truncated at ``max_level`` (:func:`truncate`)."""
    parts = tuple(hierarchy(L, block_size, rank, causal) for L in docs.lengths)
    if max_level is not None:
        parts = tuple(truncate(h, max_level, flat_top) for h in parts)
    n_levels = max(h.n_levels for h in parts)
    first_block, a = [], 0
    for h in parts:
        first_block.append(a)
        a += h.n_blocks
    windows, first_window = [0] * n_levels, []
    for h in parts:
        first_window.append(tuple(windows[l] for l in range(n_levels)))
        for l in range(h.n_levels):
            windows[l] += h.windows[l]
    offsets = tuple(sum(w * rank for w in windows[:l]) for l in range(n_levels))
    return DocHierarchy(docs=docs, parts=parts, first_block=tuple(first_block), first_window=tuple(first_window),
                        block_size=block_size, rank=rank, causal=causal, n_blocks=a, n_levels=n_levels,
                        windows=tuple(windows), offsets=offsets, num_summaries=sum(w * rank for w in windows))


def is_flat(dh: DocHierarchy) -> bool:
    """Whether the layout is the flattened batch itself, padded at its end (every document
    starts on a block): then no token moves."""
    m = dh.block_size
    return all(s == a0 * m for s, a0 in zip(dh.docs.starts, dh.first_block))


# Up to this many copies a move runs as slice copies (memcpy-fast on a CPU, and a few
# dozen Python steps); beyond, or on an accelerator (one launch each), as one indexed op.
_SLICES_MAX = 128


def _by_slices(x: torch.Tensor, dh: DocHierarchy) -> bool:
    return x.device.type == "cpu" and len(dh.moves) <= _SLICES_MAX


def _place(x: torch.Tensor, dh: DocHierarchy) -> torch.Tensor:
    """(1, heads, B*n, d) -> (1, heads, n_layout, d): each token at its place in the layout, zeros
    in the padding (filled there only: the rest is written once)."""
    out = x.new_empty(x.shape[0], x.shape[1], dh.n, x.shape[3])
    if _by_slices(x, dh):
        for src, dst, length, pad in dh.moves:
            out[:, :, dst:dst + length] = x[:, :, src:src + length]
            out[:, :, dst + length:dst + length + pad] = 0
        return out
    out.index_copy_(2, dh.token_index(x.device), x)
    return out.index_fill_(2, dh.padding_index(x.device), 0)


def _gather(y: torch.Tensor, dh: DocHierarchy) -> torch.Tensor:
    """(1, heads, n_layout, d) -> (1, heads, B*n, d): the real tokens, in order."""
    if not _by_slices(y, dh):
        return y.index_select(2, dh.token_index(y.device))
    out = y.new_empty(y.shape[0], y.shape[1], dh.docs.batch * dh.docs.n, y.shape[3])
    for src, dst, length, _ in dh.moves:
        out[:, :, src:src + length] = y[:, :, dst:dst + length]
    return out


class _ToLayout(torch.autograd.Function):
    """(1, heads, B*n, d) -> (1, heads, n_layout, d): real tokens copied to their places, zeros
    between; the backward gathers them back (no scatter-add)."""

    @staticmethod
    def forward(ctx, flat, dh):
        ctx.dh = dh
        return _place(flat, dh)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dh), None


class _FromLayout(torch.autograd.Function):
    """(1, heads, n_layout, d) -> (1, heads, B*n, d): the real tokens; the backward puts their
    gradients back in place, zeros between."""

    @staticmethod
    def forward(ctx, y, dh):
        ctx.dh = dh
        return _gather(y, dh)

    @staticmethod
    def backward(ctx, grad):
        return _place(grad, ctx.dh), None


def to_layout(x: torch.Tensor, dh: DocHierarchy) -> torch.Tensor:
    """(B, heads, n, d) -> (1, heads, n_layout, d): the documents block-aligned, zeros between."""
    B, Hx, n, d = x.shape
    flat = x.transpose(0, 1).reshape(1, Hx, B * n, d)  # a view when B == 1
    if is_flat(dh):
        return pad_to(flat, dh.n)
    return _ToLayout.apply(flat, dh)


def from_layout(y: torch.Tensor, dh: DocHierarchy) -> torch.Tensor:
    """Inverse of :func:`to_layout` on the real tokens: (1, H, n_layout, d) -> (B, H, n, d)."""
    H, d, B, n = y.shape[1], y.shape[3], dh.docs.batch, dh.docs.n
    flat = y[:, :, :B * n] if is_flat(dh) else _FromLayout.apply(y, dh)  # (1, H, B*n, d)
    return flat.view(H, B, n, d).transpose(0, 1)


def doc_summaries(summaries, k: torch.Tensor, v: torch.Tensor, dh: DocHierarchy):
    """Bottom-up summaries (``summaries.bottom_up``) of each document's own windows, from the
    block-aligned keys and values (1, Hkv, n_layout, d): (1, Hkv, num_summaries, d) each."""
    from .summaries import finish

    def zs(x, which):
        _, Hx, _, d = x.shape
        z = summaries.leaves(x.view(1, Hx, dh.n_blocks, dh.block_size, d), dh.rank, which)  # (1, Hx, blocks, p, d)
        if dh.windows[0] != dh.n_blocks:  # documents too short for coarse levels have no windows
            z = z.index_select(2, dh.leaf_blocks(x.device))  # (1, Hx, windows_1, p, d)
        out = [z]
        for l in range(1, dh.n_levels):
            padded = torch.cat([z, z.new_zeros(1, Hx, 1, *z.shape[3:])], dim=2)
            z = summaries.parents(padded.index_select(2, dh.children(l, x.device)), dh.windows[l], which)
            out.append(z)
        return out

    if dh.n_levels == 0:
        empty = k.new_zeros(1, k.shape[1], 0, k.shape[3])
        return empty, empty
    return finish(zs(k, 0), dh), finish(zs(v, 1), dh)


__all__ = ["Documents", "DocHierarchy", "as_documents", "doc_hierarchy", "doc_summaries", "to_layout",
           "from_layout", "cu_seqlens_from_doc_positions"]
