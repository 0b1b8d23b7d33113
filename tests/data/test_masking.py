import pytest
import torch

from fmtrain.data.masking import IGNORE_INDEX, mask_tokens, replacement_ids

VOCAB, MASK = 1000, 4
SPECIALS = [0, 1, 2, 3, 4]
N = 200_000
# Binomial standard deviations at these sizes are 0.0008 (15% of 200k) and 0.002-0.0025
# (80% / 10% of the 30k chosen); the tolerances are about 6 of them.
TOL_CHOSEN, TOL_SPLIT = 0.005, 0.015


def corrupt(tokens, **kw):
    args = dict(seed=7, index=3, mask_id=MASK, replacements=replacement_ids(VOCAB, SPECIALS),
                special_ids=SPECIALS)
    args.update(kw)
    return mask_tokens(tokens, **args)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(5, VOCAB, (N,), generator=g)
    t[::50] = 2          # EOS every 50 tokens: never chosen
    return t


def test_rates_80_10_10(tokens):
    inputs, targets = corrupt(tokens)
    maskable = tokens != 2
    chosen = targets != IGNORE_INDEX
    assert abs(chosen.sum() / maskable.sum() - 0.15) < TOL_CHOSEN
    n = chosen.sum()
    masked = (inputs == MASK) & chosen
    kept = (inputs == tokens) & chosen
    replaced = chosen & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < TOL_SPLIT
    assert abs(replaced.sum() / n - 0.1) < TOL_SPLIT
    # A random replacement equal to the original (1 in 995) counts as kept.
    assert abs(kept.sum() / n - 0.1) < TOL_SPLIT


def test_loss_only_at_chosen_positions_and_originals_kept(tokens):
    inputs, targets = corrupt(tokens)
    chosen = targets != IGNORE_INDEX
    assert torch.equal(targets[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])    # unchosen tokens untouched
    assert inputs.dtype == targets.dtype == torch.int64


def test_specials_never_chosen_nor_drawn(tokens):
    inputs, targets = corrupt(tokens)
    assert (targets[tokens == 2] == IGNORE_INDEX).all()
    replaced = (targets != IGNORE_INDEX) & (inputs != MASK) & (inputs != tokens)
    assert replaced.any()
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIALS)).any()
    assert replacement_ids(VOCAB, SPECIALS).tolist() == list(range(5, VOCAB))


def test_deterministic_given_seed_and_index(tokens):
    a, b = corrupt(tokens), corrupt(tokens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_index = corrupt(tokens, index=4)
    other_seed = corrupt(tokens, seed=8)
    assert not torch.equal(a[1], other_index[1])
    assert not torch.equal(a[1], other_seed[1])


def test_slices_match_the_whole_sequence(tokens):
    seq = tokens[:4096]
    full_in, full_tg = corrupt(seq)
    parts = [corrupt(seq[o:o + 1024], seq_len=4096, offset=o) for o in range(0, 4096, 1024)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_in)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_tg)
    with pytest.raises(ValueError, match="outside a sequence"):
        corrupt(seq[:1024], seq_len=4096, offset=3584)
