"""The data pipeline: tokenizers, corpora, token caches, packed loaders, MLM masking.

    from fmtrain.data import build_loaders
    data = build_loaders("stdlib", "tokenizer/stdlib-32k.model", "cache/data",
                         seq_len=131072, batch_size=1, dp_rank=r, dp_size=n)
    batch = data.train.next_batch()      # input_ids, targets, positions, doc_positions
    for batch in data.val: ...           # a fixed, finite held-out pass

Names are imported lazily, so `python -m fmtrain.data.tokenizer` does not
import its own module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
    "Corpus": "corpus", "CorpusError": "corpus",
    "TokenData": "tokens", "cached_tokens": "tokens", "build_tokens": "tokens",
    "PackedLoader": "loader", "EvalLoader": "loader", "DataLoaders": "loader", "build_loaders": "loader",
    "loaders_for": "loader", "corpus_of": "loader",
    "mask_tokens": "masking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fmtrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fmtrain.data' has no attribute {name!r}")
