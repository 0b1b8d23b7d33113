"""Document masking (fma's ``cu_seqlens``): packed documents equal each document run alone.

The reference is the definition itself: ``fma`` (dense) on each document's own slice. The
block-aligned path (:mod:`fmtrain.attention.documents`) is compared with it in float64,
outputs and the gradients of q, k, v (and of learned parameters), to ``TOL64`` (1e-12; the
issue's floor is 1e-10): two exact algorithms that differ by summation order only (~1e-15
seen), far below a key from another document (~1e-2).
"""
import pytest
import torch

from fmtrain.attention import fma
from fmtrain.attention.documents import (as_documents, cu_seqlens_from_doc_positions, doc_hierarchy, is_flat)
from fmtrain.attention.summaries import M2MSummaries, build_summaries

from .conftest import TOL64, outputs_and_grads, qkv, randn

# Document lengths of one packed row (m = 8): shorter than a block, exactly on block
# boundaries, one token, one document with several coarse levels, a partial last block.
PACKINGS = [
    [100, 50, 3, 40, 7],
    [8, 16, 24, 64, 8],
    [1, 1, 30, 200],
    [5, 3, 2, 7, 1, 6],      # every document shorter than a block
    [123],                   # one document: the unmasked op
]


def _cu(lengths):
    return torch.tensor([0] + lengths).cumsum(0)


def _separately(q, k, v, lengths, g, extra=(), **kw):
    """Each document's output and the gradients, from fma (dense) on each document's slice
    alone, with one output gradient for the whole packed row (drawn from ``g``)."""
    B, H, n, d = q.shape
    outs, s = [], 0
    for L in lengths:
        row, col = divmod(s, n)
        outs.append(fma(q[row:row + 1, :, col:col + L], k[row:row + 1, :, col:col + L],
                        v[row:row + 1, :, col:col + L], impl="dense", **kw))
        s += L
    out = torch.cat([o.transpose(1, 2).reshape(-1, H, d) for o in outs]).view(B, n, H, d).transpose(1, 2)
    gout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return out, torch.autograd.grad(out, (q, k, v, *extra), gout)


def _check(rng, q, k, v, lengths, extra=(), **kw):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    o_ref, g_ref = _separately(q, k, v, lengths, torch.Generator().manual_seed(seed), extra, **kw)
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), extra, impl="torch",
                             cu_seqlens=_cu(lengths), **kw)
    assert (o - o_ref).abs().max() < TOL64
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert (a - b).abs().max() < TOL64, f"gradient {i}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", PACKINGS)
def test_packed_equals_separate(rng, lengths, causal):
    q, k, v = qkv(rng, 1, 4, 2, sum(lengths), 8)  # GQA
    _check(rng, q, k, v, lengths, block_size=8, rank=2, causal=causal)


def test_packed_equals_separate_with_indexed_moves(rng, monkeypatch):
    """The layout moved by the indexed ops (an accelerator's way) gives the same, causal."""
    from fmtrain.attention import documents

    monkeypatch.setattr(documents, "_SLICES_MAX", -1)
    lengths = PACKINGS[0]
    q, k, v = qkv(rng, 1, 4, 2, sum(lengths), 8)
    _check(rng, q, k, v, lengths, block_size=8, rank=2, causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_rows_are_boundaries(rng, causal):
    """Two rows; cu_seqlens need not list the row end (a document never crosses it)."""
    lengths = [50, 14, 64, 20, 30, 22]  # rows of 100: the row end falls inside [64, 20)+... cut at 100
    q, k, v = qkv(rng, 2, 2, 2, 100, 8)
    cut = [50, 14, 36, 28, 20, 30, 22]  # the same packing with the row end listed
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    o_ref, g_ref = _separately(q, k, v, cut, torch.Generator().manual_seed(seed), block_size=8, rank=2,
                               causal=causal)
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), impl="torch", block_size=8, rank=2,
                             causal=causal, cu_seqlens=_cu(lengths))
    assert (o - o_ref).abs().max() < TOL64
    assert max((a - b).abs().max() for a, b in zip(g, g_ref)) < TOL64


@pytest.mark.parametrize("refine", [0, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_learned_summaries_and_level_offsets(rng, causal, refine):
    """m2m summaries away from their averaging start, and per-head level offsets: their
    gradients too (the summaries of each document pair only its own children); refined too."""
    lengths = [100, 50, 3, 40, 7, 60, 1, 123]
    q, k, v = qkv(rng, 1, 4, 2, sum(lengths), 8)
    summ = M2MSummaries(2, 8, 2).double()
    with torch.no_grad():
        summ.leaf.add_(0.1 * randn(rng, *summ.leaf.shape))
        summ.up.add_(0.1 * randn(rng, *summ.up.shape))
    offset = randn(rng, 4, 6, requires_grad=True)
    _check(rng, q, k, v, lengths, extra=(summ.leaf, summ.up, offset), block_size=8, rank=2, causal=causal,
           summaries=summ, level_offset=offset, refine=refine)


@pytest.mark.parametrize("max_level", [0, 1])
def test_local_and_truncated(rng, max_level):
    """``local`` attention (max_level=0) and a truncated hierarchy over packed documents."""
    lengths = [100, 50, 3, 40, 7]
    q, k, v = qkv(rng, 1, 2, 2, sum(lengths), 8)
    _check(rng, q, k, v, lengths, block_size=8, rank=2, max_level=max_level)


@pytest.mark.parametrize("kw", [dict(variant="linear"), dict(summary="conv")], ids=str)
def test_other_paths_run_each_document(rng, kw):
    """The linear variant and conv summaries run document by document: exact too."""
    lengths = [70, 9, 49]
    q, k, v = qkv(rng, 1, 2, 2, sum(lengths), 8)
    if kw.get("summary") == "conv":
        kw = dict(summaries=build_summaries("conv", n_kv_heads=2, head_dim=8, block_size=8, rank=2,
                                            max_seq_len=128).double())
    _check(rng, q, k, v, lengths, block_size=8, rank=2, **kw)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", PACKINGS[:4])
def test_refined_on_the_layout_equals_separate(rng, lengths, causal):
    """Adaptive refinement over packed documents in one far field: each query descends through
    its own document's windows only (a document with one child window included) and opens its
    own blocks, whose keys stop at the document's end; refine=3 opens more blocks than short
    documents have."""
    q, k, v = qkv(rng, 1, 4, 2, sum(lengths), 8)
    _check(rng, q, k, v, lengths, block_size=8, rank=2, causal=causal, refine=3)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", PACKINGS[:4])
def test_refined_with_a_flat_top_on_the_layout_equals_separate(rng, lengths, causal):
    """Capped at level 1 with a flat top: each document's top lists hold its own earlier windows
    only, however many (the layout's lists are as wide as the longest document's)."""
    q, k, v = qkv(rng, 1, 4, 2, sum(lengths), 8)
    _check(rng, q, k, v, lengths, block_size=8, rank=2, causal=causal, refine=2, max_level=1, flat_top=True)


@pytest.mark.parametrize("causal", [True, False])
def test_refined_on_the_layout_through_the_kernels(monkeypatch, causal):
    """impl='triton' (interpreted, fp32): the core's kernels and the opened-block kernels, each
    opened block's keys stopping at its own document's end (read per block), against the float64
    definition; the opened-block kernels counted, so a fallback to PyTorch fails."""
    from fmtrain.attention import kernels
    if not kernels.triton_available():
        pytest.skip("triton does not import here")
    from fmtrain.attention.kernels import function as Fn
    calls = []
    real = Fn.opened_forward
    monkeypatch.setattr(Fn, "opened_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(7)
    lengths = [70, 9, 49, 1, 37]
    q, k, v = qkv(g, 1, 2, 2, sum(lengths), 16)
    q, k, v = (x.float().double() for x in (q, k, v))  # the kernels' inputs, exactly: a near-tie opens another block
    ref = fma(q, k, v, block_size=8, rank=2, causal=causal, refine=2, impl="dense", cu_seqlens=_cu(lengths))
    out = fma(q.float(), k.float(), v.float(), block_size=8, rank=2, causal=causal, refine=2, impl="triton",
              cu_seqlens=_cu(lengths))
    assert calls and (out.double() - ref).abs().max() < 2e-5


def test_float32_against_float64(rng):
    """The block-aligned path in float32 against the float64 definition: 1e-5 (float32's
    rounding of softmax sums over ~100 keys)."""
    lengths = [100, 50, 3, 40, 7]
    q, k, v = qkv(rng, 1, 2, 2, sum(lengths), 16)
    ref = fma(q, k, v, block_size=8, rank=2, impl="dense", cu_seqlens=_cu(lengths))
    out = fma(q.float(), k.float(), v.float(), block_size=8, rank=2, impl="torch", cu_seqlens=_cu(lengths))
    assert (out.double() - ref).abs().max() < 1e-5


def test_nothing_crosses_a_boundary(rng):
    """Changing one document's tokens changes no other document's outputs or gradients."""
    lengths = [40, 60, 28]
    q, k, v = qkv(rng, 1, 2, 2, 128, 8)
    out = fma(q, k, v, block_size=8, rank=2, causal=False, impl="torch", cu_seqlens=_cu(lengths))
    with torch.no_grad():
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 40:100] += 1.0
        v2[:, :, 40:100] -= 1.0
    out2 = fma(q, k2, v2, block_size=8, rank=2, causal=False, impl="torch", cu_seqlens=_cu(lengths))
    assert torch.equal(out[:, :, :40], out2[:, :, :40]) and torch.equal(out[:, :, 100:], out2[:, :, 100:])
    assert (out[:, :, 40:100] - out2[:, :, 40:100]).abs().max() > 1e-3


def test_layout():
    """Each document starts on a block; a row of one aligned document moves nothing."""
    docs = as_documents([0, 10, 11, 40], 1, 40)
    dh = doc_hierarchy(docs, 8, 2, True, None)
    assert dh.first_block == (0, 2, 3) and dh.n == 8 * 7 and not is_flat(dh)
    assert is_flat(doc_hierarchy(as_documents([0, 64], 1, 64), 8, 2, True, None))
    assert is_flat(doc_hierarchy(as_documents([0, 16, 37], 1, 37), 8, 2, True, None))


@pytest.mark.parametrize("lengths", [[10, 1, 29], [8, 16, 3, 5, 8], [40]])
def test_layout_moves_by_slices_and_by_index_agree(monkeypatch, lengths):
    """The CPU's slice copies and the indexed ops an accelerator runs move the same tokens:
    zeros in the padding, every token back where it came from, gradients through both ways."""
    from fmtrain.attention import documents

    docs = as_documents(_cu(lengths), 1, sum(lengths))
    dh = doc_hierarchy(docs, 8, 2, True, None)
    x = torch.randn(1, 3, sum(lengths), 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 3, dh.n, 4, dtype=torch.float64, requires_grad=True)
    moved = []
    for most in (documents._SLICES_MAX, -1):  # -1: the indexed ops
        monkeypatch.setattr(documents, "_SLICES_MAX", most)
        placed, gathered = documents._ToLayout.apply(x, dh), documents._FromLayout.apply(y, dh)
        moved.append((placed, gathered, *torch.autograd.grad((placed * 2).sum() + (gathered * 3).sum(), (x, y))))
    for a, b in zip(*moved):
        assert torch.equal(a, b)
    placed, gathered, gx, gy = moved[0]
    assert torch.equal(documents._FromLayout.apply(placed, dh), x)
    assert not placed.index_select(2, dh.padding_index("cpu")).any()  # the padding holds zeros
    assert torch.equal(gx, torch.full_like(x, 2)) and gy.sum() == 3 * x.numel()
    assert len(dh.moves) == (1 if len(lengths) == 1 else len(lengths) - sum(L % 8 == 0 for L in lengths[:-1]))


def test_cu_seqlens_from_doc_positions():
    pos = torch.tensor([[5, 6, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]])
    assert cu_seqlens_from_doc_positions(pos).tolist() == [0, 2, 5, 6, 10, 12]


@pytest.mark.parametrize("cu, message", [
    ([0, 10, 30], r"end at batch \* n = 40"),
    ([1, 40], "start at 0"),
    ([0, 20, 10, 40], "non-decreasing"),
    (torch.tensor([[0, 40]]), "1-D integer tensor"),
    (torch.tensor([0.0, 40.0]), "1-D integer tensor"),
])
def test_bad_cu_seqlens(cu, message):
    q = torch.zeros(1, 2, 40, 8)
    with pytest.raises(ValueError, match=message):
        fma(q, q, q, block_size=8, rank=2, cu_seqlens=cu)
