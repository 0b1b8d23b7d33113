"""Adaptive refinement (fma's ``refine``): the blocked path against the per-query dense reference,
exactness when every block is opened, causality, retrieval of a far key, gradients, errors.

Tolerances as in test_fma.py: two exact float64 algorithms differ by summation order only
(~1e-15 seen); 1e-12 leaves three orders of margin and is far below a missing or doubled
key (~1e-2). The selection is discrete: random float64 inputs have no ties between window
scores, so both readings of the rule open the same blocks.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fmtrain.attention import fma
from fmtrain.attention.hierarchy import hierarchy, truncate
from fmtrain.attention.reference import dense_attention, dense_refined
from fmtrain.attention.refine import SelectionReach, keys_per_query, select, window_boxes
from fmtrain.attention.rope import inverse_frequencies
from fmtrain.attention.summaries import MEAN, build_summaries

from .conftest import TOL64, outputs_and_grads, qkv, randn

CASES = [  # n, m, p, H, Hkv
    (64, 8, 2, 2, 2),        # power of two times m
    (93, 8, 4, 4, 2),        # partial last block, GQA
    (130, 8, 2, 3, 1),       # multi-query, partial coarse windows
    (200, 16, 8, 2, 2),      # p = m/2
]


def _compare(rng, q, k, v, extra=(), **kw):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    o_ref, g_ref = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), extra, impl="dense", **kw)
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), extra, impl="torch", **kw)
    assert (o - o_ref).abs().max() < TOL64
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert (a - b).abs().max() < TOL64, f"gradient {i}"
    return o


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("refine", [1, 3])
@pytest.mark.parametrize("n,m,p,H,Hkv", CASES)
def test_blocked_matches_dense_float64(rng, n, m, p, H, Hkv, refine, causal):
    q, k, v = qkv(rng, 2, H, Hkv, n, 16)
    o = _compare(rng, q, k, v, block_size=m, rank=p, causal=causal, refine=refine)
    plain = fma(q, k, v, block_size=m, rank=p, causal=causal)
    assert (o - plain).abs().max() > 1e-3  # the refinement changed something: the test is not vacuous


@pytest.mark.parametrize("kind,cap", [("m2m", {}), ("conv", {}), ("m2m", dict(max_level=2, flat_top=True))], ids=str)
def test_learned_summaries_and_level_offsets_get_the_reference_gradients(rng, kind, cap):
    n, m, p, H, Hkv = 150, 8, 2, 4, 2
    q, k, v = qkv(rng, 2, H, Hkv, n, 8)
    summ = build_summaries(kind, n_kv_heads=Hkv, head_dim=8, block_size=m, rank=p, max_seq_len=256).double()
    with torch.no_grad():
        for t in summ.parameters():
            t.add_(torch.randn(t.shape, generator=rng, dtype=t.dtype) * 0.3)
    off = randn(rng, H, 6, requires_grad=True)
    params = (off, *summ.parameters())
    _compare(rng, q, k, v, params, block_size=m, rank=p, causal=True, refine=2, summaries=summ,
             level_offset=off, weighted=True, **cap)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_without_refinement_is_plain_multipole(rng, causal):
    q, k, v = qkv(rng, 1, 2, 2, 100, 8)
    h = hierarchy(100, 8, 2, causal)
    ks, vs = MEAN(k, v, h)
    a = dense_refined(q, k, v, ks, vs, h, scale=0.3, weighted=True, refine=0)
    b = dense_attention(q, k, v, ks, vs, h, scale=0.3, weighted=True)
    assert (a - b).abs().max() < TOL64


def _assert_softmax_attention(rng, n, H, Hkv, causal, **kw):
    """fma(**kw) equals SDPA, outputs and gradients (float64)."""
    q, k, v = qkv(rng, 2, H, Hkv, n, 8)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    o, g = outputs_and_grads(q, k, v, torch.Generator().manual_seed(seed), causal=causal, **kw)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                         is_causal=causal)
    g_ref = torch.autograd.grad(ref, (q, k, v), torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed),
                                                           dtype=ref.dtype))
    assert (o - ref).abs().max() < TOL64
    for name, a, b in zip("qkv", g, g_ref):
        assert (a - b).abs().max() < TOL64, f"d{name}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m,p,H,Hkv", [(100, 8, 2, 4, 2), (64, 4, 2, 2, 2), (37, 4, 1, 1, 1)])
def test_opening_every_block_is_exact_softmax_attention(rng, n, m, p, H, Hkv, causal):
    _assert_softmax_attention(rng, n, H, Hkv, causal, block_size=m, rank=p, refine=-(-n // m))


def test_nothing_after_a_query_changes_it(rng):
    n, m, i = 160, 8, 97
    q, k, v = qkv(rng, 1, 4, 2, n, 8)
    kw = dict(block_size=m, rank=2, causal=True, refine=3, impl="torch")
    out = fma(q, k, v, **kw)
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, i + 1:] += torch.randn(x[:, :, i + 1:].shape, generator=rng, dtype=x.dtype)
    out2 = fma(q2, k2, v2, **kw)
    assert (out[:, :, :i + 1] - out2[:, :, :i + 1]).abs().max() < TOL64
    assert (out[:, :, i + 1:] - out2[:, :, i + 1:]).abs().max() > 1e-3
    gq, gk, gv = torch.autograd.grad(out[:, :, :i + 1].sum(), (q, k, v))
    for name, gr in (("q", gq), ("k", gk), ("v", gv)):
        assert gr[:, :, i + 1:].abs().max() == 0, f"d{name} reaches past the query"


def test_a_far_key_that_matches_is_opened_and_read_exactly(rng):
    """One key far back aligned with the last query: refinement opens its block, and the output
    carries its value, which plain multipole attention blurs into a summary."""
    n, m, d = 512, 16, 16
    q = randn(rng, 1, 1, n, d) * 0.1
    k = randn(rng, 1, 1, n, d) * 0.1
    v = randn(rng, 1, 1, n, d)
    needle = 37  # block 2, at distance 474 from the last query
    q[0, 0, -1] = k[0, 0, needle] = torch.ones(d) * 2
    v[0, 0, needle] = torch.full((d,), 5.0)
    h = hierarchy(n, m, 2, True)
    opened, lv, win = select(q[:, :, -1:], window_boxes(k, h), h, 1, 1 / math.sqrt(d), n - 1)
    assert opened[0, 0, 0, 0].item() == needle // m
    refined = fma(q, k, v, block_size=m, rank=2, refine=1)[0, 0, -1]
    plain = fma(q, k, v, block_size=m, rank=2)[0, 0, -1]
    assert (refined - 5).abs().max() < 0.05  # the needle's own value, nearly all the weight
    assert (plain - 5).abs().max() > 1.0


def test_low_precision_follows_float64(rng):
    q, k, v = qkv(rng, 1, 4, 2, 300, 16)
    o64 = fma(q, k, v, block_size=16, rank=2, refine=2)
    o32 = fma(q.float(), k.float(), v.float(), block_size=16, rank=2, refine=2)
    # float32 scores can swap near-tied windows; those queries differ, the rest agree to rounding.
    close = (o32.double() - o64).abs().amax(-1) < 1e-4
    assert close.float().mean() > 0.95


def test_cost_per_query_grows_with_log_n():
    for K in (2, 4, 8):
        small, large = (keys_per_query(hierarchy(n, 64, 2, True), K) for n in (16384, 1 << 20))
        assert small < large < 2 * small  # 64x the tokens, less than twice the keys


def test_bad_refine_is_refused(rng):
    q, k, v = qkv(rng, 1, 2, 2, 64, 8)
    with pytest.raises(ValueError, match="refine must be a count"):
        fma(q, k, v, block_size=8, refine=-1)
    with pytest.raises(ValueError, match="needs variant='nlogn'"):
        fma(q, k, v, block_size=8, refine=2, variant="linear")


def test_strided_inputs_as_a_layer_passes_them(rng):
    """Projections hand fma permuted views; the refined path reads them as they are."""
    B, n, H, Hkv, d = 2, 130, 4, 2, 8
    q, k, v = qkv(rng, B, H, Hkv, n, d)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not kt.is_contiguous()
    a = fma(q, k, v, block_size=8, rank=2, refine=2)
    b = fma(qt, kt, vt, block_size=8, rank=2, refine=2)
    assert (a - b).abs().max() < TOL64


@pytest.mark.parametrize("G", [1, 4])
def test_opened_tiles_group_pairs_by_block_and_invert(G):
    """Every tile row holds a pair whose block is the tile's; taking each pair's slot into the
    tiles and back is the identity, slots with no block come back 0; a query's pairs sum."""
    from fmtrain.attention.refine import OpenedTiles
    g = torch.Generator().manual_seed(7)
    B, Hkv, nq, K, n_blocks, c = 2, 3, 50, 4, 9, 5
    opened = torch.randint(-1, n_blocks, (B, Hkv, nq, K), generator=g)
    tiles = OpenedTiles(opened, n_blocks, G)
    heads = torch.arange(B * Hkv).repeat_interleave(nq * K).view(B, Hkv, nq, K)
    owner = torch.full((tiles.n_tiles * tiles.T,), -1)
    owner[tiles.row] = (opened + heads * n_blocks).reshape(-1)[tiles.query * K + tiles.slot]
    assert ((owner == -1) | (owner == tiles.block.repeat_interleave(tiles.T))).all()
    x = torch.randn(B, Hkv, nq, G, K * c, generator=g, dtype=torch.float64)
    back = tiles.to_pairs(tiles.of_pairs(x)).view(B, Hkv, nq, G, K, c)
    has = (opened >= 0).view(B, Hkv, nq, 1, K, 1)
    assert torch.equal(back, torch.where(has, x.view_as(back), 0.0))
    y = torch.randn(B, Hkv, nq, G, c, generator=g, dtype=torch.float64)
    summed = tiles.to_queries(tiles.of_queries(y))  # each query's row once per opened block
    assert torch.allclose(summed, y * has.sum(-2), rtol=1e-12, atol=0)
    one = torch.randperm(n_blocks, generator=g)[:K].expand(B, Hkv, 1, K)  # one query (decoding): distinct blocks
    assert OpenedTiles(one, n_blocks, G).T == 1  # tiles of one row, none padded


@pytest.mark.parametrize("by_sort", [False, True])
@pytest.mark.parametrize("G, nq, group", [(1, 50, 8), (3, 21, 4), (2, 1, 8)])
def test_summary_columns_equal_each_querys_own_slots(rng, by_sort, G, nq, group):
    """Through a group's columns, each query's scores, weighted sums and outer products are those
    of its own slots gathered one by one (float64); slots that do not exist read nothing and write
    nothing; both ways of finding the columns agree. A query's slots are distinct rows (as a
    partition's summaries are), padding groups included (nq not a multiple of the group)."""
    from fmtrain.attention.refine import SummaryColumns
    B, Hkv, S, R, d = 2, 3, 6, 40, 5
    rows = torch.stack([torch.randperm(R, generator=rng)[:S] for _ in range(B * Hkv * nq)]).view(B, Hkv, nq, S)
    ok = torch.rand(B, Hkv, nq, S, generator=rng) < 0.8
    rows = torch.where(ok, rows, 0)  # a slot that does not exist may name any row, as clamped slots do
    table, x, w = randn(rng, B, Hkv, R, d), randn(rng, B, Hkv, nq, G, d), randn(rng, B, Hkv, nq, G, S)
    w = torch.where(ok.unsqueeze(-2), w, 0.0)  # what the far field spreads: 0 where no slot
    cols = SummaryColumns(rows, ok, R, group, by_sort=by_sort)
    mine = table[torch.arange(B).view(B, 1, 1, 1), torch.arange(Hkv).view(1, Hkv, 1, 1), rows]  # (B, Hkv, nq, S, d)
    scores = cols.scores(x, cols.table(table))
    assert torch.allclose(torch.where(ok.unsqueeze(-2), scores, 0.0),
                          torch.where(ok.unsqueeze(-2), x @ mine.transpose(-1, -2), 0.0), rtol=0, atol=TOL64)
    from fmtrain.attention.torch_core import Scratch
    spread = cols.spread(w, Scratch(), "w")
    assert torch.allclose(cols.weighted_sum(spread, cols.table(table)), w @ mine, rtol=0, atol=TOL64)
    got, want = torch.zeros_like(table), torch.zeros_like(table)
    cols.add_outer(got, spread, x)
    for b in range(B):
        for hh in range(Hkv):
            want[b, hh].index_add_(0, rows[b, hh].reshape(-1), (w[b, hh].transpose(-1, -2) @ x[b, hh]).reshape(-1, d))
    assert torch.allclose(got, want, rtol=0, atol=TOL64)
    assert cols.U <= min(group, nq) * S + 1  # at most every slot of a group, and the spare


# --------------------------------------------------------------------------- a flat top level
# ``max_level`` below the sequence's levels with ``flat_top``: the top kept level's lists hold every
# window of it outside the near field, so the capped hierarchy still partitions the sequence.
FLAT_CASES = [  # n, m, p, H, Hkv, max_level (each cuts at least one level)
    (200, 8, 2, 2, 2, 2),
    (257, 8, 4, 4, 2, 1),   # partial last block, GQA, the top level is level 1
    (300, 4, 2, 3, 1, 3),   # multi-query
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("refine", [1, 3])
@pytest.mark.parametrize("n,m,p,H,Hkv,max_level", FLAT_CASES)
def test_flat_top_blocked_matches_dense_float64(rng, n, m, p, H, Hkv, max_level, refine, causal):
    assert hierarchy(n, m, p, causal).n_levels > max_level
    q, k, v = qkv(rng, 1, H, Hkv, n, 16)
    kw = dict(block_size=m, rank=p, causal=causal, refine=refine, max_level=max_level)
    o = _compare(rng, q, k, v, flat_top=True, **kw)
    dropped = fma(q, k, v, **kw)  # the same cap, reach dropped
    assert (o - dropped).abs().max() > 1e-3  # the flat top saw what the cap drops: not vacuous


@pytest.mark.parametrize("causal", [True, False])
def test_flat_top_opening_every_block_is_exact_softmax_attention(rng, causal):
    """Every key counted once, itself or in one summary: opening every block leaves none to a
    summary, so the capped hierarchy with a flat top is softmax attention, gradients included."""
    _assert_softmax_attention(rng, 150, 4, 2, causal, block_size=8, rank=2, refine=-(-150 // 8), max_level=1,
                              flat_top=True)


def test_flat_top_nothing_after_a_query_changes_it(rng):
    n, m, i = 300, 8, 211
    q, k, v = qkv(rng, 1, 4, 2, n, 8)
    kw = dict(block_size=m, rank=2, causal=True, refine=2, impl="torch", max_level=2, flat_top=True)
    out = fma(q, k, v, **kw)
    short = fma(q[:, :, :i + 1], k[:, :, :i + 1], v[:, :, :i + 1], **kw)  # fewer levels and windows
    assert (out[:, :, :i + 1] - short).abs().max() < TOL64
    gq, gk, gv = torch.autograd.grad(out[:, :, :i + 1].sum(), (q, k, v))
    for name, gr in (("q", gq), ("k", gk), ("v", gv)):
        assert gr[:, :, i + 1:].abs().max() == 0, f"d{name} reaches past the query"


def test_flat_top_cutting_nothing_changes_nothing(rng):
    q, k, v = qkv(rng, 1, 2, 2, 100, 8)
    kw = dict(block_size=8, rank=2, refine=2)
    levels = hierarchy(100, 8, 2, True).n_levels
    a = fma(q, k, v, **kw)
    assert torch.equal(a, fma(q, k, v, max_level=levels, flat_top=True, **kw))


def test_flat_top_opens_a_needle_beyond_the_capped_reach(rng):
    """Capped at level 1 (reach 2 blocks back), a key far back is dropped; the flat top lists it,
    and refinement opens it and reads its value."""
    n, m, d = 512, 16, 16
    q, k, v = randn(rng, 1, 1, n, d) * 0.1, randn(rng, 1, 1, n, d) * 0.1, randn(rng, 1, 1, n, d)
    needle = 37
    q[0, 0, -1] = k[0, 0, needle] = torch.ones(d) * 2
    v[0, 0, needle] = torch.full((d,), 5.0)
    kw = dict(block_size=m, rank=2, refine=1, max_level=1)
    flat = fma(q, k, v, flat_top=True, **kw)[0, 0, -1]
    dropped = fma(q, k, v, **kw)[0, 0, -1]
    assert (flat - 5).abs().max() < 0.05
    assert (dropped - 5).abs().max() > 1.0


def test_flat_top_lists_every_earlier_window_of_the_top_level():
    h = truncate(hierarchy(64 * 8, 8, 2, True), 2, flat_top=True)  # 64 blocks, level 2: 32 windows
    rows = h.window_lists(2)
    assert rows.shape == (32, 30)
    for c in (0, 1, 2, 9, 31):
        assert [w for w in rows[c].tolist() if w >= 0] == list(range(c - 1))
    hb = truncate(hierarchy(64 * 8, 8, 2, False), 2, flat_top=True)
    assert [w for w in hb.window_lists(2)[9].tolist() if w >= 0] == [w for w in range(32) if abs(w - 9) > 1]
    assert h.window_lists(1).shape[1] == 2  # the levels below keep their lists
    assert truncate(hierarchy(64 * 8, 8, 2, True), 9, flat_top=True) == hierarchy(64 * 8, 8, 2, True)


def test_flat_top_without_refinement_is_refused(rng):
    q, k, v = qkv(rng, 1, 2, 2, 64, 8)
    with pytest.raises(ValueError, match="flat_top=True needs refine > 0"):
        fma(q, k, v, block_size=8, max_level=1, flat_top=True)


# --------------------------------------------------------------------------- selection within a reach
def _perturbed_m2m(rng):
    """Learned (m2m) summaries for 2 key/value heads of 16, block 8, rank 2, moved off averaging."""
    summ = build_summaries("m2m", n_kv_heads=2, head_dim=16, block_size=8, rank=2).double()
    with torch.no_grad():
        for t in summ.parameters():
            t.add_(torch.randn(t.shape, generator=rng, dtype=t.dtype) * 0.3)
    return summ


def _reach(distance, d, theta=100.0):
    return SelectionReach(distance, inverse_frequencies(d, theta))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m,p,H,Hkv,distance", [(200, 8, 2, 2, 2, 30), (257, 8, 4, 4, 2, 70), (300, 4, 2, 3, 1, 17)])
def test_select_reach_blocked_matches_dense_float64(rng, n, m, p, H, Hkv, distance, causal):
    """The vectorised selection and the per-query reference rotate the same summaries by the same
    distances; the outputs and gradients agree, and differ from the unclamped selection's."""
    q, k, v = qkv(rng, 1, H, Hkv, n, 16)
    kw = dict(block_size=m, rank=p, causal=causal, refine=2)
    o = _compare(rng, q, k, v, select_reach=_reach(distance, 16), **kw)
    assert (o - fma(q, k, v, **kw)).abs().max() > 1e-3  # some selection changed: not vacuous


def test_select_reach_beyond_the_sequence_changes_nothing_and_composes(rng):
    q, k, v = qkv(rng, 1, 4, 2, 300, 16)
    kw = dict(block_size=8, rank=2, refine=2)
    assert torch.equal(fma(q, k, v, **kw), fma(q, k, v, select_reach=_reach(300, 16), **kw))
    # with packed documents, a flat top, and learned summaries: against the reference per document
    summ = _perturbed_m2m(rng)
    _compare(rng, q, k, v, block_size=8, rank=2, refine=3, max_level=2, flat_top=True, summaries=summ,
             select_reach=_reach(40, 16))


def test_select_reach_nothing_after_a_query_changes_it(rng):
    n, i = 300, 211
    q, k, v = qkv(rng, 1, 4, 2, n, 8)
    kw = dict(block_size=8, rank=2, causal=True, refine=2, impl="torch", select_reach=_reach(30, 8))
    out = fma(q, k, v, **kw)
    short = fma(q[:, :, :i + 1], k[:, :, :i + 1], v[:, :, :i + 1], **kw)
    assert (out[:, :, :i + 1] - short).abs().max() < TOL64


def test_select_reach_scores_far_windows_at_the_reach():
    """A far window's selection score is its box's bound for the query turned back by RoPE as far
    as the window's centre lies beyond the reach: the bound on its keys' scores as if they lay that
    many positions later."""
    from fmtrain.attention.refine import _box_query, _tables, _window_scores
    from fmtrain.attention.rope import apply_rope, rope_angles, rotate

    n, m, d, theta = 512, 16, 16, 100.0
    g = torch.Generator().manual_seed(5)
    k = apply_rope(torch.randn(1, 1, n, d, generator=g, dtype=torch.float64), *rope_angles(torch.arange(n), d, theta))
    q = apply_rope(torch.randn(1, 1, n, d, generator=g, dtype=torch.float64), *rope_angles(torch.arange(n), d, theta))
    h = hierarchy(n, m, 2, True)  # 4 levels; level 4's window 0 holds tokens 0..127, centred at 64
    boxes = window_boxes(k, h)
    reach = 215  # the query at 511 lies 447 from it: 232 beyond
    tabs, qg = _tables(h, "cpu"), q[:, :, -1:].unsqueeze(3)  # (B, Hkv, nq, G, d)
    lv, win, pos = torch.tensor([[[[4]]]]), torch.tensor([[[[0]]]]), torch.tensor([n - 1])
    at_reach = _reach(reach, d, theta)
    got = _window_scores(_box_query(qg, boxes, at_reach), h, tabs, lv, win, 1.0, at_reach, pos)
    turned = rotate(qg, torch.tensor(-232), inverse_frequencies(d, theta))
    assert (got - _window_scores(_box_query(turned, boxes, None), h, tabs, lv, win, 1.0)).abs().max() < 1e-12
    assert (got - _window_scores(_box_query(qg, boxes, None), h, tabs, lv, win, 1.0)).abs().max() > 1e-3
    # and it bounds the moved keys' scores: each key of the window, turned 232 positions later
    moved = rotate(k[0, 0, :128], torch.tensor(232), inverse_frequencies(d, theta))
    assert float((moved @ q[0, 0, -1]).max()) <= float(got) + 1e-12


# --------------------------------------------------------------------------- the far field's attention within a reach
def _attend(distance, d, theta=100.0):
    return SelectionReach(distance, inverse_frequencies(d, theta), attend=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,m,p,H,Hkv,distance", [(200, 8, 2, 2, 2, 30), (257, 8, 4, 4, 2, 70), (300, 4, 2, 3, 1, 17)])
def test_attend_reach_blocked_matches_dense_float64(rng, n, m, p, H, Hkv, distance, causal):
    """Opened blocks and summaries beyond the reach, turned per (query, block) and per (query,
    window): the blocked path's outputs and gradients equal the reference's (which turns every
    query once per window), and differ from the selection-only reach's."""
    q, k, v = qkv(rng, 1, H, Hkv, n, 16)
    kw = dict(block_size=m, rank=p, causal=causal, refine=2)
    o = _compare(rng, q, k, v, select_reach=_attend(distance, 16), **kw)
    assert (o - fma(q, k, v, select_reach=_reach(distance, 16), **kw)).abs().max() > 1e-3  # not vacuous


@pytest.mark.parametrize("causal", [True, False])
def test_attend_reach_opening_every_block_is_attention_with_distances_clamped_by_block(rng, causal):
    """Every block opened leaves no summary: the result is softmax attention in which a key of a
    block whose centre lies farther than the reach is scored as if moved that much closer (as
    ReRoPE clamps distances, by block here), its fine neighbours at their real positions. Written
    out key by key, apart from the reference."""
    from fmtrain.attention.rope import rotate

    n, m, H, d, D = 72, 8, 2, 8, 5  # D < m: the fine neighbours' centres lie beyond it, and stay unturned
    q, k, v = qkv(rng, 1, H, 1, n, d)
    inv = inverse_frequencies(d, 100.0)
    o = fma(q, k, v, block_size=m, rank=2, causal=causal, refine=n // m, impl="torch",
            select_reach=SelectionReach(D, inv, attend=True))
    s = torch.full((H, n, n), -math.inf, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1 if causal else n):
            dist = i - (j // m * m + m // 2)
            beyond = 0 if abs(i // m - j // m) <= 1 else dist - max(-D, min(D, dist))
            s[:, i, j] = q[0, :, i] @ rotate(k[0, 0, j], torch.tensor(beyond), inv) / math.sqrt(d)
    ref = torch.softmax(s, -1) @ v[0, 0]
    assert (o[0] - ref).abs().max() < TOL64
    assert (o - fma(q, k, v, block_size=m, rank=2, causal=causal, refine=n // m)).abs().max() > 1e-3


def test_attend_reach_beyond_the_sequence_changes_nothing_and_composes(rng):
    """Within the reach every turn is by 0: bitwise the plain result. With packed documents, a flat
    top and learned summaries, each document as the reference reads it alone."""
    q, k, v = qkv(rng, 1, 4, 2, 300, 16)
    kw = dict(block_size=8, rank=2, refine=2)
    assert torch.equal(fma(q, k, v, **kw), fma(q, k, v, select_reach=_attend(300, 16), **kw))
    summ = _perturbed_m2m(rng)
    flat = dict(block_size=8, rank=2, refine=3, max_level=2, flat_top=True, summaries=summ)
    _compare(rng, q, k, v, select_reach=_attend(40, 16), **flat)
    docs = [0, 70, 230, 300]  # a document ending mid-block, one of 160 tokens spanning several windows
    _compare(rng, q, k, v, select_reach=_attend(40, 16), cu_seqlens=docs, **flat)


def test_attend_reach_nothing_after_a_query_changes_it(rng):
    n, i = 300, 211
    q, k, v = qkv(rng, 1, 4, 2, n, 8)
    kw = dict(block_size=8, rank=2, causal=True, refine=2, impl="torch", select_reach=_attend(30, 8))
    out = fma(q, k, v, **kw)
    short = fma(q[:, :, :i + 1], k[:, :, :i + 1], v[:, :, :i + 1], **kw)
    assert (out[:, :, :i + 1] - short).abs().max() < TOL64


# --------------------------------------------------------------------------- selection keys: window boxes
def _brute_boxes(k, n, m, levels):
    """{(level, window): (hi, lo)} of a single sequence's keys k (Hkv, n, d), window by window."""
    out = {}
    for l in range(1, levels + 1):
        w = m << (l - 1)
        for c in range(-(-n // w)):
            keys = k[:, c * w:min((c + 1) * w, n)]
            out[l, c] = keys.amax(1), keys.amin(1)
    return out


@pytest.mark.parametrize("n,m", [(64, 8), (93, 8), (130, 4)])
def test_window_boxes_are_each_windows_tight_channel_range(rng, n, m):
    """Every window's box spans exactly its keys' range in every channel (padding and the tokens
    of other windows excluded): ``centre +- radius`` equals the brute-force max and min."""
    k = randn(rng, 2, 3, n, 8)
    h = hierarchy(n, m, 2, True)
    boxes = window_boxes(k, h)
    assert boxes.centre.shape == (2, 3, sum(h.windows), 8)
    for b in range(2):
        for (l, c), (hi, lo) in _brute_boxes(k[b], n, m, h.n_levels).items():
            row = sum(h.windows[:l - 1]) + c
            assert (boxes.centre[b, :, row] + boxes.radius[b, :, row] - hi).abs().max() < 1e-15
            assert (boxes.centre[b, :, row] - boxes.radius[b, :, row] - lo).abs().max() < 1e-15


def test_window_boxes_of_packed_documents_hold_their_own_documents_keys_only(rng):
    """In the block-aligned layout of packed documents, each document's windows bound its own keys,
    as its own hierarchy's would alone."""
    from fmtrain.attention.documents import as_documents, doc_hierarchy, to_layout

    n, m = 120, 8
    cu = torch.tensor([0, 37, 40, 120, 200, 240])  # two rows of 120: documents of 37, 3, 80 | 80, 40
    k = randn(rng, 2, 2, n, 8)
    docs = as_documents(cu, 2, n)
    dh = doc_hierarchy(docs, m, 2, True, None)
    boxes = window_boxes(to_layout(k, dh), dh)
    flat = k.transpose(1, 2).reshape(2 * n, 2, 8)
    for s, L, part, wins in zip(docs.starts, docs.lengths, dh.parts, dh.first_window):
        for (l, c), (hi, lo) in _brute_boxes(flat[s:s + L].transpose(0, 1), L, m, part.n_levels).items():
            row = sum(dh.windows[:l - 1]) + wins[l - 1] + c
            assert (boxes.centre[0, :, row] + boxes.radius[0, :, row] - hi).abs().max() < 1e-15
            assert (boxes.centre[0, :, row] - boxes.radius[0, :, row] - lo).abs().max() < 1e-15


def test_a_matching_key_is_opened_where_its_windows_summaries_score_lowest(rng):
    """One key matches the query, in a block whose other keys point away from it: the block's
    mean (its summary) scores lowest of all, its box's bound highest. The selection opens it at
    every level of the descent and the output reads the key's value."""
    n, m, d = 512, 16, 16
    q, k, v = randn(rng, 1, 1, n, d) * 0.1, randn(rng, 1, 1, n, d) * 0.1, randn(rng, 1, 1, n, d)
    needle = 37  # block 2, 474 tokens before the last query
    k[0, 0, 32:48] -= 0.5  # its block: away from the query, but for the needle
    q[0, 0, -1] = k[0, 0, needle] = torch.ones(d) * 2
    v[0, 0, needle] = torch.full((d,), 5.0)
    h = hierarchy(n, m, 2, True)
    ks, _ = MEAN(k, v, h)
    level1 = ks[0, 0, :2 * h.windows[0]].view(-1, 2, d) @ q[0, 0, -1]  # (blocks, p)
    assert level1.amax(-1)[:n // m - 2].argmin() == needle // m  # the summaries would rank it last
    opened, _, _ = select(q[:, :, -1:], window_boxes(k, h), h, 1, 1 / math.sqrt(d), n - 1)
    assert opened[0, 0, 0, 0].item() == needle // m
    assert (fma(q, k, v, block_size=m, rank=2, refine=1)[0, 0, -1] - 5).abs().max() < 0.05


def test_select_reach_is_refused_without_refinement_and_checked(rng):
    q, k, v = qkv(rng, 1, 2, 2, 64, 8)
    with pytest.raises(ValueError, match="select_reach needs refine > 0"):
        fma(q, k, v, block_size=8, select_reach=_reach(10, 8))
    with pytest.raises(ValueError, match="inv_freq of head_dim/2 = 4 frequencies"):
        fma(q, k, v, block_size=8, refine=1, select_reach=_reach(10, 16))
