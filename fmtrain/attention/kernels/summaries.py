"""Every level of the bottom-up summaries (``mean``, ``m2m``) in a constant number of launches.

The PyTorch form (:class:`..summaries.Summaries`) builds level ``l+1`` from level ``l`` with a
few ops per level, forward and backward: ~6-22 ops a level, 7 to 13 levels from 16k to 1M
tokens, each a launch on a GPU. Here two kernels build them all (issue #26's "no host work in
the hot path"), and two more run the backward:

- ``_up_kernel``, one program per chunk of ``C`` fine blocks (and head, and k/v): the level-1
  summaries of its blocks from their tokens (``leaf``: p x m), then the levels whose windows lie
  inside the chunk, each parent from its two children (``up``: p x 2p), through an fp32 buffer
  ``z`` that the program reads back after a barrier.
- ``_top_kernel``, one program per head and k/v: the levels above the chunks' (at most 63
  windows at the first of them: :func:`_chunk_blocks` makes the chunks that wide).
- backward, the same two in reverse order (``_top_bwd_kernel`` then ``_up_bwd_kernel``): each
  window's gradient is its own summary's (times the summary's scale) plus its parent's share
  (``up^T`` times the parent's), handed down through the buffer ``g``; the tokens get ``leaf^T``
  times their block's. m2m's map gradients are summed per program and then over programs by
  PyTorch (no atomics: deterministic).

Outputs are the summaries as the attention reads them, ``z * scale`` (:func:`..summaries.finish`),
in the tokens' dtype; the recursion itself runs in fp32 (the PyTorch form rounds each level to the
tokens' dtype, so in bf16 the two differ by bf16 rounding, and this one is the closer to float64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..hierarchy import Hierarchy, summary_scales
from .triton_core import _mm

# Above the chunks at most this many windows: the top kernel walks them one program per head.
TOP_WINDOWS = 64
# Shapes Triton would otherwise specialise on (== 1, divisible by 16): a recompile each. The tokens'
# strides (skb ... svn) are specialised: divisible by 16 (as a row of H * d is) is what lets a row
# of 8 halves load as one 16-byte vector.
_INTS = ["s_w", "s_h", "u_w", "u_h", "H", "n", "n_blocks", "S", "C", "chunk_levels", "L", "chunks"]
STRIDES = ("skb", "skh", "skn", "svb", "svh", "svn")


def _jit(fn):
    """``triton.jit``, without specialising on the integer arguments of :data:`_INTS` it has."""
    args = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(do_not_specialize=[a for a in _INTS if a in args])(fn)


def _chunk_blocks(n_blocks: int) -> int:
    """Fine blocks per chunk: a power of two, so that a chunk holds whole windows of its levels,
    wide enough that at most :data:`TOP_WINDOWS` windows remain above the chunks."""
    return triton.next_power_of_2(max(1, -(-n_blocks // TOP_WINDOWS)))


@triton.jit
def _bases(K, V, skb, skh, skn, svb, svh, svn, OUT_K, OUT_V, b, hh, H, S, D: tl.constexpr, which):
    """The k or v of program (b, head, which): its tokens' base and row stride, and the base of its
    rows in a (B, H, S, D) output pair (summaries, or the tokens' gradients: then S = n)."""
    if which == 0:
        x, sn, out = K + b * skb + hh * skh, skn.to(tl.int64), OUT_K + (b * H + hh) * S * D
    else:
        x, sn, out = V + b * svb + hh * svh, svn.to(tl.int64), OUT_V + (b * H + hh) * S * D
    return x, sn, out


@triton.jit
def _tree_mm(a, b, DOT: tl.constexpr):
    """a @ b in fp32 for the tree's small maps: with p <= 4 as a broadcast product (a tl.dot would pad
    the p rows to 16, 8x the registers), else tl.dot on tiles padded to 16."""
    if DOT:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


@triton.jit
def _level_offset(level, n_blocks, P: tl.constexpr):
    """First row of coarse ``level`` in the concatenated summaries: p times the windows below it."""
    off = tl.zeros([], tl.int32)
    for l in range(1, level):
        off += tl.cdiv(n_blocks, 1 << (l - 1)) * P
    return off


@triton.jit
def _parents(zb, ob, SCALE, U, off_child, nw_child, off, w_lo, w_hi, offs_p, offs_2p, offs_d,
             D: tl.constexpr, P: tl.constexpr, DOT: tl.constexpr):
    """Windows ``[w_lo, w_hi)`` of one level from their children: z = up @ (children's 2p rows)."""
    dok = offs_d[None, :] < D
    for w in range(w_lo, w_hi):
        crow = off_child + 2 * w * P + offs_2p  # the two children's p rows each, consecutive
        cok = (offs_2p < 2 * P) & (2 * w + offs_2p // P < nw_child)
        cz = tl.load(zb + crow[:, None] * D + offs_d[None, :], mask=cok[:, None] & dok, other=0.0)
        z = _tree_mm(U, cz, DOT)  # (BLOCK_P, BLOCK_D)
        _store(z, off + w * P + offs_p, offs_p < P, zb, ob, SCALE, offs_d, D)


@triton.jit
def _store(z, rows, rok, zb, ob, SCALE, offs_d, D: tl.constexpr):
    """Rows of z: unscaled (fp32, for the levels above and the backward) and as the attention reads them."""
    mask = rok[:, None] & (offs_d[None, :] < D)
    tl.store(zb + rows[:, None] * D + offs_d[None, :], z, mask=mask)
    s = tl.load(SCALE + rows, mask=rok, other=0.0)
    tl.store(ob + rows[:, None] * D + offs_d[None, :], (z * s[:, None]).to(ob.dtype.element_ty), mask=mask)


@triton.jit
def _map(MAP, s_w, s_h, which, hh, rows, cols, R: tl.constexpr, C: tl.constexpr):
    """This head's leaf (p x m) or up (p x 2p) map, as ``rows`` x ``cols`` tiles in fp32, zero-padded:
    rows and cols index the map's own rows and columns (swap them for its transpose)."""
    return tl.load(MAP + which * s_w + hh * s_h + rows * C + cols, mask=(rows < R) & (cols < C),
                   other=0.0).to(tl.float32)


@triton.jit
def _pick(which, A, B):
    """A for the keys' programs (which = 0), B for the values'."""
    if which == 0:
        out = A
    else:
        out = B
    return out


@_jit
def _up_kernel(K, V, skb, skh, skn, svb, svh, svn, LEAF, UP, s_w, s_h, u_w, u_h, Z, KS, VS, SCALE,
               H, n, n_blocks, S, C, chunk_levels,
               M: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, LEAF_P: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_2P: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    ch, bh, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hh = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    x, sn, ob = _bases(K, V, skb, skh, skn, svb, svh, svn, KS, VS, b, hh, H, S, D, which)
    zb = Z + (which * tl.num_programs(1) + bh).to(tl.int64) * S * D
    offs_t, offs_lp, offs_p = tl.arange(0, BLOCK_M), tl.arange(0, LEAF_P), tl.arange(0, BLOCK_P)
    offs_2p, offs_d = tl.arange(0, BLOCK_2P), tl.arange(0, BLOCK_D)
    A = _map(LEAF, s_w, s_h, which, hh, offs_lp[:, None], offs_t[None, :], P, M)  # (LEAF_P, BLOCK_M)
    U = _map(UP, u_w, u_h, which, hh, offs_p[:, None], offs_2p[None, :], P, 2 * P)  # (BLOCK_P, BLOCK_2P)
    dok = offs_d[None, :] < D
    lo = ch * C
    for blk in range(lo, tl.minimum(lo + C, n_blocks)):  # level 1: each block's p summaries
        rows = blk * M + offs_t
        xt = tl.load(x + rows[:, None] * sn + offs_d[None, :],
                     mask=(offs_t[:, None] < M) & (rows[:, None] < n) & dok, other=0.0)  # (BLOCK_M, BLOCK_D)
        z = _mm(A.to(xt.dtype), xt, PRECISION, UPCAST)  # (LEAF_P, BLOCK_D): tensor cores, rows >= p padding
        _store(z, blk * P + offs_lp, offs_lp < P, zb, ob, SCALE, offs_d, D)
    off_child, off = tl.zeros([], tl.int32), n_blocks * P
    for l in range(2, chunk_levels + 1):  # the levels whose windows lie inside the chunk
        tl.debug_barrier()  # the children, stored by other threads of this program
        per = C >> (l - 1)
        nw = tl.cdiv(n_blocks, 1 << (l - 1))
        _parents(zb, ob, SCALE, U, off_child, tl.cdiv(n_blocks, 1 << (l - 2)), off,
                 ch * per, tl.minimum(ch * per + per, nw), offs_p, offs_2p, offs_d, D, P, DOT)
        off_child, off = off, off + nw * P


@_jit
def _top_kernel(UP, u_w, u_h, Z, KS, VS, SCALE,
                H, n_blocks, S, chunk_levels, L,
                P: tl.constexpr, D: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_2P: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr):
    bh, which = tl.program_id(0), tl.program_id(1)
    hh = (bh % H).to(tl.int64)
    ob = _pick(which, KS, VS) + bh.to(tl.int64) * S * D
    zb = Z + (which * tl.num_programs(0) + bh).to(tl.int64) * S * D
    offs_p, offs_2p, offs_d = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_2P), tl.arange(0, BLOCK_D)
    U = _map(UP, u_w, u_h, which, hh, offs_p[:, None], offs_2p[None, :], P, 2 * P)
    off_child = _level_offset(chunk_levels, n_blocks, P)
    off = off_child + tl.cdiv(n_blocks, 1 << (chunk_levels - 1)) * P
    for l in range(chunk_levels + 1, L + 1):
        tl.debug_barrier()
        nw = tl.cdiv(n_blocks, 1 << (l - 1))
        _parents(zb, ob, SCALE, U, off_child, tl.cdiv(n_blocks, 1 << (l - 2)), off, 0, nw,
                 offs_p, offs_2p, offs_d, D, P, DOT)
        off_child, off = off, off + nw * P


@triton.jit
def _down(zb, gb, db, SCALE, Ut, off, w, nw_child, off_child, has_parent, offs_p, offs_2p, offs_d,
          D: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_2P: tl.constexpr,
          DOT: tl.constexpr, MAP_GRADS: tl.constexpr):
    """Window ``w`` of a level above 1: its gradient g (its summaries' own, scaled, plus the share its
    parent handed down), handed on to its children (``up^T g``, into gb); returns g @ children^T,
    its term of up's gradient (zeros without MAP_GRADS)."""
    dok = offs_d[None, :] < D
    rows = off + w * P + offs_p
    g = _own_and_parent(rows, offs_p < P, zb, gb, db, SCALE, offs_d, has_parent, D)
    crow = off_child + 2 * w * P + offs_2p
    cok = ((offs_2p < 2 * P) & (2 * w + offs_2p // P < nw_child))[:, None] & dok
    tl.store(gb + crow[:, None] * D + offs_d[None, :], _tree_mm(Ut, g, DOT), mask=cok)
    dU = tl.zeros([BLOCK_P, BLOCK_2P], tl.float32)
    if MAP_GRADS:
        cz = tl.load(zb + crow[:, None] * D + offs_d[None, :], mask=cok, other=0.0)
        dU = _tree_mm(g, tl.trans(cz), DOT)
    return dU


@triton.jit
def _own_and_parent(rows, rok, zb, gb, db, SCALE, offs_d, has_parent, D: tl.constexpr):
    """The gradient of rows of z: d(summaries) * scale, plus the parent's share if ``has_parent > 0``."""
    mask = rok[:, None] & (offs_d[None, :] < D)
    s = tl.load(SCALE + rows, mask=rok, other=0.0)
    g = tl.load(db + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32) * s[:, None]
    parent = (rows * 0 + has_parent) > 0  # (a scalar condition as a mask the interpreter takes too)
    return g + tl.load(gb + rows[:, None] * D + offs_d[None, :], mask=mask & parent[:, None], other=0.0)


@_jit
def _top_bwd_kernel(UP, u_w, u_h, Z, G, GKS, GVS, SCALE, DUP,
                    H, n_blocks, S, chunk_levels, L, chunks,
                    P: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_2P: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT: tl.constexpr, MAP_GRADS: tl.constexpr):
    bh, which = tl.program_id(0), tl.program_id(1)
    hh = (bh % H).to(tl.int64)
    row0 = (which * tl.num_programs(0) + bh).to(tl.int64) * S * D
    zb, gb = Z + row0, G + row0
    db = _pick(which, GKS, GVS) + bh.to(tl.int64) * S * D
    offs_p, offs_2p, offs_d = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_2P), tl.arange(0, BLOCK_D)
    Ut = _map(UP, u_w, u_h, which, hh, offs_p[None, :], offs_2p[:, None], P, 2 * P)  # (BLOCK_2P, BLOCK_P)
    dU = tl.zeros([BLOCK_P, BLOCK_2P], tl.float32)
    off = _level_offset(L, n_blocks, P)
    for i in range(0, L - chunk_levels):  # levels L .. chunk_levels + 1, top first
        l = L - i
        nw_child = tl.cdiv(n_blocks, 1 << (l - 2))
        off_child = off - nw_child * P
        tl.debug_barrier()  # this level's parent shares, stored by other threads
        for w in range(0, tl.cdiv(n_blocks, 1 << (l - 1))):
            dU += _down(zb, gb, db, SCALE, Ut, off, w, nw_child, off_child, L - l, offs_p, offs_2p, offs_d,
                        D, P, BLOCK_P, BLOCK_2P, DOT, MAP_GRADS)
        off = off_child
    if MAP_GRADS:  # (B, chunks + 1, 2, H, P, 2P): this one's slot is the last
        b = bh // H
        slot = ((b * (chunks + 1) + chunks) * 2 + which) * H + hh
        tl.store(DUP + slot * P * 2 * P + offs_p[:, None] * (2 * P) + offs_2p[None, :], dU,
                 mask=(offs_p[:, None] < P) & (offs_2p[None, :] < 2 * P))


@_jit
def _up_bwd_kernel(K, V, skb, skh, skn, svb, svh, svn, LEAF, UP, s_w, s_h, u_w, u_h, Z, G, GKS, GVS, SCALE,
                   DK, DV, DLEAF, DUP,
                   H, n, n_blocks, S, C, chunk_levels, L, chunks,
                   M: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                   LEAF_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_2P: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT: tl.constexpr, MAP_GRADS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   TOKENS: tl.constexpr):
    ch, bh, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hh = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    x, sn, dxb = _bases(K, V, skb, skh, skn, svb, svh, svn, DK, DV, b, hh, H, n, D, which)
    row0 = (which * tl.num_programs(1) + bh).to(tl.int64) * S * D
    zb, gb = Z + row0, G + row0
    db = _pick(which, GKS, GVS) + bh.to(tl.int64) * S * D
    offs_lp, offs_p = tl.arange(0, LEAF_P), tl.arange(0, BLOCK_P)
    offs_2p, offs_d = tl.arange(0, BLOCK_2P), tl.arange(0, BLOCK_D)
    Ut = _map(UP, u_w, u_h, which, hh, offs_p[None, :], offs_2p[:, None], P, 2 * P)  # (BLOCK_2P, BLOCK_P)
    dU = tl.zeros([BLOCK_P, BLOCK_2P], tl.float32)
    off = _level_offset(chunk_levels, n_blocks, P)
    for i in range(0, chunk_levels - 1):  # levels chunk_levels .. 2, inside the chunk
        l = chunk_levels - i
        nw_child = tl.cdiv(n_blocks, 1 << (l - 2))
        off_child = off - nw_child * P
        per = C >> (l - 1)
        tl.debug_barrier()
        for w in range(ch * per, tl.minimum(ch * per + per, tl.cdiv(n_blocks, 1 << (l - 1)))):
            dU += _down(zb, gb, db, SCALE, Ut, off, w, nw_child, off_child, L - l, offs_p, offs_2p, offs_d,
                        D, P, BLOCK_P, BLOCK_2P, DOT, MAP_GRADS)
        off = off_child
    tl.debug_barrier()
    dok = offs_d[None, :] < D
    lo = ch * C
    if not TOKENS:  # level 1's whole gradient, into G, for the dk/dv kernel's epilogue to apply
        for blk in range(lo, tl.minimum(lo + C, n_blocks)):
            rows = blk * P + offs_lp
            g = _own_and_parent(rows, offs_lp < P, zb, gb, db, SCALE, offs_d, L - 1, D)
            tl.store(gb + rows[:, None] * D + offs_d[None, :], g, mask=(offs_lp < P)[:, None] & dok)
    slot = ((b * chunks + ch) * 2 + which) * H + hh
    # Level 1, the tokens, BLOCK_T rows of every block at a time (a whole block's token gradient
    # and tokens would not fit in registers at head_dim 128).
    if TOKENS:
        for t0 in tl.static_range(0, BLOCK_M, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            At = _map(LEAF, s_w, s_h, which, hh, offs_lp[None, :], offs_t[:, None], P, M)  # (BLOCK_T, LEAF_P)
            dA = tl.zeros([LEAF_P, BLOCK_T], tl.float32)
            for blk in range(lo, tl.minimum(lo + C, n_blocks)):
                g = _own_and_parent(blk * P + offs_lp, offs_lp < P, zb, gb, db, SCALE, offs_d, L - 1, D)  # (LEAF_P, BLOCK_D)
                # in the tokens' dtype, for the tensor cores (as the attention's kernels round their
                # score gradients); fp32 stays fp32 (IEEE products)
                g = g.to(dxb.dtype.element_ty)
                rows = blk * M + offs_t
                tok = (offs_t[:, None] < M) & (rows[:, None] < n) & dok
                tl.store(dxb + rows[:, None] * D + offs_d[None, :],
                         _mm(At.to(g.dtype), g, PRECISION, UPCAST).to(dxb.dtype.element_ty), mask=tok)
                if MAP_GRADS:
                    xt = tl.load(x + rows[:, None] * sn + offs_d[None, :], mask=tok, other=0.0)
                    dA += _mm(g, tl.trans(xt), PRECISION, UPCAST)
            if MAP_GRADS:  # per program: (B, chunks, 2, H, P, M)
                tl.store(DLEAF + slot * P * M + offs_lp[:, None] * M + offs_t[None, :], dA,
                         mask=(offs_lp[:, None] < P) & (offs_t[None, :] < M))
    if MAP_GRADS:  # per program: (B, chunks + 1, 2, H, P, 2P)
        slot = ((b * (chunks + 1) + ch) * 2 + which) * H + hh
        tl.store(DUP + slot * P * 2 * P + offs_p[:, None] * (2 * P) + offs_2p[None, :], dU,
                 mask=(offs_p[:, None] < P) & (offs_2p[None, :] < 2 * P))


# One warp group, no software pipelining: the loops are short and wait on the barriers.
LAUNCH = dict(num_warps=4, num_stages=1)


def _tiles_for(m: int, d: int, p: int) -> dict:
    """Tiles, powers of two, the padding masked: the tokens' products on tensor cores (``tl.dot``,
    16 rows and columns at least: LEAF_P), the tree's on p x 2p maps as broadcast products up to
    p = 4 (DOT False), padded dots above."""
    dot = p > 4
    small = triton.next_power_of_2(p)
    return dict(P=p, D=d, BLOCK_M=max(16, triton.next_power_of_2(m)), LEAF_P=max(16, small),
                BLOCK_P=max(16, small) if dot else small, BLOCK_2P=max(16, 2 * small) if dot else 2 * small,
                BLOCK_D=max(16, triton.next_power_of_2(d)), DOT=dot)


def tree_tiles(tiles: dict) -> dict:
    """The tiles of the kernels that only walk the levels (no tokens: no leaf tiles)."""
    return {k: v for k, v in tiles.items() if k not in ("BLOCK_M", "LEAF_P")}


def _bwd_rows(block_m: int) -> int:
    """Token rows the backward's leaf pass takes at a time."""
    return min(block_m, 32)


def _map_strides(leaf, up) -> tuple:
    """The maps' (which, head) strides as the kernels take them: head stride 0 for one shared head."""
    return (leaf.stride(0), leaf.stride(1) if leaf.shape[1] > 1 else 0,
            up.stride(0), up.stride(1) if up.shape[1] > 1 else 0)


def tree_forward(k, v, leaf, up, h: Hierarchy):
    """Every level's summaries of k, v (B, H, n, d): (ks, vs, z), z the unscaled fp32 levels
    (2, B, H, S, d) the backward reads. ``leaf``, ``up`` contiguous."""
    B, H, n, d = k.shape
    L, S, nb, m = h.n_levels, h.num_summaries, h.n_blocks, h.block_size
    C = _chunk_blocks(nb)
    chunk_levels, chunks = min(L, C.bit_length()), triton.cdiv(nb, C)
    z = torch.empty(2, B, H, S, d, dtype=torch.float32, device=k.device)
    ks, vs = (torch.empty(B, H, S, d, dtype=k.dtype, device=k.device) for _ in range(2))
    scale = summary_scales(h, k.device, torch.float32)
    maps = _map_strides(leaf, up)
    tiles = _tiles_for(m, d, h.rank)
    from .function import _precision, _upcast

    _up_kernel[(chunks, B * H, 2)](
        k, v, *k.stride()[:3], *v.stride()[:3], leaf, up, *maps, z, ks, vs, scale,
        H, n, nb, S, C, chunk_levels, M=m, PRECISION=_precision(k.dtype), UPCAST=_upcast(k.dtype),
        **tiles, **LAUNCH)
    _top_kernel[(B * H, 2)](up, *maps[2:], z, ks, vs, scale, H, nb, S, chunk_levels, L, **tree_tiles(tiles),
                            **LAUNCH)
    return ks, vs, z


def tree_backward(k, v, leaf, up, z, h: Hierarchy, dks, dvs, map_grads: bool, tokens: bool = True):
    """The backward of :func:`tree_forward` from the summaries' gradients dks, dvs (B, H, S, d; any
    float dtype): (dk, dv, g, dleaf, dup). ``tokens``: the tokens' gradients dk, dv (else None,
    and g holds every block's level-1 gradient for :func:`leaf_epilogue`). ``map_grads``: the maps'
    gradients (leaf's only with ``tokens``; else the dk/dv kernel forms them), else None."""
    B, H, n, d = k.shape
    L, S, nb, m, p = h.n_levels, h.num_summaries, h.n_blocks, h.block_size, h.rank
    C = _chunk_blocks(nb)
    chunk_levels, chunks = min(L, C.bit_length()), triton.cdiv(nb, C)
    g = torch.empty_like(z)  # each window's share from its parent (level 1's whole gradient without tokens)
    dk = dv = None
    if tokens:
        dk, dv = (torch.empty(B, H, n, d, dtype=x.dtype, device=k.device) for x in (k, v))
    dleaf = torch.empty(B, chunks, 2, H, p, m, device=k.device) if map_grads and tokens else z
    dup = torch.empty(B, chunks + 1, 2, H, p, 2 * p, device=k.device) if map_grads else z
    scale = summary_scales(h, k.device, torch.float32)
    maps = _map_strides(leaf, up)
    tiles = _tiles_for(m, d, p)
    from .function import _precision, _upcast

    _top_bwd_kernel[(B * H, 2)](up, *maps[2:], z, g, dks, dvs, scale, dup, H, nb, S, chunk_levels, L, chunks,
                                MAP_GRADS=map_grads, **tree_tiles(tiles), **LAUNCH)
    _up_bwd_kernel[(chunks, B * H, 2)](
        k, v, *k.stride()[:3], *v.stride()[:3], leaf, up, *maps, z, g, dks, dvs, scale,
        dk if tokens else z, dv if tokens else z, dleaf, dup,
        H, n, nb, S, C, chunk_levels, L, chunks, M=m, BLOCK_T=_bwd_rows(tiles["BLOCK_M"]),
        MAP_GRADS=map_grads, PRECISION=_precision(k.dtype), UPCAST=_upcast(k.dtype), TOKENS=tokens,
        **tiles, **LAUNCH)
    dl = du = None
    if map_grads:  # summed over the batch and the programs; shared maps (one head) over the heads too
        du = (dup.sum(dim=(0, 1)) if up.shape[1] > 1 else dup.sum(dim=(0, 1, 3)).unsqueeze(1)).to(up.dtype)
        if tokens:
            dl = (dleaf.sum(dim=(0, 1)) if leaf.shape[1] > 1 else dleaf.sum(dim=(0, 1, 3)).unsqueeze(1)).to(leaf.dtype)
    return dk, dv, g, dl, du


def leaf_epilogue(g, leaf, h: Hierarchy, nk: int, B: int, map_grads: bool) -> dict:
    """The dk/dv kernel's ``tree`` arguments (:func:`.function.core_backward_keys`): level-1
    gradients ``g`` from :func:`tree_backward` (tokens=False), the leaf maps and, with
    ``map_grads``, a partial buffer (B * Hkv, key blocks, 2, p, m) fp32 for the leaf's gradient."""
    H, p, m = g.shape[2], h.rank, h.block_size
    parts = torch.empty(B * H, triton.cdiv(nk, m), 2, p, m, device=g.device) if map_grads else g
    s_w, s_h = _map_strides(leaf, leaf)[:2]
    return dict(TG=g, LEAF=leaf, DLEAF=parts, s_w=s_w, s_h=s_h, T=h.num_summaries, TREE=True, MAP_GRADS=map_grads,
                P=p, LEAF_P=_tiles_for(m, g.shape[-1], p)["LEAF_P"])


def leaf_grad(tree: dict, leaf: torch.Tensor, B: int) -> torch.Tensor:
    """The leaf map's gradient from :func:`leaf_epilogue`'s partials: (2, H or 1, p, m), leaf's dtype."""
    parts = tree["DLEAF"]  # (B * Hkv, blocks, 2, p, m)
    Hkv = parts.shape[0] // B
    per_head = parts.view(B, Hkv, *parts.shape[1:]).sum(dim=(0, 2)).transpose(0, 1)  # (2, Hkv, p, m)
    return (per_head if leaf.shape[1] > 1 else per_head.sum(1, keepdim=True)).to(leaf.dtype)


class TreeSummaries(torch.autograd.Function):
    """(k, v, leaf, up) -> (ks, vs), each (B, H, num_summaries, d): the summaries of every level.

    ``leaf`` (2, H or 1, p, m) and ``up`` (2, H or 1, p, 2p): the keys' and the values' maps per
    head (one shared head: the parameter-free means); their gradients are computed where asked.
    """

    @staticmethod
    def forward(ctx, k, v, leaf, up, h: Hierarchy):
        leaf, up = leaf.contiguous(), up.contiguous()
        ks, vs, z = tree_forward(k, v, leaf, up, h)
        ctx.save_for_backward(k, v, leaf, up, z)
        ctx.h = h
        return ks, vs

    @staticmethod
    def backward(ctx, dks, dvs):
        k, v, leaf, up, z = ctx.saved_tensors
        dks = torch.zeros_like(z[0], dtype=k.dtype) if dks is None else dks.contiguous()
        dvs = torch.zeros_like(z[0], dtype=k.dtype) if dvs is None else dvs.contiguous()
        map_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dk, dv, _, dl, du = tree_backward(k, v, leaf, up, z, ctx.h, dks, dvs, map_grads)
        return dk, dv, dl, du, None


class SummarizedAttention(torch.autograd.Function):
    """(q, k, v, leaf, up) -> out: a whole sequence's summaries (:func:`tree_forward`) and the
    core (:func:`.function.core_forward`) as one autograd node, so that the summaries' gradient
    reaches the tokens inside the dk/dv kernel (its epilogue adds ``leaf^T g1``: issue #26's "no
    full-size copies"), not as a second (B, Hkv, n, d) gradient per tensor that autograd then adds.

    q (B, H, N, d), k, v (B, Hkv, N, d): padded to whole blocks (N = h.padded_len), contiguous,
    one dtype (fp16/bf16/fp32); leaf, up as :class:`TreeSummaries` takes them. Returns out like q.
    Backward: dq (and the summaries' gradients per query head), the tree's levels above 1, then
    dk, dv with the summaries' share; m2m's map gradients where asked.
    """

    @staticmethod
    def forward(ctx, q, k, v, leaf, up, h: Hierarchy, weighted: bool, scale: float):
        from .function import _check, core_forward

        leaf, up = leaf.contiguous(), up.contiguous()
        ks, vs, z = tree_forward(k, v, leaf, up, h)
        _check(q, k, v, ks, vs, h, 0, False)
        out, lse = core_forward(q, k, v, ks, vs, h, weighted, scale, 0, 0)
        ctx.save_for_backward(q, k, v, leaf, up, z, ks, vs, out, lse)
        ctx.h, ctx.weighted, ctx.scale = h, weighted, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from .function import core_backward_keys, core_backward_rows

        q, k, v, leaf, up, z, ks, vs, out, lse = ctx.saved_tensors
        h, scale = ctx.h, ctx.scale
        B, H, N, d = q.shape
        Hkv, T = k.shape[1], ks.shape[2]
        dout = dout.to(q.dtype).contiguous()
        map_grads = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dq, delta, dks, dvs = core_backward_rows(q, k, v, ks, vs, out, lse, dout, None, h, ctx.weighted, scale,
                                                 0, 0, want_s=True)
        tree = dl = du = None
        if dks is not None:  # no coarse slot reads a summary otherwise: they get no gradient
            dks, dvs = (x.view(B, Hkv, H // Hkv, T, d).sum(2) for x in (dks, dvs))  # fp32, per kv head
            _, _, g, _, du = tree_backward(k, v, leaf, up, z, h, dks, dvs, map_grads, tokens=False)
            tree = leaf_epilogue(g, leaf, h, k.shape[2], B, map_grads)
        dk, dv = core_backward_keys(q, k, v, dout, lse, delta, h, scale, 0, 0, tree)
        if map_grads and tree is not None:
            dl = leaf_grad(tree, leaf, B)
        elif map_grads:
            dl, du = torch.zeros_like(leaf), torch.zeros_like(up)
        return dq, dk, dv, dl, du, None, None, None


def tree_summaries(k: torch.Tensor, v: torch.Tensor, leaf: torch.Tensor, up: torch.Tensor, h: Hierarchy):
    """Summaries of every level of ``h`` from k, v (B, H, n, d) in the kernels: (ks, vs)."""
    if k.dtype != v.dtype or k.shape != v.shape:
        raise ValueError(f"tree summaries: k and v must match, got {k.dtype} {tuple(k.shape)} and "
                         f"{v.dtype} {tuple(v.shape)}")
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    return TreeSummaries.apply(k, v, leaf, up, h)
