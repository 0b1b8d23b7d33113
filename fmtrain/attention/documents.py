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
from dataclasses import dataclass

import torch


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


__all__ = ["Documents", "as_documents", "cu_seqlens_from_doc_positions"]
