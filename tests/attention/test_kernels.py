"""Triton kernels (``impl="triton"``) against the float64 dense reference.

Without a GPU these run in Triton's CPU interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); shapes are tiny because the interpreter is slow.

Tolerances (absolute, on O(1) outputs and gradients from unit-normal inputs):
- fp32 2e-5 (as test_fma's fp32 bound): the kernels multiply in IEEE fp32
  (``input_precision="ieee"``, never TF32) and accumulate in fp32 over a few
  hundred terms; up to ~1e-6 is seen.
- fp16 5e-3 / bf16 4e-2, relative to the largest reference value: inputs are
  rounded (2**-11 / 2**-8 relative) and, as in FlashAttention, probabilities and
  score gradients are rounded to the input dtype before the second matmul. Seen:
  fp16 <= 7e-4, bf16 <= 1e-2 (the PyTorch path, which keeps them in fp32: 7e-4,
  9e-3). A missing or doubled key changes results by ~1e-1.
- bf16 under the interpreter multiplies in fp32 (its bf16 ``tl.dot`` is broken,
  see ``triton_core._mm``): exact bf16 products either way, but the GPU's bf16
  MMA path itself is checked only by ``bench/gpu_check.sh``.
"""
import math
import warnings

import pytest
import torch

from fmtrain.attention import fma
from fmtrain.attention.cores import select_core
from fmtrain.attention.hierarchy import extend_keys, hierarchy
from fmtrain.attention.torch_core import BlockAttention
from fmtrain.attention.summaries import M2MSummaries

from .conftest import randn

kernels = pytest.importorskip("fmtrain.attention.kernels")
if not kernels.triton_available():
    pytest.skip("triton does not import here", allow_module_level=True)
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def qkv(g, B, H, Hkv, n, d):
    return randn(g, B, H, n, d), randn(g, B, Hkv, n, d), randn(g, B, Hkv, n, d)


class KernelSpy:
    """Counts forward and backward calls of the Triton core (alone, or with the summaries as one
    node: ``SummarizedAttention``), so a silent fallback fails the test."""

    def __init__(self, monkeypatch):
        from fmtrain.attention.kernels.function import TritonBlockAttention
        from fmtrain.attention.kernels.summaries import SummarizedAttention

        self.fwd = self.bwd = 0
        for T in (TritonBlockAttention, SummarizedAttention):
            self._wrap(monkeypatch, T)

    def _wrap(self, monkeypatch, T):
        fwd, bwd = T.forward, T.backward

        def forward(*a, **k):
            self.fwd += 1
            return fwd(*a, **k)

        def backward(*a, **k):
            self.bwd += 1
            return bwd(*a, **k)

        monkeypatch.setattr(T, "forward", staticmethod(forward))
        monkeypatch.setattr(T, "backward", staticmethod(backward))


@pytest.fixture
def spy(monkeypatch):
    return KernelSpy(monkeypatch)


def run(q, k, v, dtype, params=(), **kw):
    """Output and gradients (q, k, v, *params) of fma on ``dtype`` copies, in float64."""
    q, k, v = (t.to(DEV, dtype).requires_grad_() for t in (q, k, v))
    out = fma(q, k, v, **kw)
    assert out.dtype == dtype
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEV, dtype)
    grads = torch.autograd.grad(out, (q, k, v, *params), gout)
    return out.double().cpu(), [x.double().cpu() for x in grads]


def assert_close(got, want, tol, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err < tol, f"{what}: error {err:.2e} > {tol:.0e}"


def compare(spy, q, k, v, dtype, **kw):
    ref_o, ref_g = run(q, k, v, torch.float64, impl="dense", **kw)
    o, g = run(q, k, v, dtype, impl="triton", **kw)
    assert spy.fwd == 1 and spy.bwd == 1, "fma(impl='triton') did not run the kernels"
    tol = TOL[dtype]
    assert_close(o, ref_o, tol, "out")
    for i, (a, b) in enumerate(zip(g, ref_g)):
        assert_close(a, b, tol, f"grad {i}")


CASES = [  # n, m, p, H, Hkv, d
    (7, 16, 2, 2, 1, 8),        # one partial block, no coarse level
    (100, 16, 2, 2, 1, 8),      # GQA, partial last block
    (173, 16, 4, 2, 2, 16),     # p = 4, partial coarse windows
    (90, 12, 2, 1, 1, 4),       # m not a power of two, tiny head dim (tiles padded and masked)
]


@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m,p,H,Hkv,d", CASES)
def test_triton_matches_dense_fp32(rng, spy, n, m, p, H, Hkv, d, causal, variant):
    q, k, v = qkv(rng, 1, H, Hkv, n, d)
    compare(spy, q, k, v, torch.float32, block_size=m, rank=p, causal=causal, variant=variant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_half_precision_close_to_float64(rng, spy, dtype, causal):
    q, k, v = qkv(rng, 1, 2, 1, 150, 32)
    compare(spy, q, k, v, dtype, block_size=16, rank=2, causal=causal)


@pytest.mark.parametrize("grads,causal", [("fused", True), ("fused", False), ("separate", True)])
def test_learned_summaries_train_through_the_kernels(rng, spy, monkeypatch, grads, causal):
    """Gradients of the m2m summary maps flow through the kernels' summary gradients: "fused", the
    summaries' share of k's and v's gradients and the leaf map's gradient formed in the dk/dv
    kernel's epilogue (the default); "separate", by the summary kernels, added by autograd."""
    from fmtrain.attention.kernels.function import SUMMARY_GRADS_ENV

    monkeypatch.setenv(SUMMARY_GRADS_ENV, grads)
    n, m, p = 130, 16, 2
    summ = M2MSummaries(2, m, p).double()
    with torch.no_grad():  # random maps, far from averaging
        summ.leaf.normal_(generator=rng).mul_(0.3)
        summ.up.normal_(generator=rng).mul_(0.5)
    q, k, v = qkv(rng, 1, 4, 2, n, 8)
    params = (summ.leaf, summ.up)
    ref_o, ref_g = run(q, k, v, torch.float64, params, impl="dense", block_size=m, rank=p, causal=causal,
                       summaries=summ)
    summ.to(DEV, torch.float32)
    o, g = run(q, k, v, torch.float32, params, impl="triton", block_size=m, rank=p, causal=causal,
               summaries=summ)
    assert spy.fwd == 1 and spy.bwd == 1
    assert_close(o, ref_o, 2e-5, "out")
    for name, a, b in zip(("q", "k", "v", "leaf", "up"), g, ref_g):
        assert b.abs().max() > 0, name  # the comparison means something
        assert_close(a, b, 2e-5, name)


@pytest.mark.parametrize("n,m,p,H,d,dtype", [
    (16 * 37 + 5, 16, 2, 2, 16, torch.float32),   # ragged n; levels 1-4 in chunks of 8 blocks, 5 above
    (8 * 41, 8, 8, 1, 8, torch.float32),          # p = 8: the tree's products as padded tl.dot
    (16 * 21 + 3, 16, 2, 2, 32, torch.bfloat16),
])
@pytest.mark.parametrize("kind", ["m2m", "mean"])
def test_every_summary_level_in_the_kernels_matches_the_float64_recursion(rng, monkeypatch, kind, n, m, p, H, d, dtype):
    """:mod:`fmtrain.attention.kernels.summaries` against the PyTorch recursion in float64: the
    summaries, the tokens' gradients and m2m's maps' (random, far from averaging). The chunks are
    made narrow (8 windows above them) so that both the chunk kernel and the top kernel build
    levels. Tolerances as the core's (TOL): fp32 sees ~2e-7; bf16 rounds the maps and the token
    gradients' products to bf16 (as the PyTorch path does), ~1e-2."""
    from fmtrain.attention.hierarchy import hierarchy as make
    from fmtrain.attention.kernels import summaries as T
    from fmtrain.attention.summaries import build_summaries

    monkeypatch.setattr(T, "TOP_WINDOWS", 8)
    h = make(n, m, p, True)
    C = T._chunk_blocks(h.n_blocks)
    assert 1 < C.bit_length() < h.n_levels  # levels inside the chunks and above them
    s = build_summaries(kind, n_kv_heads=H, head_dim=d, block_size=m, rank=p)
    if kind == "m2m":
        with torch.no_grad():
            s.leaf.add_(0.1 * torch.randn(s.leaf.shape, generator=rng))
            s.up.add_(0.1 * torch.randn(s.up.shape, generator=rng))
    B = 2 if dtype == torch.bfloat16 else 1
    k, v = (randn(rng, B, H, n, d).to(dtype) for _ in range(2))
    wk, wv = randn(rng, B, H, h.num_summaries, d), randn(rng, B, H, h.num_summaries, d)
    got, ref = [], []
    for impl, dt in (("triton", dtype), ("torch", torch.float64)):
        maps = [x.detach().to(torch.float32 if impl == "triton" else dt).requires_grad_() for x in s.maps(h, k)]
        kv = [x.detach().to(DEV if impl == "triton" else "cpu", dt).requires_grad_() for x in (k, v)]
        if impl == "triton":
            ks, vs = T.tree_summaries(*kv, *[x.to(DEV) for x in maps], h)
        else:  # the recursion, with the same maps as parameters
            r = build_summaries("m2m", n_kv_heads=maps[0].shape[1], head_dim=d, block_size=m, rank=p).double()
            r.leaf, r.up = (torch.nn.Parameter(x) for x in maps)
            maps = [r.leaf, r.up]
            ks, vs = r(*kv, h)
        ((ks.double().cpu() * wk).sum() + (vs.double().cpu() * wv).sum()).backward()
        (got if impl == "triton" else ref).append([ks, vs] + [x.grad for x in kv + maps])
    for name, a, b in zip(("ks", "vs", "dk", "dv", "dleaf", "dup"), got[0], ref[0]):
        a, b = a.detach().double().cpu(), b.detach().double()
        assert b.abs().max() > 0, name
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err < TOL[dtype], f"{name}: {err:.2e} relative to the largest (seed {rng.initial_seed()})"


@pytest.mark.parametrize("launch", ["occupancy", "run4"])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_core_range_and_lse_gradient_match_the_pytorch_core(rng, monkeypatch, causal, weighted, launch):
    """The core contract: query blocks [a0, a0+nq) with extended keys, a loss on out AND lse,
    gradients for q, k_ext, v_ext and the summaries (a range sees part of each window's
    readers: the summaries' pass counts only the range's blocks); fp32 kernel vs float64
    PyTorch core. "run4": the forward's long loop, over ranges of 2 and 3 blocks (a run cut short)."""
    from fmtrain.attention.kernels.function import LAUNCH_ENV, TritonBlockAttention

    monkeypatch.setenv(LAUNCH_ENV, launch)

    n, m, d, H, Hkv = 200, 16, 8, 2, 1
    h = hierarchy(n, m, 2, causal)
    F = len(h.fine_blocks())
    q, k, v = qkv(rng, 1, H, Hkv, n, d)
    ks, vs = randn(rng, 1, Hkv, h.num_summaries, d), randn(rng, 1, Hkv, h.num_summaries, d)
    qp = torch.nn.functional.pad(q, (0, 0, 0, h.padded_len - n))
    for a0, nq in ((0, 2), (5, 3), (h.n_blocks - 3, 3)):
        args = (qp[:, :, a0 * m:(a0 + nq) * m], *(extend_keys(t, h)[:, :, a0 * m:(a0 + nq + F - 1) * m]
                                                  for t in (k, v)), ks, vs)
        ref = [t.clone().requires_grad_() for t in args]
        got = [t.to(DEV, torch.float32).requires_grad_() for t in args]
        o1, l1 = BlockAttention.apply(*ref, h, weighted, 0.4, a0)
        o2, l2 = TritonBlockAttention.apply(*got, h, weighted, 0.4, a0)
        assert l2.dtype == torch.float32 and o2.dtype == torch.float32
        go, gl = torch.randn(o1.shape, generator=rng, dtype=torch.float64), torch.randn(l1.shape, generator=rng,
                                                                                        dtype=torch.float64)
        g1 = torch.autograd.grad((o1 * go).sum() + (l1 * gl).sum(), ref)
        g2 = torch.autograd.grad((o2 * go.to(o2)).sum() + (l2 * gl.to(l2)).sum(), got)
        assert_close(o2.double().cpu(), o1, 2e-5, f"out a0={a0}")
        assert_close(l2.double().cpu(), l1, 2e-5, f"lse a0={a0}")
        for name, a, b in zip(("q", "k_ext", "v_ext", "ks", "vs"), g2, g1):
            assert_close(a.double().cpu(), b, 2e-5, f"d{name} a0={a0}")


@pytest.mark.parametrize("d", [32, 64])
def test_head_dims(rng, spy, d):
    q, k, v = qkv(rng, 1, 1, 1, 80, d)
    compare(spy, q, k, v, torch.float32, block_size=16, rank=2, causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_head_dim_128_and_block_64(rng, spy, causal):
    q, k, v = qkv(rng, 1, 2, 1, 300, 128)
    compare(spy, q, k, v, torch.float32, block_size=64, rank=2, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("m,keys", [(32, 16), (48, 32)])
def test_dkv_kernel_on_key_tiles_narrower_than_a_block(rng, spy, monkeypatch, causal, m, keys):
    """The "occupancy" launch splits each key block over several dk/dv programs (32 keys each at
    head_dim 128, which the interpreter is too slow for): the same split at small shapes, a block of
    48 rows in 64-row tiles included (the second program's last 16 rows are padding)."""
    from fmtrain.attention.kernels import function as Fn

    plain = Fn._launches
    monkeypatch.setattr(Fn, "_launches", lambda *a, **kw: dict(plain(*a, **kw), dkv_keys=keys))
    q, k, v = qkv(rng, 1, 4, 2, 230, 16)
    compare(spy, q, k, v, torch.float32, block_size=m, rank=2, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_forward_long_loop_matches_the_reference(rng, spy, monkeypatch, causal):
    """``_fwd_run_kernel`` ("run4": a program walks 4 query blocks, each fine key tile loaded once and
    handed on): sequences whose block count is not a multiple of the run, GQA, packed documents
    (the carried tiles cross a document boundary: masked by the next block's key range)."""
    from fmtrain.attention.kernels.function import LAUNCH_ENV

    monkeypatch.setenv(LAUNCH_ENV, "run4")
    launched = []
    from fmtrain.attention.kernels import function as Fn
    run_kernel = Fn._fwd_run_kernel
    monkeypatch.setattr(Fn, "_fwd_run_kernel", type("Spy", (), {"__getitem__": lambda self, grid: (
        launched.append(grid), run_kernel[grid])[1]})())
    for n, H, Hkv, d in ((100, 2, 1, 8), (173, 4, 2, 16)):  # 7 and 11 blocks of 16
        q, k, v = qkv(rng, 1, H, Hkv, n, d)
        spy.fwd = spy.bwd = 0
        compare(spy, q, k, v, torch.float32, block_size=16, rank=2, causal=causal)
    lengths = [100, 50, 3, 40, 7]
    q, k, v = qkv(rng, 1, 4, 2, sum(lengths), 8)
    spy.fwd = spy.bwd = 0
    compare(spy, q, k, v, torch.float32, block_size=16, rank=2, causal=causal,
            cu_seqlens=torch.tensor([0] + lengths).cumsum(0))
    assert [g[0] for g in launched] == [2, 3, 4]  # ceil(blocks / 4) programs per head: the long loop ran


def test_launch_configuration_is_chosen_by_name(monkeypatch):
    from fmtrain.attention.kernels import function as Fn

    monkeypatch.delenv(Fn.LAUNCH_ENV, raising=False)
    assert Fn.launch_config() == "occupancy"
    wide = Fn._launches(64, 128)
    assert wide["fwd"]["num_warps"] == 4 and wide["dkv_keys"] == 32
    monkeypatch.setenv(Fn.LAUNCH_ENV, "flash2")
    assert Fn._launches(64, 128)["fwd"]["num_warps"] == 8 and Fn._launches(64, 128)["dkv_keys"] == 64
    assert Fn._launches(64, 64) == Fn._launches(64, 64, config="occupancy")  # narrow tiles: alike
    assert Fn._launches(64, 64, config="run4")["fwd_run"] == 4 and Fn._launches(64, 128)["fwd_run"] == 1
    monkeypatch.setenv(Fn.LAUNCH_ENV, "fast")
    with pytest.raises(ValueError, match="FMTRAIN_TRITON_LAUNCH='fast' is not a launch configuration"):
        Fn.launch_config()


def test_causal_kernel_ignores_the_future_exactly(rng):
    n, m = 120, 16
    q, k, v = (t.to(DEV, torch.float32) for t in qkv(rng, 1, 2, 2, n, 8))
    base = fma(q, k, v, block_size=m, impl="triton")
    i = 70
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, i + 1:] += 1.0
    out = fma(q2, k2, v2, block_size=m, impl="triton")
    assert torch.equal(out[:, :, :i + 1], base[:, :, :i + 1])
    assert not torch.equal(out[:, :, i + 1:], base[:, :, i + 1:])


def test_kernels_are_deterministic(rng):
    q, k, v = (t.to(DEV, torch.float32).requires_grad_() for t in qkv(rng, 1, 2, 1, 100, 8))

    def once():
        out = fma(q, k, v, block_size=16, impl="triton")
        return (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))

    a, b = once(), once()
    for x, y in zip(a, b):  # every gradient accumulates in one program's registers: no atomics
        assert torch.equal(x, y)


def test_dispatch(monkeypatch):
    from fmtrain.attention.kernels.function import TritonBlockAttention

    x = torch.zeros(1, 1, 16, 8)
    assert select_core("torch", x) is BlockAttention
    assert select_core("auto", x) is BlockAttention  # CPU tensors: the PyTorch core
    assert select_core("auto", x.double()) is BlockAttention
    assert select_core("triton", x) is TritonBlockAttention
    with pytest.warns(UserWarning, match="float64"):
        assert select_core("triton", x.double()) is BlockAttention
    if torch.cuda.is_available():
        assert select_core("auto", x.cuda()) is TritonBlockAttention
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        fma(x, x, x, block_size=8, impl="triton")


def test_float64_through_triton_impl_is_the_pytorch_result(rng):
    q, k, v = qkv(rng, 1, 2, 1, 50, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fma(q, k, v, block_size=8, impl="triton")
    assert torch.equal(a, fma(q, k, v, block_size=8, impl="torch"))


def test_core_rejects_bad_ranges(rng):
    from fmtrain.attention.kernels.function import TritonBlockAttention

    h = hierarchy(64, 16, 2, True)
    q = torch.zeros(1, 1, 32, 8)
    k = torch.zeros(1, 1, 48, 8)
    s = torch.zeros(1, 1, h.num_summaries, 8)
    with pytest.raises(ValueError, match="outside the hierarchy"):
        TritonBlockAttention.apply(q, k, k, s, s, h, True, 1 / math.sqrt(8), 3)
    with pytest.raises(ValueError, match="extended keys"):
        TritonBlockAttention.apply(q, k[:, :, :32], k[:, :, :32], s, s, h, True, 1.0, 0)


# --- GPU lowering without a GPU -------------------------------------------------------------
def _aot_compile(dtype: str, m: int, d: int, S: int, causal: bool) -> None:
    """Compile every kernel for sm_90 as the JIT would (Triton IR -> PTX -> cubin with Triton's
    bundled ptxas; the launcher's tiles and options, pointers 16-byte aligned:
    ``fmtrain.attention.kernels.aot``), and check what the half-precision code uses.

    The interpreter runs the kernels' Python semantics only; this catches what fails in
    the real lowering (dot shapes, dtype mixes, layouts, loop-carried types: a name bound
    before a loop must keep its shape in it, which the interpreter never checks). In bf16 and
    fp16 every kernel must keep its values in registers (no spills) and multiply on tensor
    cores, the forward must load 16-byte vectors at d >= 64, and every kernel must fit two
    programs on an SM (#26's gate) in the default launch configuration. The "flash2" configuration, kept for timing beside
    it, must compile without spills; "run4"'s long-loop forward must compile.
    """
    from fmtrain.attention.kernels import aot

    variants = [v + ("occupancy",) for v in aot.kernel_variants(dtype, m, d, S, causal, config="occupancy")]
    if (dtype, m, d) in DOCS_AOT:  # packed documents' fine mask too
        variants += [v + ("occupancy",) for v in aot.kernel_variants(dtype, m, d, S, causal, docs=True,
                                                                     config="occupancy")]
    if m * d > 64 * 64:  # the launches differ only for wide tiles
        variants += [v + ("flash2",) for v in aot.kernel_variants(dtype, m, d, S, causal, config="flash2")
                     if not v[0].startswith("opened")]
    if dtype != "fp32":  # (fp32's IEEE products compile the long loop in minutes)
        variants += [v + ("run4",) for v in aot.kernel_variants(dtype, m, d, S, causal, config="run4")
                     if v[0] == "fwd_run"]
    for name, fn, consts, launch, pointers, config in variants:
        compiled = aot.compile_sm90(fn, consts, pointers, launch)
        if dtype == "fp32":
            continue  # IEEE fp32 products: no tensor cores; spills reported by the bench, not gated
        r = aot.resources(name, compiled)
        case = f"{name} {dtype} m={m} d={d} S={S} causal={causal} {config}"
        if name.startswith("summ"):  # the summaries of every level: the tokens' products on tensor cores
            assert r.tensor_core_ops > 0 or name in aot.TREE_ONLY, f"{case}: no tensor-core instructions"
            # (ptxas keeps a 4-byte value of the top kernels' nested loops on the stack at d = 16)
            assert r.spill_bytes <= 8 and r.programs_per_sm >= 2, f"{case}: {r.gate()}"
            continue
        assert r.tensor_core_ops > 0, f"{case}: no tensor-core instructions"
        if config == "run4":
            continue  # a candidate for the GPU check: at d = 128 it spills (bench/kernel_resources.py says how much)
        assert r.spill_bytes == 0, f"{case}: spills {r.spill_bytes} bytes ({r.registers} registers)"
        if name == "fwd" and d >= 64:  # rows of 128 bytes and more (narrow tiles load 8 bytes at a time)
            assert r.vector_loads > 0, f"{case}: no 16-byte loads"
        if config == "occupancy":
            assert r.programs_per_sm >= 2, f"{case}: {r.gate()}"


# (dtype, block size m, head_dim d, coarse slots S): tiles as the launcher picks them, the coarse
# tile smaller than, equal to and larger than the fine one; fp32 (IEEE products) and half types.
AOT_CASES = [("bf16", 64, 64, 5), ("bf16", 64, 128, 200), ("fp32", 64, 64, 40), ("fp16", 32, 32, 40),
             ("bf16", 16, 16, 3)]
DOCS_AOT = {("bf16", 64, 128), ("fp16", 32, 32)}  # fp32 lowers the same code, 3 minutes slower


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_compile_for_hopper(causal):
    """The real GPU lowering of every kernel for AOT_CASES, in a process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset
    code = (f"import tests.attention.test_kernels as t\n"
            f"for c in t.AOT_CASES: t._aot_compile(*c, {causal})")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Alone it takes about 40 s; beside another compiling process ten times that. The limit only
    # catches a hang, so it leaves room for a loaded machine.
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m,H,Hkv,refine,cap", [(150, 16, 4, 2, 2, {}), (96, 16, 2, 2, 3, {}),
                                                   (200, 16, 2, 1, 2, dict(max_level=1, flat_top=True))], ids=str)
def test_refined_far_field_kernels_match_the_reference(monkeypatch, dtype, causal, n, m, H, Hkv, refine, cap):
    """Adaptive refinement with impl='triton': the opened blocks run in the opened-tile kernels
    (counted, so a silent fallback fails), the fine level in the core's; outputs and gradients
    against the float64 dense reference on the same (rounded) inputs: the selection is discrete,
    so the reference must see the values the kernels see, or a near-tie opens another block.
    The far field accumulates in fp32 whatever the inputs (TOL as above); the blocks of keys and
    values the kernels read are in the inputs' dtype (half the bytes, and registers to spare)."""
    from fmtrain.attention.kernels import function as Fn
    calls, block_dtypes = {"fwd": 0, "bwd": 0}, set()
    for name, key, kb_arg in (("opened_forward", "fwd", 1), ("opened_backward", "bwd", 4)):
        real = getattr(Fn, name)

        def spy(*a, _real=real, _key=key, _kb=kb_arg, **k):
            calls[_key] += 1
            block_dtypes.add(a[_kb].dtype)
            return _real(*a, **k)
        monkeypatch.setattr(Fn, name, spy)
    g = torch.Generator().manual_seed(n + refine)
    q, k, v = qkv(g, 1, H, Hkv, n, 32)
    dout = randn(g, 1, H, n, 32)
    grads = []
    q, k, v, dout = (x.to(dtype).double() for x in (q, k, v, dout))
    for impl, dt in (("dense", torch.float64), ("triton", dtype)):
        xs = [x.detach().to(DEV, dt).clone().requires_grad_() for x in (q, k, v)]
        out = fma(*xs, block_size=m, rank=2, causal=causal, refine=refine, impl=impl, **cap)
        out.backward(dout.to(DEV, dt))
        grads.append([out.detach().double().cpu()] + [x.grad.double().cpu() for x in xs])
    assert calls["fwd"] >= 1 and calls["bwd"] >= 1, calls
    assert block_dtypes == {dtype}  # the kernels read the keys' and values' blocks in the inputs' dtype
    for i, (a, b) in enumerate(zip(grads[1], grads[0])):
        err = (a - b).abs().max().item() / (b.abs().max().item() if dtype != torch.float32 else 1.0)
        assert err < TOL[dtype], f"{['out', 'dq', 'dk', 'dv'][i]}: {err:.2e} (seed {n + refine})"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[100, 50, 3, 40, 7], [16, 32, 5, 11, 64]], ids=str)
def test_packed_documents_through_the_kernels(rng, spy, lengths, causal):
    """Document masking (``cu_seqlens``) in one launch per kernel: each block's fine mask reads
    its document's key range, the summaries' backward each window's document. Against the
    float64 definition (each document's dense fma alone), fp32's tolerance."""
    q, k, v = qkv(rng, 1, 4, 2, sum(lengths), 8)
    cu = torch.tensor([0] + lengths).cumsum(0)
    compare(spy, q, k, v, torch.float32, block_size=16, rank=2, causal=causal, cu_seqlens=cu)
