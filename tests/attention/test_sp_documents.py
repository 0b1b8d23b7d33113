"""Sequence parallelism with document masking on real gloo ranks, against one process in float64.

Every rank builds the same packed rows from one seed, runs its slice through
``fma(..., group=..., cu_seqlens=<global>)`` and compares its slice of the output and
of dq, dk, dv (and the summed m2m parameter gradients) with ``fma`` on one process
with the same documents, which tests/attention/test_documents.py holds equal to each
document run alone. Tolerance 1e-12 as in test_sequence_parallel.py: the algorithms
are exact and differ in summation order only.
"""
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fmtrain.attention import fma
from fmtrain.attention.sp_documents import global_cu_seqlens, rank_plans, row_documents
from fmtrain.attention.documents import as_documents
from fmtrain.attention.sequence_parallel import TRAFFIC, reset_traffic
from fmtrain.attention.summaries import build_summaries

from .test_sequence_parallel import _store, chunk_errors

TOL64 = 1e-12


def _lengths(n: int, spec, seed: int) -> list[int]:
    """One row's document lengths: ``spec`` a list of lengths (the last one filled up) or
    ``("random", lo, hi)``."""
    if spec[0] == "random":
        rng, out = random.Random(seed), []
        while sum(out) < n:
            out.append(min(rng.randint(spec[1], spec[2]), n - sum(out)))
        return out
    return list(spec) + ([n - sum(spec)] if sum(spec) < n else [])


def _one_case(case, group, seed):
    n, m, p, H, Hkv, causal, kind, rows, *extra = case
    extra = extra[0] if extra else {}
    impl = extra.get("impl", "torch")  # "triton": the kernels (interpreted) in fp32 on the ranks
    P, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(seed)
    B, d = len(rows), 8
    lengths = [L for b, spec in enumerate(rows) for L in _lengths(n, spec, seed + b)]
    cu = torch.tensor([0] + lengths).cumsum(0)
    q = torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, n, d, generator=g, dtype=torch.float64)
    gout = torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
    summ = build_summaries(kind, n_kv_heads=Hkv, head_dim=d, block_size=m, rank=p, max_seq_len=n).double()
    with torch.no_grad():  # random learned maps, far from averaging
        for prm in summ.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=prm.dtype) * 0.3)
    params = list(summ.parameters())
    kw = dict(block_size=m, rank=p, causal=causal, summaries=summ, impl="torch", cu_seqlens=cu,
              max_level=extra.get("max_level"), refine=extra.get("refine", 0), flat_top=extra.get("flat_top", False))
    if extra.get("level_offset"):
        kw["level_offset"] = (torch.randn(H, 12, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
        params.append(kw["level_offset"])
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fma(*full, **kw)
    ref_g = [torch.zeros_like(t) if g_ is None else g_ for t, g_ in
             zip(full + params, torch.autograd.grad(ref, full + params, gout, allow_unused=True))]
    C = n // P
    sl = slice(r * C, (r + 1) * C)
    dt, tol = (torch.float32, 2e-5) if impl == "triton" else (torch.float64, TOL64)  # fp32: rounding of sums
    mine = [t[:, :, sl].to(dt).requires_grad_() for t in (q, k, v)]
    if impl == "triton":
        kw["summaries"], params = summ.float(), [prm for prm in summ.parameters()]
        ref_g = ref_g[:3] + [torch.zeros_like(prm) for prm in params]  # compared through dk, dv only
    out = fma(*mine, group=group, **{**kw, "impl": impl})
    got = list(torch.autograd.grad(out, mine + params, gout[:, :, sl].to(dt).contiguous(), allow_unused=True))
    if impl == "triton":
        got = got[:3]
    bad = chunk_errors(out, got, ref, ref_g, sl, group, tol)
    assert not bad, f"case {case} (lengths {lengths}) rank {r}/{P}: {bad}"


def _worker(rank, world, store, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        for i, case in enumerate(cases):
            _one_case(case, dist.group.WORLD, seed=2000 + i)
    finally:
        dist.destroy_process_group()


def run_ranks(world, cases):
    mp.spawn(_worker, args=(world, _store(), cases), nprocs=world, join=True)


def _grid(n, m, p, rows_list):
    return [(n, m, p, 4, 2, causal, kind, rows) for rows in rows_list for causal in (True, False)
            for kind in ("m2m", "mean")]


def test_sp2_documents_equal_one_process():
    """Documents across the rank boundary, on it exactly, shorter than a block, on block
    boundaries, longer than a rank's slice; two rows with different packings."""
    n = 128  # 2 ranks of 64 tokens = 8 blocks of 8
    run_ranks(2, _grid(n, 8, 2, [
        [[37, 50]],             # a document across the boundary, mid-block
        [[64]],                 # a boundary on the ranks' boundary
        [[3, 1, 5, 100]],       # documents shorter than a block; the last spans both ranks
        [[16, 32, 8]],          # on block boundaries
        [[20], [70, 2, 1]],     # two rows
    ]) + [(128, 8, 2, 4, 2, causal, "mean", [[37, 50]], {"max_level": level}) for causal in (True, False)
          for level in (0, 1)])  # attention="local" (fine level only), and levels cut off


def test_sp4_documents_equal_one_process():
    """Four ranks of 32 tokens: documents spanning three and four ranks, windows of every
    level across ranks, random packings."""
    run_ranks(4, _grid(128, 8, 2, [
        [[5, 110]],
        [("random", 1, 40)],
    ]) + _grid(256, 8, 2, [[("random", 10, 150)], [[9, 200]]]))


def test_sp_documents_refined_equal_one_process():
    """refine > 0: keys all-gathered, each rank's far field over its documents' own windows and
    blocks (documents across the ranks' boundary, shorter than a block, spanning four ranks),
    level offsets included."""
    cases = [(128, 8, 2, 4, 2, causal, kind, rows, {"refine": 2}) for rows in ([[37, 50]], [[3, 1, 5, 100]])
             for causal in (True, False) for kind in ("m2m", "mean")]
    run_ranks(2, cases + [(128, 8, 2, 4, 2, True, "m2m", [[20, 90]], {"refine": 3, "level_offset": True}),
                          (128, 8, 2, 4, 2, True, "m2m", [[20, 100]], {"refine": 2, "max_level": 1, "flat_top": True})])
    run_ranks(4, [(128, 8, 2, 4, 1, causal, "m2m", [[5, 110]], {"refine": 2}) for causal in (True, False)])


def test_sp2_documents_triton_kernels():
    """The Triton core (interpreted, fp32) on each rank's blocks of the packed layout."""
    run_ranks(2, [(n, 8, 2, 2, 1, causal, "m2m", rows, {"impl": "triton"}) for n, rows in ((64, [[13, 30]]), (128, [[5, 110]]))
                  for causal in (True, False)])


@pytest.mark.slow
def test_sp4_documents_longer_rows():
    run_ranks(4, _grid(2048, 16, 4, [[("random", 30, 900)], [[1500]]]) +
              [(2048, 16, 2, 2, 1, True, "m2m", [("random", 100, 3000)])])


def _traffic(rank, world, store, n, lengths, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        C, d, m, p = n // world, 8, 16, 2
        g = torch.Generator().manual_seed(0)
        x = [torch.randn(1, 1, C, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        cu = torch.tensor([0] + lengths).cumsum(0)
        reset_traffic()
        fma(*x, block_size=m, rank=p, causal=False, impl="torch", group=dist.group.WORLD, cu_seqlens=cu).sum().backward()
        got = [None] * world
        dist.all_gather_object(got, dict(TRAFFIC))
        if rank == 0:
            levels = rank_plans(row_documents(as_documents(cu, 1, n))[0], m, p, False, None, world)[0].n_levels
            torch.save({"levels": levels, "traffic": got}, out)
    finally:
        dist.destroy_process_group()


def test_traffic_does_not_grow_with_n(tmp_path):
    """A document over all four ranks, shifted off the blocks by a short one (every window of
    every level misaligned with the ranks), bidirectional: the bytes a rank sends and receives,
    forward and backward, grow with the levels only, from 4k to 64k tokens (16x)."""
    per_n = {}
    for n in (4096, 65536):
        mp.spawn(_traffic, args=(4, _store(), n, [7, n - 7], str(tmp_path / "t.pt")), nprocs=4, join=True)
        res = torch.load(tmp_path / "t.pt")
        per_n[n] = (res["levels"], max(sum(t.values()) for t in res["traffic"]))
    (l0, b0), (l1, b1) = per_n[4096], per_n[65536]
    assert l1 == l0 + 4
    # what grows is a few windows per added level: p * d numbers of k and v, each way
    per_level = 2 * 2 * 2 * 8 * (2 * 8) * 8  # sent+recv, fwd+bwd, k+v, 8 windows, p*d numbers, 8 bytes
    assert b1 <= b0 + (l1 - l0) * per_level, per_n
    assert b1 > b0  # the top levels do cross the ranks

def _global_cu(rank, world, store):
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        n = 24
        lengths = [[5, 10, 9], [24]]
        pos = torch.cat([torch.cat([torch.arange(L) for L in row]).unsqueeze(0) for row in lengths])
        C = n // world
        got = global_cu_seqlens(pos[:, rank * C:(rank + 1) * C], dist.group.WORLD)
        assert got.tolist() == [0, 5, 15, 24, 48], got
    finally:
        dist.destroy_process_group()


def test_global_cu_seqlens_from_slices():
    mp.spawn(_global_cu, args=(3, _store()), nprocs=3, join=True)


def test_row_documents_splits_rows():
    docs = as_documents([0, 5, 12, 20, 40], 2, 20)
    assert [r.lengths for r in row_documents(docs)] == [(5, 7, 8), (20,)]


def _refuse(rank, world, store):
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        x = torch.randn(1, 2, 32, 8)
        for kw, what in ((dict(variant="linear"), "variant='linear'"),
                         (dict(level_offset=torch.zeros(2, 4)), "level_offset without refine > 0"),
                         (dict(impl="dense"), "impl='dense'")):
            with pytest.raises(ValueError, match=what.replace("(", r"\(").replace(")", r"\)")):
                fma(x, x, x, block_size=8, rank=2, group=dist.group.WORLD, cu_seqlens=[0, 10, 64], **kw)
    finally:
        dist.destroy_process_group()


def test_refuses_what_has_no_path():
    mp.spawn(_refuse, args=(2, _store()), nprocs=2, join=True)
