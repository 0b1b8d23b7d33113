"""bench/roofline.py counts the scores a query really sees: the dense reference's masks agree."""
import pytest

from fmtrain.attention.hierarchy import hierarchy
from fmtrain.attention.reference import interaction_mask


@pytest.mark.parametrize("n", [1, 37, 64, 200, 513])
@pytest.mark.parametrize("causal", [True, False])
def test_scores_seen_match_the_dense_masks(n, causal):
    from bench import roofline

    h = hierarchy(n, 16, 2, causal)
    fine, coarse = interaction_mask(h)
    needed, computed = roofline.scores_seen(n, 16, 2, causal)
    assert needed == int(fine.sum()) + int((~coarse.isinf()).sum())
    assert computed == h.n_blocks * 16 * (len(h.fine_blocks()) * 16 + h.coarse_slots) >= needed
