"""Does a model use its context? Held-out loss by the predicted token's position in its document.

Documents are read one at a time from their start, so a position is the distance from
the document's start and no target crosses a document boundary; losses are summed in
log-spaced position buckets, each with the tokens and documents behind it. Used by
``python -m fmtrain.eval RUN --by-position`` and by ``bench/long_context.py``.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

# Bucket edges of the predicted token's position in its document: [1, 64), [64, 256), ...
EDGES = (1, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576)


def bucket_name(lo: int, hi: int) -> str:
    k = lambda x: f"{x // 1024}k" if x >= 1024 else str(x)  # noqa: E731
    return f"{k(lo)}-{k(hi)}"


def held_out_documents(cfg, min_len: int, tokenizer: str | None = None) -> list[np.ndarray]:
    """The held-out documents of a run's corpus with at least ``min_len`` tokens (the split the
    trainer used: the run's data settings, see :func:`fmtrain.data.corpus_of`; its tokenizer, or
    ``tokenizer``: a checkpoint's copy), longest first."""
    from .data import corpus_of
    from .data.tokens import cached_tokens

    _, splits = cached_tokens(corpus_of(cfg), tokenizer or cfg.data.tokenizer, cfg.data.cache_dir,
                              progress=False)
    val = splits["validation"]
    docs = [np.asarray(val.document(d), dtype=np.int64) for d in range(val.n_docs)]
    return sorted((d for d in docs if len(d) >= min_len), key=len, reverse=True)


def nll_by_position(model, ids: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of ``ids[1:]`` given everything before, float64."""
    device = next(model.parameters()).device
    x = torch.from_numpy(ids[None, :-1]).to(device)
    y = torch.from_numpy(ids[None, 1:]).to(device)
    return (-model.token_logprobs(x, y, chunk=chunk)[0]).cpu().numpy()


def loss_by_position(model, docs: list[np.ndarray], max_len: int, progress=None) -> dict:
    """Sums and counts of the loss per position bucket over ``docs``, each read to ``max_len``
    tokens (positions 1 .. max_len-1: buckets at powers of two stay whole), so that results can
    be merged. ``progress(i, n_docs)`` after every document."""
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: give a whole number >= 2 (a document's first token has no loss)")
    sums = np.zeros(len(EDGES) - 1)
    counts = np.zeros(len(EDGES) - 1, dtype=np.int64)
    doc_counts = np.zeros(len(EDGES) - 1, dtype=np.int64)
    t0 = time.perf_counter()
    for i, doc in enumerate(docs):
        ids = doc[:max_len]
        nll = nll_by_position(model, ids)
        pos = np.arange(1, len(ids))  # the predicted token's distance from the document's start
        b = np.searchsorted(EDGES, pos, side="right") - 1
        np.add.at(sums, b, nll)
        np.add.at(counts, b, 1)
        doc_counts[np.unique(b)] += 1
        if progress is not None:
            progress(i + 1, len(docs))
    return dict(eval_len=max_len, n_docs=len(docs), sums=sums.tolist(), counts=counts.tolist(),
                doc_counts=doc_counts.tolist(), eval_wall_s=time.perf_counter() - t0)


def mean_loss(row: dict, lo: int, hi: int) -> tuple[float, int, int]:
    """Mean loss, tokens and documents of the buckets ``[lo, hi)`` of a :func:`loss_by_position` result."""
    s, c = sum(row["sums"][lo:hi]), sum(row["counts"][lo:hi])
    return (s / c if c else math.nan), c, max(row["doc_counts"][lo:hi], default=0)


def table(row: dict, seq_len: int) -> str:
    """One result as a markdown table: a line per bucket with tokens behind it (``*``: beyond the
    training length ``seq_len``)."""
    lines = ["| position | loss (nats/token) | bits/token | tokens | documents |", "|---|---|---|---|---|"]
    for i in range(len(EDGES) - 1):
        loss, tokens, docs = mean_loss(row, i, i + 1)
        if tokens:
            name = bucket_name(EDGES[i], EDGES[i + 1]) + ("*" if EDGES[i] >= seq_len else "")
            lines.append(f"| {name} | {loss:.4f} | {loss / math.log(2):.4f} | {tokens:,} | {docs} |")
    return "\n".join(lines) + (f"\n\nHeld-out loss by the predicted token's position in its document; * beyond "
                               f"the training length ({seq_len:,}).")


def plot(row: dict, seq_len: int, path, title: str) -> None:
    """Loss against position (bucket centres, log scale) into ``path`` (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(math.sqrt(EDGES[i] * EDGES[i + 1]), mean_loss(row, i, i + 1)[0]) for i in range(len(EDGES) - 1)
           if row["counts"][i]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o")
    ax.axvline(seq_len, color="gray", ls="-.", lw=0.8)
    ax.text(seq_len, ax.get_ylim()[1], " training length", fontsize=8, color="gray", va="top")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in document (tokens, bucket centre)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["EDGES", "bucket_name", "held_out_documents", "nll_by_position", "loss_by_position", "mean_loss",
           "table", "plot"]
