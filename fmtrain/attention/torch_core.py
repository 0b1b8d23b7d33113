"""The PyTorch core of multipole attention: the twin of the Triton core (``kernels/``).

:class:`BlockAttention` is a FlashAttention-style autograd function over a range of
fine query blocks: per block one joint softmax over its fine neighbours and its
coarse summaries, never an ``n x n`` tensor. The forward walks chunks of query
blocks and keeps only the output and the log-sum-exp; the backward recomputes each
chunk's scores from them. Peak memory beyond inputs, outputs and gradients is one
chunk of scores per thread, whatever ``n``.

The core returns ``(out, lse)`` and accepts a gradient for ``lse``, so partial
results over disjoint key sets can be merged exactly outside it (the linear
variant's coarse term, sequence parallelism's ranges of blocks).
"""
from __future__ import annotations

import bisect
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .cpu import usable_threads
from .hierarchy import BlockTables, Hierarchy, block_tables

# Scores per chunk of one (batch, kv head) (elements); the backward holds about
# four tensors this size. Small enough to stay near the cache, large enough that
# Python overhead per chunk does not matter.
CHUNK_SCORES = 1 << 19
# The core works in base 2 (scores times log2(e), exp2): on CPU, torch's exp2 is about 3x
# faster than exp, and exp is 10-50x slower still on arguments that underflow (masked and
# far keys), which exp2 is not.
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores and softmax sums are accumulated in: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Layout:
    """Keys/values and summaries, and the per-block views the core multiplies.

    The core sees ``nq`` query blocks, global blocks ``[a0, a0 + nq)``, and their
    fine keys as "extended" keys: the blocks ``[a0 - 1, a0 + nq + F - 2)`` (one
    block before the first query block, one after the last when bidirectional),
    zeros where outside the sequence (masked anyway). For each (batch, kv head)
    ``bh``, the fine keys of local blocks [i0, i1) are an overlapping strided
    view (nb, d, F*m) of the extended keys: no copy, and ``torch.bmm`` takes it.

    ``extended=False``: ``k_ext, v_ext`` are only the query blocks' own keys (nq*m
    tokens) and the blocks beyond them count as zeros (a whole sequence on one device).
    That saves the caller a padded copy of the keys and values, which at 16k tokens cost
    a sixth of the forward (the copy's fresh pages); only the chunks at the two ends then
    assemble their fine keys in scratch.
    """

    def __init__(self, q, k_ext, v_ext, ks, vs, h: Hierarchy, a0: int, dtype, extended: bool = True):
        B, H, N, d = q.shape  # N: whole query blocks
        Hkv = k_ext.shape[1]
        self.B, self.H, self.Hkv, self.G, self.d = B, H, Hkv, H // Hkv, d
        self.m, self.h, self.a0 = h.block_size, h, a0
        self.nblk = N // self.m
        self.F = len(h.fine_blocks())
        self.Fm = self.F * self.m
        self.extended = extended
        want = self.nblk + self.F - 1 if extended else self.nblk
        if k_ext.shape[2] != want * self.m:
            raise ValueError(f"{'extended ' if extended else ''}keys must hold {want} blocks of {self.m} "
                             f"for {self.nblk} query blocks, got {k_ext.shape[2]} tokens")
        self.kp = k_ext.to(dtype).reshape(B * Hkv, -1, d)  # (BH, (nblk+F-1)*m or nblk*m, d)
        self.vp = v_ext.to(dtype).reshape(B * Hkv, -1, d)
        # Dummy zero summary at index T for masked slots.
        self.ks = F.pad(ks.to(dtype), (0, 0, 0, 1)).reshape(B * Hkv, -1, d)
        self.vs = F.pad(vs.to(dtype), (0, 0, 0, 1)).reshape(B * Hkv, -1, d)

    def q_blocks(self, q):
        """(B, H, N, *t) -> (B*Hkv, nblk, G*m, *t): the G query heads of a kv head share keys."""
        B, Hkv, G, m = self.B, self.Hkv, self.G, self.m
        tail = q.shape[3:]
        q = q.reshape(B, Hkv, G, self.nblk, m, *tail).permute(0, 1, 3, 2, 4, *range(5, 5 + len(tail)))
        return q.reshape(B * Hkv, self.nblk, G * m, *tail)

    def from_q_blocks(self, x):
        """Inverse of :meth:`q_blocks`."""
        B, Hkv, G, m = self.B, self.Hkv, self.G, self.m
        tail = x.shape[3:]
        x = x.reshape(B, Hkv, self.nblk, G, m, *tail).permute(0, 1, 3, 2, 4, *range(5, 5 + len(tail)))
        return x.reshape(B, Hkv * G, self.nblk * m, *tail)

    def key_blocks(self, e0: int, e1: int) -> tuple[int, int, int]:
        """Extended blocks [e0, e1) -> the blocks [lo, hi) of ``kp`` they are, clipped, and
        the offset of ``lo`` in [e0, e1) (blocks outside ``kp`` are zeros)."""
        shift = 0 if self.extended else -1
        nk = self.kp.shape[1] // self.m
        lo, hi = max(e0 + shift, 0), min(e1 + shift, nk)
        return lo, hi, lo - (e0 + shift)

    def fine_t(self, xp, bh, i0, i1, ws: "Scratch", name: str):
        """Transposed fine keys (or values) of local blocks [i0, i1): (nb, d, F*m), a view
        (of scratch, for an end chunk of unextended keys)."""
        m, e1 = self.m, i1 + self.F - 1  # extended blocks [i0, e1)
        lo, hi, off = self.key_blocks(i0, e1)
        x = xp[bh, lo * m:hi * m]
        if hi - lo < e1 - i0:
            full = ws(name, ((e1 - i0) * m, self.d), xp)
            full.zero_()[off * m:(off + hi - lo) * m] = x
            x = full
        return x.unfold(0, self.Fm, m)

    def chunks(self, rows_per_block: int, bh: int):
        """Local block ranges [i0, i1) of one (batch, kv head), a chunk of scores each."""
        width = self.Fm + self.h.coarse_slots
        step = max(1, CHUNK_SCORES // (rows_per_block * width))
        for i0 in range(0, self.nblk, step):
            yield i0, min(i0 + step, self.nblk)


class Scratch:
    """One thread's buffers for a chunk's temporaries, reused by all its chunks.

    A fresh megabyte-sized tensor per chunk would come from newly mapped memory (glibc
    hands such blocks back to the kernel when they are freed) and fault its pages in
    every time: measured at about a fifth of the CPU core's time. Every chunk of a core
    call has at most the first chunk's shape, so each buffer is allocated once.
    """

    def __init__(self):
        self.bufs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


def _each_chunk(L: _Layout, rows_per_block: int, fn) -> None:
    """``fn(bh, i0, i1, scratch)`` over every chunk; (batch, kv head) pairs in parallel
    threads on CPU, each thread with its own :class:`Scratch`.

    A chunk's operations are small (tens of 64 x 64 matrices), too small for torch's
    intra-op threads to pay off; independent heads are. Each head writes only its own
    slices of the outputs and gradients, so threads never touch the same memory.
    """
    heads = range(L.B * L.Hkv)
    grad = torch.is_grad_enabled()  # thread-local: the head threads must see the caller's
    local = threading.local()

    def one_head(bh):
        if not hasattr(local, "scratch"):
            local.scratch = Scratch()
        with torch.set_grad_enabled(grad):
            for i0, i1 in L.chunks(rows_per_block, bh):
                fn(bh, i0, i1, local.scratch)

    on_cpu = L.kp.device.type == "cpu"
    # Head threads on the cores other processes leave free (cpu.py); each head's result is the
    # same whatever the count, so this never changes the numbers.
    workers = min(usable_threads(), len(heads)) if on_cpu else 1
    if workers <= 1:
        with _single_op_thread() if on_cpu else nullcontext():
            for bh in heads:
                one_head(bh)
        return
    with _single_op_thread(), ThreadPoolExecutor(workers) as pool:
        list(pool.map(one_head, heads))


@contextmanager
def _single_op_thread():
    """One intra-op thread while the head threads run (they are the parallelism)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Bias:
    """The additive score bias of a chunk, applied in place (no chunk-sized temporaries).

    Fine scores (nb, G*m, F*m) get the causal pattern (shared by all blocks) and,
    in the few blocks at the ends of the sequence (of each document, when packed), -inf for
    keys outside it;
    coarse scores (nb, G*m, S) get the summaries' log-weights (-inf: masked slot), in base 2
    as the core's scores are.
    """

    def __init__(self, h: Hierarchy, tables: BlockTables, dtype, device):
        m, self.h = h.block_size, h
        self.Fm = len(h.fine_blocks()) * m
        self.causal = None
        if h.causal:  # key slot j of a block is token (j - m) relative to the block start
            rel = torch.arange(self.Fm, device=device) - m
            ok = rel[None, :] <= torch.arange(m, device=device)[:, None]
            self.causal = torch.zeros(m, self.Fm, dtype=dtype, device=device).masked_fill_(~ok, -math.inf)
        self.coarse = tables.bias.to(device=device, dtype=dtype) * LOG2E  # (n_blocks, S)
        # Blocks whose fine slots reach outside their sequence (or document): (block, lo, hi).
        self.edges = h.fine_edges()
        self.edge_blocks = [e[0] for e in self.edges]
        self.outside = None  # (edges, F*m): each edge block's fine slots outside its keys
        if self.edges:
            e = torch.tensor(self.edges, device=device)  # (edges, 3): block, lo, hi
            key = (e[:, :1] - 1) * m + torch.arange(self.Fm, device=device)  # slot j of block a: key (a-1)*m + j
            self.outside = (key < e[:, 1:2]) | (key >= e[:, 2:3])

    def fine_(self, s: torch.Tensor, a0: int, a1: int) -> torch.Tensor:
        nb, Gm, Fm = s.shape
        m = self.h.block_size
        if self.causal is not None:
            s.view(nb, Gm // m, m, Fm).add_(self.causal)
        for e in range(bisect.bisect_left(self.edge_blocks, a0), bisect.bisect_left(self.edge_blocks, a1)):
            s[self.edges[e][0] - a0].masked_fill_(self.outside[e], -math.inf)
        return s

    def coarse_(self, s: torch.Tensor, a0: int, a1: int) -> torch.Tensor:
        return s.add_(self.coarse[a0:a1, None, :])


def _scores(L: _Layout, bias: _Bias, tables: BlockTables, qb, scale: float, bh, i0, i1, ws: Scratch):
    """Fine (nb, G*m, F*m) and coarse (nb, G*m, S) base-2 scores of local blocks [i0, i1),
    biased; and their keys/values. qb: (nb, G*m, d) queries; scale * log2(e) is applied
    inside the products (no scaled copy of the queries). All four live in ``ws``.
    """
    c = scale * LOG2E
    a0, a1 = L.a0 + i0, L.a0 + i1  # global blocks
    kf_t, vf_t = L.fine_t(L.kp, bh, i0, i1, ws, "kf"), L.fine_t(L.vp, bh, i0, i1, ws, "vf")  # (nb, d, F*m)
    idx = tables.index[a0:a1].reshape(-1)
    nb, Gm, S, d = i1 - i0, qb.shape[1], tables.index.shape[1], L.d
    kc = torch.index_select(L.ks[bh], 0, idx, out=ws("kc", (nb * S, d), qb)).view(nb, S, d)
    vc = torch.index_select(L.vs[bh], 0, idx, out=ws("vc", (nb * S, d), qb)).view(nb, S, d)
    zero = qb.new_zeros(())
    sf = torch.baddbmm(zero, qb, kf_t, beta=0, alpha=c, out=ws("sf", (nb, Gm, L.Fm), qb))
    sc = torch.baddbmm(zero, qb, kc.transpose(1, 2), beta=0, alpha=c, out=ws("sc", (nb, Gm, S), qb))
    return bias.fine_(sf, a0, a1), bias.coarse_(sc, a0, a1), (kf_t, vf_t, kc, vc)


class BlockAttention(torch.autograd.Function):
    """(q, k_ext, v_ext, ks, vs) -> (out, lse) for query blocks ``[a0, a0 + nq)`` of ``h``.

    q: (B, H, nq*m, d); k_ext, v_ext: (B, Hkv, (nq+F-1)*m, d), see :class:`_Layout`
    (with ``extended=False``: (B, Hkv, nq*m, d), zeros beyond);
    ks, vs: (B, Hkv, T, d) summaries of the whole hierarchy (indexed by its tables).
    out: (B, H, nq*m, d); lse: (B, H, nq*m) in fp32 (fp64 for fp64 inputs).
    The backward takes gradients of both and returns them for all five tensors.
    """

    @staticmethod
    def forward(ctx, q, k, v, ks, vs, h: Hierarchy, weighted: bool, scale: float, a0: int = 0,
                extended: bool = True):
        acc = acc_dtype(q.dtype)
        L = _Layout(q, k, v, ks, vs, h, a0, acc, extended)
        tables = block_tables(h, weighted, q.device)
        bias = _Bias(h, tables, acc, q.device)
        qs = L.q_blocks(q.to(acc))  # (BH, nblk, G*m, d)
        out = torch.empty(qs.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(qs.shape[:-1], dtype=acc, device=q.device)

        def chunk(bh, i0, i1, ws):
            sf, sc, (_, vf_t, _, vc) = _scores(L, bias, tables, qs[bh, i0:i1], scale, bh, i0, i1, ws)
            mx = torch.maximum(sf.amax(-1, keepdim=True), sc.amax(-1, keepdim=True)) if sc.shape[-1] \
                else sf.amax(-1, keepdim=True)
            pf, pc = sf.sub_(mx).exp2_(), sc.sub_(mx).exp2_()
            tot = pf.sum(-1, keepdim=True) + pc.sum(-1, keepdim=True)
            o = out[bh, i0:i1] if out.dtype == acc else ws("o", out[bh, i0:i1].shape, sf)  # in place if it can be
            o = torch.bmm(pf, vf_t.transpose(1, 2), out=o).baddbmm_(pc, vc).div_(tot)  # (nb, G*m, d)
            if out.dtype != acc:
                out[bh, i0:i1] = o
            lse[bh, i0:i1] = ((mx + tot.log2()) * LN2).squeeze(-1)  # natural log, as the contract says
        _each_chunk(L, L.G * L.m, chunk)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, ks, vs, out, lse)
        ctx.h, ctx.weighted, ctx.scale, ctx.a0, ctx.extended = h, weighted, scale, a0, extended
        return L.from_q_blocks(out), L.from_q_blocks(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, ks, vs, out, lse = ctx.saved_tensors
        h, scale = ctx.h, ctx.scale
        acc = acc_dtype(q.dtype)
        L = _Layout(q, k, v, ks, vs, h, ctx.a0, acc, ctx.extended)
        tables = block_tables(h, ctx.weighted, q.device)
        bias = _Bias(h, tables, acc, q.device)
        qs = L.q_blocks(q.to(acc))
        dob = L.q_blocks(dout.to(acc)) if dout is not None else torch.zeros_like(qs)
        dlb = L.q_blocks(dlse.to(acc)) if dlse is not None else None
        m, d, F_, T = L.m, L.d, L.F, ks.shape[2]
        zero = qs.new_zeros(())
        dq = torch.empty(qs.shape, dtype=acc, device=q.device)  # contiguous: chunks write into it
        # Key/value gradients per block of kp: no zero fill. Slot F-1 of a chunk reaches
        # blocks no earlier chunk touched and writes them; the other slots add. The first
        # blocks, which no slot F-1 reaches, are only ever added to.
        # Allocated in the returned shape and returned as they are: a view would make autograd
        # add the summaries' share of the key gradient out of place, into yet another buffer.
        dk_out, dv_out = (torch.empty(t.shape, dtype=acc, device=t.device) for t in (k, v))
        dkp, dvp = dk_out.view(L.kp.shape), dv_out.view(L.vp.shape)
        for g in (dkp, dvp):
            g.view(L.B * L.Hkv, -1, m, d)[:, :L.key_blocks(0, F_ - 1)[1]].zero_()
        dks, dvs = torch.zeros_like(L.ks), torch.zeros_like(L.vs)

        def chunk(bh, i0, i1, ws):
            qc, do = qs[bh, i0:i1], dob[bh, i0:i1]
            nb, Gm, S = i1 - i0, qc.shape[1], tables.index.shape[1]
            sf, sc, (kf_t, vf_t, kc, vc) = _scores(L, bias, tables, qc, scale, bh, i0, i1, ws)
            row = lse[bh, i0:i1, :, None] * LOG2E
            # delta_i = dO_i . O_i - dlse_i: the softmax-backward row term (lse's gradient folds in here).
            dl = torch.mul(do, out[bh, i0:i1], out=ws("do_o", do.shape, do)).sum(-1, keepdim=True)  # (nb, G*m, 1)
            if dlb is not None:
                dl.sub_(dlb[bh, i0:i1, :, None])
            pf, pc = sf.sub_(row).exp2_(), sc.sub_(row).exp2_()  # (nb, G*m, F*m), (nb, G*m, S)
            dsf = torch.bmm(do, vf_t, out=ws("dsf", (nb, Gm, L.Fm), do)).sub_(dl).mul_(pf)
            dsc = torch.bmm(do, vc.transpose(1, 2), out=ws("dsc", (nb, Gm, S), do)).sub_(dl).mul_(pc)
            # The score scale enters every gradient through the scores: applied in the products.
            torch.baddbmm(zero, dsf, kf_t.transpose(1, 2), beta=0, alpha=scale, out=dq[bh, i0:i1])
            dq[bh, i0:i1].baddbmm_(dsc, kc, alpha=scale)
            dkb, dvb = dkp[bh].view(-1, m, d), dvp[bh].view(-1, m, d)
            for f in reversed(range(F_)):  # fine slot f of local block i is extended block i + f
                lo, hi, off = L.key_blocks(i0 + f, i1 + f)  # blocks outside kp: zero keys, no gradient
                rows = slice(off, off + hi - lo)
                ds_t = dsf[rows, :, f * m:(f + 1) * m].transpose(1, 2)  # (nb', m, G*m)
                p_t = pf[rows, :, f * m:(f + 1) * m].transpose(1, 2)
                dk_f, dv_f = dkb[lo:hi], dvb[lo:hi]  # (nb', m, d)
                if f == F_ - 1:
                    torch.baddbmm(zero, ds_t, qc[rows], beta=0, alpha=scale, out=dk_f)
                    torch.bmm(p_t, do[rows], out=dv_f)
                else:
                    dk_f.baddbmm_(ds_t, qc[rows], alpha=scale)
                    dv_f.baddbmm_(p_t, do[rows])
            if S:  # scatter-add into the summaries the slots came from
                idx = tables.index[L.a0 + i0:L.a0 + i1].reshape(-1)
                dkc = torch.baddbmm(zero, dsc.transpose(1, 2), qc, beta=0, alpha=scale, out=ws("dkc", (nb, S, d), do))
                dks[bh].index_add_(0, idx, dkc.view(-1, d))
                dvs[bh].index_add_(0, idx, torch.bmm(pc.transpose(1, 2), do, out=ws("dvc", (nb, S, d), do)).view(-1, d))
        _each_chunk(L, L.G * m, chunk)
        B, Hkv = L.B, L.Hkv
        dq = L.from_q_blocks(dq).to(q.dtype)
        dk, dv = dk_out.to(k.dtype), dv_out.to(v.dtype)
        dks = dks.view(B, Hkv, -1, d)[:, :, :T].to(ks.dtype)
        dvs = dvs.view(B, Hkv, -1, d)[:, :, :T].to(vs.dtype)
        return dq, dk, dv, dks, dvs, None, None, None, None, None


__all__ = ["BlockAttention", "Scratch", "acc_dtype", "CHUNK_SCORES", "LOG2E", "LN2"]
