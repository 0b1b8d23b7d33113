"""The decoding caches against the full forward, float64.

A causal output must not depend on the tokens after it (prefix consistency); the
multipole cache's outputs then equal the full forward's at every decoded position.
Tolerance 1e-10 in float64: the cache computes the same sums in another order
(a single softmax per token instead of base-2 chunks and merged partials), so
differences are rounding, ~1e-15 here; float32 to 1e-5 (rounding of 2m + p*L
scores and values, ~1e-7, with margin for the accumulation order).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fmtrain.attention import fma
from fmtrain.attention.cache import KVCache, MultipoleCache, RefinedCache
from fmtrain.attention.hierarchy import num_levels
from fmtrain.attention.summaries import SUMMARY_KINDS, build_summaries

SEED = 1234


def _inputs(n, B=2, H=4, Hkv=2, d=8, dtype=torch.float64, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, d, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, n, d, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, n, d, generator=g, dtype=dtype)
    return q, k, v


def _summaries(kind, m, p, Hkv=2, d=8, max_seq_len=4096, seed=SEED):
    """Summaries with non-trivial learned maps (their init is the mean)."""
    s = build_summaries(kind, n_kv_heads=Hkv, head_dim=d, block_size=m, rank=p, max_seq_len=max_seq_len).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in s.parameters():
            prm.add_(0.2 * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    return s


@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("kind", SUMMARY_KINDS)
def test_prefix_consistency(kind, variant):
    """fma's causal output at t is the same whatever follows t (the cache relies on it)."""
    m, p, n = 4, 2, 160
    q, k, v = _inputs(n)
    s = _summaries(kind, m, p)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, variant=variant, summaries=s, impl="torch")
        for t in (1, 3, 4, 5, 8, 9, 16, 17, 31, 33, 64, 65, 100, 127, 128, 129, 159):
            part = fma(q[:, :, :t], k[:, :, :t], v[:, :, :t], block_size=m, rank=p, variant=variant,
                       summaries=s, impl="dense")
            torch.testing.assert_close(part, full[:, :, :t], rtol=0, atol=1e-12,
                                       msg=lambda e: f"t={t}, seed {SEED}: {e}")


def _decode_all(cache, q, k, v, n0):
    outs = []
    for t in range(n0, q.shape[2]):
        outs.append(cache.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
    return torch.cat(outs, dim=2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("kind", SUMMARY_KINDS)
def test_cache_equals_forward_across_many_levels(kind, variant):
    """Block 2, rank 2, 1050 tokens (9 coarse levels), prompts on and off block and window
    boundaries, GQA: every decoded output equals the full forward's."""
    m, p, n = 2, 2, 1050
    assert num_levels(n, m) == 9
    q, k, v = _inputs(n, B=1)
    s = _summaries(kind, m, p)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, variant=variant, summaries=s, impl="torch")
        for n0 in (1, 32, 101):
            cache = MultipoleCache(s, block_size=m, rank=p, variant=variant).prefill(
                q[:, :, :n0], k[:, :, :n0], v[:, :, :n0])
            got = _decode_all(cache, q, k, v, n0)
            torch.testing.assert_close(got, full[:, :, n0:], rtol=0, atol=1e-10,
                                       msg=lambda e: f"prompt {n0}, seed {SEED}: {e}")


@pytest.mark.parametrize("variant,kind,max_level,weighted",
                         [(v, k, ml, w) for v, k, ml, w in itertools.product(
                             ("nlogn", "linear"), SUMMARY_KINDS, (None, 0, 2), (True, False))
                          if w or ml is None])
def test_cache_equals_forward(variant, kind, max_level, weighted):
    """Short sequences, prompts inside, at the end of and just past the first blocks and level-2
    windows (blocks of 4, windows of 8) up to 3 blocks, truncated hierarchies and the unweighted
    scores too."""
    m, p, n = 4, 2, 150
    q, k, v = _inputs(n)
    s = _summaries(kind, m, p)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, variant=variant, summaries=s, impl="torch",
                   max_level=max_level, weighted=weighted)
        for n0 in (1, 3, 4, 5, 8, 9, 3 * m):
            cache = MultipoleCache(s, block_size=m, rank=p, variant=variant, max_level=max_level,
                                   weighted=weighted).prefill(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0])
            torch.testing.assert_close(_decode_all(cache, q, k, v, n0), full[:, :, n0:], rtol=0, atol=1e-10,
                                       msg=lambda e: f"prompt {n0}, seed {SEED}: {e}")


def test_cache_float32_and_memory():
    """float32 within 1e-5 of the forward; the cache's bytes grow with log n, not n."""
    m, p, n = 8, 2, 1100
    q, k, v = _inputs(n, dtype=torch.float32)
    s = build_summaries("m2m", n_kv_heads=2, head_dim=8, block_size=m, rank=p)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, summaries=s, impl="torch")
        cache = MultipoleCache(s, block_size=m, rank=p).prefill(q[:, :, :40], k[:, :, :40], v[:, :, :40])
        small = cache.nbytes()
        torch.testing.assert_close(_decode_all(cache, q, k, v, 40), full[:, :, 40:], rtol=0, atol=1e-5)
    # Fine keys and values of 2 blocks, per level 3 complete windows of p summaries (keys and
    # values) and the current block's 2p coarse slots (keys, values, bias): O((m + p L) d).
    L, B, Hkv, d = num_levels(n, m), 2, 2, 8
    bound = B * Hkv * d * 4 * (2 * 2 * m + L * (3 * 2 * p + 2 * 2 * p)) + 4 * 2 * p * L
    assert small < cache.nbytes() <= bound
    assert cache.nbytes() < 0.1 * (2 * B * Hkv * n * d * 4)  # a key/value cache of n tokens


def test_kv_cache_equals_full_attention():
    q, k, v = _inputs(70)
    full = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True)
    cache = KVCache(reserve=8).prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5])  # grows several times
    torch.testing.assert_close(_decode_all(cache, q, k, v, 5), full[:, :, 5:], rtol=0, atol=1e-12)
    assert cache.nbytes() == 2 * 2 * 2 * 70 * 8 * 8


def test_conv_beyond_its_length_is_refused():
    m, p = 4, 2
    s = _summaries("conv", m, p, max_seq_len=64)
    q, k, v = _inputs(80)
    cache = MultipoleCache(s, block_size=m, rank=p).prefill(q[:, :, :60], k[:, :, :60], v[:, :, :60])
    with pytest.raises(ValueError, match="conv summaries were built for sequences up to 64 tokens"):
        _decode_all(cache, q, k, v, 60)


@pytest.mark.parametrize("variant", ["nlogn", "linear"])
@pytest.mark.parametrize("kind", ["m2m", "conv"])
def test_cache_with_level_offsets_equals_forward(variant, kind):
    """Learned per-head level offsets (random here) enter the cached coarse scores as in the forward."""
    m, p, n = 4, 2, 300
    q, k, v = _inputs(n)
    s = _summaries(kind, m, p)
    offset = torch.randn(4, 32, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, variant=variant, summaries=s, impl="torch", level_offset=offset)
        for n0 in (1, 5, 37, 128):
            cache = MultipoleCache(s, block_size=m, rank=p, variant=variant, level_offset=offset).prefill(
                q[:, :, :n0], k[:, :, :n0], v[:, :, :n0])
            torch.testing.assert_close(_decode_all(cache, q, k, v, n0), full[:, :, n0:], rtol=0, atol=1e-10,
                                       msg=lambda e: f"prompt {n0}, seed {SEED}: {e}")


# --------------------------------------------------------------------------- adaptive refinement
def _refined(s, m, p, K, **kw):
    return RefinedCache(s, refine=K, block_size=m, rank=p, **kw)


@pytest.mark.parametrize("kind,K,weighted,max_level",
                         [(kind, K, True, None) for kind in SUMMARY_KINDS for K in (1, 3)]
                         + [("m2m", 2, False, None), ("mean", 2, True, 2), ("conv", 2, False, 3),
                            ("m2m", 2, True, "2f"), ("mean", 3, True, "1f")])
def test_refined_cache_equals_forward(kind, K, weighted, max_level):
    """Each token's selection and far field as in the full forward with ``refine=K``: prompts
    from one token to several blocks, on and off block and window boundaries (every one of them
    for m2m with K=3, three for the other cases: each prompt decodes the rest of the sequence
    token by token), GQA; capped levels, with a flat top ("2f": max_level 2, flat_top) whose
    lists grow as the store does."""
    m, p, n = 4, 2, 150
    q, k, v = _inputs(n)
    s = _summaries(kind, m, p)
    flat = isinstance(max_level, str)
    max_level = int(max_level[0]) if flat else max_level
    prompts = (1, 3, 4, 9, 16, 17, 33, 64, 100) if (kind, K, max_level) == ("m2m", 3, None) else (1, 17, 64)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, summaries=s, impl="torch", refine=K, weighted=weighted,
                   max_level=max_level, flat_top=flat)
        for n0 in prompts:
            cache = _refined(s, m, p, K, weighted=weighted, max_level=max_level, flat_top=flat).prefill(
                q[:, :, :n0], k[:, :, :n0], v[:, :, :n0])
            torch.testing.assert_close(_decode_all(cache, q, k, v, n0), full[:, :, n0:], rtol=0, atol=1e-10,
                                       msg=lambda e: f"prompt {n0}, seed {SEED}: {e}")


@pytest.mark.parametrize("attend", [False, True], ids=["selection", "attention"])
def test_refined_cache_with_a_select_reach_equals_forward(attend):
    """Selection clamped at a reach (and with a flat top past a cap), and with ``attend`` the far
    field's attention too: each token's rotated summaries, choices and turned blocks as in the
    full forward."""
    from fmtrain.attention.refine import SelectionReach
    from fmtrain.attention.rope import inverse_frequencies

    m, p, n = 4, 2, 200
    q, k, v = _inputs(n)
    s = _summaries("m2m", m, p)
    reach = SelectionReach(25, inverse_frequencies(8, 100.0), attend)
    for cap in ({}, dict(max_level=2, flat_top=True)):
        with torch.no_grad():
            full = fma(q, k, v, block_size=m, rank=p, summaries=s, impl="torch", refine=2, select_reach=reach, **cap)
            assert (full - fma(q, k, v, block_size=m, rank=p, summaries=s, impl="torch", refine=2,
                               **cap)).abs().max() > 1e-3  # the reach changed some selection
            for n0 in (1, 128):
                cache = _refined(s, m, p, 2, select_reach=reach, **cap).prefill(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0])
                torch.testing.assert_close(_decode_all(cache, q, k, v, n0), full[:, :, n0:], rtol=0, atol=1e-10,
                                           msg=lambda e: f"prompt {n0}, {cap}, seed {SEED}: {e}")


@pytest.mark.parametrize("kind", ["m2m", "conv"])
def test_refined_cache_with_level_offsets_equals_forward(kind):
    """Offsets with exactly the sequence's levels: the cache's layout has more (levels no query
    sees yet), which take offset 0 and change nothing."""
    m, p, n = 4, 2, 300
    q, k, v = _inputs(n)
    s = _summaries(kind, m, p)
    offset = torch.randn(4, num_levels(n, m), generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, summaries=s, impl="torch", level_offset=offset, refine=2)
        for n0 in (1, 128):
            cache = _refined(s, m, p, 2, level_offset=offset).prefill(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0])
            torch.testing.assert_close(_decode_all(cache, q, k, v, n0), full[:, :, n0:], rtol=0, atol=1e-10,
                                       msg=lambda e: f"prompt {n0}, seed {SEED}: {e}")


def test_refined_cache_opening_every_block_is_softmax_attention():
    """``refine`` at least the number of blocks: every token attends to its whole prefix exactly."""
    m, p, n = 4, 2, 90
    q, k, v = _inputs(n)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), is_causal=True)
    with torch.no_grad():
        cache = _refined(build_summaries("m2m", n_kv_heads=2, head_dim=8, block_size=m, rank=p).double(),
                         m, p, n // m + 1).prefill(q[:, :, :3], k[:, :, :3], v[:, :, :3])
        torch.testing.assert_close(_decode_all(cache, q, k, v, 3), exact[:, :, 3:], rtol=0, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", SUMMARY_KINDS)
def test_refined_cache_across_many_levels_and_growths(kind):
    """1050 tokens in blocks of 2 from a 5-token prompt: 9 coarse levels, the stores' layout
    doubled 8 times; the fine store explicitly on the host (``store_device``)."""
    m, p, n = 2, 2, 1050
    q, k, v = _inputs(n, B=1)
    s = _summaries(kind, m, p)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, summaries=s, impl="torch", refine=3)
        cache = _refined(s, m, p, 3, store_device="cpu").prefill(q[:, :, :5], k[:, :, :5], v[:, :, :5])
        torch.testing.assert_close(_decode_all(cache, q, k, v, 5), full[:, :, 5:], rtol=0, atol=1e-10,
                                   msg=lambda e: f"seed {SEED}: {e}")
    assert cache.k_store.device.type == "cpu" and cache.layout.n >= n


def test_refined_cache_float32_and_memory():
    """float32 within 1e-5 of the forward. The store holds every token's key and value (room
    for at most half as many again) and every window's summaries and key box (about 2(p + 1)/m
    rows a token, laid out for at most twice the tokens); the hot state stays the plain cache's
    size, O((m + p L) d)."""
    m, p, n, B, Hkv, d = 8, 2, 1100, 2, 2, 8
    q, k, v = _inputs(n, dtype=torch.float32)
    s = build_summaries("m2m", n_kv_heads=Hkv, head_dim=d, block_size=m, rank=p)
    with torch.no_grad():
        full = fma(q, k, v, block_size=m, rank=p, summaries=s, impl="torch", refine=2)
        cache = _refined(s, m, p, 2).prefill(q[:, :, :40], k[:, :, :40], v[:, :, :40])
        torch.testing.assert_close(_decode_all(cache, q, k, v, 40), full[:, :, 40:], rtol=0, atol=1e-5)
    assert n <= cache.k_store.shape[2] <= 1.5 * n + m
    assert cache.ks.shape[2] <= 2 * p * (2 * n + 2 * m) // m + 4 * p
    row_bytes = B * Hkv * d * 4
    assert cache.boxes.centre.shape[2] == cache.ks.shape[2] // p  # a box per window
    assert cache.cold_nbytes() == 2 * row_bytes * (cache.k_store.shape[2] + cache.ks.shape[2] + cache.boxes.centre.shape[2])
    hot = cache.nbytes() - cache.cold_nbytes()
    L = num_levels(n, m)
    assert hot <= 2 * row_bytes * (2 * m + 3 * p * L) + 4 * 2 * m  # fine slots and bias, 3 windows a level
