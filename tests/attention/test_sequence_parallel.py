"""Sequence-parallel fma on real gloo ranks against the single-process result in float64.

Every rank builds the same full tensors from one seed, runs its chunk through
``fma(..., group=...)`` and compares its chunk of the output and of dq, dk, dv
with the single-process result; summary-parameter gradients are summed over the
group first (each rank holds the part its tokens contribute). Tolerance 1e-12 as
in tests/attention: exact algorithms differ by summation order only (summary
parameter gradients, sums over all n tokens, relative to their largest entry).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fmtrain.attention import fma
from fmtrain.attention.summaries import build_summaries

TOL64 = 1e-12


def _store() -> str:
    """A rendezvous for one spawned group: a file in a fresh folder, no TCP port. A port picked
    free here can be taken by the other test worker before rank 0 binds it, and ranks that meet
    in another group's store die in gloo's connectFullMesh ("Connection closed by peer")."""
    return "file://" + os.path.join(tempfile.mkdtemp(prefix="fmtrain-sp-"), "store")


def _one_case(case, group, seed):
    n, m, p, H, Hkv, causal, variant, kind, weighted, *extra = case
    extra = extra[0] if extra else {}  # refine: K; level_offset, window_rope: True
    P, r = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(seed)
    d = 8
    q = torch.randn(1, H, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, Hkv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, Hkv, n, d, generator=g, dtype=torch.float64)
    gout = torch.randn(1, H, n, d, generator=g, dtype=torch.float64)
    summ = build_summaries(kind, n_kv_heads=Hkv, head_dim=d, block_size=m, rank=p, max_seq_len=n).double()
    with torch.no_grad():  # random learned maps, far from averaging
        for prm in summ.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=prm.dtype) * 0.3)
    params = list(summ.parameters())
    if extra.get("window_rope"):  # model.summary_rope="window": whole-sequence summaries only
        from fmtrain.attention.summaries import WindowRotated
        summ = WindowRotated(summ, d, 10000.0, None)
    kw = dict(block_size=m, rank=p, causal=causal, variant=variant, weighted=weighted, summaries=summ,
              impl="torch", refine=extra.get("refine", 0), max_level=extra.get("max_level"),
              flat_top=extra.get("flat_top", False))
    if extra.get("select_reach"):
        from fmtrain.attention.refine import SelectionReach
        from fmtrain.attention.rope import inverse_frequencies
        kw["select_reach"] = SelectionReach(extra["select_reach"], inverse_frequencies(d, 100.0),
                                            extra.get("attend_reach", False))
    if extra.get("level_offset"):
        kw["level_offset"] = (torch.randn(H, 12, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
        params.append(kw["level_offset"])
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = fma(*full, **kw)
    ref_g = [torch.zeros_like(t) if g_ is None else g_ for t, g_ in
             zip(full + params, torch.autograd.grad(ref, full + params, gout, allow_unused=True))]
    C = n // P
    sl = slice(r * C, (r + 1) * C)
    mine = [t[:, :, sl].clone().requires_grad_() for t in (q, k, v)]
    out = fma(*mine, group=group, **kw)
    got = list(torch.autograd.grad(out, mine + params, gout[:, :, sl].contiguous(), allow_unused=True))
    bad = chunk_errors(out, got, ref, ref_g, sl, group, TOL64)
    assert not bad, f"case {case} rank {r}/{P}: {bad}"


def chunk_errors(out, got, ref, ref_g, sl, group, tol: float) -> dict:
    """This rank's slice ``sl`` of the output and of dq, dk, dv (``got[:3]``) against one process's
    (``ref``, ``ref_g[:3]``), and the parameters' gradients (``got[3:]``, None: unused here) summed
    over the group: the errors not below ``tol``, by name."""
    errs = {"out": (out - ref[:, :, sl]).abs().max().item()}
    for name, a, b in zip("qkv", got[:3], ref_g[:3]):
        errs["d" + name] = (a - b[:, :, sl]).abs().max().item()
    for i, (a, b) in enumerate(zip(got[3:], ref_g[3:])):
        a = torch.zeros_like(b) if a is None else a.clone()
        dist.all_reduce(a, group=group)
        # a sum over all n tokens: rounding grows with its size, so relative to its largest entry
        errs[f"dparam{i}"] = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    return {k_: e for k_, e in errs.items() if not e < tol}


def _worker(rank, world, store, cases, sub):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        if sub:  # contiguous groups of `sub` ranks (how the trainer lays out SP x DP)
            groups = [dist.new_group(list(range(i, i + sub))) for i in range(0, world, sub)]
            group = groups[rank // sub]
        for i, case in enumerate(cases):
            _one_case(case, group, seed=1000 + i)
    finally:
        dist.destroy_process_group()


def run_ranks(world, cases, sub=0):
    mp.spawn(_worker, args=(world, _store(), cases, sub), nprocs=world, join=True)


# n, m, p, H, Hkv, causal, variant, summary, weighted
def _grid(ns, P):
    cases = []
    for n, m, p in ns:
        for causal in (True, False):
            for variant in ("nlogn", "linear"):
                for kind in ("m2m", "conv", "mean"):
                    cases.append((n, m, p, 4, 2, causal, variant, kind, True))
    return cases


def test_sp2_all_masks_variants_kinds():
    # n/2 = m * 2**K for K = 0 (one block per rank), 1, 3, 4 (levels halo'd, none gathered)
    run_ranks(2, _grid([(16, 8, 2), (32, 8, 2), (128, 8, 4), (256, 16, 2)], 2)
              + [(256, 8, 2, 2, 2, True, "nlogn", "m2m", False), (256, 8, 2, 2, 2, False, "linear", "m2m", False)])


def _refined_grid(ns, K):
    return [(n, m, p, 4, 2, causal, "nlogn", kind, weighted, {"refine": K})
            for n, m, p in ns for causal in (True, False) for kind in ("m2m", "conv", "mean")
            for weighted in (True, False) if weighted or kind == "m2m"]


def test_sp_refined_equals_one_device():
    """refine > 0 (all-gathered keys): every rank's chunk of outputs and gradients, summary
    parameters and level offsets included, equals the single process's; blocks opened on
    other ranks, one block per rank, windows across ranks."""
    run_ranks(2, _refined_grid([(16, 4, 2), (128, 8, 2)], 2)
              + [(128, 8, 2, 4, 2, True, "nlogn", "m2m", False, {"refine": 3, "level_offset": True}),
                 (128, 8, 2, 4, 2, True, "nlogn", "m2m", True, {"refine": 2, "window_rope": True}),
                 (256, 8, 2, 4, 2, True, "nlogn", "m2m", True, {"refine": 2, "max_level": 2, "flat_top": True,
                                                                 "select_reach": 40}),
                 (256, 8, 2, 4, 2, True, "nlogn", "m2m", True, {"refine": 2, "select_reach": 40,
                                                                 "attend_reach": True})])
    run_ranks(4, _refined_grid([(128, 8, 2)], 3)
              + [(96, 8, 2, 4, 1, False, "nlogn", "m2m", True, {"refine": 2, "level_offset": True})])


def test_sp4_all_masks_variants_kinds():
    # P = 4: levels above K+1 are formed from the all-gathered chunk summaries
    run_ranks(4, _grid([(32, 8, 2), (128, 8, 2), (512, 16, 4)], 4))


def test_sp2_subgroups_of_a_4_rank_world():
    run_ranks(4, [(256, 8, 2, 2, 1, True, "nlogn", "m2m", True), (128, 8, 2, 2, 2, False, "linear", "conv", True)],
              sub=2)


@pytest.mark.slow
def test_sp3_partial_top_windows():
    # P = 3: the coarsest windows hold 2 or 1 ranks (partial windows, counts < nominal)
    run_ranks(3, _grid([(48, 8, 2), (192, 8, 2)], 3))


@pytest.mark.slow
def test_sp_64k():
    run_ranks(4, [(65536, 64, 2, 2, 1, True, "nlogn", "m2m", True),
                  (65536, 64, 2, 2, 1, False, "linear", "m2m", True)])
    run_ranks(2, [(65536, 64, 2, 2, 1, True, "linear", "m2m", True),
                  (65536, 64, 2, 2, 1, False, "nlogn", "m2m", True)])


def _refuse(rank, world, store):
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        x = torch.randn(1, 1, 24, 8)
        with pytest.raises(ValueError, match="power of two"):
            fma(x, x, x, block_size=8, rank=2, group=dist.group.WORLD)  # 3 blocks per rank
        x = torch.randn(1, 1, 20, 8)
        with pytest.raises(ValueError, match="power of two"):
            fma(x, x, x, block_size=8, rank=2, group=dist.group.WORLD)  # not whole blocks
    finally:
        dist.destroy_process_group()


def test_refuses_chunks_that_do_not_align():
    mp.spawn(_refuse, args=(2, _store()), nprocs=2, join=True)


def _refined_traffic(rank, world, store):
    from fmtrain.attention.sequence_parallel import TRAFFIC, reset_traffic

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        C, Hkv, d = 64, 2, 8
        x = torch.randn(1, 4, C, d, dtype=torch.float64, requires_grad=True)
        kv = torch.randn(1, Hkv, C, d, dtype=torch.float64, requires_grad=True)
        with pytest.raises(ValueError, match="whole fine blocks of block_size=16"):
            fma(x[:, :, :40], kv[:, :, :40], kv[:, :, :40], block_size=16, group=dist.group.WORLD, refine=1)
        reset_traffic()
        out = fma(x, kv, kv * 2, block_size=8, rank=2, group=dist.group.WORLD, refine=2)
        out.sum().backward()
        # Keys and values all-gathered, their gradients reduce-scattered: (P-1) chunks each way.
        chunk = 2 * (world - 1) * C * Hkv * d * 8  # k and v, float64
        assert TRAFFIC == {"fwd_sent": chunk, "fwd_recv": chunk, "bwd_sent": chunk, "bwd_recv": chunk}, TRAFFIC
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_sp_refined_moves_the_keys_once_each_way(world):
    """What the refined path costs, counted by the collectives: ring attention's volume or less."""
    mp.spawn(_refined_traffic, args=(world, _store()), nprocs=world, join=True)


def test_group_of_one_is_the_local_path():
    x = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    if not dist.is_initialized():  # an in-process store: no port, no rendezvous variables left behind
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            assert torch.equal(fma(x, x, x, block_size=8, group=dist.group.WORLD), fma(x, x, x, block_size=8))
        finally:
            dist.destroy_process_group()
