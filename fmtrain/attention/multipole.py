"""``fma(q, k, v)``: the multipole attention op, SDPA-like. It checks its inputs and sends them
to one path: the dense reference (:mod:`.reference`), the blocked PyTorch or Triton core
(:mod:`.blocked`), adaptive refinement (:mod:`.refine`) or sequence parallelism
(:mod:`.sequence_parallel`); all of them share the hierarchy of :mod:`.hierarchy`."""
from __future__ import annotations

import math

import torch

from .blocked import blocked_multipole, summarized_attention
from .documents import Documents, as_documents, doc_hierarchy, doc_summaries, from_layout, to_layout
from .hierarchy import call_hierarchy, sizes_error
from .refine import refined_multipole
from .reference import dense_attention, dense_refined
from .sequence_parallel import sp_fma, sp_refined
from .sp_documents import sp_documents, sp_documents_refined
from .summaries import MEAN, Summaries

IMPLS = ("auto", "torch", "triton", "dense")
VARIANTS = ("nlogn", "linear")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q, k, v, block_size, rank, impl, variant):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"fma: {name} must be a 4-D tensor (batch, heads, n, head_dim), got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"fma: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if min(q.shape[1], k.shape[1], q.shape[3]) < 1:
        raise ValueError(f"fma: q {tuple(q.shape)} and k/v {tuple(k.shape)} need at least one head each and "
                         "head_dim >= 1")
    B, H, n, d = q.shape
    if k.shape[0] != B or k.shape[2] != n:
        raise ValueError(
            f"fma: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and sequence length "
            "(multipole attention is self-attention over one sequence)")
    if k.shape[3] != d:
        raise ValueError(f"fma: head_dim of q ({d}) and k/v ({k.shape[3]}) differ; project them to the same size")
    if H % k.shape[1]:
        raise ValueError(
            f"fma: q has {H} heads, k/v have {k.shape[1]}; grouped-query attention needs the "
            "query heads to be a multiple of the key/value heads")
    if n < 1:
        raise ValueError("fma: the sequence is empty (n=0); multipole attention needs n >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"fma: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if q.dtype not in _DTYPES:
        raise TypeError(f"fma: dtype {q.dtype} is not supported; use one of {', '.join(map(str, _DTYPES))}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"fma: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if (err := sizes_error(block_size, rank)) is not None:
        raise ValueError(f"fma: {err}")
    if impl not in IMPLS:
        raise ValueError(f"fma: unknown impl {impl!r}; choose one of {IMPLS}")
    if variant not in VARIANTS:
        raise ValueError(f"fma: unknown variant {variant!r}; choose one of {VARIANTS}")


def fma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64, rank: int = 2,
        causal: bool = True, weighted: bool = True, scale: float | None = None, impl: str = "auto",
        variant: str = "nlogn", summaries: Summaries | None = None,
        max_level: int | None = None, group=None, level_offset: torch.Tensor | None = None,
        refine: int = 0, cu_seqlens=None, flat_top: bool = False, select_reach=None) -> torch.Tensor:
    """Fast multipole attention.

    Args:
        q: (batch, heads, n, head_dim); k, v: (batch, kv_heads, n, head_dim),
            ``heads`` a multiple of ``kv_heads`` (grouped-query attention).
        block_size: ``m``, tokens per fine block.
        rank: ``p``, summaries per coarse window (divides ``block_size``).
        causal: mask keys after the query.
        weighted: add ``log(tokens behind a summary)`` to its score (the paper's ``scale_attn``).
        scale: score scale, default ``1/sqrt(head_dim)``.
        impl: ``"auto"`` (Triton kernels on CUDA, else ``"torch"``), ``"triton"`` (fused
            kernels; float64 falls back to ``"torch"``), ``"torch"`` (blocked, O(n) memory),
            ``"dense"`` (reference, O(n^2) memory: tests and small ``n`` only).
        variant: ``"nlogn"`` (default) or ``"linear"`` (queries summarised on coarse levels).
        summaries: how key/value summaries are formed; parameter-free means by default.
        max_level: drop the coarse levels above it (``0``: fine level only, i.e. local
            block attention, a baseline); default all levels.
        flat_top: with ``max_level`` below the sequence's levels, the top kept level's
            interaction lists hold every window of that level outside the near field rather
            than dropping what lies beyond its reach (:func:`.hierarchy.truncate`): the
            sequence stays covered with the levels a model trained, and refinement can open
            any block. Its cost grows as ``n / (m 2**(max_level-1))`` summaries a query.
            Needs ``refine > 0`` (the far field of refinement reads such lists).
        select_reach: :class:`.refine.SelectionReach` ``(distance, inv_freq)``: refinement's
            selection scores windows farther than ``distance`` from the query as if they were
            that far, rotated by RoPE's frequencies ``inv_freq`` (head_dim/2,) (the queries'
            and keys' own); the attention itself reads the real positions, unless
            ``attend=True``: then the far field's attention too (opened blocks and summaries
            lying beyond, turned per (query, window); the fine neighbours at real positions;
            the opened blocks in PyTorch, not the Triton kernels). For a model past its
            training length (``distance`` = the training length changes nothing within it).
            Needs ``refine > 0``; None: real distances.
        group: a sequence-parallel process group: ``q, k, v`` are then this rank's
            contiguous chunk of the sequence and the result is this rank's chunk of the
            global result (see ``sequence_parallel.py``); ``None`` or size 1: local.
        level_offset: (heads, levels or more) added to the scores of each coarse level's
            summaries on top of the log-weights (learned by the layer, see
            ``MultipoleAttention(level_offset=True)``); None: no offset.
        refine: ``K``, far fine blocks each query opens and attends to token by token
            (adaptive refinement, :mod:`.refine`: the blocks are chosen by a bound on their
            keys' scores, descending from the interaction list): 0 is plain multipole
            attention, ``K`` at least the number of fine blocks is exact softmax attention.
            nlogn only.
        cu_seqlens: document masking for packed rows (:mod:`.documents`): 0, then the end of
            each document in the batch flattened to ``batch * n`` tokens (FlashAttention's
            varlen convention; rows' ends are boundaries anyway). Each document's output is
            then ``fma`` run on that document alone. A CPU tensor or a list (the tables are
            built on the host). None: one sequence per row. With ``group``, the boundaries
            of the *global* rows (``batch * n * group size`` tokens), the same on every rank
            (:func:`.sp_documents.global_cu_seqlens` builds them from each rank's slice).

    Returns:
        (batch, heads, n, head_dim), the dtype of ``q``.
    """
    _check(q, k, v, block_size, rank, impl, variant)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"fma: refine must be a count of fine blocks >= 0, got {refine!r}")
    if select_reach is not None and not refine:
        raise ValueError("fma: select_reach needs refine > 0 (it changes refinement's far field only); set refine, "
                         "or select_reach=None")
    if select_reach is not None and (select_reach.distance < 1 or select_reach.inv_freq.shape != (q.shape[3] // 2,)):
        raise ValueError(f"fma: select_reach must be (distance >= 1, inv_freq of head_dim/2 = {q.shape[3] // 2} "
                         f"frequencies), got distance {select_reach.distance}, inv_freq "
                         f"{tuple(select_reach.inv_freq.shape)}")
    if flat_top and not refine:
        raise ValueError("fma: flat_top=True needs refine > 0 (the flat top level's lists grow with n and only "
                         "adaptive refinement's far field reads them); set refine, or flat_top=False")
    if refine and variant != "nlogn":
        raise ValueError("fma: refine > 0 needs variant='nlogn' (the linear variant shares one query per "
                         "window on coarse levels, so there is no per-query selection); set refine=0")
    if q.shape[0] == 0:  # an empty batch: an empty result, still in the graph of q, k and v
        return q * 0 + (k.sum() + v.sum()) * 0
    n, d = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if level_offset is not None and (level_offset.dim() != 2 or level_offset.shape[0] != q.shape[1]):
        raise ValueError(f"fma: level_offset must be (heads={q.shape[1]}, levels), got {tuple(level_offset.shape)}")
    sp = group is not None and torch.distributed.get_world_size(group) > 1
    if cu_seqlens is not None:
        # With a group, the documents are the global rows' (each rank passes the same cu_seqlens).
        n_rows = q.shape[2] * (torch.distributed.get_world_size(group) if sp else 1)
        docs = as_documents(cu_seqlens, q.shape[0], n_rows)
        if all(L == n_rows for L in docs.lengths):
            cu_seqlens = None  # one document per row (long documents, short rows): the plain call
    if cu_seqlens is not None and sp:
        _sp_documents_ok(impl, variant, summaries, refine, level_offset)  # every rank refuses alike
        kw = dict(block_size=block_size, rank=rank, causal=causal, weighted=weighted, scale=scale,
                  summaries=summaries or MEAN, max_level=max_level, impl=impl)
        if refine:
            return sp_documents_refined(q, k, v, docs, group, refine=refine, level_offset=level_offset,
                                        flat_top=flat_top, select_reach=select_reach, **kw)
        return sp_documents(q, k, v, docs, group, **kw)
    if cu_seqlens is not None:
        kw = dict(block_size=block_size, rank=rank, causal=causal, weighted=weighted, scale=scale, impl=impl,
                  variant=variant, summaries=summaries, max_level=max_level, group=group,
                  level_offset=level_offset, refine=refine, flat_top=flat_top, select_reach=select_reach)
        return _documents(q, k, v, docs, kw) if impl != "dense" else _per_document(q, k, v, docs, kw)
    if sp:
        if impl == "dense":
            raise ValueError("fma: impl='dense' has no sequence-parallel path; use impl='torch' or 'auto'")
        if refine:
            return sp_refined(q, k, v, group, block_size=block_size, rank=rank, causal=causal, weighted=weighted,
                              scale=scale, summaries=summaries, max_level=max_level, refine=refine, impl=impl,
                              level_offset=level_offset, flat_top=flat_top, select_reach=select_reach)
        if level_offset is not None:
            raise ValueError("fma: level_offset has no sequence-parallel path yet (except with refine > 0); "
                             "train it with parallel.sequence=1")
        return sp_fma(q, k, v, group, block_size=block_size, rank=rank, causal=causal, weighted=weighted,
                      scale=scale, variant=variant, summaries=summaries, max_level=max_level, impl=impl)
    h = call_hierarchy(n, block_size, rank, causal, max_level, level_offset, flat_top)
    if not refine and variant == "nlogn" and level_offset is None and impl != "dense":
        out = summarized_attention(q, k, v, summaries or MEAN, h, scale=scale, weighted=weighted, impl=impl)
        if out is not None:  # the Triton kernels, summaries and core as one node
            return out
    ks, vs = (summaries or MEAN)(k, v, h, impl=impl)
    if refine and h.n_levels:
        if impl == "dense":
            return dense_refined(q, k, v, ks, vs, h, scale=scale, weighted=weighted, refine=refine,
                                 level_offset=level_offset, select_reach=select_reach)
        return refined_multipole(q, k, v, ks, vs, h, scale=scale, weighted=weighted, refine=refine, impl=impl,
                                 level_offset=level_offset, select_reach=select_reach)
    if impl == "dense":
        return dense_attention(q, k, v, ks, vs, h, scale=scale, weighted=weighted, variant=variant,
                               level_offset=level_offset)
    return blocked_multipole(q, k, v, ks, vs, h, scale=scale, weighted=weighted, variant=variant, impl=impl,
                             level_offset=level_offset)


def _sp_documents_ok(impl, variant, summaries, refine, level_offset) -> None:
    """Refuse what sequence parallelism with document masking does not run (yet), saying what to change."""
    what = ("impl='dense' (the reference runs on one device)" if impl == "dense" else
            "variant='linear'" if variant != "nlogn" else
            "level_offset without refine > 0" if level_offset is not None and not refine else
            "summaries that are not formed bottom-up (conv, or rotated at their windows)"
            if summaries is not None and not (isinstance(summaries, Summaries) and summaries.bottom_up) else None)
    if what:
        raise ValueError(f"fma: document masking with sequence parallelism runs the nlogn variant with mean or m2m "
                         f"summaries; {what} has no such path yet: run it with parallel.sequence=1, or without "
                         "document masking")


def _documents(q, k, v, docs: Documents, kw) -> torch.Tensor:
    """``fma`` over packed documents: the block-aligned layout through one core call (PyTorch or
    Triton, as without documents) and, with ``refine``, one far field, where it serves (nlogn,
    bottom-up summaries), else each document alone."""
    summaries = kw["summaries"] or MEAN
    if not (kw["variant"] == "nlogn" and isinstance(summaries, Summaries) and summaries.bottom_up):
        return _per_document(q, k, v, docs, kw)
    dh = doc_hierarchy(docs, kw["block_size"], kw["rank"], kw["causal"], kw["max_level"], kw["flat_top"])
    level_offset = kw["level_offset"]
    if level_offset is not None and level_offset.shape[1] < dh.n_levels:
        raise ValueError(f"fma: level_offset has {level_offset.shape[1]} levels, the longest document "
                         f"({max(docs.lengths)} tokens) has {dh.n_levels}")
    qa, ka, va = (to_layout(x, dh) for x in (q, k, v))  # (1, heads, n_layout, d)
    ks, vs = doc_summaries(summaries, ka, va, dh)
    if kw["refine"] and dh.n_levels:  # each query opens blocks of its own document only: its lists hold no other
        out = refined_multipole(qa, ka, va, ks, vs, dh, scale=kw["scale"], weighted=kw["weighted"],
                                refine=kw["refine"], impl=kw["impl"], level_offset=level_offset,
                                select_reach=kw["select_reach"])
    else:
        out = blocked_multipole(qa, ka, va, ks, vs, dh, scale=kw["scale"], weighted=kw["weighted"], impl=kw["impl"],
                                level_offset=level_offset)
    return from_layout(out, dh)


def _per_document(q, k, v, docs: Documents, kw) -> torch.Tensor:
    """``fma`` on each document alone, outputs put back in place: (B, H, n, d)."""
    B, H, n, d = q.shape
    flat = [x.transpose(1, 2).reshape(B * n, x.shape[1], d) for x in (q, k, v)]  # (B*n, heads, d)
    outs = []
    for s, L in zip(docs.starts, docs.lengths):
        qd, kd, vd = (x[s:s + L].transpose(0, 1).unsqueeze(0) for x in flat)  # (1, heads, L, d)
        outs.append(fma(qd, kd, vd, **kw)[0].transpose(0, 1))  # (L, H, d)
    return torch.cat(outs).view(B, n, H, d).transpose(1, 2)


__all__ = ["fma", "IMPLS", "VARIANTS"]
