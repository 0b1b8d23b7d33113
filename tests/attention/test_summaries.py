"""Summaries: mean against a direct definition, m2m/conv initialised to averaging equal mean."""
import pytest
import torch

from fmtrain.attention import fma
from fmtrain.attention.hierarchy import hierarchy
from fmtrain.attention.summaries import (ConvSummaries, M2MSummaries, MeanSummaries, build_summaries,
                                         window_means)

from .conftest import randn


def direct_means(x, h):
    """Mean of the real tokens of every sub-window, level by level, straight from the definition."""
    out = []
    for l in range(1, h.n_levels + 1):
        w, sub = h.window_size(l), h.window_size(l) // h.rank
        for c in range(h.windows[l - 1]):
            for j in range(h.rank):
                lo, hi = c * w + j * sub, min(c * w + (j + 1) * sub, h.n)
                out.append(x[:, :, lo:hi].mean(2) if hi > lo else torch.zeros_like(x[:, :, 0]))
    return torch.stack(out, dim=2)


@pytest.mark.parametrize("n,m,p", [(64, 8, 2), (93, 8, 4), (517, 16, 2), (1000, 8, 1)])
def test_mean_summaries_are_sub_window_means(rng, n, m, p):
    x = randn(rng, 2, 3, n, 5)
    h = hierarchy(n, m, p, False)
    ks, vs = MeanSummaries()(x, x, h)
    assert ks.shape == (2, 3, h.num_summaries, 5)
    assert (ks - direct_means(x, h)).abs().max() < 1e-13


@pytest.mark.parametrize("n", [64, 93, 517])
def test_m2m_and_conv_at_initialisation_reproduce_mean(rng, n):
    m, p = 8, 2
    h = hierarchy(n, m, p, True)
    k, v = randn(rng, 1, 2, n, 4), randn(rng, 1, 2, n, 4)
    ref = MeanSummaries()(k, v, h)
    for s in (M2MSummaries(2, m, p).double(), ConvSummaries(4, m, p, max_seq_len=1024).double()):
        for a, b in zip(s(k, v, h), ref):
            assert (a - b).abs().max() < 1e-13, type(s).__name__


def test_m2m_parameters_do_not_depend_on_n_and_run_at_any_length(rng):
    s = M2MSummaries(2, 8, 2).double()
    with torch.no_grad():
        s.leaf.normal_(generator=rng)
    n_params = sum(p.numel() for p in s.parameters())
    assert n_params == 2 * 2 * (2 * 8 + 2 * 4)
    for n in (50, 700, 3000):
        q = randn(rng, 1, 2, n, 4)
        out = fma(q, q, q, block_size=8, summaries=s)
        assert out.shape == q.shape and torch.isfinite(out).all()


def test_conv_is_tied_to_its_length():
    s = ConvSummaries(4, 8, 2, max_seq_len=256)
    q = torch.randn(1, 1, 512, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        fma(q, q, q, block_size=8, summaries=s)
    assert fma(q[:, :, :200], q[:, :, :200], q[:, :, :200], block_size=8, summaries=s).shape == (1, 1, 200, 4)


def test_learned_summaries_are_linear_in_the_tokens(rng):
    """Sequence parallelism builds coarse levels from sums of partial summaries: needs linearity."""
    h = hierarchy(300, 8, 2, False)
    s = M2MSummaries(1, 8, 2).double()
    with torch.no_grad():
        s.leaf.normal_(generator=rng), s.up.normal_(generator=rng)
    a, b = randn(rng, 1, 1, 300, 3), randn(rng, 1, 1, 300, 3)
    ka, _ = s(a, a, h)
    kb, _ = s(b, b, h)
    kab, _ = s(2 * a + b, 2 * a + b, h)
    assert (kab - (2 * ka + kb)).abs().max() < 1e-12


def test_window_means_ignore_padding(rng):
    x = randn(rng, 1, 1, 70, 2)
    h = hierarchy(70, 8, 2, False)
    means = window_means(x, h)
    assert torch.allclose(means[0][0, 0, -1], x[0, 0, 64:70].mean(0))
    assert torch.allclose(means[1][0, 0, -1], x[0, 0, 64:70].mean(0))  # window of 16 holding 6 tokens


def test_build_summaries_errors():
    with pytest.raises(ValueError, match="unknown summary kind"):
        build_summaries("fft", n_kv_heads=1, head_dim=4, block_size=8, rank=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        build_summaries("conv", n_kv_heads=1, head_dim=4, block_size=8, rank=2)


def test_conv_parameter_count_grows_with_length():
    """The paper's scheme: about head_dim * p * n parameters per key and value at length n."""
    small = sum(p.numel() for p in ConvSummaries(64, 64, 2, 4096).parameters())
    big = sum(p.numel() for p in ConvSummaries(64, 64, 2, 131072).parameters())
    assert big > 30 * small
    assert 15e6 < big < 18e6  # the design page's "about 17M per layer" at n = 131072, d = 64, p = 2


def test_window_rotated_summaries_rotate_the_mean_of_unrotated_keys(rng):
    """Each key summary is the mean of the un-rotated keys behind it, rotated at their mean
    position; values are the plain means. Checked summary by summary against that formula."""
    from fmtrain.attention.rope import apply_rope, rope_angles
    from fmtrain.attention.summaries import WindowRotated, summary_positions

    n, m, p, d = 203, 8, 2, 8
    h = hierarchy(n, m, p, True)
    k, v = randn(rng, 1, 2, n, d), randn(rng, 1, 2, n, d)
    cos, sin = rope_angles(torch.arange(n), d)
    ks, vs = WindowRotated(MeanSummaries(), d, 10000.0, None)(apply_rope(k, cos, sin), v, h)
    _, vs_plain = MeanSummaries()(k, v, h)
    assert (vs - vs_plain).abs().max() < 1e-12
    pos = summary_positions(h)
    checked = 0
    for l in range(1, h.n_levels + 1):
        sub = h.window_size(l) // p
        for s, count in enumerate(h.summary_counts(l).flatten().tolist()):
            if count == 0:
                continue
            start = s * sub
            assert pos[h.offsets[l - 1] + s] == start + (count - 1) / 2
            c, sn = rope_angles(pos[h.offsets[l - 1] + s:h.offsets[l - 1] + s + 1], d)
            want = apply_rope(k[:, :, start:start + count].mean(dim=2, keepdim=True), c, sn)
            assert (ks[:, :, h.offsets[l - 1] + s] - want[:, :, 0]).abs().max() < 1e-12
            checked += 1
    assert checked == sum(int((h.summary_counts(l) > 0).sum()) for l in range(1, h.n_levels + 1))
    with pytest.raises(ValueError, match="whole sequences only"):
        WindowRotated(MeanSummaries(), d, 10000.0, None).leaves(k, p, 0)
