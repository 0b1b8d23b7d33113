"""fma: the blocked path against the dense reference, causality, receptive field, dtypes, errors.

Tolerances: float64 comparisons of two exact algorithms differ only by summation
order, a few ulps of the largest intermediate (scores of O(10), outputs O(1)):
1e-12 absolute leaves three orders of margin above the ~1e-15 seen and is still
far below any real defect (a missing or doubled key changes outputs by ~1e-2).
"""
import math

import pytest
import torch

from fmtrain.attention import fma
from fmtrain.attention.blocked import block_attention
from fmtrain.attention.hierarchy import hierarchy
from fmtrain.attention.summaries import M2MSummaries

from .conftest import TOL64, outputs_and_grads, qkv, randn

CASES = [  # n, m, p, H, Hkv
    (1, 8, 2, 2, 2),
    (7, 8, 2, 2, 1),
    (16, 8, 2, 2, 2),        # two blocks: fine level only
    (64, 8, 2, 4, 2),        # power of two times m
    (93, 8, 4, 3, 3),        # partial last block
    (200, 16, 2, 4, 1),      # multi-query
    (256, 8, 1, 2, 2),       # p = 1
    (517, 16, 8, 2, 2),      # p = m/2, partial coarse windows
]


@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m,p,H,Hkv", CASES)
def test_blocked_matches_dense_float64(rng, n, m, p, H, Hkv, causal, variant):
    q, k, v = qkv(rng, 2, H, Hkv, n, 16)
    kw = dict(block_size=m, rank=p, causal=causal, variant=variant)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    o_ref, g_ref = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), impl="dense", **kw)
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), impl="torch", **kw)
    assert (o - o_ref).abs().max() < TOL64
    for name, a, b in zip("qkv", g, g_ref):
        assert (a - b).abs().max() < TOL64, f"d{name}"


@pytest.mark.parametrize("blocks_per_chunk", [1, 3])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,G", [(200, 1), (93, 2)])
def test_many_chunks_match_dense_float64(rng, monkeypatch, n, G, causal, blocks_per_chunk):
    """The core walks query blocks in chunks; gradients of keys shared by neighbouring
    chunks are written by one and added to by the next, and the first and last chunks
    assemble their out-of-sequence neighbours: all of that only happens with many chunks."""
    import fmtrain.attention.torch_core as torch_core

    m, p = 8, 2
    h = hierarchy(n, m, p, causal)
    width = len(h.fine_blocks()) * m + h.coarse_slots
    monkeypatch.setattr(torch_core, "CHUNK_SCORES", blocks_per_chunk * G * m * width)
    q, k, v = qkv(rng, 2, 2 * G, 2, n, 16)
    kw = dict(block_size=m, rank=p, causal=causal)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    o_ref, g_ref = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), impl="dense", **kw)
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), impl="torch", **kw)
    assert (o - o_ref).abs().max() < TOL64
    for name, a, b in zip("qkv", g, g_ref):
        assert (a - b).abs().max() < TOL64, f"d{name}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_unweighted_and_learned_summaries_match_dense(rng, causal, weighted):
    n, m, p = 150, 8, 2
    summ = M2MSummaries(2, m, p).double()
    with torch.no_grad():  # random maps, far from averaging
        summ.leaf.normal_(generator=rng).mul_(0.3)
        summ.up.normal_(generator=rng).mul_(0.5)
    q, k, v = qkv(rng, 1, 4, 2, n, 8)
    kw = dict(block_size=m, rank=p, causal=causal, weighted=weighted, summaries=summ)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    params = (summ.leaf, summ.up)
    o_ref, g_ref = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), params, impl="dense", **kw)
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), params, impl="torch", **kw)
    assert (o - o_ref).abs().max() < TOL64
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() < TOL64


def test_core_gradients_including_lse_pass_gradcheck(rng):
    """The custom backward against finite differences, with a loss on out and on lse."""
    n, m, p = 40, 4, 2
    h = hierarchy(n, m, p, True)
    q, k, v = qkv(rng, 1, 2, 1, n, 4)
    ks = randn(rng, 1, 1, h.num_summaries, 4, requires_grad=True)
    vs = randn(rng, 1, 1, h.num_summaries, 4, requires_grad=True)

    def f(q, k, v, ks, vs):
        out, lse = block_attention(q, k, v, ks, vs, h, scale=0.5, weighted=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v, ks, vs), atol=1e-8)


@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("impl", ["torch", "dense"])
def test_causal_outputs_ignore_the_future_exactly(rng, impl, variant):
    n, m = 300, 8
    q, k, v = qkv(rng, 1, 2, 2, n, 8)
    kw = dict(block_size=m, rank=2, causal=True, impl=impl, variant=variant)
    with torch.no_grad():
        base = fma(q, k, v, **kw)
        for i in (0, 7, 8, 63, 64, 150, 298):
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            for t in (q2, k2, v2):
                t[:, :, i + 1:] += torch.randn(t[:, :, i + 1:].shape, generator=rng, dtype=t.dtype)
            out = fma(q2, k2, v2, **kw)
            assert torch.equal(out[:, :, :i + 1], base[:, :, :i + 1]), f"position {i} sees the future"
            assert not torch.equal(out[:, :, i + 1:], base[:, :, i + 1:])


@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("causal", [True, False])
def test_every_visible_input_reaches_the_output(rng, causal, variant):
    """No holes: output i depends on every key/value position it may see (all, or all <= i)."""
    n, m = 150, 8
    q, k, v = qkv(rng, 1, 1, 1, n, 4)
    out = fma(q, k, v, block_size=m, rank=2, causal=causal, variant=variant)
    for i in (0, 9, 77, 149):
        gk, gv = torch.autograd.grad(out[0, 0, i].sum(), (k, v), retain_graph=True)
        reach = (gv[0, 0].abs().sum(-1) > 0)
        expect = torch.arange(n) <= i if causal else torch.ones(n, dtype=torch.bool)
        assert torch.equal(reach, expect), f"query {i}"
        if not (causal and i == 0):  # a single visible key gets no key gradient from a softmax
            assert torch.equal(gk[0, 0].abs().sum(-1) > 0, expect), f"query {i}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [True, False])
def test_low_precision_close_to_float64(rng, dtype, tol, causal):
    """fp32 within 2e-5 (accumulation in fp32 over ~100 terms); bf16 within 3e-2
    (inputs rounded to 8 bits of mantissa, ~4e-3 relative, times O(1) outputs)."""
    n = 333
    q, k, v = qkv(rng, 2, 4, 2, n, 32)
    ref = fma(q, k, v, block_size=16, causal=causal, impl="dense")
    out = fma(q.to(dtype), k.to(dtype), v.to(dtype), block_size=16, causal=causal)
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < tol
    out.float().sum().backward()  # the backward runs in low precision too


def test_default_scale_and_explicit_scale(rng):
    q, k, v = qkv(rng, 1, 2, 2, 100, 16)
    a = fma(q, k, v, block_size=8)
    b = fma(q, k, v, block_size=8, scale=1 / math.sqrt(16))
    c = fma(q, k, v, block_size=8, scale=0.1)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_no_quadratic_allocation(rng):
    """Forward + backward at n = 8192 allocate nothing near n*n/64 elements at once."""
    n = 8192
    q, k, v = (t.float().detach().requires_grad_() for t in qkv(rng, 1, 1, 1, n, 16))
    with torch.profiler.profile(profile_memory=True) as prof:
        fma(q, k, v, block_size=32).sum().backward()
    biggest = max(e.self_cpu_memory_usage for e in prof.events())
    assert biggest < n * n // 64 * 4, f"an op allocated {biggest} bytes"


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(q=(1, 2, 10, 8), k=(1, 2, 10, 4)), ValueError, "head_dim"),
    (dict(q=(1, 3, 10, 8), k=(1, 2, 10, 8)), ValueError, "multiple of the key/value heads"),
    (dict(q=(1, 2, 10, 8), k=(1, 2, 12, 8)), ValueError, "sequence length"),
    (dict(q=(2, 10, 8), k=(2, 10, 8)), ValueError, "4-D"),
    (dict(q=(1, 2, 0, 8), k=(1, 2, 0, 8)), ValueError, "n=0"),
    (dict(q=(1, 0, 10, 8), k=(1, 0, 10, 8)), ValueError, "at least one head"),
    (dict(q=(1, 2, 10, 0), k=(1, 2, 10, 0)), ValueError, "head_dim >= 1"),
    (dict(block_size=10, rank=3), ValueError, "multiple of rank"),
    (dict(impl="cuda"), ValueError, "unknown impl"),
    (dict(variant="fast"), ValueError, "unknown variant"),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, msg):
    qs, ks = kwargs.pop("q", (1, 2, 10, 8)), kwargs.pop("k", (1, 2, 10, 8))
    with pytest.raises(exc, match=msg):
        fma(torch.randn(qs), torch.randn(ks), torch.randn(ks), **kwargs)


@pytest.mark.parametrize("impl", ["torch", "dense"])
def test_an_empty_batch_gives_an_empty_result(impl):
    q = torch.randn(0, 4, 40, 8, requires_grad=True)
    k, v = (torch.randn(0, 2, 40, 8, requires_grad=True) for _ in range(2))
    out = fma(q, k, v, block_size=8, impl=impl)
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_dtype_mix_is_refused():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(TypeError, match="share one dtype"):
        fma(q, q.double(), q)
    with pytest.raises(TypeError, match="not supported"):
        fma(q.int(), q.int(), q.int())


def test_block_attention_is_a_function_of_its_inputs_only(rng):
    """Same inputs twice give bitwise the same result (no state between calls)."""
    q, k, v = qkv(rng, 1, 2, 1, 97, 8)
    assert torch.equal(fma(q, k, v, block_size=8), fma(q, k, v, block_size=8))


@pytest.mark.parametrize("causal", [True, False])
def test_core_on_a_range_of_blocks_equals_the_whole(rng, causal):
    """The seam of sequence parallelism and of kernels: query blocks [a0, a0+nq) with
    their extended keys give that slice of the whole-sequence result, gradients included."""
    from fmtrain.attention.hierarchy import extend_keys
    from fmtrain.attention.torch_core import BlockAttention

    n, m = 200, 8
    h = hierarchy(n, m, 2, causal)
    q, k, v = qkv(rng, 1, 2, 1, n, 4)
    ks, vs = (randn(rng, 1, 1, h.num_summaries, 4, requires_grad=True) for _ in range(2))
    full, full_lse = block_attention(q, k, v, ks, vs, h, scale=0.5, weighted=True)
    F = len(h.fine_blocks())
    for a0, nq in ((0, 3), (5, 7), (h.n_blocks - 4, 4)):
        qs = torch.nn.functional.pad(q, (0, 0, 0, h.padded_len - n))[:, :, a0 * m:(a0 + nq) * m]
        ke, ve = (extend_keys(t, h)[:, :, a0 * m:(a0 + nq + F - 1) * m] for t in (k, v))
        out, lse = BlockAttention.apply(qs, ke, ve, ks, vs, h, True, 0.5, a0)
        rows = slice(a0 * m, min((a0 + nq) * m, n))
        real = rows.stop - rows.start
        assert (out[:, :, :real] - full[:, :, rows]).abs().max() < TOL64
        assert (lse[:, :, :real] - full_lse[:, :, rows]).abs().max() < TOL64
        g = torch.randn(full.shape, generator=rng, dtype=full.dtype)
        g[:, :, :rows.start] = 0
        g[:, :, rows.stop:] = 0
        want = torch.autograd.grad(full, (q, k, v, ks, vs), g, retain_graph=True)
        gl = torch.nn.functional.pad(g, (0, 0, 0, h.padded_len - n))[:, :, a0 * m:(a0 + nq) * m]
        got = torch.autograd.grad(out, (q, k, v, ks, vs), gl, allow_unused=True)
        for name, a, b in zip(("q", "k", "v", "ks", "vs"), got, want):
            a = torch.zeros_like(b) if a is None else a
            assert (a - b).abs().max() < TOL64, (a0, name)


@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m,p,H,Hkv", [(203, 8, 2, 4, 2), (93, 8, 4, 3, 3), (40, 8, 2, 2, 1)])
def test_level_offsets_match_dense_float64(rng, n, m, p, H, Hkv, causal, variant):
    """Learned per-head level offsets: the blocked path (fine core + per-query coarse term)
    against the dense reference, outputs and gradients, the offsets' own included."""
    q, k, v = qkv(rng, 2, H, Hkv, n, 8)
    offset = randn(rng, H, 32, requires_grad=True)
    kw = dict(block_size=m, rank=p, causal=causal, variant=variant, level_offset=offset)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    o_ref, g_ref = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), (offset,), impl="dense", **kw)
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), (offset,), impl="torch", **kw)
    assert (o - o_ref).abs().max() < TOL64
    for name, a, b in zip(["q", "k", "v", "offset"], g, g_ref):
        assert (a - b).abs().max() < TOL64, f"d{name}"
    levels = hierarchy(n, m, p, causal).n_levels
    assert g[3][:, levels:].abs().max() == 0, "levels the sequence does not have got a gradient"
    assert g[3][:, :levels].abs().min() > 0, "a level's offset did not reach the output"
    with torch.no_grad():  # a zero offset is the fixed prior exactly
        plain = fma(q, k, v, block_size=m, rank=p, causal=causal, variant=variant, impl="torch")
        zero = fma(q, k, v, impl="torch", **{**kw, "level_offset": torch.zeros_like(offset)})
    assert (plain - zero).abs().max() < TOL64


def test_level_offset_errors(rng):
    q, k, v = qkv(rng, 1, 2, 2, 300, 8)
    with pytest.raises(ValueError, match="level_offset must be"):
        fma(q, k, v, block_size=8, level_offset=torch.zeros(3, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="has 2 levels"):
        fma(q, k, v, block_size=8, level_offset=torch.zeros(2, 2, dtype=torch.float64))
