"""The hierarchy against the design page's definition, read independently here."""
import math

import pytest
import torch

from fmtrain.attention.hierarchy import block_tables, coarse_windows, hierarchy, num_levels, truncate
from fmtrain.attention.reference import interaction_mask


def design_list(c: int, causal: bool) -> set[int]:
    """Children of the parent's neighbours that are not c or its neighbours (the design page)."""
    P = c // 2
    kids = {2 * (P - 1), 2 * (P - 1) + 1, 2 * (P + 1), 2 * (P + 1) + 1}
    kids -= {c - 1, c, c + 1}
    return {w for w in kids if w < c} if causal else kids


@pytest.mark.parametrize("causal", [False, True])
def test_coarse_windows_match_the_design(causal):
    for c in range(0, 64):
        assert set(coarse_windows(c, causal)) == design_list(c, causal), c


@pytest.mark.parametrize("j", range(1, 8))
def test_levels_stop_at_quarter_length_for_powers_of_two(j):
    m = 16
    n = m * 2 ** j
    h = hierarchy(n, m, 2, False)
    assert h.n_levels == j - 1
    if h.n_levels:
        assert h.window_size(h.n_levels) == n // 4


def covered_tokens(h, masks, i):
    """Multiset of key positions query i sees: its fine keys and the tokens behind its summaries."""
    fine, coarse = masks
    seen = fine[i].nonzero().flatten().tolist()
    for s in (~coarse[i].isinf()).nonzero().flatten().tolist():
        l = max(l for l in range(1, h.n_levels + 1) if h.offsets[l - 1] <= s)
        r = s - h.offsets[l - 1]
        c, j = divmod(r, h.rank)
        w = h.window_size(l)
        lo = c * w + j * (w // h.rank)
        seen += list(range(lo, min(lo + w // h.rank, h.n)))
    return seen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,m,p", [(1, 4, 2), (9, 4, 2), (64, 4, 2), (100, 4, 1), (203, 8, 4), (256, 8, 2), (130, 4, 4)])
def test_interaction_lists_partition_the_keys(n, m, p, causal):
    h = hierarchy(n, m, p, causal)
    masks = interaction_mask(h)
    for i in range(n):
        seen = sorted(covered_tokens(h, masks, i))
        expect = list(range(i + 1)) if causal else list(range(n))
        assert seen == expect, f"query {i}: keys missing or repeated"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [5, 64, 100, 333])
def test_block_tables_agree_with_the_per_query_lists(n, causal, weighted):
    h = hierarchy(n, 8, 2, causal)
    t = block_tables(h, weighted)
    _, coarse = interaction_mask(h)
    for a in range(h.n_blocks):
        want = {s: (v if weighted else 0.0) for s, v in enumerate(coarse[a * h.block_size].tolist()) if not math.isinf(v)}
        got = {int(s): float(b) for s, b in zip(t.index[a], t.bias[a]) if not math.isinf(b)}
        assert got == pytest.approx(want)
        assert all(int(s) == h.num_summaries for s, b in zip(t.index[a], t.bias[a]) if math.isinf(b))


def test_summary_log_weights_count_only_real_tokens():
    h = hierarchy(70, 8, 2, False)  # last fine block holds 6 of 8 tokens
    assert h.summary_counts(1)[-1].tolist() == [4, 2]
    assert h.summary_counts(2)[-1].tolist() == [6, 0]  # window of 16 tokens with 6 real


def test_truncate_keeps_only_the_fine_level():
    h = truncate(hierarchy(1000, 16, 2, True), 0)
    assert h.n_levels == 0 and h.num_summaries == 0


@pytest.mark.parametrize("bad", [(0, 64, 2), (10, 64, 3), (10, 0, 1)])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError, match="block_size|n="):
        hierarchy(*bad, True)


def test_num_levels_small_sequences():
    assert num_levels(1, 64) == 0
    assert num_levels(128, 64) == 0
    assert num_levels(129, 64) == 1
    assert num_levels(256, 64) == 1
    assert num_levels(257, 64) == 2


def test_extend_keeps_the_layout_and_adds_levels_no_query_sees():
    """The decoding cache's layout: levels above the sequence's own hold complete windows in no
    interaction list yet; the levels below keep their windows and offsets."""
    from fmtrain.attention.hierarchy import extend, hierarchy

    h = hierarchy(1024, 8, 2, True)  # 128 blocks, 6 levels
    e = extend(h, h.n_levels + 2)
    assert e.n_levels == 8 and e.windows[:6] == h.windows and e.offsets[:6] == h.offsets
    assert e.windows[6:] == (2, 1) and e.num_summaries == h.num_summaries + 3 * 2
    assert e.offsets[7] == e.offsets[6] + 2 * 2
    for level in (7, 8):
        assert (e.window_lists(level) == -1).all()
    assert extend(h, 3) is h
