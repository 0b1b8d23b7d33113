"""SentencePiece tokenizers: train, load, encode in parallel, bytes per token.

A trained tokenizer is two files side by side:

    <name>.model   the SentencePiece model
    <name>.json    the settings it was trained with (vocabulary, kind, corpus)

The settings make text round-trip exactly (identity normalisation, whitespace
kept, digits split, byte fallback, no dummy prefix), which code needs: default
SentencePiece turns "\\t\\treturn  y;" into "return y;".

Command line: ``python -m fmtrain.data.tokenizer --help``.
"""

from __future__ import annotations

import abc
import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
import torch

from fmtrain.data.hf_tokenizer import (FILES as HF_FILES, HFTokenizer, hf_tokenizer_spec, is_hf_tokenizer_file,
                                       load_hf_tokenizer)
from fmtrain.input_files import SNIFF_BYTES, InputFileError, impostor

# Fixed ids of the special pieces, the same for every model this module trains.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MASK_PIECE = "<mask>"

# Trainer settings that make decode(encode(text)) == text for any Unicode text.
ROUND_TRIP_SETTINGS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    byte_fallback=True,
    add_dummy_prefix=False,
)

# Training sentences: SentencePiece learns no piece across sentence boundaries,
# so feeding multi-line chunks (rather than lines) lets it learn "\n" pieces.
_TRAIN_CHUNK_CHARS = 4096
_MAX_SENTENCE_BYTES = 1 << 16
# Encoding cost grows faster than linearly with string length, so long texts
# are cut (preferably after a newline) into pieces of about this many chars.
_ENCODE_CHUNK_CHARS = 1 << 16


def default_num_threads() -> int:
    """CPUs this process may run on (SLURM and taskset restrict it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Tokenizer(abc.ABC):
    """A loaded SentencePiece model with the ids and byte counts the trainer needs.

    A Hugging Face tokenizer (:class:`fmtrain.data.hf_tokenizer.HFTokenizer`) has the same
    interface and counts as one (``isinstance``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size: int = self.sp.get_piece_size()
        self.bos_id: int | None = _or_none(self.sp.bos_id())
        self.eos_id: int | None = _or_none(self.sp.eos_id())
        self.pad_id: int | None = _or_none(self.sp.pad_id())
        self.unk_id: int | None = _or_none(self.sp.unk_id())
        mask = self.sp.piece_to_id(MASK_PIECE)  # unknown pieces map to unk
        self.mask_id: int | None = mask if self.sp.is_control(mask) else None
        self.token_bytes = self._token_bytes()  # (vocab_size,) int64

    @property
    def special_ids(self) -> dict[str, int | None]:
        """The special ids as keyword arguments for `PackedLoader`."""
        return dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                    mask_id=self.mask_id, unk_id=self.unk_id)

    def _token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token stands for: 0 for special tokens, 1 for byte pieces.

        Bits per byte = loss_sum_nats / (ln 2 * token_bytes[targets].sum()).
        """
        counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            if self.sp.is_byte(i):
                counts[i] = 1
            else:
                counts[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return counts

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no BOS/EOS added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of many texts, encoded on `num_threads` threads (default: all CPUs).

        Long texts are cut into line-aligned pieces first so that one large
        document also spreads over the threads; decoding is unaffected.
        """
        pieces: list[str] = []
        owner: list[int] = []  # which text each piece belongs to
        for i, text in enumerate(texts):
            for piece in _split_for_encoding(text):
                pieces.append(piece)
                owner.append(i)
        encoded = self.sp.encode(pieces, num_threads=num_threads or default_num_threads())
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(owner, encoded):
            out[i].extend(ids)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids; special tokens decode to nothing."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.sp.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id})"


def _or_none(i: int) -> int | None:
    return None if i < 0 else i


def _split_for_encoding(text: str, size: int = _ENCODE_CHUNK_CHARS) -> Iterator[str]:
    """Cut `text` into pieces of about `size` chars, after a newline (else a space) where possible."""
    start = 0
    while len(text) - start > size:
        cut = text.find("\n", start + size, start + 2 * size)
        if cut < 0:
            cut = text.find(" ", start + size, start + 2 * size)
        cut = start + size if cut < 0 else cut + 1
        yield text[start:cut]
        start = cut
    if start < len(text) or not text:
        yield text[start:]


def _training_sentences(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Multi-line chunks of the documents, at most `max_bytes` of text in all."""
    seen = 0
    for text in texts:
        for chunk in _chunks_for_training(text):
            seen += len(chunk.encode("utf-8"))
            if seen > max_bytes:
                return
            yield chunk


def _chunks_for_training(text: str) -> Iterator[str]:
    buf: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        # A very long line (minified data) is cut so no sentence is dropped as too long.
        for i in range(0, len(line), _TRAIN_CHUNK_CHARS):
            part = line[i:i + _TRAIN_CHUNK_CHARS]
            buf.append(part)
            n += len(part)
            if n >= _TRAIN_CHUNK_CHARS:
                yield "".join(buf)
                buf, n = [], 0
    if buf:
        yield "".join(buf)


def model_paths(out: str | Path) -> tuple[Path, Path]:
    """(<out>.model, <out>.json) for an output name given with or without `.model`."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix == ".model" else out
    return stem.with_name(stem.name + ".model"), stem.with_name(stem.name + ".json")


def train_tokenizer(
    texts: Iterable[str],
    out: str | Path,
    *,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    with_mask: bool = True,
    max_train_bytes: int = 200_000_000,
    num_threads: int | None = None,
    corpus: object = None,
) -> Tokenizer:
    """Train a SentencePiece model on the documents `texts` and save it as `<out>.model`.

    Args:
        texts: documents (an iterator is read once, up to `max_train_bytes`).
        out: output name; writes `<out>.model` and `<out>.json` (the settings).
        vocab_size: pieces in the vocabulary, special and byte pieces included.
        model_type: "bpe" (default) or "unigram".
        with_mask: reserve the `<mask>` piece the masked LM needs (id 4).
        max_train_bytes: stop reading documents after this much text.
        corpus: a JSON-serialisable description of the corpus, saved with the settings.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    n_special = 4 + int(with_mask)
    if vocab_size < n_special + 256 + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs 256 pieces "
                         f"plus {n_special} special ones; use at least {n_special + 257}")
    model_file, settings_file = model_paths(out)
    model_file.parent.mkdir(parents=True, exist_ok=True)

    counted = _Counted(_training_sentences(texts, max_train_bytes))
    settings = dict(
        ROUND_TRIP_SETTINGS,
        vocab_size=vocab_size,
        model_type=model_type,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        control_symbols=[MASK_PIECE] if with_mask else [],
        max_sentence_length=_MAX_SENTENCE_BYTES,
        character_coverage=0.9995,
    )
    buffer = io.BytesIO()
    start = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted, model_writer=buffer,
            num_threads=num_threads or default_num_threads(), minloglevel=2, **settings)
    except RuntimeError as err:
        if counted.bytes == 0:
            raise ValueError("cannot train a tokenizer: the corpus has no text") from err
        # SentencePiece's messages (e.g. "Vocabulary size too high (...) <= N") are
        # clear but easy to miss in its log; repeat them with the numbers we know.
        raise ValueError(f"SentencePiece could not train a {model_type} model of {vocab_size} pieces "
                         f"(model.vocab_size) on {counted.bytes} bytes of text: {err}; lower model.vocab_size "
                         "or give more text") from err
    model_file.write_bytes(buffer.getvalue())
    meta = dict(settings, corpus=corpus, train_bytes=counted.bytes,
                train_seconds=round(time.time() - start, 1), sentencepiece=spm.__version__)
    settings_file.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Tokenizer(model_file)


class _Counted:
    """An iterator that counts the UTF-8 bytes passing through it."""

    def __init__(self, it: Iterator[str]):
        self.it, self.bytes = it, 0

    def __iter__(self) -> "_Counted":
        return self

    def __next__(self) -> str:
        s = next(self.it)
        self.bytes += len(s.encode("utf-8"))
        return s


def _hf_tokenizer_file(path: Path) -> Path | None:
    """The Hugging Face tokenizer ``path`` names: a tokenizer.json, a folder holding one, or the
    ``tokenizer.model`` a checkpoint of a run on a Hugging Face tokenizer does not have.
    A damaged tokenizer.json is an InputFileError, not taken for a SentencePiece model or no tokenizer."""
    if path.is_dir():
        candidate = path / "tokenizer.json"
    elif path.suffix == ".json" or (path.name == "tokenizer.model" and not path.exists()):
        candidate = path.with_name("tokenizer.json") if path.suffix != ".json" else path
    else:
        return None
    return candidate if hf_tokenizer_spec(candidate) is not None else None


# A checkpoint keeps a SentencePiece model's training settings under this name, not as
# `tokenizer.json`, which Hugging Face tools would take for a tokenizer of theirs.
SETTINGS_IN_CHECKPOINT = "sentencepiece_settings.json"


def tokenizer_files(path: str | Path) -> list[tuple[Path, str]]:
    """(file, name in a checkpoint) of every file the tokenizer at ``path`` is made of."""
    path = Path(path)
    if is_hf_tokenizer_file(path):
        return [(path, HF_FILES[0])] + [(path.parent / n, n) for n in HF_FILES[1:] if (path.parent / n).is_file()]
    # The settings beside a trained model (<name>.json), in a checkpoint, or in one written
    # before they were renamed (a `tokenizer.json` that is not a Hugging Face tokenizer).
    settings = [p for p in (path.with_suffix(".json"), path.parent / SETTINGS_IN_CHECKPOINT)
                if p.is_file() and not is_hf_tokenizer_file(p)]
    model = [(path, "tokenizer.model")] if path.is_file() else []
    return model + [(p, SETTINGS_IN_CHECKPOINT) for p in settings[:1]]


def load_tokenizer(path: str | Path, *, vocab_size: int | None = None, need_mask: bool = False) -> Tokenizer:
    """Load `<path>` (a `.model` file, its name without `.model`, or a folder holding `tokenizer.model`),
    or a Hugging Face tokenizer: a `tokenizer.json`, or a folder holding one (preferred over a
    `tokenizer.model` beside it), with its `tokenizer_config.json`.

    Args:
        vocab_size: the model config's vocabulary size; a different tokenizer size is an error
            (a Hugging Face tokenizer may be smaller: pretrained embeddings are often padded).
        need_mask: the objective is masked LM, so the tokenizer must have a `<mask>` piece.
    """
    path = Path(path)
    hf = _hf_tokenizer_file(path)
    if hf is not None:
        return load_hf_tokenizer(hf, vocab_size=vocab_size, need_mask=need_mask)
    if path.is_dir():
        path = path / "tokenizer.model"
    elif not path.exists() and path.suffix != ".model":
        path = model_paths(path)[0]
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model {str(path)!r} not found; train one with "
            f"`python -m fmtrain.data.tokenizer train --out {path.with_suffix('')}`")
    try:
        tok = Tokenizer(path)
    except (RuntimeError, OSError) as err:
        with open(path, "rb") as fh:
            instead = impostor(fh.read(SNIFF_BYTES), path, "tokenizer")
        if instead is not None:
            raise InputFileError(instead) from None
        raise ValueError(f"{str(path)!r} is not a SentencePiece model: {err}") from err
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ValueError(
            f"tokenizer {str(path)!r} has {tok.vocab_size} pieces but the model config has "
            f"model.vocab_size={vocab_size}; set model.vocab_size to {tok.vocab_size} or train a "
            f"tokenizer with --vocab-size {vocab_size}")
    if need_mask and tok.mask_id is None:
        raise ValueError(
            f"tokenizer {str(path)!r} has no {MASK_PIECE} piece, which the masked LM needs; "
            f"train one without --no-mask")
    return tok


Tokenizer.register(HFTokenizer)


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    from fmtrain.data.corpus import add_corpus_arguments

    p = argparse.ArgumentParser(
        prog="python -m fmtrain.data.tokenizer",
        description="Train or inspect SentencePiece tokenizers for fmtrain.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a tokenizer on a corpus (default: the stdlib corpus)",
                       description="Train a SentencePiece tokenizer; writes OUT.model and OUT.json.")
    t.add_argument("--out", required=True, help="output name, e.g. tokenizer/stdlib-32k")
    t.add_argument("--vocab-size", type=int, default=32000, help="pieces in the vocabulary (default 32000)")
    t.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="default bpe")
    t.add_argument("--no-mask", action="store_true", help="do not reserve <mask> (causal LM only)")
    t.add_argument("--max-train-mb", type=float, default=200.0,
                   help="read at most this many MB of text for training (default 200)")
    t.add_argument("--threads", type=int, default=None, help="default: all CPUs")
    add_corpus_arguments(t)
    i = sub.add_parser("info", help="print a tokenizer's size, special ids and a sample encoding")
    i.add_argument("path", help="the .model file")
    i.add_argument("--text", default="def f(x):\n\treturn  x ** 2  # 12345\n", help="text to encode")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (ValueError, OSError) as err:  # bad input: one clear line, not a traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        from fmtrain.data.corpus import corpus_from_arguments

        corpus = corpus_from_arguments(args)
        texts = (text for split, text in corpus.documents() if split == "train")
        start = time.time()
        tok = train_tokenizer(texts, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
                              with_mask=not args.no_mask, max_train_bytes=int(args.max_train_mb * 1e6),
                              num_threads=args.threads, corpus=corpus.describe())
        print(f"wrote {tok.path} and {model_paths(tok.path)[1]} "
              f"({tok.vocab_size} pieces, {time.time() - start:.1f} s)")
    else:
        tok = load_tokenizer(args.path)
        ids = tok.encode(args.text)
        print(tok)
        print("special ids:", tok.special_ids)
        print(f"{len(ids)} tokens for {len(args.text.encode())} bytes:",
              [tok.sp.id_to_piece(i) for i in ids])
        print("round trip:", tok.decode(ids) == args.text)


if __name__ == "__main__":
    sys.exit(main())
