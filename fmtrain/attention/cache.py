"""Decoding caches: what one attention layer keeps to produce a sequence one token at a time.

:class:`MultipoleCache` is multipole attention's. In the causal hierarchy
(:mod:`.hierarchy`) the query at position ``t``, in fine block ``a``, sees exact
keys only in blocks ``a-1`` and ``a`` (up to ``t``), and on each coarse level
``l`` the summaries of the one or two windows ``coarse_windows(a >> (l-1))``,
which are complete before block ``a`` starts. A complete window's summaries
never change (every summary kind is a fixed linear map of its tokens), so the
cache holds, per layer:

- the keys and values of the last two fine blocks, ``2 m`` tokens;
- per coarse level, the summaries of its last three complete windows (what the
  next blocks' lists and the bottom-up kinds' next parents need);
- ``conv`` only: each level's running share of the window being filled
  (:meth:`ConvSummaries.window_part`); the linear variant: per level the query
  sums of the last two complete windows, and the current block's queries.

That is ``O((m + p log n) d)`` numbers per layer and key/value head, where a
full-attention cache holds ``O(n d)``, and each token costs as many
multiply-adds. Every output equals the full forward's at the same position (the
causal output at ``t`` does not depend on what follows ``t``): the summaries come
from the same :class:`~.summaries.Summaries` methods as the forward's, and the
interaction lists from the same ``coarse_windows``.

:class:`KVCache` is full attention's standard key/value cache (``O(n d)``), so that
the ``sdpa`` baseline generates at its real speed.

Both are filled by ``prefill(q, k, v)`` with the prompt's rotated queries, keys and
values (the layer runs its ordinary forward over the prompt once), then
``step(q, k, v)`` takes one new token per sequence, ``(B, H, 1, d)`` and
``(B, Hkv, 1, d)``, and returns its attention output ``(B, H, 1, d)``. A batch
holds sequences of one length (they share the hierarchy's position).

:class:`RefinedCache` is adaptive refinement's (``refine > 0``): the multipole cache's hot
state plus a store of every window's summaries and every token's key and value, from which
each token's selection reads its ``K`` opened blocks.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from .blocked import merge
from .hierarchy import Hierarchy, call_hierarchy, coarse_windows, extend, num_levels
from .refine import far_attention, select, window_boxes
from .summaries import Summaries, hierarchy
from .torch_core import Scratch, acc_dtype


def _attend(q, k, v, bias, extra=None):
    """Softmax attention of ``q`` (B, Hkv, G, d), pre-scaled, over ``k, v`` (B, Hkv, S, d) with
    additive ``bias`` (S,) or per head (Hkv, G, S), in the accumulation dtype. ``extra``: a partial ``(lse (B, Hkv, G),
    out (B, Hkv, G, d))`` over other keys, merged in exactly. Returns (B, Hkv, G, d)."""
    s = q @ k.transpose(-1, -2) + bias  # (B, Hkv, G, S)
    if extra is None:
        return torch.softmax(s, dim=-1) @ v
    lse_f = torch.logsumexp(s, dim=-1)  # finite: a query always sees itself
    return merge(lse_f, torch.softmax(s, dim=-1) @ v, *extra)[1]


class MultipoleCache:
    """One causal multipole-attention layer's decoding state (see the module docstring).

    ``summaries``, ``block_size``, ``rank``, ``weighted``, ``variant``, ``max_level``,
    ``scale`` and ``level_offset`` are the layer's own, as ``fma`` takes them.
    """

    def __init__(self, summaries: Summaries, *, block_size: int, rank: int, weighted: bool = True,
                 variant: str = "nlogn", max_level: int | None = None, scale: float | None = None,
                 level_offset: torch.Tensor | None = None):
        self.summaries, self.m, self.p = summaries, block_size, rank
        self.level_offset = level_offset
        self.weighted, self.linear, self.max_level = weighted, variant == "linear", max_level
        self.scale = scale
        self.length = 0

    # ------------------------------------------------------------------ filling from a prompt
    @torch.no_grad()
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> "MultipoleCache":
        """State after the prompt: q (B, H, n, d), k, v (B, Hkv, n, d), rotated as the layer uses them."""
        B, H, n, d = q.shape
        Hkv, m = k.shape[1], self.m
        if self.scale is None:
            self.scale = 1.0 / math.sqrt(d)
        self.B, self.H, self.Hkv, self.G, self.d = B, H, Hkv, H // Hkv, d
        self.dtype, self.acc, self.device = k.dtype, acc_dtype(k.dtype), k.device
        self.length = n
        a, r = divmod(n, m)  # the block being filled and its tokens so far
        self._check_levels(n)
        # The keys and values a query of block a attends to, in the accumulation dtype: slots
        # [0, m) block a-1, [m, 2m) block a (beyond the last token: not seen yet, masked by
        # ``bias``), then the block's coarse summaries (nlogn; see _start_block).
        self.keys = torch.zeros(B, Hkv, 2 * m, d, dtype=self.acc, device=self.device)
        self.values = torch.zeros_like(self.keys)
        lo = max(0, (a - 1) * m)
        self.keys[:, :, m - (a * m - lo):m + r] = k[:, :, lo:]
        self.values[:, :, m - (a * m - lo):m + r] = v[:, :, lo:]
        self.bias = None
        self.fine_q = q.new_zeros(B, H, m, d) if self.linear else None
        if self.linear:
            self.fine_q[:, :, :r] = q[:, :, a * m:]
        # Complete windows per level: levels[l-1] is a deque of (window, zk, zv), the last three.
        self.levels: list[deque] = []
        self.partial: list[list[torch.Tensor]] = []  # conv: [zk, zv] of each level's filling window
        if self.summaries.bottom_up:
            zk, zv = (self.summaries.leaves(x[:, :, :a * m].reshape(B, Hkv, a, m, d), self.p, w)
                      for w, x in enumerate((k, v)))
            for l in self._level_range(a):
                self.levels.append(deque(((c, zk[:, :, c].clone(), zv[:, :, c].clone()) for c in range(max(0, zk.shape[2] - 3),
                                                                                      zk.shape[2])), maxlen=3))
                up = zk.shape[2] // 2
                zk, zv = (self.summaries.parents(z[:, :, :2 * up], up, w) for w, z in enumerate((zk, zv)))
        else:
            for l in range(1, self._conv_levels() + 1):
                w_l = m << (l - 1)
                done = n // w_l
                self.levels.append(deque((
                    (c, *(self.summaries.window_part(x[:, :, c * w_l:(c + 1) * w_l], l, 0, w) for w, x in
                          enumerate((k, v))))
                    for c in range(max(0, done - 3), done)), maxlen=3))
                self.partial.append([self.summaries.window_part(x[:, :, done * w_l:], l, 0, w)
                                     for w, x in enumerate((k, v))])
        # Linear variant: query sums of complete windows per level, the last two (a window's and its sibling's).
        self.qsums: list[deque] = []
        if self.linear:
            s = q[:, :, :a * m].reshape(B, H, a, m, d).sum(dim=3)  # (B, H, a, d)
            for l in self._level_range(a):
                self.qsums.append(deque(((c, s[:, :, c].clone()) for c in range(max(0, s.shape[2] - 2), s.shape[2])),
                                        maxlen=2))
                up = s.shape[2] // 2
                s = s[:, :, :2 * up].reshape(B, H, up, 2, d).sum(dim=3)
        self.coarse, self.block = None, -1  # the block whose coarse summaries the buffers hold; built on first use
        return self

    def _level_range(self, complete_blocks: int):
        """Levels that have a complete window after ``complete_blocks`` blocks (bottom-up kinds)."""
        top = complete_blocks.bit_length()  # level l has one once complete_blocks >= 2**(l-1)
        if self.max_level is not None:
            top = min(top, self.max_level)
        return range(1, top + 1)

    def _conv_levels(self) -> int:
        top = self.summaries.n_levels
        return top if self.max_level is None else min(top, self.max_level)

    def _check_levels(self, n: int) -> None:
        """The forward at ``n`` tokens would refuse summaries that cannot serve it: so does the cache."""
        levels = num_levels(n, self.m)
        if self.max_level is not None:
            levels = min(levels, self.max_level)
        if levels and not self.summaries.bottom_up and levels > self.summaries.n_levels:
            self.summaries.check(hierarchy(n, self.m, self.p, True))  # raises, naming the fix

    # ------------------------------------------------------------------ one token
    @torch.no_grad()
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output of the token at position ``self.length``: q (B, H, 1, d), k, v
        (B, Hkv, 1, d) -> (B, H, 1, d). Appends the token to the state."""
        t, m = self.length, self.m
        a, r = divmod(t, m)
        self._check_levels(t + 1)
        if self.block != a:
            self._start_block(a, r)
        self.keys[:, :, m + r] = k[:, :, 0]
        self.values[:, :, m + r] = v[:, :, 0]
        self.bias[..., m + r] = 0.0
        if self.linear:
            self.fine_q[:, :, r] = q[:, :, 0]
        qg = q.reshape(self.B, self.Hkv, self.G, self.d).to(self.acc) * self.scale
        out = _attend(qg, self.keys, self.values, self.bias, extra=self._far_field(q))
        self._append(k, v)
        return out.reshape(self.B, self.H, 1, self.d).to(q.dtype)

    def _far_field(self, q: torch.Tensor):
        """What the token sees besides the keys of ``self.keys``, as a partial ``(lse, out)``, or
        None: the linear variant's coarse levels (one per block); :class:`RefinedCache`'s far field."""
        return self.coarse if self.linear else None

    def _window_done(self, level: int, c: int, zk: torch.Tensor, zv: torch.Tensor) -> None:
        """Window ``c`` of ``level`` is complete, with summaries ``zk, zv`` (B, Hkv, p, d): a hook
        for caches that keep every window (:class:`RefinedCache`)."""

    def _append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Advance the state past the token just attended (its keys are in the fine slots)."""
        t, m = self.length, self.m
        self.length = t + 1
        if not self.summaries.bottom_up:  # conv: every level's filling window takes the token's share
            for l in range(1, self._conv_levels() + 1):
                w_l = m << (l - 1)
                part = self.partial[l - 1]
                for w, x in enumerate((k, v)):
                    part[w] = part[w] + self.summaries.window_part(x, l, t % w_l, w)
                if (t + 1) % w_l == 0:
                    if len(self.levels) < l:
                        self.levels.append(deque(maxlen=3))
                    self.levels[l - 1].append((t // w_l, part[0], part[1]))
                    self._window_done(l, t // w_l, part[0], part[1])
                    self.partial[l - 1] = [torch.zeros_like(part[0]), torch.zeros_like(part[1])]
        if (t + 1) % m == 0:
            self._finish_block(t // m)

    def _finish_block(self, a: int) -> None:
        """Block ``a`` is complete: its summaries and their complete ancestors join the levels."""
        m, B, Hkv, d = self.m, self.B, self.Hkv, self.d
        if self.summaries.bottom_up:  # from the block's keys in the model's dtype, as the forward's
            z = [self.summaries.leaves(x[:, :, m:2 * m].to(self.dtype).reshape(B, Hkv, 1, m, d), self.p, w)
                 for w, x in enumerate((self.keys, self.values))]  # (B, Hkv, 1, p, d)
            self._climb(self.levels, a, z, lambda pair, w: self.summaries.parents(pair, 1, w),
                        done=self._window_done)
        if self.linear:
            s = self.fine_q.sum(dim=2, keepdim=True)  # (B, H, 1, d)
            self._climb(self.qsums, a, [s], lambda pair, w: pair.sum(dim=2, keepdim=True), keep=2)
        self.keys[:, :, :m] = self.keys[:, :, m:2 * m]
        self.values[:, :, :m] = self.values[:, :, m:2 * m]

    def _climb(self, levels: list, a: int, z: list, parent, keep: int = 3, done=None) -> None:
        """Add window ``a`` of level 1 with values ``z`` (a list of (B, *, 1, ...) tensors), then each
        parent it completes (an odd window completes its parent), formed by ``parent(pair, which)``;
        ``done(level, window, *values)`` is told of each."""
        c, l = a, 1
        while self.max_level is None or l <= self.max_level:
            if len(levels) < l:
                levels.append(deque(maxlen=keep))
            levels[l - 1].append((c, *(x[:, :, 0] for x in z)))
            if done is not None:
                done(l, c, *(x[:, :, 0] for x in z))
            if c % 2 == 0:
                return
            (c0, *left), (c1, *right) = levels[l - 1][-2], levels[l - 1][-1]
            assert (c0, c1) == (c - 1, c), "a window's sibling must precede it"
            z = [parent(torch.stack([x, y], dim=2), w) for w, (x, y) in enumerate(zip(left, right))]
            c, l = c // 2, l + 1

    def _window(self, levels: list, level: int, c: int):
        for entry in levels[level - 1]:
            if entry[0] == c:
                return entry[1:]
        raise AssertionError(f"window {c} of level {level} is not cached")

    def _start_block(self, a: int, r: int) -> None:
        """Block ``a`` is being filled and holds ``r`` tokens: lay out what its queries see."""
        m = self.m
        slot = torch.arange(2 * m, device=self.device)
        seen = (slot < m + r) & ((slot >= m) | (a > 0))  # block a-1 if any, block a's tokens so far
        fine_bias = torch.zeros(2 * m, dtype=self.acc, device=self.device).masked_fill_(~seen, -math.inf)
        coarse = self._coarse_of_block(a)
        if self.linear:
            self.coarse, self.bias = coarse, fine_bias
        else:
            ck, cv, cbias = coarse
            self.keys = torch.cat([self.keys[:, :, :2 * m], ck], dim=2)
            self.values = torch.cat([self.values[:, :, :2 * m], cv], dim=2)
            self.bias = torch.cat([fine_bias.expand(*cbias.shape[:-1], -1), cbias], dim=-1)
        self.block = a

    def _coarse_of_block(self, a: int):
        """What block ``a``'s queries see on the coarse levels: nlogn ``(keys, values, bias)``,
        (B, Hkv, S, d) and (S,) (per head (Hkv, G, S) with level offsets); linear the merged
        partial ``(lse, out)`` of its levels."""
        keys, vals, bias, scores = [], [], [], []
        l = 1
        while (a >> (l - 1)) >= 2 and (self.max_level is None or l <= self.max_level):
            c = a >> (l - 1)  # block a's window on level l; its list holds complete windows only
            ks, vs = [], []
            for cw in coarse_windows(c, True):
                if cw >= 0:
                    zk, zv = self._window(self.levels, l, cw)
                    ks.append(zk)
                    vs.append(zv)
            kl, vl = torch.cat(ks, dim=2).to(self.acc), torch.cat(vs, dim=2).to(self.acc)  # (B, Hkv, S_l, d)
            # A complete window's summaries each stand for w_l / p tokens: the log-weight log(count).
            b = math.log((self.m << (l - 1)) // self.p) if self.weighted else 0.0
            bl = torch.full((kl.shape[2],), b, dtype=self.acc, device=self.device)
            if self.level_offset is not None:  # (H,) of this level -> (Hkv, G, S_l)
                off = self.level_offset[:, l - 1].to(self.device, self.acc).view(self.Hkv, self.G, 1)
                bl = bl + off
            if self.linear:  # one mean query per window: the previous window's (causal)
                w_l = self.m << (l - 1)
                (qs,) = self._window(self.qsums, l, c - 1)
                qbar = (qs.to(self.acc) / w_l).reshape(self.B, self.Hkv, self.G, self.d) * self.scale
                scores.append(qbar @ kl.transpose(-1, -2) + bl)
            keys.append(kl)
            vals.append(vl)
            bias.append(bl)
            l += 1
        S_shape = (self.B, self.Hkv, 0, self.d)
        k = torch.cat(keys, dim=2) if keys else torch.zeros(S_shape, dtype=self.acc, device=self.device)
        v = torch.cat(vals, dim=2) if vals else torch.zeros(S_shape, dtype=self.acc, device=self.device)
        if not self.linear:
            if not bias:
                return k, v, torch.zeros(0, dtype=self.acc, device=self.device)
            return k, v, torch.cat([x.expand(*bias[-1].shape[:-1], -1) for x in bias], dim=-1)
        if not scores:
            return None
        s = torch.cat(scores, dim=-1)  # (B, Hkv, G, S): each level's scores with its own mean query
        lse = torch.logsumexp(s, dim=-1)
        out = torch.softmax(s, dim=-1) @ v  # (B, Hkv, G, d)
        return lse, out

    def nbytes(self) -> int:
        """Bytes of tensors this layer's cache holds."""
        tensors = [self.keys, self.values, self.bias, self.fine_q]
        for lv in (*self.levels, *self.qsums):
            for entry in lv:
                tensors += entry[1:]
        for part in self.partial:
            tensors += part
        if self.linear and self.coarse is not None:
            tensors += list(self.coarse)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def cold_nbytes(self) -> int:
        """Bytes kept outside the hot state (:class:`RefinedCache`'s store): none here."""
        return 0


class RefinedCache(MultipoleCache):
    """A causal multipole layer with adaptive refinement (``refine = K``, :mod:`.refine`).

    A token's selection descends from its interaction list's windows to ``K`` fine blocks
    anywhere before its neighbourhood. Its fine neighbourhood is :class:`MultipoleCache`'s
    hot state, kept as there (``O(m d)``); its far field reads a *store*:

    - the summaries and the key boxes (:func:`.refine.window_boxes`) of every complete window
      of every level (``2 (p + 1) / m`` rows a token): the selection scores the interaction
      list's windows and each descent's two children by their boxes, and attends the windows
      left unopened through their summaries;
    - the keys and values of every token: each token reads the ``K m`` of its opened blocks.

    The store lives on ``store_device`` (default the compute device; ``"cpu"`` keeps it in
    host memory, and the far field is then computed there: the query goes to the store and
    one partial softmax per head comes back, so nothing of size ``n`` crosses). Its
    summaries are laid out for a capacity that doubles when the sequence reaches it, its
    keys and values grow by half again, so a token costs ``O(m + p L + K (m + p L))`` as in
    the forward, plus an amortised copy. The selection and the far-field softmax are
    :func:`.refine.select` and :func:`.refine.far_attention` themselves, over a hierarchy laid
    out for the capacity: a causal query's candidates are complete windows before its own,
    at the same indices whatever the sequence's final length, so every output equals the
    full forward's.
    """

    def __init__(self, summaries: Summaries, *, refine: int, store_device=None, flat_top: bool = False,
                 select_reach=None, **kw):
        super().__init__(summaries, **kw)
        self.select_reach = select_reach  # fma's: selection scores past this distance as at it
        self.flat_top = flat_top  # fma's: the top kept level's lists hold every earlier window of it
        if refine < 1 or self.linear:
            raise ValueError("RefinedCache needs refine >= 1 and variant='nlogn'; use MultipoleCache")
        self.refine, self.store_device = refine, store_device
        self.layout = self.ks = self.vs = self.k_store = self.v_store = self.boxes = None
        self.ws = Scratch()

    @torch.no_grad()
    def prefill(self, q, k, v) -> "RefinedCache":
        super().prefill(q, k, v)
        n = k.shape[2]
        self.store_device = torch.device(self.store_device or self.device)
        self._reserve_tokens(n + 1)
        self.k_store[:, :, :n], self.v_store[:, :, :n] = k, v
        self._lay_out(n + 1)
        h = self._call_hierarchy(n)
        if h.n_levels:  # the forward's summaries of the prompt
            self._place(*self.summaries(k, v, h), h, n)
        for l, entries in enumerate(self.levels, start=1):  # levels above the prompt's own: their few windows
            for c, wk, wv in entries:
                self._window_done(l, c, wk, wv)
        return self

    def _call_hierarchy(self, n: int) -> Hierarchy:
        return call_hierarchy(n, self.m, self.p, True, self.max_level, None, self.flat_top)

    def _place(self, zk: torch.Tensor, zv: torch.Tensor, h: Hierarchy, tokens: int) -> None:
        """Copy the complete windows (within ``tokens`` tokens) of summaries laid out by ``h`` into
        the store's layout."""
        for l in range(1, h.n_levels + 1):
            rows, src, dst = tokens // h.window_size(l) * self.p, h.offsets[l - 1], self.layout.offsets[l - 1]
            self.ks[:, :, dst:dst + rows], self.vs[:, :, dst:dst + rows] = zk[:, :, src:src + rows], zv[:, :, src:src + rows]

    def _reserve_tokens(self, tokens: int) -> None:
        """Room for ``tokens`` keys and values in the store, in whole blocks, growing by half again."""
        have = 0 if self.k_store is None else self.k_store.shape[2]
        if tokens <= have:
            return
        size = -(-max(tokens, have + have // 2) // self.m) * self.m
        new = [torch.zeros(self.B, self.Hkv, size, self.d, dtype=self.acc, device=self.store_device)
               for _ in range(2)]
        if have:
            new[0][:, :, :have], new[1][:, :, :have] = self.k_store, self.v_store
        self.k_store, self.v_store = new

    def _lay_out(self, tokens: int) -> None:
        """Lay the summaries out for at least ``tokens`` tokens (a power of two of blocks), moving
        what they hold."""
        if self.layout is not None and tokens <= self.layout.n:
            return
        m = self.m
        blocks = 1 << max(2, (-(-tokens // m) - 1).bit_length())
        levels = blocks.bit_length()  # a complete window of level l needs 2**(l-1) blocks
        if self.max_level is not None:
            levels = min(levels, self.max_level)
        old = self.layout, self.ks, self.vs
        self.layout = h = extend(self._call_hierarchy(blocks * m), levels)
        self.ks = torch.zeros(self.B, self.Hkv, h.num_summaries, self.d, dtype=self.acc, device=self.store_device)
        self.vs = torch.zeros_like(self.ks)
        if old[0] is not None:
            self._place(old[1], old[2], old[0], self.length)
        self.offset = None
        # The boxes of the windows complete so far (those still filling are rebuilt as they complete).
        self.boxes = window_boxes(self.k_store[:, :, :h.padded_len], h, limit=self.length)
        if self.level_offset is not None and h.n_levels:  # (H, layout levels); levels no query sees yet: 0
            off = self.level_offset[:, :h.n_levels].to(self.store_device, self.acc)
            self.offset = torch.nn.functional.pad(off, (0, h.n_levels - off.shape[1]))

    def _window_done(self, level: int, c: int, zk: torch.Tensor, zv: torch.Tensor) -> None:
        at = self.layout.offsets[level - 1] + c * self.p
        self.ks[:, :, at:at + self.p], self.vs[:, :, at:at + self.p] = zk, zv
        row = sum(self.layout.windows[:level - 1]) + c  # the boxes' rows: levels in turn from level 1
        if level == 1:  # its block's keys
            keys = self.k_store[:, :, c * self.m:(c + 1) * self.m]  # (B, Hkv, m, d)
            hi, lo = keys.amax(2), keys.amin(2)
        else:  # its two children's (2c and 2c + 1 on the level below), complete before it
            first = sum(self.layout.windows[:level - 2]) + 2 * c
            centre, radius = (x[:, :, first:first + 2] for x in self.boxes)  # (B, Hkv, 2, d)
            hi, lo = (centre + radius).amax(2), (centre - radius).amin(2)
        self.boxes.centre[:, :, row], self.boxes.radius[:, :, row] = (hi + lo) / 2, (hi - lo) / 2

    def _coarse_of_block(self, a: int):
        """No fixed coarse keys: the far field is chosen per token (:meth:`_far_field`)."""
        empty = torch.zeros(self.B, self.Hkv, 0, self.d, dtype=self.acc, device=self.device)
        return empty, empty, torch.zeros(0, dtype=self.acc, device=self.device)

    @torch.no_grad()
    def step(self, q, k, v):
        t = self.length
        self._reserve_tokens(t + 1)
        self._lay_out(t + 1)
        self.k_store[:, :, t], self.v_store[:, :, t] = k[:, :, 0], v[:, :, 0]
        return super().step(q, k, v)

    def _far_field(self, q: torch.Tensor):
        """The token's opened blocks and remaining candidates, computed where the store is:
        ``(lse (B, Hkv, G), out (B, Hkv, G, d))`` on the compute device."""
        h, t = self.layout, self.length
        if not h.n_levels:
            return None
        q = q.to(self.store_device)
        sel = select(q, self.boxes, h, self.refine, self.scale, i0=t, reach=self.select_reach)  # (B, Hkv, 1, K), 2 x (B, Hkv, 1, C)
        kb, vb = (x.view(self.B, self.Hkv, -1, self.m * self.d) for x in (self.k_store, self.v_store))
        out, lse = far_attention(q, t + 1, self.offset, h, sel, kb, vb, self.ks, self.vs, self.weighted,
                                 self.scale, self.ws, reach=self.select_reach,
                                 pos=torch.tensor([t], device=q.device))  # (B, Hkv, 1, G, d), (B, Hkv, 1, G, 1)
        return lse[:, :, 0, :, 0].to(self.device), out[:, :, 0].to(self.device)

    def nbytes(self) -> int:
        return super().nbytes() + self.cold_nbytes()

    def cold_nbytes(self) -> int:
        """Bytes of the store (on ``store_device``: every window's summaries and key box, every
        token's key and value); the rest is the hot state, ``O((m + p log n) d)`` as the plain cache's."""
        return sum(x.nbytes for x in (self.ks, self.vs, *self.boxes, self.k_store, self.v_store))


class KVCache:
    """Full attention's key/value cache: every key and value so far, ``O(n d)`` per layer."""

    def __init__(self, scale: float | None = None, reserve: int = 256):
        self.scale, self.reserve, self.length = scale, reserve, 0

    @torch.no_grad()
    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        B, n, d = k.shape[0], k.shape[2], k.shape[3]
        self.G = q.shape[1] // k.shape[1]
        if self.scale is None:
            self.scale = 1.0 / math.sqrt(d)
        self.k = k.new_empty(B, k.shape[1], n + self.reserve, d)
        self.v = v.new_empty(self.k.shape)
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        self.length = n
        return self

    @torch.no_grad()
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = self.length
        if t == self.k.shape[2]:  # grow by half again: amortised O(1) copies per token
            grow = max(self.reserve, t // 2)
            self.k = torch.cat([self.k, self.k.new_empty(*self.k.shape[:2], grow, self.k.shape[3])], dim=2)
            self.v = torch.cat([self.v, self.v.new_empty(self.k.shape)], dim=2)
        self.k[:, :, t], self.v[:, :, t] = k[:, :, 0], v[:, :, 0]
        self.length = t + 1
        B, H, _, d = q.shape
        acc = acc_dtype(q.dtype)
        qg = q.reshape(B, -1, self.G, d).to(acc) * self.scale  # (B, Hkv, G, d)
        kk, vv = self.k[:, :, :t + 1].to(acc), self.v[:, :, :t + 1].to(acc)
        out = torch.softmax(qg @ kk.transpose(-1, -2), dim=-1) @ vv
        return out.reshape(B, H, 1, d).to(q.dtype)

    def nbytes(self) -> int:
        """Bytes of the keys and values so far (the reserve beyond them not counted)."""
        return 2 * self.k[:, :, :self.length].numel() * self.k.element_size()

    def cold_nbytes(self) -> int:
        return 0


__all__ = ["MultipoleCache", "RefinedCache", "KVCache"]
