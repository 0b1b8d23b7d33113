"""``TritonBlockAttention``: the Triton kernels behind ``torch_core.BlockAttention``'s contract.

Same arguments, same outputs, same gradients (dlse included), so any caller of
the PyTorch core (whole sequences, the linear variant's lse merge, sequence
parallelism's ranges of blocks) can swap it in. fp16/bf16/fp32 only: Triton's
fp64 ``tl.dot`` is not portable, so float64 stays on the PyTorch core.
"""
from __future__ import annotations

import os

import torch
import triton

from ..hierarchy import SEEN_BY_COLS, Hierarchy, block_tables, cached_on_device, seen_by, summary_bias
from . import triton_interpreting
from .triton_core import (LOG2E, _dkv_kernel, _dq_kernel, _dsum_kernel, _fwd_kernel, _fwd_run_kernel,
                          _opened_bwd_kernel, _opened_fwd_kernel)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _device_tables(h: Hierarchy, weighted: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables as the kernels read them: int32 index, fp32 bias."""
    t = block_tables(h, weighted, device, torch.int32, torch.float32)
    index, bias = t.index, t.bias
    if index.numel() == 0:  # no coarse level: the kernels never read them, but need a pointer
        index = torch.zeros(1, dtype=torch.int32, device=device)
        bias = torch.zeros(1, device=device)
    return index, bias


def _key_bounds(h, device) -> tuple[torch.Tensor, bool]:
    """Per block the keys its queries may see, for packed documents (:mod:`..documents`), and
    whether there are any: a sequence's are ``[0, n)``, passed as ``n`` (a pointer never read)."""
    if isinstance(h, Hierarchy):
        return cached_on_device(("no key bounds", device), lambda: torch.zeros(1, dtype=torch.int32, device=device)), False
    return h.key_bounds(device), True


def _blocks(m: int, d: int, S: int) -> dict:
    """Tile sizes: powers of two >= 16 (``tl.dot``'s minimum); padding rows/columns are masked."""
    bm = max(16, triton.next_power_of_2(m))
    bd = max(16, triton.next_power_of_2(d))
    bc = min(64, max(16, triton.next_power_of_2(max(S, 1))))
    return dict(BLOCK_M=bm, BLOCK_D=bd, BLOCK_C=bc)


# How the core's kernels are launched. "occupancy" (the default) fits two programs on an H100 SM
# at head_dim 128 (#26's resource gate, bench/kernel_resources.py): 4 warps, one stage, and the
# dk/dv kernel on 32-key tiles so that its two fp32 accumulators fit in registers. "flash2" is
# FlashAttention-2's defaults (8 warps and two stages at head_dim 128), the kernels' launch until
# 2026-12-07: one program per SM. "run4" is "occupancy" with the forward's long loop: a program
# walks 4 consecutive query blocks and loads each fine key tile once (_fwd_run_kernel). None has
# been timed on a GPU yet; bench/gpu_check.py times them side by side. Below head_dim 128
# "occupancy" and "flash2" launch alike (every kernel already fits two).
LAUNCH_CONFIGS = ("occupancy", "flash2", "run4")
LAUNCH_ENV = "FMTRAIN_TRITON_LAUNCH"


def _env_choice(env: str, choices: tuple[str, ...], what: str) -> str:
    """``$env`` if set (one of ``choices``, else a ValueError naming them), else the first choice."""
    name = os.environ.get(env, "") or choices[0]
    if name not in choices:
        raise ValueError(f"{env}={name!r} is not {what}; use one of {choices}")
    return name


def launch_config() -> str:
    """The launch configuration in use: ``$FMTRAIN_TRITON_LAUNCH``, else "occupancy"."""
    return _env_choice(LAUNCH_ENV, LAUNCH_CONFIGS, "a launch configuration")


# Where the summaries' gradient meets the tokens': "fused" (the default), in the dk/dv kernel's
# epilogue (summaries.SummarizedAttention, whole sequences with mean or m2m summaries); "separate",
# the summary kernels' own token gradients, added to the core's by autograd (one more (B, Hkv, n, d)
# tensor written, read and summed per k and v): kept so that a GPU can time both.
SUMMARY_GRADS = ("fused", "separate")
SUMMARY_GRADS_ENV = "FMTRAIN_SUMMARY_GRADS"


def summary_grads() -> str:
    """``$FMTRAIN_SUMMARY_GRADS``, else "fused"."""
    return _env_choice(SUMMARY_GRADS_ENV, SUMMARY_GRADS, "a summary-gradient path")


def _launches(bm: int, bd: int, docs: bool = False, config: str | None = None) -> dict:
    """Launch options of each core kernel ('fwd', 'dq', 'dkv', 'dsum': num_warps, num_stages), the
    dk/dv kernel's key rows per program ('dkv_keys'), whether it takes the summaries' share in its
    epilogue ('dkv_tree', :class:`.summaries.SummarizedAttention`) and the query blocks per forward
    program ('fwd_run'; 1: ``_fwd_kernel``), for tiles of ``bm`` rows x ``bd`` columns."""
    config = config or launch_config()
    wide = bm * bd > 64 * 64
    run = 4 if config == "run4" else 1
    if wide and config in ("occupancy", "run4"):
        one = dict(num_warps=4, num_stages=1)
        return dict(fwd=one, dq=one, dkv=one, dsum=dict(num_warps=8, num_stages=2), dkv_keys=min(bm, 32),
                    dkv_tree=True, fwd_run=run)
    base = dict(num_warps=8 if wide else 4, num_stages=2)
    # Packed documents' key ranges cost flash2's dq kernel the last registers at d=128 (bidirectional,
    # bf16: 24 bytes spilled with two stages, none with one).
    dq = dict(base, num_stages=1) if docs else base
    # flash2's dk/dv on whole 64-key blocks at d=128 has no registers left for the epilogue (sm_90,
    # bf16: 276-368 bytes spilled): there the summaries' token gradients stay separate, as they were.
    return dict(fwd=base, dq=dq, dkv=base, dsum=base, dkv_keys=bm, dkv_tree=not wide, fwd_run=run)


def fuses_summary_grads(m: int, d: int) -> bool:
    """Whether a whole sequence's summaries and core run as one node (:class:`.summaries.SummarizedAttention`)
    for blocks of ``m`` and head_dim ``d``: ``FMTRAIN_SUMMARY_GRADS`` is "fused" and the launch's dk/dv
    kernel takes the epilogue."""
    blk = _blocks(m, d, 1)
    return summary_grads() == "fused" and _launches(blk["BLOCK_M"], blk["BLOCK_D"])["dkv_tree"]


def _precision(dtype) -> str:
    # fp32: IEEE products (TF32 would lose 13 bits and the PyTorch core's agreement); ignored for halves.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype) -> bool:
    # Triton 3.9's CPU interpreter computes bf16 tl.dot wrongly: multiply in fp32 there (see _mm).
    return dtype == torch.bfloat16 and triton_interpreting()


def _check(q, k, v, ks, vs, h: Hierarchy, a0: int, extended: bool):
    B, H, N, d = q.shape
    m, F = h.block_size, len(h.fine_blocks())
    if q.dtype not in DTYPES:
        raise TypeError(f"triton core: dtype {q.dtype} is not supported (fp16, bf16, fp32); "
                        "float64 runs on the PyTorch core (impl='torch')")
    if q.device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("triton core: tensors are on the CPU; Triton kernels need a CUDA device, "
                           "or TRITON_INTERPRET=1 set before triton is first imported (tests)")
    if N % m:
        raise ValueError(f"triton core: queries must be whole blocks of {m}, got {N} rows")
    nq = N // m
    if not (0 <= a0 and a0 + nq <= h.n_blocks):
        raise ValueError(f"triton core: query blocks [{a0}, {a0 + nq}) outside the hierarchy's "
                         f"{h.n_blocks} blocks")
    Hkv = k.shape[1]
    rows = (nq + F - 1) * m if extended else max(k.shape[2], h.n)
    if k.shape != (B, Hkv, rows, d) or v.shape != k.shape or H % Hkv:
        what = f"extended keys/values must be (B, Hkv, {rows}, {d})" if extended else \
            f"a sequence's keys/values must be (B, Hkv, >= {h.n}, {d})"
        raise ValueError(f"triton core: {what} with H % Hkv == 0, got k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"q {tuple(q.shape)}")
    if ks.shape != vs.shape or ks.shape[:2] != (B, Hkv) or ks.shape[3] != d or ks.shape[2] < h.num_summaries:
        raise ValueError(f"triton core: summaries must be (B, Hkv, >= {h.num_summaries}, {d}), "
                         f"got ks {tuple(ks.shape)}, vs {tuple(vs.shape)}")


def core_forward(q, k, v, ks, vs, h: Hierarchy, weighted: bool, scale: float, a0: int, k_start: int):
    """The forward kernel: (out, lse), out like q, lse (B, H, N) fp32. All inputs contiguous, in q's
    dtype; ``k_start`` the position of the keys' row 0 (see :mod:`.triton_core`)."""
    B, H, N, d = q.shape
    Hkv, T = k.shape[1], ks.shape[2]
    m, F, S = h.block_size, len(h.fine_blocks()), h.coarse_slots
    nq = N // m
    index, bias = _device_tables(h, weighted, q.device)
    if T == 0:  # no summaries at all: give the kernel a valid (never read) pointer
        ks = vs = q.new_zeros(B, Hkv, 1, d)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    blk = _blocks(m, d, S)
    bounds, docs = _key_bounds(h, q.device)
    launch = _launches(blk["BLOCK_M"], blk["BLOCK_D"], docs)
    run = launch["fwd_run"]
    kernel, grid, extra = (_fwd_kernel, (nq, B * H), {}) if run == 1 else \
        (_fwd_run_kernel, (triton.cdiv(nq, run), B * H), dict(RUN=run))
    kernel[grid](
        q, k, v, ks, vs, index, bias, bounds, out, lse,
        h.n, nq, a0, H, H // Hkv, T, S, k_start, k.shape[2], scale * LOG2E,
        m=m, d=d, F=F, CAUSAL=h.causal, DOCS=docs, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), **blk,
        **extra, **launch["fwd"])
    return out, lse


def core_backward_rows(q, k, v, ks, vs, out, lse, dout, dlse, h: Hierarchy, weighted: bool, scale: float, a0: int,
                       k_start: int, want_s: bool):
    """The backward's query-side kernels: dq (and delta, which the dq kernel's prologue forms
    for the next kernels), and where ``want_s`` the summaries' gradients per *query* head,
    (B, H, T, d) fp32 each (None else). Returns (dq, delta, dks, dvs)."""
    B, H, N, d = q.shape
    Hkv, nk, T = k.shape[1], k.shape[2], ks.shape[2]
    G = H // Hkv
    m, F, S = h.block_size, len(h.fine_blocks()), h.coarse_slots
    nq = N // m
    # delta_i = dO_i . O_i - dlse_i, the softmax-backward row term (lse's gradient folds in here):
    # formed by the dq kernel's prologue, read by the dk/dv and summary kernels.
    delta = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse = dlse.contiguous() if has_dlse else delta  # without dlse a pointer the kernel never reads
    index, bias = _device_tables(h, weighted, q.device)
    blk = _blocks(m, d, S)
    prec = _precision(q.dtype)
    dq = torch.empty_like(q)
    bounds, docs = _key_bounds(h, q.device)
    launch = _launches(blk["BLOCK_M"], blk["BLOCK_D"], docs)
    _dq_kernel[(nq, B * H)](
        q, k, v, ks, vs, index, bias, bounds, out, dout, dlse, lse, delta, dq,
        h.n, nq, a0, H, G, T, S, k_start, nk, scale,
        m=m, d=d, F=F, CAUSAL=h.causal, DOCS=docs, PRECISION=prec, UPCAST=_upcast(q.dtype), HAS_DLSE=has_dlse,
        **blk, **launch["dq"])
    dks = dvs = None
    if want_s and S > 0:
        seen = seen_by(h, q.device)
        dks = torch.zeros(B, H, T, d, dtype=torch.float32, device=q.device)  # per query head
        dvs = torch.zeros_like(dks)
        _dsum_kernel[(seen.shape[0], B * H)](
            q, ks, vs, dout, lse, delta, seen, summary_bias(h, weighted, q.device), dks, dvs,
            nq, a0, H, G, T, scale,
            m=m, d=d, p=h.rank, COLS=SEEN_BY_COLS, BLOCK_M=blk["BLOCK_M"], BLOCK_D=blk["BLOCK_D"],
            BLOCK_P=max(16, triton.next_power_of_2(h.rank)), PRECISION=prec, UPCAST=_upcast(q.dtype),
            **launch["dsum"])
    return dq, delta, dks, dvs


def core_backward_keys(q, k, v, dout, lse, delta, h: Hierarchy, scale: float, a0: int, k_start: int,
                       tree: dict | None = None):
    """The dk/dv kernel: (dk, dv) like k, v. ``tree`` (:func:`.summaries.leaf_epilogue`'s arguments):
    the summaries' share of the tokens' gradients added in the kernel's epilogue, their level-1
    gradients times the leaf map, and the leaf map's gradient partials written (whole sequences)."""
    B, H, N, d = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    m, F, S = h.block_size, len(h.fine_blocks()), h.coarse_slots
    nq = N // m
    blk = _blocks(m, d, S)
    bounds, docs = _key_bounds(h, q.device)
    launch = _launches(blk["BLOCK_M"], blk["BLOCK_D"], docs)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    keys = launch["dkv_keys"]  # key rows per program: a block in triton.cdiv(m, keys) programs
    if tree is None:  # pointers the kernel never reads
        tree = dict(TG=delta, LEAF=delta, s_w=0, s_h=0, DLEAF=delta, T=0, TREE=False, MAP_GRADS=False, P=1, LEAF_P=16)
    _dkv_kernel[(triton.cdiv(nk, m) * triton.cdiv(m, keys), B * Hkv)](
        q, k, v, dout, lse, delta, bounds, dk, dv, tree["TG"], tree["LEAF"], tree["DLEAF"],
        h.n, nq, a0, H, H // Hkv, k_start // m, nk, tree["s_w"], tree["s_h"], tree["T"], scale,
        m=m, d=d, F=F, CAUSAL=h.causal, DOCS=docs, PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype),
        BLOCK_M=blk["BLOCK_M"], BLOCK_N=keys, BLOCK_D=blk["BLOCK_D"], TREE=tree["TREE"], MAP_GRADS=tree["MAP_GRADS"],
        P=tree["P"], LEAF_P=tree["LEAF_P"], **launch["dkv"])
    return dk, dv


class TritonBlockAttention(torch.autograd.Function):
    """(q, k_ext, v_ext, ks, vs) -> (out, lse): see ``torch_core.BlockAttention`` for the contract.

    ``extended=False`` (a whole sequence's own keys, row ``t`` holding position ``t``): the
    kernels read them in place, masking the rows before the first and past the last, so no
    padded copy is made and the gradients come back in their shape.
    """

    @staticmethod
    def forward(ctx, q, k, v, ks, vs, h: Hierarchy, weighted: bool, scale: float, a0: int = 0,
                extended: bool = True):
        _check(q, k, v, ks, vs, h, a0, extended)
        dt = q.dtype
        ctx.dtypes = tuple(t.dtype for t in (k, v, ks, vs))  # gradients go back in these
        q = q.contiguous()
        k, v, ks, vs = (t.to(dt).contiguous() for t in (k, v, ks, vs))
        k_start = (a0 - 1) * h.block_size if extended else 0  # the position of the keys' row 0
        out, lse = core_forward(q, k, v, ks, vs, h, weighted, scale, a0, k_start)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, ks, vs, out, lse)
        ctx.h, ctx.weighted, ctx.scale, ctx.a0, ctx.k_start = h, weighted, scale, a0, k_start
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, ks, vs, out, lse = ctx.saved_tensors
        h, scale, a0, k_start = ctx.h, ctx.scale, ctx.a0, ctx.k_start
        B, H, N, d = q.shape
        Hkv, T = k.shape[1], ks.shape[2]
        dout = torch.zeros_like(q) if dout is None else dout.to(q.dtype).contiguous()
        want_s = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dq, delta, dks, dvs = core_backward_rows(q, k, v, ks, vs, out, lse, dout, dlse, h, ctx.weighted, scale, a0,
                                                 k_start, want_s)
        dk, dv = core_backward_keys(q, k, v, dout, lse, delta, h, scale, a0, k_start)
        if dks is not None:  # each kv head's summaries: the sum over its G query heads' shares
            dks, dvs = (x.view(B, Hkv, H // Hkv, T, d).sum(2).to(dt)
                        for x, dt in ((dks, ctx.dtypes[2]), (dvs, ctx.dtypes[3])))
        elif want_s:  # no coarse slot: zero gradients
            dks, dvs = (torch.zeros(B, Hkv, T, d, dtype=dt, device=q.device) for dt in ctx.dtypes[2:])
        return dq, dk.to(ctx.dtypes[0]), dv.to(ctx.dtypes[1]), dks, dvs, None, None, None, None, None


def _opened_tiles(m: int, d: int, T: int, G: int, inputs) -> tuple[dict, dict]:
    """Tiles and launch options of the opened-block kernels; ``inputs`` the dtype of the attention's
    inputs (products in it, as the core's kernels do, when half)."""
    half = {torch.float16: 1, torch.bfloat16: 2}.get(inputs, 0)
    rows, bd = max(16, triton.next_power_of_2(T * G)), max(16, triton.next_power_of_2(d))
    tiles = dict(m=m, d=d, BLOCK_R=rows, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_D=bd,
                 PRECISION=_precision(inputs), UPCAST=_upcast(inputs), HALF=half)
    # Half inputs come as half tensors (refine.FarField): four warps then hold a 64 x 128 tile's
    # backward in registers with two programs per SM; fp32 keeps eight for wide tiles.
    return tiles, dict(num_warps=4 if half or rows * bd <= 64 * 64 else 8, num_stages=1)


def _as_inputs(x: torch.Tensor, inputs) -> torch.Tensor:
    """Queries (or their output gradients) in the inputs' half dtype, where the attention's inputs
    are half: the kernels multiply in it anyway, and then load half the bytes (a chunk's copy)."""
    return x.to(inputs) if inputs in (torch.float16, torch.bfloat16) and x.dtype != inputs else x


def _ends(n, blk):
    """The key limit as the opened kernels take it: (n, ENDS, DOCS). ``n`` the sequence's length, or
    each block's document's end, (n_blocks,) (packed documents: read per block)."""
    if isinstance(n, int):
        return n, blk, False  # ENDS is never read
    return 0, n.to(torch.int64).contiguous(), True


def opened_forward(qg, kb, vb, rowq, blk, n, T: int, scale: float, inputs=torch.float32):
    """Each tile row's softmax over its tile's block (``refine.OpenedTiles.attend``'s contract):
    qg (B, Hkv, nq, G, d); kb, vb (B, Hkv, n_blocks, m*d), in the inputs' dtype or in fp32; rowq
    (tiles*T,) int32 query index or -1; blk (tiles,) int32 global block row; ``n`` the tokens that
    exist (or each block's end, see :func:`_ends`); ``inputs`` the attention inputs' dtype. Returns
    out (tiles, T*G, d), lse (tiles, T*G), fp32 (qg's dtype)."""
    B, Hkv, nq, G, d = qg.shape
    n_blocks, m = kb.shape[2], kb.shape[3] // d
    n_tiles = blk.numel()
    out = torch.empty(n_tiles, T * G, d, dtype=qg.dtype, device=qg.device)
    lse = torch.empty(n_tiles, T * G, dtype=qg.dtype, device=qg.device)
    if n_tiles:
        tiles, launch = _opened_tiles(m, d, T, G, inputs)
        n, ends, docs = _ends(n, blk)
        _opened_fwd_kernel[(n_tiles,)](_as_inputs(qg, inputs), kb, vb, rowq, blk, ends, out, lse, n, n_blocks, T, G,
                                       scale * LOG2E, DOCS=docs, **tiles, **launch)
    return out, lse


def opened_backward(qg, do, lse, delta, kb, vb, rowq, blk, n, T: int, scale: float, inputs=torch.float32):
    """``refine.OpenedTiles.grads``' contract: lse, delta (B, Hkv, nq, G, 1) per query; returns dq per
    tile row (tiles, T*G, d) and dk, dv per tile (tiles, m, d)."""
    B, Hkv, nq, G, d = qg.shape
    n_blocks, m = kb.shape[2], kb.shape[3] // d
    n_tiles = blk.numel()
    dq = torch.empty(n_tiles, T * G, d, dtype=qg.dtype, device=qg.device)
    dk = torch.empty(n_tiles, m, d, dtype=qg.dtype, device=qg.device)
    dv = torch.empty_like(dk)
    if n_tiles:
        tiles, launch = _opened_tiles(m, d, T, G, inputs)
        n, ends, docs = _ends(n, blk)
        _opened_bwd_kernel[(n_tiles,)](_as_inputs(qg, inputs), _as_inputs(do, inputs).contiguous(), lse.contiguous(),
                                       delta.contiguous(), kb, vb, rowq,
                                       blk, ends, dq, dk, dv, n, n_blocks, T, G, scale, DOCS=docs, **tiles, **launch)
    return dq, dk, dv
