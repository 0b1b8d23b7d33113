"""Packed sequences for training and evaluation, sharded over DP and SP ranks, resumable.

Packing. Each epoch, the documents (each ending in EOS) are put in an order
drawn from (seed, epoch) and read as one stream; sequence j of the epoch is the
stream's tokens [j*L, (j+1)*L) (plus one more token for the causal targets).
Every token of the epoch's stream is in exactly one sequence, in order; the
last < L tokens of each epoch are dropped (different ones each epoch). The
order of the sequences is shuffled too, from (seed, epoch).
With `align_documents` (data.align_documents, the model's block size) each
document's span in the stream is its tokens and then padding to a whole block,
so every document starts on a block of its row (document masking then moves no
token in attention); the padding is input PAD with no loss.

Sharding. The loader walks one infinite stream of sequences; a step takes
the next `batch_size * dp_size` of them and data-parallel rank r takes rows
[r*B, (r+1)*B). Sequence-parallel ranks of one DP rank read the same
sequences, and rank s keeps only columns [s*C, (s+1)*C), C = L / sp_size,
with their global positions. The state is the number of sequences consumed,
so a resume continues at the exact next sequence.

Targets run across document boundaries as in GPT-2 style packing: the target
at an EOS is the next document's first token. No BOS is inserted; with
data.document_masking the model attends within documents only, found from
`doc_positions` (0 at each document's first token).

A batch is a dict of int64 tensors, each (B, C):
    input_ids      tokens (MLM: corrupted, see masking.py)
    targets        causal: next tokens; MLM: original ids at chosen positions; -100: no loss
    positions      global positions in the packed sequence: s*C + [0, C)
    doc_positions  position of each token inside its document (its EOS included; eval padding
                   past the held-out stream counts as one document)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fmtrain.data.corpus import Corpus
from fmtrain.data.masking import IGNORE_INDEX, mask_array, replacement_ids
from fmtrain.data.tokenizer import Tokenizer, load_tokenizer
from fmtrain.data.tokens import TokenData, cached_tokenizer, cached_tokens

OBJECTIVES = ("causal", "mlm")
STATE_VERSION = 1
STREAM_SAMPLES = 4096  # tokens read for the stream's fingerprint, spread over the whole data


def stream_fingerprint(tokens: TokenData) -> str:
    """A hash of the documents in their stored order: their lengths, and tokens sampled evenly.

    The data position a checkpoint saves is an offset into this order: files renamed (same
    contents, another order) or edited keep the token and document counts but not the stream.
    Every length, and a few thousand tokens (not all: 10^10 tokens would take minutes to read).
    """
    h = hashlib.sha256(np.ascontiguousarray(tokens.offsets, dtype=np.int64).tobytes())
    if tokens.n_tokens:
        picks = np.linspace(0, tokens.n_tokens - 1, min(STREAM_SAMPLES, tokens.n_tokens)).astype(np.int64)
        h.update(np.asarray(tokens.tokens[picks], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


class _Stream:
    """The documents of `data` read in `order` as one stream of tokens.

    ``align`` > 0 (``data.align_documents``): each document's span in the stream is its tokens
    followed by padding (token -1) up to a multiple of ``align``, counted in the document's
    positions, so every document starts on a multiple of ``align`` (with ``seq_len`` one too,
    on a block of its row).
    """

    def __init__(self, data: TokenData, order: np.ndarray | None, align: int = 0):
        self.data = data
        self.lengths = np.diff(data.offsets)
        self.order = np.arange(data.n_docs) if order is None else order
        # starts[i]: where the i-th document of the order begins in the stream.
        self.starts = np.concatenate([[0], np.cumsum(_spans(self.lengths, align)[self.order])]).astype(np.int64)
        self.length = int(self.starts[-1])

    def read_into(self, start: int, tokens: np.ndarray, doc_pos: np.ndarray) -> bool:
        """Fill tokens and doc_pos, both (n,) int64, from stream [start, start + n).

        Copies one slice per document piece (a long-context sequence spans few
        documents); an aligned document's padding reads as token -1. Past the stream's
        end: token -1, positions counting from 0 (the padding is one document: document
        masking then keeps it apart in one piece, not as a document per token). Returns
        whether any token read -1.
        """
        n = len(tokens)
        end = min(start + n, self.length)
        pos, padded = start, False
        slot = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            in_doc = pos - int(self.starts[slot])
            take = min(end, int(self.starts[slot + 1])) - pos
            doc = self.order[slot]
            real = min(take, max(int(self.lengths[doc]) - in_doc, 0))
            src = int(self.data.offsets[doc]) + in_doc
            out = slice(pos - start, pos - start + take)
            tokens[out][:real] = self.data.tokens[src:src + real]
            if real < take:
                tokens[out][real:] = -1
                padded = True
            np.add(_arange(take), in_doc, out=doc_pos[out])
            pos += take
            slot += 1
        if start + n > end:
            pad = max(end - start, 0)
            tokens[pad:] = -1
            doc_pos[pad:] = _arange(n - pad)
            return True
        return padded


def _spans(lengths: np.ndarray, align: int) -> np.ndarray:
    """Each document's tokens in the stream: its length, rounded up to a multiple of ``align`` (> 0)."""
    return -(-lengths // align) * align if align else lengths


_ARANGE = np.arange(0, dtype=np.int64)


def _arange(n: int) -> np.ndarray:
    """np.arange(n), from a cache that grows (no allocation per document piece)."""
    global _ARANGE
    if len(_ARANGE) < n:
        _ARANGE = np.arange(max(n, 2 * len(_ARANGE)), dtype=np.int64)
    return _ARANGE[:n]


class _Sequences:
    """Turns sequence starts into batches: reads, shifts or masks, slices for SP."""

    def __init__(self, seq_len: int, sp_rank: int, sp_size: int, objective: str, seed: int,
                 pad_id: int, mask_id: int | None, vocab_size: int | None, special_ids: list[int],
                 mask_prob: float = 0.15):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if seq_len <= 0 or seq_len % sp_size:
            raise ValueError(f"seq_len={seq_len} must be positive and divisible by sp_size={sp_size}")
        if not 0 <= sp_rank < sp_size:
            raise ValueError(f"sp_rank={sp_rank} is not in [0, sp_size={sp_size})")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if objective == "mlm":
            if mask_id is None or vocab_size is None:
                raise ValueError("the mlm objective needs mask_id and vocab_size (the tokenizer's)")
            self.replacements = replacement_ids(vocab_size, special_ids)
        self.seq_len, self.sp_rank, self.sp_size = seq_len, sp_rank, sp_size
        self.chunk = seq_len // sp_size
        self.objective, self.seed, self.pad_id, self.mask_id = objective, seed, pad_id, mask_id
        self.special_ids, self.mask_prob = special_ids, mask_prob
        # Causal sequences read one token more: the last target.
        self.extra = 1 if objective == "causal" else 0

    def batch(self, rows: list[tuple[_Stream, int, int]]) -> dict[str, torch.Tensor]:
        """This rank's slice of each (stream, start offset, index) sequence; `index` seeds masking.

        All work is numpy, wrapped as tensors at the end: torch's intra-op
        threads, busy with the model or descheduled, made the same work 100x
        slower on a loaded CPU.
        """
        B, C, lo = len(rows), self.chunk, self.sp_rank * self.chunk
        tokens = np.empty((B, C + self.extra), dtype=np.int64)     # (B, C+1) causal, (B, C) mlm
        doc_pos = np.empty((B, C + self.extra), dtype=np.int64)
        padded = [stream.read_into(start + lo, tokens[b], doc_pos[b]) for b, (stream, start, _) in enumerate(rows)]
        if self.objective == "causal":
            inputs, targets = tokens[:, :-1].copy(), tokens[:, 1:].copy()
        else:
            inputs, targets = np.empty((B, C), dtype=np.int64), np.empty((B, C), dtype=np.int64)
            for b, (_, _, index) in enumerate(rows):
                inputs[b], targets[b] = mask_array(
                    np.maximum(tokens[b], 0), seed=self.seed, index=index, mask_id=self.mask_id,
                    replacements=self.replacements, special_ids=self.special_ids,
                    seq_len=self.seq_len, offset=lo, mask_prob=self.mask_prob)
        if any(padded):  # aligned documents' padding; eval padding past the end of the held-out stream
            past = tokens < 0
            # No target is padding, nor does padding predict (the next document's first token).
            targets[past[:, self.extra:] | past[:, :C]] = IGNORE_INDEX
            inputs[past[:, :C]] = self.pad_id
        positions = np.broadcast_to(lo + _arange(C), (B, C)).copy()
        return {k: torch.from_numpy(v) for k, v in dict(
            input_ids=inputs, targets=targets, positions=positions,
            doc_positions=np.ascontiguousarray(doc_pos[:, :C])).items()}


def _check_ranks(dp_rank: int, dp_size: int, batch_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


class PackedLoader:
    """Infinite training batches of packed sequences for one (DP rank, SP rank).

    Args:
        tokens: the tokenised training split (`TokenData`).
        seq_len: tokens per (whole) sequence, L.
        batch_size: sequences per step on this data-parallel rank, B.
        seed: the order of documents and sequences, and the masking, derive from it.
        dp_rank, dp_size: this rank's place among data-parallel ranks.
        sp_rank, sp_size: this rank's place in its sequence-parallel group.
        objective: "causal" or "mlm".
        bos_id ... unk_id: the tokenizer's special ids (`**tokenizer.special_ids`);
            specials are never masked nor drawn as random replacements.
        vocab_size: the tokenizer's (MLM random replacements).
        mask_prob: share of tokens the MLM corrupts.
        align_documents: 0, or a block size that divides ``seq_len`` (``data.align_documents``:
            the model's ``block_size``): each document is followed by padding (input PAD, no
            loss, counted in its positions) up to a multiple of it, so that documents start on
            blocks and document masking moves no token (causal only: a bidirectional model would
            attend to the padding).
    """

    def __init__(self, tokens: TokenData, seq_len: int, batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, sp_rank: int = 0, sp_size: int = 1, objective: str = "causal", *,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 mask_id: int | None = None, unk_id: int | None = None, vocab_size: int | None = None,
                 mask_prob: float = 0.15, align_documents: int = 0):
        _check_ranks(dp_rank, dp_size, batch_size)
        if align_documents < 0 or (align_documents and seq_len % align_documents):
            raise ValueError(f"align_documents={align_documents} must be 0 or divide seq_len={seq_len} (documents "
                             f"start on its multiples in the stream, so on blocks of a row only if rows are whole blocks)")
        if align_documents and objective != "causal":
            raise ValueError(f"align_documents pads each document for the causal objective only (a bidirectional "
                             f"model would attend to the padding); got objective={objective!r}: set it to 0")
        specials = [i for i in (bos_id, eos_id, pad_id, mask_id, unk_id) if i is not None]
        self.seqs = _Sequences(seq_len, sp_rank, sp_size, objective, seed,
                               pad_id if pad_id is not None else 0, mask_id, vocab_size, specials, mask_prob)
        self.data, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.dp_rank, self.dp_size, self.objective = dp_rank, dp_size, objective
        self.align_documents = align_documents
        stream_length = int(_spans(np.diff(tokens.offsets), align_documents).sum())  # the same in every order
        need = seq_len + self.seqs.extra
        if stream_length < need:
            raise ValueError(
                f"the training data has {stream_length} tokens"
                f"{' with its documents aligned' if align_documents else ''}, fewer than one sequence of "
                f"seq_len={seq_len}{' plus the last target' if self.seqs.extra else ''} ({need}); "
                f"use a larger corpus or a smaller seq_len")
        self.sequences_per_epoch = (stream_length - self.seqs.extra) // seq_len
        self.stream = stream_fingerprint(tokens)
        self.consumed = 0  # sequences taken by all DP ranks together
        self._layouts: dict[int, tuple[_Stream, np.ndarray]] = {}

    def _layout(self, epoch: int) -> tuple[_Stream, np.ndarray]:
        """(the epoch's document stream, its sequence order), drawn from (seed, epoch)."""
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, epoch])
            stream = _Stream(self.data, rng.permutation(self.data.n_docs), self.align_documents)
            order = rng.permutation(self.sequences_per_epoch)
            self._layouts = {e: v for e, v in self._layouts.items() if e >= epoch - 1}
            self._layouts[epoch] = (stream, order)
        return self._layouts[epoch]

    @property
    def epoch(self) -> int:
        return self.consumed // self.sequences_per_epoch

    def _locate(self, k: int) -> tuple[_Stream, int, int]:
        """(stream, start offset, k) of the k-th sequence of the infinite stream."""
        epoch, j = divmod(k, self.sequences_per_epoch)
        stream, order = self._layout(epoch)
        return stream, int(order[j]) * self.seq_len, k

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next step's batch for this rank: dict of (B, C) int64 tensors."""
        first = self.consumed + self.dp_rank * self.batch_size
        batch = self.seqs.batch([self._locate(first + b) for b in range(self.batch_size)])
        self.consumed += self.batch_size * self.dp_size
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (the same on every rank) plus what it must be resumed with."""
        return dict(version=STATE_VERSION, consumed=self.consumed, seed=self.seed, seq_len=self.seq_len,
                    objective=self.objective, batch_size=self.batch_size, dp_size=self.dp_size,
                    n_tokens=self.data.n_tokens, n_docs=self.data.n_docs, stream=self.stream,
                    align_documents=self.align_documents)

    def load_state_dict(self, state: dict[str, Any], allow_resplit: bool = False) -> None:
        """Continue at the exact next sequence of a saved run.

        A different data-parallel size or per-rank batch size changes which rank
        reads which sequence; it is refused unless `allow_resplit` (the stream
        then continues at the same sequence, split the new way).
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"cannot resume the data loader from state version {state.get('version')!r}")
        fresh = ("; to continue the model on other data or at another length, start a new run.dir with "
                 "model.init_from set to this run (its weights, with a fresh optimizer and data position)")
        state = {"align_documents": 0, **state}  # saved since it exists; unaligned before
        for key in ("seed", "seq_len", "objective", "align_documents"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data loader: saved {key}={state.get(key)!r}, "
                                 f"now {getattr(self, key)!r}{fresh}")
        if (state["n_tokens"], state["n_docs"]) != (self.data.n_tokens, self.data.n_docs):
            raise ValueError(
                f"cannot resume the data loader: it was saved on data of {state['n_tokens']} tokens in "
                f"{state['n_docs']} documents, now {self.data.n_tokens} in {self.data.n_docs} "
                f"(a different corpus or tokenizer){fresh}")
        if state.get("stream", self.stream) != self.stream:  # checkpoints before it was saved: not checked
            raise ValueError(
                f"cannot resume the data loader: the training data has the {self.data.n_tokens} tokens in "
                f"{self.data.n_docs} documents it was saved on, but not in the same order or with the same "
                f"contents (files renamed, reordered or edited since), so the saved position would repeat "
                f"and skip documents; restore the corpus as it was{fresh}")
        resplit = (state["dp_size"], state["batch_size"]) != (self.dp_size, self.batch_size)
        if resplit and not allow_resplit:
            raise ResplitNeeded(
                f"cannot resume the data loader: saved with dp_size={state['dp_size']}, "
                f"batch_size={state['batch_size']}, now dp_size={self.dp_size}, batch_size={self.batch_size}; "
                f"pass allow_resplit=True to continue at the same sequence, split over the new ranks")
        self.consumed = int(state["consumed"])


class ResplitNeeded(ValueError):
    """A saved position of another data-parallel layout or batch size (see `allow_resplit`)."""


class EvalLoader:
    """A fixed, finite pass over held-out data, the same every time it is iterated.

    The documents are read in their stored order and cut into consecutive
    sequences; the last one is padded (input PAD, target -100), and so are whole
    rows that fill the last global batch, so every DP rank yields the same
    number of batches and every held-out token is scored once. Arguments as for
    `PackedLoader`; `max_batches` caps the pass.
    """

    def __init__(self, tokens: TokenData, seq_len: int, batch_size: int, seed: int, dp_rank: int,
                 dp_size: int, sp_rank: int = 0, sp_size: int = 1, objective: str = "causal", *,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 mask_id: int | None = None, unk_id: int | None = None, vocab_size: int | None = None,
                 mask_prob: float = 0.15, max_batches: int | None = None):
        _check_ranks(dp_rank, dp_size, batch_size)
        specials = [i for i in (bos_id, eos_id, pad_id, mask_id, unk_id) if i is not None]
        self.seqs = _Sequences(seq_len, sp_rank, sp_size, objective, seed,
                               pad_id if pad_id is not None else 0, mask_id, vocab_size, specials, mask_prob)
        self.stream = _Stream(tokens, None)
        self.seq_len, self.batch_size, self.dp_rank, self.dp_size = seq_len, batch_size, dp_rank, dp_size
        # Causal: the last token has no target, so a stream of T tokens has T - 1 to score.
        scored = max(self.stream.length - self.seqs.extra, 0)
        self.n_sequences = math.ceil(scored / seq_len)
        n = math.ceil(self.n_sequences / (batch_size * dp_size))
        self.n_batches = n if max_batches is None else min(n, max_batches)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for step in range(self.n_batches):
            first = (step * self.dp_size + self.dp_rank) * self.batch_size
            # Rows past the last sequence read past the stream's end: all padding.
            yield self.seqs.batch([(self.stream, k * self.seq_len if k < self.n_sequences else self.stream.length, k)
                                   for k in range(first, first + self.batch_size)])


# ------------------------------------------------------------------ the standard pair

@dataclass
class DataLoaders:
    """What `build_loaders` returns."""

    train: PackedLoader
    val: EvalLoader | None   # None when the corpus holds nothing out
    tokenizer: Tokenizer
    cache: Path              # the token cache entry used


def with_settings(corpus: Corpus | str | list | dict, **settings) -> Corpus:
    """``corpus`` parsed, with the settings given (text_field, val_fraction, max_missing_text; None:
    the corpus's own) in place of its own."""
    return replace(Corpus.parse(corpus), **{k: v for k, v in settings.items() if v is not None})


def corpus_of(cfg) -> Corpus:
    """The corpus of a run's :class:`~fmtrain.config.Config` as the trainer reads it: data.corpus with
    the run's data.text_field, val_fraction and max_missing_text, so that whoever reads it again (eval
    --by-position, --needle) holds out the documents the trainer held out."""
    d = cfg.data
    return with_settings(d.corpus, text_field=d.text_field, val_fraction=d.val_fraction,
                         max_missing_text=d.max_missing_text)


def build_loaders(corpus: Corpus | str | list | dict, tokenizer: Tokenizer | str | Path | None,
                  cache_dir: str | Path, *, seq_len: int, batch_size: int, seed: int = 0, dp_rank: int = 0,
                  dp_size: int = 1, sp_rank: int = 0, sp_size: int = 1, objective: str = "causal",
                  vocab_size: int | None = None, text_field: str | None = None,
                  val_fraction: float | None = None, max_missing_text: float | None = None,
                  mask_prob: float = 0.15, align_documents: int = 0,
                  eval_batch_size: int | None = None, eval_max_batches: int | None = None,
                  progress: bool = True) -> DataLoaders:
    """The training loader and the held-out evaluation loader for one rank.

    Args:
        corpus: anything `Corpus.parse` reads ("stdlib", ["data/*.jsonl"], "hf:NAME", a dict).
        tokenizer: a `.model` path or a `Tokenizer`; None (or "") trains one with
            `vocab_size` pieces on the corpus, once, cached in `cache_dir`.
        cache_dir: where tokenizers and token files are cached (shared between runs).
        vocab_size: the model config's; a tokenizer of another size is refused,
            as is one without MASK for the mlm objective.
        text_field, val_fraction, max_missing_text: override the corpus's settings when given.
        align_documents: the training loader's (`PackedLoader`); held-out rows are never aligned,
            so held-out loss compares across the setting.
        Others: as for `PackedLoader` / `EvalLoader`.

    Tokenises the corpus on first use (rank 0 builds, the others wait), then
    memory-maps it. Every rank must call this (it may hold a barrier).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    corpus = with_settings(corpus, text_field=text_field, val_fraction=val_fraction,
                           max_missing_text=max_missing_text)
    need_mask = objective == "mlm"
    if isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer.path, vocab_size=vocab_size, need_mask=need_mask)
    elif tokenizer:
        tokenizer = load_tokenizer(tokenizer, vocab_size=vocab_size, need_mask=need_mask)
    else:
        if vocab_size is None:
            raise ValueError("give a tokenizer path, or vocab_size to train one on the corpus")
        tokenizer = cached_tokenizer(corpus, cache_dir, vocab_size=vocab_size)
    folder, data = cached_tokens(corpus, tokenizer, cache_dir, progress=progress)
    common = dict(seq_len=seq_len, seed=seed, dp_rank=dp_rank, dp_size=dp_size, sp_rank=sp_rank,
                  sp_size=sp_size, objective=objective, vocab_size=tokenizer.vocab_size,
                  **tokenizer.special_ids)
    train = PackedLoader(data["train"], batch_size=batch_size, mask_prob=mask_prob, align_documents=align_documents,
                         **common)
    val = None
    if data["validation"].n_tokens > 0:
        val = EvalLoader(data["validation"], batch_size=eval_batch_size or batch_size,
                         max_batches=eval_max_batches, mask_prob=mask_prob, **common)
    return DataLoaders(train=train, val=val, tokenizer=tokenizer, cache=folder)


def loaders_for(cfg, world=None, *, tokenizer: Tokenizer | str | Path | None = None,
                batch_size: int | None = None, eval_max_batches: int | None = None,
                progress: bool = False) -> DataLoaders:
    """:func:`build_loaders` for a run's :class:`~fmtrain.config.Config` (``data``, with the
    train seed and the model's objective and vocabulary) and this process's place in
    ``world`` (None: one process). ``tokenizer`` and ``batch_size`` replace the config's (a
    checkpoint's own tokenizer, an evaluation's batch size)."""
    d = cfg.data
    ranks = {} if world is None else dict(dp_rank=world.dp_rank, dp_size=world.dp_size, sp_rank=world.sp_rank,
                                          sp_size=world.sp_size)
    return build_loaders(corpus_of(cfg), tokenizer if tokenizer is not None else (d.tokenizer or None), d.cache_dir,
                         seq_len=d.seq_len, batch_size=batch_size or d.batch_size, seed=cfg.train.seed,
                         objective=cfg.model.kind, vocab_size=cfg.model.vocab_size, text_field=d.text_field,
                         val_fraction=d.val_fraction, max_missing_text=d.max_missing_text, mask_prob=d.mask_prob,
                         align_documents=cfg.model.block_size if d.align_documents else 0,
                         eval_max_batches=eval_max_batches, progress=progress, **ranks)

