"""The multipole hierarchy: levels, windows and interaction lists.

This is the one definition every implementation (dense reference, blocked
PyTorch, Triton, sequence-parallel, the decoding cache) reads. It says which
positions and which summaries a query sees, and with which log-weight; the only
tensors of tokens it touches are padded into its block layout (:func:`pad_to`,
:func:`extend_keys`).

Conventions (see the design page "Multipole attention"):
- level 0 is the fine level: blocks of ``m`` tokens, block ``a`` covers
  ``[a*m, (a+1)*m)``; a query of block ``a`` sees blocks ``a-1, a, a+1``
  (causal: ``a-1`` and the keys ``<= i`` of ``a``).
- coarse level ``l = 1..L`` has windows of ``w_l = m * 2**(l-1)`` tokens; each
  window has ``p`` summaries, summary ``j`` standing for the sub-window
  ``[c*w + j*w/p, c*w + (j+1)*w/p)``.
- ``L`` is the smallest level count whose interaction lists cover the sequence:
  ``ceil(n/m) <= 2**(L+1)``.
- Tokens past ``n`` (the padded tail) are never keys: a summary stands for the
  real tokens of its sub-window only (its log-weight is ``log(count)``), and a
  summary with no real token is masked.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


def coarse_windows(c: int, causal: bool) -> tuple[int, ...]:
    """Windows of the same level in the interaction list of window ``c``.

    The children of the parent's neighbours that are not ``c`` or its
    neighbours; causal keeps the ones before ``c``. May contain indices outside
    the sequence (negative or too large): callers drop them.
    """
    if c % 2 == 0:
        return (c - 2,) if causal else (c - 2, c + 2, c + 3)
    return (c - 3, c - 2) if causal else (c - 3, c - 2, c + 2)


def sizes_error(block_size, rank) -> str | None:
    """What is wrong with ``(block_size, rank)``, or None: every path checks with this."""
    if not isinstance(block_size, int) or not isinstance(rank, int) or block_size < 1 or rank < 1 \
            or block_size % rank:
        return (f"block_size={block_size} must be a positive multiple of rank={rank} (each fine block is "
                "split into `rank` equal sub-windows); e.g. block_size=64, rank=2")
    return None


def num_levels(n: int, block_size: int) -> int:
    """Number of coarse levels ``L`` for a sequence of ``n`` tokens."""
    n_blocks = -(-n // block_size)
    return max(0, math.ceil(math.log2(n_blocks)) - 1) if n_blocks > 1 else 0


@dataclass(frozen=True)
class Hierarchy:
    """Index tables of the hierarchy for one ``(n, m, p, causal)``.

    Summaries of all levels are stored concatenated along one axis of length
    ``num_summaries``: level ``l`` (1-based) occupies
    ``[offsets[l-1], offsets[l-1] + windows[l-1] * p)``, window ``c``'s summary
    ``j`` at ``offsets[l-1] + c*p + j``. Index ``num_summaries`` is a masked
    dummy slot that implementations may fill with zeros.
    """

    n: int
    block_size: int
    rank: int
    causal: bool
    n_blocks: int
    n_levels: int
    windows: tuple[int, ...]  # windows per coarse level, level 1 first
    offsets: tuple[int, ...]  # start of each level in the concatenated summaries
    num_summaries: int
    # The top level's lists hold every window of it outside the near field (:func:`truncate`).
    flat_top: bool = False

    @property
    def padded_len(self) -> int:
        """Length after padding to whole fine blocks."""
        return self.n_blocks * self.block_size

    def window_size(self, level: int) -> int:
        """Tokens per window on coarse level ``level >= 1``."""
        return self.block_size << (level - 1)

    @property
    def slots_per_level(self) -> int:
        """Summary slots one query block sees per coarse level."""
        return (2 if self.causal else 3) * self.rank

    @property
    def coarse_slots(self) -> int:
        """Summary slots one query block sees over all coarse levels."""
        return self.slots_per_level * self.n_levels

    def list_width(self, level: int) -> int:
        """Windows in one interaction list of ``level``, at most: 2 (causal) or 3, or on a flat
        top level every window but the near field's (``windows - 2``)."""
        width = self.slots_per_level // self.rank
        if self.flat_top and level == self.n_levels:
            return max(width, self.windows[level - 1] - 2)
        return width

    def fine_blocks(self) -> tuple[int, ...]:
        """Offsets of the fine blocks a query block sees, relative to its own."""
        return (-1, 0) if self.causal else (-1, 0, 1)

    def fine_edges(self) -> tuple[tuple[int, int, int], ...]:
        """The blocks whose fine slots reach keys outside the sequence, each with the keys
        ``[lo, hi)`` it may see: ``(block, lo, hi)``, by block (the first, and the last few)."""
        last_ok = (self.n - (len(self.fine_blocks()) - 1) * self.block_size) // self.block_size
        return tuple((a, 0, self.n) for a in sorted({0} | set(range(max(0, last_ok + 1), self.n_blocks))))

    # --- token counts -----------------------------------------------------
    def summary_counts(self, level: int) -> torch.Tensor:
        """Real tokens behind each summary of ``level``: ``(windows, p)`` int64."""
        w, p = self.window_size(level), self.rank
        sub = w // p
        start = torch.arange(self.windows[level - 1] * p) * sub
        count = (self.n - start).clamp(min=0, max=sub)
        return count.view(-1, p)

    def window_counts(self, level: int) -> torch.Tensor:
        """Real tokens in each window of ``level`` (level 0: fine blocks)."""
        w = self.block_size if level == 0 else self.window_size(level)
        nw = self.n_blocks if level == 0 else self.windows[level - 1]
        start = torch.arange(nw) * w
        return (self.n - start).clamp(min=0, max=w)

    # --- interaction lists ------------------------------------------------
    @functools.lru_cache(maxsize=1024)
    def window_lists(self, level: int) -> torch.Tensor:
        """``(windows, list_width(level))`` window indices each window of ``level`` sees; -1 = none."""
        nw, width = self.windows[level - 1], self.list_width(level)
        rows = torch.full((nw, width), -1, dtype=torch.long)
        if self.flat_top and level == self.n_levels:  # every window of the level outside c's near field
            c, w = torch.arange(nw).unsqueeze(1), torch.arange(nw).unsqueeze(0)
            seen = w < c - 1 if self.causal else (w - c).abs() > 1  # (nw, nw)
            r, col = seen.nonzero(as_tuple=True)
            rows[r, seen.long().cumsum(1)[r, col] - 1] = col
            return rows
        for c in range(nw):
            ws = [w for w in coarse_windows(c, self.causal) if 0 <= w < nw]
            rows[c, :len(ws)] = torch.tensor(ws, dtype=torch.long)
        return rows

    def query_window(self, level: int) -> torch.Tensor:
        """Window whose mean query stands for window ``c`` in the linear variant.

        Bidirectional: ``c`` itself (the paper's definition). Causal: ``c - 1``,
        because the mean over ``c`` would include queries after the query that
        uses it, letting later tokens change earlier outputs. Every window a
        causal ``c`` interacts with lies before ``c - 1`` anyway, and windows
        with a non-empty list have ``c >= 2``. Entries with no list are -1.
        """
        nw = self.windows[level - 1]
        c = torch.arange(nw)
        if not self.causal:
            return c
        qc = c - 1
        has_list = (self.window_lists(level) >= 0).any(dim=1)
        return torch.where(has_list, qc, torch.full_like(qc, -1))


def _levels(n: int, m: int, L: int) -> tuple[int, ...]:
    n_blocks = -(-n // m)
    return tuple(-(-n_blocks // (1 << (l - 1))) for l in range(1, L + 1))


@functools.lru_cache(maxsize=256)
def hierarchy(n: int, block_size: int, rank: int, causal: bool) -> Hierarchy:
    """The hierarchy for ``n`` tokens (cached: it depends on shapes only)."""
    if n < 1:
        raise ValueError(f"multipole attention needs a sequence of at least 1 token, got n={n}")
    if (err := sizes_error(block_size, rank)) is not None:
        raise ValueError(err)
    L = num_levels(n, block_size)
    windows = _levels(n, block_size, L)
    offsets, total = [], 0
    for nw in windows:
        offsets.append(total)
        total += nw * rank
    return Hierarchy(
        n=n, block_size=block_size, rank=rank, causal=causal,
        n_blocks=-(-n // block_size), n_levels=L, windows=windows,
        offsets=tuple(offsets), num_summaries=total,
    )


def truncate(h: Hierarchy, max_level: int, flat_top: bool = False) -> Hierarchy:
    """``h`` without the coarse levels above ``max_level`` (0: fine level only, "local" attention).

    Keys beyond the remaining levels' reach are then not seen at all: an ablation, a
    baseline, and a model run past the levels it trained (``model.max_level``), no longer a
    partition of the sequence. ``flat_top``: the top remaining level's lists hold every
    window of that level outside the near field instead (causal: every earlier one), so the
    sequence stays partitioned: ``O(n / (m 2**(max_level-1)))`` summaries a query at the top,
    a flat list as NSA's selection has, over which adaptive refinement can open any block.
    Where ``max_level`` cuts nothing the hierarchy is unchanged (its top level's lists cover
    the sequence already).
    """
    if max_level < 0:
        raise ValueError(f"max_level must be >= 0, got {max_level}")
    if max_level >= h.n_levels:
        return h
    windows = h.windows[:max_level]
    # (a packed layout, .documents.DocHierarchy, is truncated only to its fine level: its parts carry the flag)
    flat = dict(flat_top=flat_top and max_level > 0) if isinstance(h, Hierarchy) else {}
    return replace(h, n_levels=max_level, windows=windows, offsets=h.offsets[:max_level],
                   num_summaries=sum(w * h.rank for w in windows), **flat)


def extend(h: Hierarchy, n_levels: int) -> Hierarchy:
    """``h`` with coarse levels up to ``n_levels`` in its summary layout: the levels above its own
    hold windows that are complete within ``h.n`` tokens but in no query's interaction list yet
    (a causal block ``a`` sees level ``l`` only once ``a >> (l-1) >= 2``). The decoding cache lays
    its summaries out so, where a longer sequence will look them up."""
    if n_levels <= h.n_levels:
        return h
    if h.flat_top:
        raise ValueError("extend: a hierarchy with a flat top level has no levels above it")
    windows = _levels(h.n, h.block_size, n_levels)
    offsets = tuple(sum(w * h.rank for w in windows[:l]) for l in range(n_levels))
    return replace(h, n_levels=n_levels, windows=windows, offsets=offsets,
                   num_summaries=sum(w * h.rank for w in windows))


def call_hierarchy(n: int, block_size: int, rank: int, causal: bool, max_level: int | None,
                   level_offset: torch.Tensor | None, flat_top: bool = False) -> Hierarchy:
    """The hierarchy an ``fma`` call over ``n`` tokens uses (truncated at ``max_level``, its top
    level flat with ``flat_top``); refuses per-head level offsets (H, levels) with fewer levels
    than it has."""
    h = hierarchy(n, block_size, rank, causal)
    if max_level is not None:
        h = truncate(h, max_level, flat_top)
    if level_offset is not None and level_offset.shape[1] < h.n_levels:
        raise ValueError(f"fma: level_offset has {level_offset.shape[1]} levels, the sequence ({n} tokens) "
                         f"has {h.n_levels}")
    return h


@dataclass(frozen=True)
class BlockTables:
    """Per fine block: the coarse summaries its queries see and their log-weights.

    ``index``: ``(n_blocks, coarse_slots)`` int64 into the concatenated summaries,
    ``num_summaries`` (the dummy slot) where masked. ``bias``: same shape, float64,
    ``log(count)`` (weighted) or ``0``; ``-inf`` where masked.
    """

    index: torch.Tensor
    bias: torch.Tensor


@functools.lru_cache(maxsize=1024)
def level_slots(h: Hierarchy, level: int, weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The summary slots of each window's interaction list on ``level``.

    ``index``: (windows, slots_per_level) int64 into the concatenated summaries,
    ``num_summaries`` where masked; ``bias``: same shape, float64 log-weights
    (``log(count)``, or 0 unweighted), ``-inf`` where masked.
    """
    if h.flat_top and level == h.n_levels:
        raise ValueError("a flat top level's lists grow with n: only adaptive refinement's far field reads "
                         "them (fma needs refine > 0 with flat_top)")
    p = h.rank
    win = h.window_lists(level).unsqueeze(-1).expand(-1, -1, p)  # (windows, S//p, p)
    j = torch.arange(p)
    counts = h.summary_counts(level)  # (windows, p)
    cnt = torch.where(win >= 0, counts[win.clamp(min=0), j], torch.zeros_like(win))
    ok = cnt > 0
    index = torch.where(ok, h.offsets[level - 1] + win * p + j, h.num_summaries)
    w = cnt.double().log() if weighted else torch.zeros_like(cnt, dtype=torch.double)
    bias = torch.where(ok, w, -math.inf)
    nw = h.windows[level - 1]
    return index.reshape(nw, -1), bias.reshape(nw, -1)


@functools.lru_cache(maxsize=256)
def _block_tables_cpu(h: Hierarchy, weighted: bool) -> BlockTables:
    if not isinstance(h, Hierarchy):  # packed documents (.documents.DocHierarchy) concatenate their own
        return h.tables_cpu(weighted)
    S = h.slots_per_level
    index = torch.full((h.n_blocks, h.coarse_slots), h.num_summaries, dtype=torch.long)
    bias = torch.full((h.n_blocks, h.coarse_slots), -math.inf, dtype=torch.float64)
    blocks = torch.arange(h.n_blocks)
    for l in range(1, h.n_levels + 1):
        c = blocks >> (l - 1)  # window of each block on level l
        idx, b = level_slots(h, l, weighted)
        index[:, (l - 1) * S:l * S] = idx[c]
        bias[:, (l - 1) * S:l * S] = b[c]
    return BlockTables(index, bias)


# Tables made on the CPU once per hierarchy and copied to a device once per (device, dtype): a
# call then makes no tensor on the host and waits for no copy (each would synchronise the stream).
_on_device: dict = {}


def cached_on_device(key: tuple, make):
    """``make()``, made once per ``key`` (which names the hierarchy and the device) and kept."""
    if key not in _on_device:
        if len(_on_device) > 512:
            _on_device.clear()
        _on_device[key] = make()
    return _on_device[key]


def block_tables(h: Hierarchy, weighted: bool, device: torch.device | str = "cpu",
                 index_dtype: torch.dtype = torch.int64, bias_dtype: torch.dtype = torch.float64) -> BlockTables:
    """:class:`BlockTables` for ``h`` on ``device`` in the given dtypes (cached per device and
    dtypes: the Triton kernels read int32 indices and fp32 log-weights)."""
    t = _block_tables_cpu(h, weighted)
    device = torch.device(device)
    if device.type == "cpu" and (index_dtype, bias_dtype) == (torch.int64, torch.float64):
        return t
    return cached_on_device(("tables", h, weighted, device, index_dtype, bias_dtype), lambda: BlockTables(
        t.index.to(device, index_dtype), t.bias.to(device, bias_dtype)))


@functools.lru_cache(maxsize=256)
def all_summary_counts(h: Hierarchy) -> torch.Tensor:
    """Real tokens behind every summary, all levels concatenated: (num_summaries,) int64."""
    if h.n_levels == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([h.summary_counts(l).reshape(-1) for l in range(1, h.n_levels + 1)])


# Columns of :func:`seen_by`'s table: level, window, its first summary, its sequence's first and
# end block (a packed document's, else 0 and n_blocks), then the windows that see it.
SEEN_BY_COLS = 9


@functools.lru_cache(maxsize=256)
def _seen_by_cpu(h: Hierarchy) -> torch.Tensor:
    if not isinstance(h, Hierarchy):  # packed documents (.documents.DocHierarchy) concatenate their own
        return h.seen_by_cpu()
    rows = []
    for l in range(1, h.n_levels + 1):
        seers = [[] for _ in range(h.windows[l - 1])]
        for c_q, listed in enumerate(h.window_lists(l).tolist()):
            for c in listed:
                if c >= 0:
                    seers[c].append(c_q)
        for c, qs in enumerate(seers):
            assert len(qs) <= SEEN_BY_COLS - 5, "a window is in at most four interaction lists"
            rows.append([l, c, h.offsets[l - 1] + c * h.rank, 0, h.n_blocks] + qs + [-1] * (SEEN_BY_COLS - 5 - len(qs)))
    return torch.tensor(rows, dtype=torch.int32).view(-1, SEEN_BY_COLS)


def seen_by(h: Hierarchy, device: torch.device | str) -> torch.Tensor:
    """The interaction lists inverted, for the summaries' backward: one row per coarse window of
    every level, ``(level, window, index of its first summary, first and end block of its
    sequence (a packed document's), then up to four windows of the same level whose lists hold
    it, -1 padded)``; (windows of all levels, SEEN_BY_COLS) int32
    (cached per device)."""
    return cached_on_device(("seen_by", h, torch.device(device)), lambda: _seen_by_cpu(h).to(device))


def summary_bias(h: Hierarchy, weighted: bool, device: torch.device | str) -> torch.Tensor:
    """(num_summaries,) fp32: each summary's score bias wherever it is seen, ``log(count)``
    (weighted) or 0, and -inf for a summary with no real token (cached per device)."""
    def make():
        counts = all_summary_counts(h)
        w = counts.clamp(min=1).double().log() if weighted else torch.zeros(counts.shape, dtype=torch.double)
        return torch.where(counts > 0, w, -math.inf).to(device, torch.float32)
    return cached_on_device(("summary_bias", h, weighted, torch.device(device)), make)


def window_divisors(h: Hierarchy, level: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(windows,) real tokens in each window of ``level``, at least 1: a window mean's divisor
    (cached per device and dtype)."""
    return cached_on_device(("divisors", h, level, torch.device(device), dtype),
                             lambda: h.window_counts(level).clamp(min=1).to(device, dtype))


def summary_scales(h: Hierarchy, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(num_summaries,) factors that turn each summary's ``z`` into the mean of its real tokens:
    ``(window/p) / count``, 0 where no real token is behind it (cached per device and dtype)."""
    def make():
        counts = all_summary_counts(h)
        nominal = torch.cat([torch.full((h.windows[l - 1] * h.rank,), h.window_size(l) // h.rank)
                             for l in range(1, h.n_levels + 1)]) if h.n_levels else counts
        scale = torch.where(counts > 0, nominal / counts.clamp(min=1).double(), 0.0)
        return scale.to(device, dtype)
    return cached_on_device(("scales", h, torch.device(device), dtype), make)


# --- the block layout of tokens -------------------------------------------------
def pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad ``x`` (B, H, n, d) along the sequence to ``length`` tokens."""
    n = x.shape[2]
    return x if n == length else F.pad(x, (0, 0, 0, length - n))


def extend_keys(x: torch.Tensor, h: Hierarchy) -> torch.Tensor:
    """Keys (B, Hkv, n', d) of a whole sequence (``n' <= h.padded_len``) -> the "extended" keys
    of all its blocks, which a core reads as its fine neighbourhoods: zero-padded to whole
    blocks, plus one zero block in front (and one behind when bidirectional)."""
    m = h.block_size
    return F.pad(x, (0, 0, m, h.padded_len - x.shape[2] + (len(h.fine_blocks()) - 2) * m))
