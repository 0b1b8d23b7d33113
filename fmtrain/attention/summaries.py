"""Key and value summaries of the coarse windows: ``mean``, ``m2m`` and ``conv``.

Every kind is a linear map of the (zero-padded) tokens, computed level by level:
``z_l`` of shape ``(B, H, windows_l, p, d)``. The summary a query sees is
``z_l * (w_l/p) / count``, where ``count`` is the number of real tokens behind
it, so that the averaging maps give the exact mean of the real tokens even in
a partial last window; summaries with no real token are masked by the
hierarchy. Keeping the ``z`` linear in the keys is what lets sequence
parallelism build coarse levels from all-gathered partial summaries.

- ``mean``: parameter-free averages (the reference definition).
- ``m2m``: bottom-up learned maps, like the FMM's multipole-to-multipole
  translation: level 1 from the ``m`` tokens of each window (``A: p x m``),
  level ``l+1`` from the ``2p`` summaries of its two children (``B: p x 2p``),
  per key/value head. Parameters do not depend on ``n``.
- ``conv``: the paper's per-level convolution with kernel = stride = window,
  per channel; parameters grow with the longest sequence it was built for.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hierarchy import (Hierarchy, cached_on_device, hierarchy, num_levels, pad_to, sizes_error,
                        summary_scales, window_divisors)

SUMMARY_KINDS = ("m2m", "conv", "mean")


def _pair_children(z: torch.Tensor, windows_up: int) -> torch.Tensor:
    """(B, H, w, p, d) -> (B, H, windows_up, 2p, d): the two children of each parent."""
    B, H, w, p, d = z.shape
    if w < 2 * windows_up:
        z = F.pad(z, (0, 0, 0, 0, 0, 2 * windows_up - w))
    return z.reshape(B, H, windows_up, 2 * p, d)


def finish(zs: list[torch.Tensor], h: Hierarchy) -> torch.Tensor:
    """Concatenate the levels' ``z`` and scale each to the mean of its real tokens.

    ``zs[l-1]``: (B, H, windows_l, p, d). Returns (B, H, num_summaries, d).
    """
    if not zs:
        return zs  # type: ignore[return-value]
    z = torch.cat([z.flatten(2, 3) for z in zs], dim=2)  # (B, H, num_summaries, d)
    return z * summary_scales(h, z.device, z.dtype)[:, None]


class Summaries(nn.Module):
    """Base class: ``forward(k, v, h) -> (ks, vs)``, each (B, H, num_summaries, d).

    Two ways to form a window's ``z``, which the sequence-parallel path and the
    decoding cache use piece by piece:
    - bottom-up kinds (``bottom_up = True``: ``mean``, ``m2m``): level 1 by
      :meth:`leaves` from a fine block's tokens, level ``l+1`` by :meth:`parents` from
      its two children on level ``l``;
    - the others (``conv``): every level from its window's tokens, a sum of
      :meth:`window_part` over any split of the window.
    """

    bottom_up = True

    def leaves(self, xb: torch.Tensor, rank: int, which: int) -> torch.Tensor:
        """Level-1 ``z`` of whole fine blocks: (B, H, nb, m, d) -> (B, H, nb, rank, d)."""
        raise NotImplementedError

    def parents(self, z: torch.Tensor, windows_up: int, which: int) -> torch.Tensor:
        """Parents from children: (B, H, w, p, d) -> (B, H, windows_up, p, d) (missing children: zeros)."""
        raise NotImplementedError

    def check(self, h: Hierarchy) -> None:
        """Raise if these summaries cannot serve ``h``."""

    def maps(self, h: Hierarchy, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The leaf map (2, heads or 1, p, m) and the up map (2, heads or 1, p, 2p), keys' then
        values', for the Triton kernels that build every level at once
        (:mod:`.kernels.summaries`); None where the kind has no such form."""
        return None

    def zs(self, x: torch.Tensor, h: Hierarchy, which: int) -> list[torch.Tensor]:
        """Unscaled per-level summaries of ``x`` (0: keys, 1: values)."""
        self.check(h)
        B, H, _, d = x.shape
        z = self.leaves(pad_to(x, h.padded_len).view(B, H, h.n_blocks, h.block_size, d), h.rank, which)
        zs = [z]
        for nw in h.windows[1:]:
            z = self.parents(z, nw, which)
            zs.append(z)
        return zs

    def forward(self, k: torch.Tensor, v: torch.Tensor, h: Hierarchy, impl: str = "torch"):
        """(ks, vs), each (B, H, num_summaries, d). ``impl``: the attention core's
        (:func:`~.cores.select_core`); where it is Triton, every level is built by the kernels of
        :mod:`.kernels.summaries` (a constant number of launches), else level by level here."""
        if h.n_levels == 0:
            empty = k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3])
            return empty, empty
        if impl != "torch" and (maps := self.maps(h, k)) is not None and k.dtype == v.dtype:
            from .cores import runs_on_triton

            if runs_on_triton(impl, k):
                from .kernels.summaries import tree_summaries

                self.check(h)
                return tree_summaries(k, v, *maps, h)
        return finish(self.zs(k, h, 0), h), finish(self.zs(v, h, 1), h)


def averaging_maps(block_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps that make ``m2m`` the ``mean``: leaf (p, m) averages each sub-window's ``m/p``
    tokens, up (p, 2p) each pair of sub-windows."""
    sub = block_size // rank
    eye = torch.eye(rank)
    return eye.repeat_interleave(sub, dim=1) / sub, eye.repeat_interleave(2, dim=1) / 2


class MeanSummaries(Summaries):
    """Parameter-free means of each sub-window."""

    def maps(self, h, like):
        def make():
            leaf, up = averaging_maps(h.block_size, h.rank)
            return tuple(x.expand(2, 1, *x.shape).contiguous().to(like.device) for x in (leaf, up))
        return cached_on_device(("averaging maps", h.block_size, h.rank, like.device), make)

    def leaves(self, xb, rank, which):
        B, H, nb, m, d = xb.shape
        return xb.view(B, H, nb, rank, m // rank, d).mean(dim=4)

    def parents(self, z, windows_up, which):
        B, H, _, p, d = z.shape
        return _pair_children(z, windows_up).view(B, H, windows_up, p, 2, d).mean(dim=4)


class M2MSummaries(Summaries):
    """Bottom-up learned summaries, initialised to averaging (= ``mean``)."""

    def __init__(self, n_heads: int, block_size: int, rank: int):
        super().__init__()
        if (err := sizes_error(block_size, rank)) is not None:
            raise ValueError(f"m2m summaries: {err}")
        self.block_size, self.rank = block_size, rank
        # leaf[which, h]: (p, m) tokens -> summaries; up[which, h]: (p, 2p) children -> parent.
        self.leaf = nn.Parameter(torch.empty(2, n_heads, rank, block_size))
        self.up = nn.Parameter(torch.empty(2, n_heads, rank, 2 * rank))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        leaf, up = averaging_maps(self.block_size, self.rank)
        self.leaf.copy_(leaf)
        self.up.copy_(up)

    def maps(self, h, like):
        return self.leaf, self.up

    def check(self, h):
        if (h.block_size, h.rank) != (self.block_size, self.rank):
            raise ValueError(
                f"m2m summaries were built for block_size={self.block_size}, rank={self.rank}; "
                f"called with block_size={h.block_size}, rank={h.rank}"
            )

    def leaves(self, xb, rank, which):
        return torch.einsum("hjt,bhctd->bhcjd", self.leaf[which].to(xb.dtype), xb)

    def parents(self, z, windows_up, which):
        return torch.einsum("hji,bhcid->bhcjd", self.up[which].to(z.dtype), _pair_children(z, windows_up))


class ConvSummaries(Summaries):
    """The paper's learned summaries: per level, a per-channel convolution whose
    kernel and stride are the window, with ``p`` outputs per channel.

    Built for sequences up to ``max_seq_len`` (its parameters grow with it).
    """

    bottom_up = False

    def __init__(self, head_dim: int, block_size: int, rank: int, max_seq_len: int):
        super().__init__()
        self.block_size, self.rank, self.max_seq_len = block_size, rank, max_seq_len
        self.n_levels = num_levels(max_seq_len, block_size)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(2, head_dim, rank, block_size << l))
            for l in range(self.n_levels)
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        p = self.rank
        for w in self.weights:
            sub = w.shape[-1] // p
            w.copy_(torch.eye(p).repeat_interleave(sub, dim=1) / sub)

    def check(self, h):
        if h.n_levels > self.n_levels or (h.block_size, h.rank) != (self.block_size, self.rank):
            raise ValueError(
                f"conv summaries were built for sequences up to {self.max_seq_len} tokens "
                f"(block_size={self.block_size}, rank={self.rank}); got n={h.n} "
                f"(block_size={h.block_size}, rank={h.rank}). Build the model with a larger "
                "max_seq_len, or use summary='m2m', which runs at any length"
            )

    def window_part(self, x: torch.Tensor, level: int, offset: int, which: int) -> torch.Tensor:
        """The share of tokens ``x`` (B, H, C, d), at offsets ``[offset, offset + C)`` of a
        window of ``level``, in that window's ``z``: (B, H, p, d). Summed over the pieces of
        a window it is the window's ``z``, since the map is linear."""
        wt = self.weights[level - 1][which][:, :, offset:offset + x.shape[2]].to(x.dtype)  # (d, p, C)
        return torch.einsum("bhtd,djt->bhjd", x, wt)

    def zs(self, x, h, which):
        self.check(h)
        B, H, _, d = x.shape
        zs = []
        for l in range(1, h.n_levels + 1):
            w, nw = h.window_size(l), h.windows[l - 1]
            xw = pad_to(x, nw * w).view(B, H, nw, w, d)
            zs.append(torch.einsum("bhctd,djt->bhcjd", xw, self.weights[l - 1][which].to(x.dtype)))
        return zs


MEAN = MeanSummaries()


def build_summaries(kind: str, *, n_kv_heads: int, head_dim: int, block_size: int,
                    rank: int, max_seq_len: int | None = None) -> Summaries:
    """The summary module for ``kind`` in :data:`SUMMARY_KINDS`."""
    if kind == "mean":
        return MeanSummaries()
    if kind == "m2m":
        return M2MSummaries(n_kv_heads, block_size, rank)
    if kind == "conv":
        if not max_seq_len:
            raise ValueError("summary='conv' needs max_seq_len (its parameters depend on the length)")
        return ConvSummaries(head_dim, block_size, rank, max_seq_len)
    raise ValueError(f"unknown summary kind {kind!r}; choose one of {SUMMARY_KINDS}")


def summary_positions(h: Hierarchy) -> torch.Tensor:
    """(num_summaries,) float64: the mean position of the real tokens behind each summary."""
    out = []
    for l in range(1, h.n_levels + 1):
        sub = h.window_size(l) // h.rank
        count = h.summary_counts(l).flatten()
        start = torch.arange(count.numel(), dtype=torch.float64) * sub
        out.append(start + (count.clamp(min=1) - 1) / 2)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class WindowRotated:
    """Summaries of un-rotated keys, each rotated at its sub-window's mean position.

    The layer's keys arrive rotated by RoPE at their own positions; a mean of keys rotated
    at different positions averages RoPE's high frequencies away. This wraps a
    :class:`Summaries` (whose parameters stay the layer's own): it undoes the rotation
    (positions ``0..n-1``), summarises, and rotates each key summary at
    :func:`summary_positions`. Values are not rotated. Whole sequences only: the
    piecewise methods (sequence parallelism, the decoding cache) are not available.
    """

    def __init__(self, inner: Summaries, head_dim: int, theta: float, scaling: dict | None):
        self.inner, self.head_dim, self.theta, self.scaling = inner, head_dim, theta, scaling
        self.bottom_up = inner.bottom_up

    def check(self, h):
        self.inner.check(h)

    def _piecewise(self, *_):
        raise ValueError("summaries rotated at their windows (model.summary_rope='window') run on whole "
                         "sequences only: no sequence parallelism or decoding cache yet")

    leaves = parents = window_part = _piecewise

    def __call__(self, k, v, h, impl: str = "torch"):
        from .rope import apply_rope, rope_angles

        if h.n_levels == 0:
            return self.inner(k, v, h, impl)
        n = k.shape[2]
        cos, sin = rope_angles(torch.arange(n, device=k.device), self.head_dim, self.theta, self.scaling)
        ks, vs = self.inner(apply_rope(k, cos, -sin), v, h, impl)
        cos, sin = rope_angles(summary_positions(h).to(k.device), self.head_dim, self.theta, self.scaling)
        return apply_rope(ks, cos, sin), vs


def window_means(x: torch.Tensor, h: Hierarchy) -> list[torch.Tensor]:
    """Mean of the real tokens of every window, per coarse level: [(B, H, windows_l, d)].

    Used for the queries of the linear variant (padding never counts).
    """
    B, H, _, d = x.shape
    s = pad_to(x, h.padded_len).view(B, H, h.n_blocks, h.block_size, d).sum(dim=3)
    out = []
    for l, nw in enumerate(h.windows, start=1):
        if l > 1:
            s = _pair_children(s.unsqueeze(3), nw).sum(dim=3)
        out.append(s / window_divisors(h, l, x.device, x.dtype)[:, None])
    return out


__all__ = ["SUMMARY_KINDS", "WindowRotated", "summary_positions", "Summaries", "MeanSummaries", "M2MSummaries", "ConvSummaries",
           "MEAN", "build_summaries", "window_means", "finish", "hierarchy"]
