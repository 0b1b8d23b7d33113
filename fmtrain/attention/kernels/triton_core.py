"""Triton kernels of the multipole core: the same function as ``blocked.BlockAttention``.

One program owns one fine query block (``m`` rows) of one head. It streams the
``F`` fine key blocks of its neighbourhood (the extended keys ``i .. i+F-1``)
and then its ``S`` coarse summary slots, gathered through the block table, in
tiles of ``BLOCK_C``; an online softmax (running max and sum, in base 2) runs
over all of them, with the summaries' log-weights added to their scores.

Backward (FlashAttention-2 style, scores recomputed from the saved lse):
- ``_dq_kernel``: per (query block, head): first the rows' ``delta = rowsum(dout * out) -
  dlse`` (stored for the next kernels: no pass of its own), then dq.
- ``_dkv_kernel``: per (key tile, kv head), a tile being a block or, in the "occupancy"
  launch at head_dim 128, 32 of its keys: dk, dv, accumulated over the ``<= F`` query
  blocks that see the block and the ``G`` query heads of the kv head, in registers: no
  atomics, deterministic.
- ``_dsum_kernel``: per (coarse window, query head): its share of the gradients of
  the window's ``p`` summaries, the interaction lists transposed
  (:func:`~..hierarchy.seen_by`): over the query blocks of the windows whose lists
  hold it, in registers; summed over each kv head's ``G`` query heads by PyTorch.
  Deterministic, with a (B, H, T, d) fp32 buffer where the per-(block, slot)
  partials took ~14 GB at 1M tokens; the same work as the forward's coarse part,
  though a top-level window's program walks ~n/(2m) blocks alone (a tail a GPU
  measurement should size).

Shapes (all contiguous): q, out, dout (B, H, N, d) with N = nq*m; k, v
(B, Hkv, nk, d), row 0 holding the key at position ``k_start`` (a range's extended keys:
``k_start = (a0-1)*m``, ``nk = (nq+F-1)*m``; a whole sequence's own keys: ``k_start = 0``,
``nk = n`` or more, read in place with the rows outside masked, no padded copy);
ks, vs (B, Hkv, T, d); lse, delta (B, H, N) fp32;
index (n_blocks, S) int32 (T = masked); bias (n_blocks, S) fp32 (-inf = masked).
Offsets are int64: at n = 1M, 16 heads, d = 128 a tensor already has 2**31 elements.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Scores run in base 2 (exp2 is the fast instruction); the kernels spell log2(e) out as a
# literal, since a jitted function may read only constexpr globals.
LOG2E = 1.4426950408889634
# Shape arguments Triton would otherwise specialise on (== 1, divisible by 16): every new n,
# summary count or range would compile the kernels again (seconds each); they gain nothing from it.
_FWD_INTS = ["n", "nq", "a0", "H", "G", "T", "S", "k_start", "nk"]


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: multiply in fp32 instead (bf16 under the CPU
    interpreter, whose bf16 ``tl.dot`` returns garbage in Triton 3.9); bf16 products are exact
    in fp32, so only the summation order differs from the GPU's bf16 MMA."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _fine_mask(qpos, kpos, lo, hi, CAUSAL: tl.constexpr):
    """Which (query, key) pairs of a fine tile count: keys inside [lo, hi) (the sequence, or the
    query block's document), and <= the query if causal."""
    ok = (kpos >= lo) & (kpos < hi)
    if CAUSAL:
        ok = ok & (kpos <= qpos)
    return ok


@triton.jit
def _key_range(BOUNDS, a, n, DOCS: tl.constexpr):
    """The keys ``[lo, hi)`` global block ``a``'s queries may see: the sequence's ``[0, n)``, or
    with packed documents their document's, row ``a`` of BOUNDS (n_blocks, 2) int32."""
    if DOCS:
        lo = tl.load(BOUNDS + 2 * a)
        hi = tl.load(BOUNDS + 2 * a + 1)
    else:
        lo = tl.zeros([], tl.int32)
        hi = tl.zeros([], tl.int32) + n
    return lo, hi


@triton.jit
def _key_rows(kpos, k_start, nk, bkv, rok, c, cok, d: tl.constexpr):
    """Offsets of the keys at positions ``kpos`` in K (B*Hkv, nk, d), whose row 0 holds position
    ``k_start``, and which of them are there to load (outside: the padding, never read)."""
    row = kpos - k_start
    there = rok & (row >= 0) & (row < nk)
    return (bkv * nk + row)[:, None] * d + c[None, :], there[:, None] & cok[None, :]


@triton.jit
def _softmax_step(s, v, mx, tot, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over one more tile: base-2 scores s (rows, keys), values v (keys, d);
    running row max mx, sum tot and unnormalised output acc. Returns the updated three."""
    mx_new = tl.maximum(mx, tl.max(s, 1))
    safe = tl.where(mx_new == float("-inf"), 0.0, mx_new)  # a row that has seen nothing yet
    alpha = tl.exp2(mx - safe)
    p = tl.exp2(s - safe[:, None])
    tot = tot * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
    return mx_new, tot, acc


@triton.jit
def _coarse_tile(KS, VS, IDX, BIAS, a, c0, S, T, bkv, cs, c, cok, d: tl.constexpr):
    """Coarse slots [c0, c0 + BLOCK_C) of block ``a``'s table row: their summaries' keys and
    values (BLOCK_C, BLOCK_D), gathered (the dummy slot T reads as zeros), their natural-log
    weights (-inf: masked or past S) and which slots exist."""
    sok = (c0 + cs) < S
    idx = tl.load(IDX + a * S + c0 + cs, mask=sok, other=T).to(tl.int64)
    bias = tl.load(BIAS + a * S + c0 + cs, mask=sok, other=float("-inf"))
    gok = (idx < T)[:, None] & cok[None, :]
    srow = (bkv * T + idx)[:, None] * d + c[None, :]
    kc = tl.load(KS + srow, mask=gok, other=0.0)
    vc = tl.load(VS + srow, mask=gok, other=0.0)
    return kc, vc, bias, sok


@triton.jit
def _fine_step(q, k, v, qpos, kpos, lo, hi, rok, mx, tot, acc, qk_scale, CAUSAL: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The online softmax over one fine key tile (keys at positions ``kpos``) of a query block."""
    s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    ok = _fine_mask(qpos[:, None], kpos[None, :], lo, hi, CAUSAL) & rok[None, :]
    s = tl.where(ok, s, float("-inf"))
    return _softmax_step(s, v, mx, tot, acc, PRECISION, UPCAST)


@triton.jit
def _coarse_part(q, KS, VS, IDX, BIAS, a, S, T, bkv, c, cok, mx, tot, acc, qk_scale, d: tl.constexpr,
                 BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The online softmax over block ``a``'s coarse slots, gathered through its table row."""
    cs = tl.arange(0, BLOCK_C)
    for c0 in range(0, S, BLOCK_C):
        kc, vc, bias, sok = _coarse_tile(KS, VS, IDX, BIAS, a, c0, S, T, bkv, cs, c, cok, d)
        # Own names: a name bound before a loop is loop-carried in compiled Triton and must keep
        # its shape, and fine scores are (BLOCK_M, BLOCK_M), these (BLOCK_M, BLOCK_C).
        sc = _mm(q, tl.trans(kc), PRECISION, UPCAST) * qk_scale + (bias * 1.4426950408889634)[None, :]
        mx, tot, acc = _softmax_step(sc, vc, mx, tot, acc, PRECISION, UPCAST)
    return mx, tot, acc


@triton.jit
def _store_rows(OUT, LSE, row0, r, c, rmask, cok, mx, tot, acc, d: tl.constexpr):
    """A query block's output and lse (natural log, as the PyTorch core returns it; -inf and out = 0
    for a row that sees nothing), its rows ``row0 + r`` where ``rmask``."""
    lse = tl.where(tot > 0, (mx + tl.log2(tot)) / 1.4426950408889634, float("-inf"))
    o = acc / tl.where(tot > 0, tot, 1.0)[:, None]
    tl.store(OUT + (row0 + r)[:, None] * d + c[None, :], o.to(OUT.dtype.element_ty), mask=rmask[:, None] & cok[None, :])
    tl.store(LSE + row0 + r, lse, mask=rmask)


@triton.jit(do_not_specialize=_FWD_INTS)
def _fwd_kernel(Q, K, V, KS, VS, IDX, BIAS, BOUNDS, OUT, LSE,
                n, nq, a0, H, G, T, S, k_start, nk, qk_scale,  # qk_scale = scale * log2(e)
                m: tl.constexpr, d: tl.constexpr, F: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)  # local query block
    bh = tl.program_id(1).to(tl.int64)  # b * H + head
    bkv = (bh // H) * (H // G) + (bh % H) // G  # b * Hkv + kv head (head h uses kv head h // G)
    a = a0 + i  # global block
    N = nq * m
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    rok = r < m
    cok = c < d
    q = tl.load(Q + (bh * N + i * m + r)[:, None] * d + c[None, :], mask=rok[:, None] & cok[None, :], other=0.0)
    qpos = a * m + r
    lo, hi = _key_range(BOUNDS, a, n, DOCS)

    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 scores)
    tot = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for f in tl.static_range(F):  # fine slot f is global block a - 1 + f
        kpos = (a - 1 + f) * m + r
        krow, kv_ok = _key_rows(kpos, k_start, nk, bkv, rok, c, cok, d)
        k = tl.load(K + krow, mask=kv_ok, other=0.0)
        v = tl.load(V + krow, mask=kv_ok, other=0.0)
        mx, tot, acc = _fine_step(q, k, v, qpos, kpos, lo, hi, rok, mx, tot, acc, qk_scale, CAUSAL, PRECISION, UPCAST)
    mx, tot, acc = _coarse_part(q, KS, VS, IDX, BIAS, a, S, T, bkv, c, cok, mx, tot, acc, qk_scale, d, BLOCK_C,
                                PRECISION, UPCAST)
    _store_rows(OUT, LSE, bh * N + i * m, r, c, rok, cok, mx, tot, acc, d)


@triton.jit
def _key_tile(K, V, b, m: tl.constexpr, r, k_start, nk, bkv, rok, c, cok, d: tl.constexpr):
    """Global block ``b``'s keys and values (BLOCK_M, BLOCK_D), zeros outside K, and their positions."""
    kpos = b * m + r
    krow, kv_ok = _key_rows(kpos, k_start, nk, bkv, rok, c, cok, d)
    return tl.load(K + krow, mask=kv_ok, other=0.0), tl.load(V + krow, mask=kv_ok, other=0.0), kpos


@triton.jit(do_not_specialize=_FWD_INTS)
def _fwd_run_kernel(Q, K, V, KS, VS, IDX, BIAS, BOUNDS, OUT, LSE,
                    n, nq, a0, H, G, T, S, k_start, nk, qk_scale,
                    m: tl.constexpr, d: tl.constexpr, F: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, RUN: tl.constexpr):
    """``_fwd_kernel``'s result, one program walking a run of ``RUN`` consecutive query blocks of one
    head (#26's long loop): block i's fine tiles are blocks i-1 .. i+F-2, so each but the last is
    the previous block's, kept in registers rather than loaded again (F loads a block become one).
    Program (j, bh) owns local blocks [j * RUN, (j + 1) * RUN); blocks past nq are masked."""
    i0 = tl.program_id(0).to(tl.int64) * RUN
    bh = tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    N = nq * m
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    rok = r < m
    cok = c < d
    # The first block's fine tiles but its last: blocks a-1 (and a, bidirectional), rotated below.
    ka, va, kpa = _key_tile(K, V, a0 + i0 - 1, m, r, k_start, nk, bkv, rok, c, cok, d)
    if F == 3:
        kb, vb, kpb = _key_tile(K, V, a0 + i0, m, r, k_start, nk, bkv, rok, c, cok, d)
    else:  # (unused: named for the loop's sake)
        kb, vb, kpb = ka, va, kpa
    for t in range(RUN):
        i = i0 + t
        a = a0 + i
        live = rok & (i * m + r < N)  # (a block past nq: no rows)
        q = tl.load(Q + (bh * N + i * m + r)[:, None] * d + c[None, :], mask=live[:, None] & cok[None, :], other=0.0)
        qpos = a * m + r
        at = tl.minimum(a, a0 + nq - 1)  # (tables read for a real block; a masked one's rows are not stored)
        lo, hi = _key_range(BOUNDS, at, n, DOCS)
        mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
        tot = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        mx, tot, acc = _fine_step(q, ka, va, qpos, kpa, lo, hi, rok, mx, tot, acc, qk_scale, CAUSAL, PRECISION, UPCAST)
        if F == 3:
            mx, tot, acc = _fine_step(q, kb, vb, qpos, kpb, lo, hi, rok, mx, tot, acc, qk_scale, CAUSAL, PRECISION,
                                      UPCAST)
        kn, vn, kpn = _key_tile(K, V, a + F - 2, m, r, k_start, nk, bkv, rok, c, cok, d)  # the one new tile
        mx, tot, acc = _fine_step(q, kn, vn, qpos, kpn, lo, hi, rok, mx, tot, acc, qk_scale, CAUSAL, PRECISION, UPCAST)
        mx, tot, acc = _coarse_part(q, KS, VS, IDX, BIAS, at, S, T, bkv, c, cok, mx, tot, acc, qk_scale, d, BLOCK_C,
                                    PRECISION, UPCAST)
        _store_rows(OUT, LSE, bh * N + i * m, r, c, live, cok, mx, tot, acc, d)
        if F == 3:
            ka, va, kpa = kb, vb, kpb
            kb, vb, kpb = kn, vn, kpn
        else:
            ka, va, kpa = kn, vn, kpn


@triton.jit(do_not_specialize=_FWD_INTS)
def _dq_kernel(Q, K, V, KS, VS, IDX, BIAS, BOUNDS, OUT, DO, DLSE, LSE, DELTA, DQ,
               n, nq, a0, H, G, T, S, k_start, nk, scale,
               m: tl.constexpr, d: tl.constexpr, F: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_DLSE: tl.constexpr):
    """dq of one (query block, head). Its prologue forms the block's softmax-backward row term,
    delta = rowsum(dout * out) - dlse, in fp32, and stores it in DELTA for the dk/dv and
    summary kernels (no pass of its own over out and dout)."""
    i = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    bkv = (bh // H) * (H // G) + (bh % H) // G
    a = a0 + i
    N = nq * m
    qk_scale = scale * 1.4426950408889634
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    rok = r < m
    cok = c < d
    qrow = (bh * N + i * m + r)[:, None] * d + c[None, :]
    qmask = rok[:, None] & cok[None, :]
    q = tl.load(Q + qrow, mask=qmask, other=0.0)
    do = tl.load(DO + qrow, mask=qmask, other=0.0)
    # Padding rows get lse = +inf, so their probabilities are exactly 0.
    lse2 = tl.load(LSE + bh * N + i * m + r, mask=rok, other=float("inf")) * 1.4426950408889634
    o = tl.load(OUT + qrow, mask=qmask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * N + i * m + r, mask=rok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + i * m + r, delta, mask=rok)
    qpos = a * m + r
    lo, hi = _key_range(BOUNDS, a, n, DOCS)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for f in tl.static_range(F):
        kpos = (a - 1 + f) * m + r
        krow, kv_ok = _key_rows(kpos, k_start, nk, bkv, rok, c, cok, d)
        k = tl.load(K + krow, mask=kv_ok, other=0.0)
        v = tl.load(V + krow, mask=kv_ok, other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        ok = _fine_mask(qpos[:, None], kpos[None, :], lo, hi, CAUSAL) & rok[None, :]
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION, UPCAST)

    cs = tl.arange(0, BLOCK_C)
    for c0 in range(0, S, BLOCK_C):
        kc, vc, bias, sok = _coarse_tile(KS, VS, IDX, BIAS, a, c0, S, T, bkv, cs, c, cok, d)
        # Own names (not s, p, dp, ds): see the forward's coarse loop.
        sc = _mm(q, tl.trans(kc), PRECISION, UPCAST) * qk_scale + (bias * 1.4426950408889634)[None, :]
        pc = tl.where((bias > float("-inf"))[None, :], tl.exp2(sc - lse2[:, None]), 0.0)
        dpc = _mm(do, tl.trans(vc), PRECISION, UPCAST)
        dsc = pc * (dpc - delta[:, None])
        dq += _mm(dsc.to(kc.dtype), kc, PRECISION, UPCAST)

    tl.store(DQ + qrow, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=["n", "nq", "a0", "H", "G", "kb0", "nk", "s_w", "s_h", "T"])
def _dkv_kernel(Q, K, V, DO, LSE, DELTA, BOUNDS, DK, DV, TG, LEAF, DLEAF,
                n, nq, a0, H, G, kb0, nk, s_w, s_h, T, scale,
                m: tl.constexpr, d: tl.constexpr, F: tl.constexpr, CAUSAL: tl.constexpr, DOCS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr, TREE: tl.constexpr, MAP_GRADS: tl.constexpr,
                P: tl.constexpr, LEAF_P: tl.constexpr):
    """dk, dv of ``BLOCK_N`` keys of key block e of K (B*Hkv, nk, d) of one kv head: global block
    kb0 + e (K's row 0 is block kb0's first key). Program (e * parts + part, bkv) owns the block's
    key rows [part * BLOCK_N, (part + 1) * BLOCK_N): a key tile narrower than the query tiles
    keeps the two fp32 accumulators (BLOCK_N x d each) small enough for two programs per SM at
    d = 128.

    Local query block i (global a0 + i) sees global block a0 + i - 1 + f as its fine slot f.

    TREE (a whole sequence, kb0 = 0; :class:`.summaries.SummarizedAttention`): the epilogue adds
    the summaries' share, ``leaf^T g1``, the block's level-1 summary gradients (TG: (2, B*Hkv, T, d)
    fp32, keys' then values', rows ``e*P ..``) through the leaf map (LEAF: keys' and values' (P, m)
    at ``which * s_w + head * s_h``), and with MAP_GRADS writes the leaf map's gradient from
    these keys, ``g1 x^T``, into this program's columns of DLEAF (B*Hkv, key blocks, 2, P, m).
    """
    parts: tl.constexpr = (m + BLOCK_N - 1) // BLOCK_N
    e = tl.program_id(0).to(tl.int64) // parts
    part = tl.program_id(0).to(tl.int64) % parts
    bkv = tl.program_id(1).to(tl.int64)  # b * Hkv + kv head
    Hkv = H // G
    b = bkv // Hkv
    hkv = bkv % Hkv
    N = nq * m
    qk_scale = scale * 1.4426950408889634
    r = tl.arange(0, BLOCK_M)  # query rows
    j = part * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's key rows of the block
    c = tl.arange(0, BLOCK_D)
    rok = r < m
    jok = j < m
    cok = c < d
    tmask = rok[:, None] & cok[None, :]
    gb = kb0 + e  # global key block
    kpos = gb * m + j
    krow, kmask = _key_rows(kpos, kb0 * m, nk, bkv, jok, c, cok, d)
    k = tl.load(K + krow, mask=kmask, other=0.0)
    v = tl.load(V + krow, mask=kmask, other=0.0)
    # The keys that count: the sequence's, or the key block's document's. A query sees a key iff
    # the key's document holds the query, so one range per key block serves all its queries.
    lo, hi = _key_range(BOUNDS, gb, n, DOCS)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(G):
        bh = b * H + hkv * G + g
        for f in tl.static_range(F):
            i = gb + 1 - f - a0
            if (i >= 0) & (i < nq):
                qrow = (bh * N + i * m + r)[:, None] * d + c[None, :]
                q = tl.load(Q + qrow, mask=tmask, other=0.0)
                do = tl.load(DO + qrow, mask=tmask, other=0.0)
                lse2 = tl.load(LSE + bh * N + i * m + r, mask=rok, other=float("inf")) * 1.4426950408889634
                delta = tl.load(DELTA + bh * N + i * m + r, mask=rok, other=0.0)
                qpos = (a0 + i) * m + r
                # Transposed scores (keys x queries): the reductions below are then plain dots.
                st = _mm(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
                ok = _fine_mask(qpos[None, :], kpos[:, None], lo, hi, CAUSAL) & jok[:, None] & rok[None, :]
                if DOCS:  # and only the queries of the key block's document
                    ok = ok & ((qpos >= lo) & (qpos < hi))[None, :]
                pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
                dv += _mm(pt.to(do.dtype), do, PRECISION, UPCAST)
                dpt = _mm(v, tl.trans(do), PRECISION, UPCAST)
                dst = pt * (dpt - delta[None, :])
                dk += _mm(dst.to(q.dtype), q, PRECISION, UPCAST)
    dk = dk * scale
    if TREE:
        tok = jok & (kpos < n)  # padding rows summarise nothing
        dk += _leaf_share(TG, LEAF, DLEAF, s_w, s_h, T, k, 0, e, j, tok, c, cok, bkv, hkv, nk, m, d, P, LEAF_P,
                          MAP_GRADS, PRECISION, UPCAST)
        dv += _leaf_share(TG, LEAF, DLEAF, s_w, s_h, T, v, 1, e, j, tok, c, cok, bkv, hkv, nk, m, d, P, LEAF_P,
                          MAP_GRADS, PRECISION, UPCAST)
    tl.store(DK + krow, dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + krow, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _leaf_share(TG, LEAF, DLEAF, s_w, s_h, T, x, which: tl.constexpr, e, j, tok, c, cok, bkv, hkv, nk,
                m: tl.constexpr, d: tl.constexpr, P: tl.constexpr, LEAF_P: tl.constexpr,
                MAP_GRADS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The keys' (which = 0) or values' share of their block's level-1 summary gradients,
    (BLOCK_N, BLOCK_D) fp32, and with MAP_GRADS the leaf map's gradient from these rows x."""
    lp = tl.arange(0, LEAF_P)  # the p summaries, padded to 16 rows for the tensor cores
    lok = lp < P
    at = tl.load(LEAF + which * s_w + hkv * s_h + lp[None, :] * m + j[:, None],
                 mask=lok[None, :] & tok[:, None], other=0.0)  # (BLOCK_N, LEAF_P): leaf^T
    grow = (which * tl.num_programs(1) + bkv) * T + e * P + lp
    g1 = tl.load(TG + grow[:, None] * d + c[None, :], mask=lok[:, None] & cok[None, :], other=0.0)
    g1 = g1.to(x.dtype)  # products in the tokens' dtype, as the attention's own
    if MAP_GRADS:
        da = _mm(g1, tl.trans(tl.where(tok[:, None], x, 0.0).to(x.dtype)), PRECISION, UPCAST)  # (LEAF_P, BLOCK_N)
        slot = ((bkv * tl.cdiv(nk, m) + e) * 2 + which) * P * m
        tl.store(DLEAF + slot + lp[:, None] * m + j[None, :], da, mask=lok[:, None] & (j < m)[None, :])
    return _mm(at.to(x.dtype), g1, PRECISION, UPCAST)


@triton.jit(do_not_specialize=["nq", "a0", "H", "G", "T"])
def _dsum_kernel(Q, KS, VS, DO, LSE, DELTA, SEEN, SBIAS, DKS, DVS,
                 nq, a0, H, G, T, scale,
                 m: tl.constexpr, d: tl.constexpr, p: tl.constexpr, COLS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One query head's share of the gradients of the ``p`` summaries of one coarse window (row
    ``w`` of the ``seen_by`` table): the transposed pass over the query blocks of the (up to
    four) windows whose lists hold it, within the local range [a0, a0 + nq), accumulated in
    registers; DKS, DVS (B, H, T, d) fp32, summed over each kv head's G query heads afterwards
    (deterministic, and the G heads run in parallel rather than one after another)."""
    w = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)  # b * H + query head
    bkv = (bh // H) * (H // G) + (bh % H) // G
    N = nq * m
    qk_scale = scale * 1.4426950408889634
    level = tl.load(SEEN + w * COLS).to(tl.int64)
    first = tl.load(SEEN + w * COLS + 2).to(tl.int64)
    base = tl.load(SEEN + w * COLS + 3).to(tl.int64)  # the window's sequence's (document's) first block
    end = tl.load(SEEN + w * COLS + 4).to(tl.int64)  # and its end block
    span = tl.full([], 1, tl.int64) << (level - 1)  # fine blocks per window of this level
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_P)
    rok = r < m
    cok = c < d
    jok = j < p
    smask = jok[:, None] & cok[None, :]
    srow = (bkv * T + first + j)[:, None] * d + c[None, :]
    ks = tl.load(KS + srow, mask=smask, other=0.0)
    vs = tl.load(VS + srow, mask=smask, other=0.0)
    orow = (bh * T + first + j)[:, None] * d + c[None, :]
    sb = tl.load(SBIAS + first + j, mask=jok, other=float("-inf"))  # natural log; -inf: no token
    live = (sb > float("-inf"))[:, None] & rok[None, :]
    dks = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    dvs = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for t in tl.static_range(COLS - 5):
        cq = tl.load(SEEN + w * COLS + 5 + t).to(tl.int64)  # a window that sees this one, or -1
        qlo = tl.maximum(base + cq * span, a0)  # its query blocks, within this call's range
        qhi = tl.where(cq >= 0, tl.minimum(tl.minimum(base + (cq + 1) * span, end), a0 + nq), qlo)
        for a in range(qlo, qhi):
            i = a - a0
            qrow = (bh * N + i * m + r)[:, None] * d + c[None, :]
            q = tl.load(Q + qrow, mask=rok[:, None] & cok[None, :], other=0.0)
            do = tl.load(DO + qrow, mask=rok[:, None] & cok[None, :], other=0.0)
            lse2 = tl.load(LSE + bh * N + i * m + r, mask=rok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + bh * N + i * m + r, mask=rok, other=0.0)
            # Transposed scores (summaries x queries), as the dk/dv kernel's.
            st = _mm(ks, tl.trans(q), PRECISION, UPCAST) * qk_scale + (sb * 1.4426950408889634)[:, None]
            pt = tl.where(live, tl.exp2(st - lse2[None, :]), 0.0)
            dvs += _mm(pt.to(do.dtype), do, PRECISION, UPCAST)
            dpt = _mm(vs, tl.trans(do), PRECISION, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dks += _mm(dst.to(q.dtype), q, PRECISION, UPCAST)
    tl.store(DKS + orow, dks * scale, mask=smask)
    tl.store(DVS + orow, dvs, mask=smask)


# Adaptive refinement's opened blocks (fmtrain/attention/refine.py: OpenedTiles). The (query, opened
# block) pairs are sorted by block into tiles of T queries; one program owns one tile: its T*G query
# rows (gathered through ROWQ, -1 for padding) against its block's m keys (row BLK of KB/VB, laid out
# (blocks, m*d); positions past n masked). The forward writes each row's softmax over the block
# (out, lse), merged with the rest of the far field by PyTorch; the backward takes each query's final
# lse and delta and writes dq per row and dk, dv per tile, summed over a block's tiles by PyTorch.
# Tensors hold the far field's accumulation dtype (fp32); with half inputs the products run in
# that half type (q, k, v exactly as given; probabilities, dout and score gradients rounded, as
# the core's kernels and FlashAttention round them), accumulating in fp32. Shapes: QG, DO (queries, G, d); LQ,
# DELTA (queries*G,); OUT, DQ (tiles*T*G, d); LSE (tiles*T*G,); DK, DV (tiles, m, d).
_OPENED_INTS = ["n", "n_blocks", "T", "G"]


@triton.jit
def _as_inputs(x, HALF: tl.constexpr):
    """The far field's fp32 copy of an input back in the inputs' dtype (exact for q, k, v), so that
    products run on tensor cores as the core's do: HALF 1 fp16, 2 bf16, 0 stay fp32."""
    if HALF == 1:
        y = x.to(tl.float16)
    elif HALF == 2:
        y = x.to(tl.bfloat16)
    else:
        y = x
    return y


@triton.jit
def _opened_rows(QG, ROWQ, t, T, G, d: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """A tile's rows: offsets of their query heads' vectors in QG, which hold a pair, and the
    flattened (query, head) index of each (for the per-query lse and delta)."""
    r = tl.arange(0, BLOCK_R)
    query = tl.load(ROWQ + t * T + r // G, mask=r < T * G, other=-1).to(tl.int64)
    qh = query * G + r % G
    rok = (r < T * G) & (query >= 0)
    c = tl.arange(0, BLOCK_D)
    return qh[:, None] * d + c[None, :], rok[:, None] & (c < d)[None, :], rok, qh


@triton.jit
def _opened_keys(BLK, ENDS, t, n, n_blocks, m: tl.constexpr, d: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOCS: tl.constexpr):
    """The tile's block: offsets of its m key rows in KB/VB and which are tokens before n (packed
    documents, DOCS: before the block's document's end, ENDS[block])."""
    blk = tl.load(BLK + t).to(tl.int64)
    j = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    if DOCS:
        end = tl.load(ENDS + blk % n_blocks)
    else:
        end = n
    kok = (j < m) & ((blk % n_blocks) * m + j < end)
    return blk * (m * d) + j[:, None] * d + c[None, :], kok[:, None] & (c < d)[None, :], kok


@triton.jit(do_not_specialize=_OPENED_INTS)
def _opened_fwd_kernel(QG, KB, VB, ROWQ, BLK, ENDS, OUT, LSE, n, n_blocks, T, G, qk_scale,
                       m: tl.constexpr, d: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HALF: tl.constexpr,
                       DOCS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    qoff, qmask, rok, qh = _opened_rows(QG, ROWQ, t, T, G, d, BLOCK_R, BLOCK_D)
    koff, kmask, kok = _opened_keys(BLK, ENDS, t, n, n_blocks, m, d, BLOCK_M, BLOCK_D, DOCS)
    q = _as_inputs(tl.load(QG + qoff, mask=qmask, other=0.0), HALF)
    k = _as_inputs(tl.load(KB + koff, mask=kmask, other=0.0), HALF)
    s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # base 2; every tile's block has a token
    s = tl.where(kok[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    p = tl.exp2(s - mx[:, None])
    tot = tl.sum(p, 1)
    v = _as_inputs(tl.load(VB + koff, mask=kmask, other=0.0), HALF)
    o = _mm(p.to(v.dtype), v, PRECISION, UPCAST) / tot[:, None]
    r = tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    row = t * T * G + r
    there = r < T * G
    tl.store(OUT + row[:, None] * d + c[None, :], o, mask=there[:, None] & (c < d)[None, :])
    tl.store(LSE + row, (mx + tl.log2(tot)) * 0.6931471805599453, mask=there)  # natural log


@triton.jit(do_not_specialize=_OPENED_INTS)
def _opened_bwd_kernel(QG, DO, LQ, DELTA, KB, VB, ROWQ, BLK, ENDS, DQ, DK, DV, n, n_blocks, T, G, scale,
                       m: tl.constexpr, d: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, HALF: tl.constexpr,
                       DOCS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    qoff, qmask, rok, qh = _opened_rows(QG, ROWQ, t, T, G, d, BLOCK_R, BLOCK_D)
    koff, kmask, kok = _opened_keys(BLK, ENDS, t, n, n_blocks, m, d, BLOCK_M, BLOCK_D, DOCS)
    q = _as_inputs(tl.load(QG + qoff, mask=qmask, other=0.0), HALF)
    do = _as_inputs(tl.load(DO + qoff, mask=qmask, other=0.0), HALF)
    lq = tl.load(LQ + qh, mask=rok, other=0.0)
    dl = tl.load(DELTA + qh, mask=rok, other=0.0)
    k = _as_inputs(tl.load(KB + koff, mask=kmask, other=0.0), HALF)
    v = _as_inputs(tl.load(VB + koff, mask=kmask, other=0.0), HALF)
    s = _mm(q, tl.trans(k), PRECISION, UPCAST) * (scale * 1.4426950408889634)
    p = tl.exp2(s - (lq * 1.4426950408889634)[:, None])
    p = tl.where(rok[:, None] & kok[None, :], p, 0.0)
    ds = p * (_mm(do, tl.trans(v), PRECISION, UPCAST) - dl[:, None]) * scale
    r = tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    row = t * T * G + r
    tl.store(DQ + row[:, None] * d + c[None, :], _mm(ds.to(k.dtype), k, PRECISION, UPCAST),
             mask=(r < T * G)[:, None] & (c < d)[None, :])
    j = tl.arange(0, BLOCK_M)
    toff = t * (m * d) + j[:, None] * d + c[None, :]
    tmask = (j < m)[:, None] & (c < d)[None, :]
    tl.store(DK + toff, _mm(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST), mask=tmask)
    tl.store(DV + toff, _mm(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST), mask=tmask)
