"""Hugging Face tokenizers (``tokenizer.json``) beside the SentencePiece models.

A Hugging Face tokenizer is the ``tokenizer.json`` that the ``tokenizers``
library reads, with its special tokens (BOS, EOS, PAD, UNK, MASK) named in the
``tokenizer_config.json`` (or ``special_tokens_map.json``) beside it, which is
what ``transformers`` writes. :class:`HFTokenizer` has the interface of
:class:`fmtrain.data.tokenizer.Tokenizer` (ids, ``token_bytes`` for bits per byte,
``encode_batch``, ``decode``), so the token cache, packing, masking and
evaluation take it as they take a SentencePiece model. Text is encoded without
the tokenizer's own BOS/EOS template (the packer adds EOS between documents).

``tokenizers`` is imported only when such a tokenizer is loaded (``pip install
-e ".[hf]"``).
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from fmtrain.input_files import InputFileError, JsonFields, found, read_json, where

MASK_PIECE = "<mask>"  # as fmtrain's SentencePiece models name it (fmtrain/data/tokenizer.py)
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
FILES = ("tokenizer.json",) + CONFIG_FILES  # what a checkpoint keeps of a Hugging Face tokenizer
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Memory: ``tokenizers`` holds about 200 bytes per character of its input while it encodes
# (alignments, offsets, a string per token): a 10 MB one-line document took 2.3 GB. So a text
# longer than 2 * _PIECE_CHARS is encoded in pieces of _PIECE_CHARS to 2 * _PIECE_CHARS
# characters, and one call encodes at most _BATCH_CHARS characters: a few hundred MB at most,
# whatever the size of the documents or of the batch.
#
# Exactness: a piece ends before a single space between two non-space characters. No token
# of the usual pre-tokenizers spans that point (GPT-2, Llama 3 and Qwen2's byte-level regexes
# give the space to the next word; Metaspace and Whitespace split there), and a piece that starts
# with a space gets no prefix from Metaspace or ByteLevel(add_prefix_space), so the ids are those
# of the whole text. A normalizer that prepends "▁" to every input (Llama 2's legacy tokenizer.json)
# would add one: for those the space is left out and the normalizer puts it back. Only a window of
# _PIECE_CHARS characters with no such space (minified code, unspaced scripts) is cut otherwise:
# after a newline between two non-space characters (still exact for the byte-level and Whitespace
# pre-tokenizers; Metaspace adds a "▁" there), else at the window's end, where a token may be split.
_PIECE_CHARS = 1 << 17
_BATCH_CHARS = 1 << 20
_AT_SPACE = re.compile(r"(?<=\S) (?=\S)")
_AFTER_NEWLINE = re.compile(r"(?<=\S\n)(?=\S)")


def hf_tokenizer_spec(path: str | Path) -> dict | None:
    """The JSON of ``path`` if it is a ``tokenizers`` file; None if it is absent, not named ``*.json``
    or the settings of a SentencePiece model (which older fmtrain checkpoints kept as ``tokenizer.json``);
    InputFileError if it is not JSON at all (a cut-short download, a Git LFS pointer) or JSON of another
    shape (``[]``, ``{}``, ``null``, a "model" that is no mapping), which is not taken for a missing
    tokenizer nor for a SentencePiece model."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".json":
        return None
    data = read_json(path, "tokenizer")
    if _sentencepiece_settings(data):
        return None
    problem = _spec_problem(data)
    if problem is not None:
        raise InputFileError(f"{where(path)} is damaged or not a Hugging Face tokenizer: {problem}, where the "
                             "tokenizers library writes a \"model\" mapping and an \"added_tokens\" list; download "
                             "it again, or name the right file")
    return data


def _sentencepiece_settings(data) -> bool:
    """The settings fmtrain saves beside a SentencePiece model (see fmtrain.data.tokenizer.train_tokenizer)."""
    return isinstance(data, dict) and "model" not in data and "added_tokens" not in data and \
        "model_type" in data and "vocab_size" in data


def _spec_problem(data) -> str | None:
    """What keeps ``data`` (a tokenizer.json's JSON) from being a ``tokenizers`` file fmtrain reads, or None."""
    if not isinstance(data, dict):
        return f"it holds {found(data)}, not a mapping"
    if not data:
        return "it holds {} (an empty mapping)"
    if "model" not in data:
        return f"it has no \"model\" (its keys: {', '.join(sorted(data)[:6])})"
    if not isinstance(data["model"], dict):
        return f"its \"model\" is {found(data['model'])}, not a mapping"
    added = data.get("added_tokens")
    if not isinstance(added, list):
        return "it has no \"added_tokens\"" if "added_tokens" not in data else \
            f"its \"added_tokens\" is {found(added)}, not a list"
    for token in added:
        if not (isinstance(token, dict) and isinstance(token.get("id"), int) and not isinstance(token["id"], bool)
                and token["id"] >= 0 and isinstance(token.get("content"), str)):
            return f"its \"added_tokens\" hold {found(token)}, not a token (a mapping with an id and its content)"
    return None


def is_hf_tokenizer_file(path: str | Path) -> bool:
    """``path`` is a ``tokenizers`` JSON file; a damaged file is not one (see :func:`hf_tokenizer_spec`)."""
    try:
        return hf_tokenizer_spec(path) is not None
    except InputFileError:
        return False


def _token_name(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken as transformers serialises it
        return value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(folder: Path) -> dict[str, str]:
    """{"bos": "<s>", ...} from tokenizer_config.json, then special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        config = JsonFields(read_json(path, "tokenizer's config"), path)
        for key in ("bos", "eos", "pad", "unk", "mask"):
            token = _token_name(config.data.get(f"{key}_token"))
            if config.has(f"{key}_token") and not isinstance(token, str):
                raise InputFileError(f"{path}: {key}_token must be a token (a string, or a mapping with its "
                                     f"content), found {found(config.data[f'{key}_token'])}")
            if token is not None:
                out.setdefault(key, token)
    return out


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _types(component: dict | None, members: str) -> set[str]:
    """The types in a tokenizer.json component (decoder, normalizer), through its Sequences."""
    if not component:
        return set()
    if component.get("type") == "Sequence":
        return set().union(*(_types(c, members) for c in component.get(members, [])))
    return {component.get("type")}


def _cut(text: str, lo: int, hi: int) -> tuple[int, bool]:
    """(where to end a piece within ``text[lo:hi]``, whether it is before a space); see _PIECE_CHARS."""
    if m := _AT_SPACE.search(text, lo, hi + 1):
        return m.start(), True
    if m := _AFTER_NEWLINE.search(text, lo, hi + 1):
        return m.start(), False
    return hi, False


def _split_long(text: str, size: int, drop_space: bool = False) -> Iterator[str]:
    """``text`` in pieces of at most 2 * ``size`` characters that encode as the whole text does
    (see _PIECE_CHARS); ``drop_space``: a piece cut before a space starts after it."""
    start = 0
    while len(text) - start > 2 * size:
        cut, at_space = _cut(text, start + size, start + 2 * size)
        yield text[start:cut]
        start = cut + 1 if drop_space and at_space else cut
    yield text[start:]


def _batches(pieces: Iterable[tuple[int, str]], chars: int) -> Iterator[list[tuple[int, str]]]:
    """(owner, piece) pairs in lists of about ``chars`` characters."""
    batch, n = [], 0
    for item in pieces:
        if batch and n + len(item[1]) > chars:
            yield batch
            batch, n = [], 0
        batch.append(item)
        n += len(item[1])
    if batch:
        yield batch


class HFTokenizer:
    """A ``tokenizer.json`` with the special ids of its ``tokenizer_config.json``; it counts as a
    :class:`fmtrain.data.tokenizer.Tokenizer` (registered there)."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:  # pragma: no cover - the hf extra is not installed
            raise ImportError("a Hugging Face tokenizer needs the tokenizers library: "
                              'pip install -e ".[hf]" (or pip install tokenizers)') from None
        self.path = Path(path)
        self.spec = hf_tokenizer_spec(self.path)  # its shape checked before the library reads it
        if self.spec is None:
            raise InputFileError(f"{where(self.path)} is not a Hugging Face tokenizer (the settings of a "
                                 "SentencePiece model?); name its tokenizer.model instead")
        self.hf = RustTokenizer.from_file(str(self.path))
        self.hf.no_padding()
        self.hf.no_truncation()
        vocab = self.hf.get_vocab(with_added_tokens=True)
        if not vocab:
            raise InputFileError(f"{where(self.path)} is damaged: it holds no tokens (its model's vocab and its "
                                 "added_tokens are empty); download it again, or name the tokenizer the weights "
                                 "were trained with")
        self.vocab_size = max(vocab.values()) + 1
        names = special_tokens(self.path.parent)
        ids = {}
        for key, token in names.items():
            i = self.hf.token_to_id(token)
            if i is None:
                raise ValueError(f"{self.path.parent}: the {key}_token {token!r} of its tokenizer config is not in "
                                 f"{self.path.name}")
            ids[key] = i
        self.bos_id, self.eos_id, self.pad_id = ids.get("bos"), ids.get("eos"), ids.get("pad")
        self.unk_id, self.mask_id = ids.get("unk"), ids.get("mask")
        self.special = {t["id"] for t in self.spec.get("added_tokens", []) if t.get("special")}
        self.special |= set(ids.values())
        self.token_bytes = self._token_bytes()
        # A normalizer that prepends "▁" to each input would add one to a piece cut before a space.
        self.drop_space = "Prepend" in _types(self.spec.get("normalizer"), "normalizers")
        self.cache_extra = f"hf eos={self.eos_id}".encode()  # part of the token cache's key

    def _token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token stands for: 0 for special tokens, 1 for byte-fallback pieces."""
        types = _types(self.spec.get("decoder"), "decoders")
        byte_level = "ByteLevel" in types
        byte_fallback = "ByteFallback" in types
        bd = _byte_decoder()
        counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        added = {t["id"]: t["content"] for t in self.spec.get("added_tokens", [])}
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i in self.special:
                continue
            if i in added:  # a plain added token: its text
                counts[i] = len(added[i].encode("utf-8"))
            elif byte_level:
                counts[i] = sum(1 if c in bd else len(c.encode("utf-8")) for c in token)
            elif byte_fallback and _BYTE_PIECE.match(token):
                counts[i] = 1
            else:  # SentencePiece-style pieces: "\u2581" is a space
                counts[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return counts

    @property
    def special_ids(self) -> dict[str, int | None]:
        """The special ids as keyword arguments for `PackedLoader`."""
        return dict(bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                    mask_id=self.mask_id, unk_id=self.unk_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text (no BOS/EOS added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Token ids of many texts (no BOS/EOS added); ``tokenizers`` spreads them over its threads.
        Long texts are encoded in pieces, and a bounded amount of text at a time (see _PIECE_CHARS)."""
        pieces = ((i, piece) for i, text in enumerate(texts)
                  for piece in _split_long(text, _PIECE_CHARS, self.drop_space))
        out: list[list[int]] = [[] for _ in texts]
        for batch in _batches(pieces, _BATCH_CHARS):
            encoded = self.hf.encode_batch_fast([piece for _, piece in batch], add_special_tokens=False)
            for (i, _), e in zip(batch, encoded):
                out[i].extend(e.ids)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.hf.id_to_token(i)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, mask_id={self.mask_id})"


def load_hf_tokenizer(path: str | Path, *, vocab_size: int | None = None, need_mask: bool = False) -> HFTokenizer:
    """Load a ``tokenizer.json``; ``vocab_size`` is the model's embedding size, which may be larger
    than the tokenizer (pretrained models pad it, Qwen2's by about 300 rows) but not smaller."""
    try:
        tok = HFTokenizer(path)
    except Exception as err:  # the Rust library raises its own exception type
        if isinstance(err, (ValueError, ImportError)):
            raise
        raise ValueError(f"{str(path)!r} is not a Hugging Face tokenizer file: {err}") from err
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {str(path)!r} has {tok.vocab_size} tokens but the model's embedding has "
            f"model.vocab_size={vocab_size} rows, so ids >= {vocab_size} would have no embedding; use the tokenizer "
            "the weights were trained with (or a larger model.vocab_size)")
    if need_mask and tok.mask_id is None:
        raise ValueError(f"tokenizer {str(path)!r} has no mask_token (in its tokenizer_config.json), which the "
                         f"masked LM needs; add one ({MASK_PIECE!r}) or train a causal LM")
    return tok


__all__ = ["HFTokenizer", "load_hf_tokenizer", "is_hf_tokenizer_file", "hf_tokenizer_spec", "special_tokens", "FILES"]
