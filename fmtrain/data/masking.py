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

import numpy as np
import torch

IGNORE_INDEX = -100


def sequence_rng(seed: int, index: int) -> np.random.Generator:
    """A generator seeded from (seed, index) alone: the same draws on every rank and every resume."""
    return np.random.default_rng([seed, index, 0x6D61736B])  # the last word: "mask", a stream of its own


def replacement_ids(vocab_size: int, special_ids: Iterable[int | None]) -> np.ndarray:
    """(n,) int64: the ids a random replacement may take, every id that is not special."""
    keep = np.ones(vocab_size, dtype=bool)
    for i in special_ids:
        if i is not None:
            keep[i] = False
    return np.flatnonzero(keep).astype(np.int64)


def mask_array(
    tokens: np.ndarray,
    *,
    seed: int,
    index: int,
    mask_id: int,
    replacements: np.ndarray,
    special_ids: Iterable[int | None],
    seq_len: int | None = None,
    offset: int = 0,
    mask_prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """`mask_tokens` on numpy arrays (what the loader calls: numpy never waits on torch's threads)."""
    n = tokens.shape[0]
    seq_len = n if seq_len is None else seq_len
    if offset < 0 or offset + n > seq_len:
        raise ValueError(f"slice [{offset}, {offset + n}) is outside a sequence of {seq_len} tokens")
    rng = sequence_rng(seed, index)
    # Three draws for the whole sequence, then this slice of each.
    window = slice(offset, offset + n)
    choose = rng.random(seq_len, dtype=np.float32)[window]                  # (C,)
    action = rng.random(seq_len, dtype=np.float32)[window]                  # (C,)
    pick = rng.integers(0, len(replacements), seq_len)[window]              # (C,)

    specials = np.array([i for i in special_ids if i is not None], dtype=tokens.dtype)
    chosen = (choose < mask_prob) & ~np.isin(tokens, specials)
    to_mask = chosen & (action < mask_frac)
    to_random = chosen & (action >= mask_frac) & (action < mask_frac + random_frac)

    inputs = tokens.copy()
    inputs[to_mask] = mask_id
    inputs[to_random] = replacements[pick[to_random]]
    targets = np.where(chosen, tokens, IGNORE_INDEX)
    return inputs, targets


def mask_tokens(
    tokens: torch.Tensor,
    *,
    seed: int,
    index: int,
    mask_id: int,
    replacements: np.ndarray | torch.Tensor,
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
    inputs, targets = mask_array(
        tokens.numpy().astype(np.int64), seed=seed, index=index, mask_id=mask_id,
        replacements=np.asarray(replacements, dtype=np.int64), special_ids=special_ids, seq_len=seq_len,
        offset=offset, mask_prob=mask_prob, mask_frac=mask_frac, random_frac=random_frac)
    return torch.from_numpy(inputs), torch.from_numpy(targets)
