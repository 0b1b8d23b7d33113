"""BERT-style corruption for the masked LM.

Each non-special token is chosen with probability `mask_prob` (0.15); a chosen
token becomes MASK (80%), a random non-special token (10%) or stays (10%), and
the loss is taken only at chosen positions (targets elsewhere are -100).

The random draws depend only on (seed, index) -- `index` is the sequence's
global number in the loader's stream, a function of the step -- and are made
for the whole sequence, so a sequence-parallel rank that corrupts only its
slice gets exactly the slice of the fully corrupted sequence.
"""

from __future__ import annotations

from typing import Iterable

import torch

IGNORE_INDEX = -100


def sequence_generator(seed: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, index) alone: the same draws on every rank and every resume."""
    # Mix with a large odd constant so nearby (seed, index) pairs give unrelated streams.
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def replacement_ids(vocab_size: int, special_ids: Iterable[int | None]) -> torch.Tensor:
    """(n,) the ids a random replacement may take: every id that is not special."""
    keep = torch.ones(vocab_size, dtype=torch.bool)
    for i in special_ids:
        if i is not None:
            keep[i] = False
    return keep.nonzero().squeeze(1)


def mask_tokens(
    tokens: torch.Tensor,
    *,
    seed: int,
    index: int,
    mask_id: int,
    replacements: torch.Tensor,
    special_ids: Iterable[int | None],
    seq_len: int | None = None,
    offset: int = 0,
    mask_prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt `tokens` (C,), the slice [offset, offset + C) of a sequence of `seq_len` tokens.

    Args:
        tokens: (C,) int64 original ids.
        seed, index: the loader's seed and the sequence's global number.
        replacements: (n,) ids a random replacement draws from (`replacement_ids`).
        special_ids: ids never chosen (EOS, PAD, ...).
        seq_len: length of the whole sequence (default C): the draws are made for all of it.
        offset: where this slice starts in the sequence (sequence parallelism).

    Returns:
        (inputs, targets), both (C,) int64; targets hold the original id where
        the loss is taken and -100 elsewhere.
    """
    n = tokens.shape[0]
    seq_len = n if seq_len is None else seq_len
    if offset < 0 or offset + n > seq_len:
        raise ValueError(f"slice [{offset}, {offset + n}) is outside a sequence of {seq_len} tokens")
    g = sequence_generator(seed, index)
    # Three draws for the whole sequence, then this rank's slice of each.
    choose = torch.rand(seq_len, generator=g)[offset:offset + n]          # (C,)
    action = torch.rand(seq_len, generator=g)[offset:offset + n]          # (C,)
    random_pick = torch.randint(len(replacements), (seq_len,), generator=g)[offset:offset + n]

    special = torch.zeros(n, dtype=torch.bool)
    for i in special_ids:
        if i is not None:
            special |= tokens == i
    chosen = (choose < mask_prob) & ~special
    to_mask = chosen & (action < mask_frac)
    to_random = chosen & (action >= mask_frac) & (action < mask_frac + random_frac)

    inputs = tokens.clone()
    inputs[to_mask] = mask_id
    inputs[to_random] = replacements[random_pick[to_random]]
    targets = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs, targets
