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

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

MASK_PIECE = "<mask>"  # as fmtrain's SentencePiece models name it (fmtrain/data/tokenizer.py)
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
FILES = ("tokenizer.json",) + CONFIG_FILES  # what a checkpoint keeps of a Hugging Face tokenizer
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def is_hf_tokenizer_file(path: str | Path) -> bool:
    """``path`` is a ``tokenizers`` JSON file (not the settings JSON of a SentencePiece model)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "added_tokens" in data


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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is unreadable: {exc}") from None
        for key in ("bos", "eos", "pad", "unk", "mask"):
            token = _token_name(data.get(f"{key}_token"))
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


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_types(d) for d in decoder.get("decoders", [])))
    return {decoder.get("type")}


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
        self.hf = RustTokenizer.from_file(str(self.path))
        self.hf.no_padding()
        self.hf.no_truncation()
        self.spec = json.loads(self.path.read_text(encoding="utf-8"))
        vocab = self.hf.get_vocab(with_added_tokens=True)
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
        self.cache_extra = f"hf eos={self.eos_id}".encode()  # part of the token cache's key

    def _token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each token stands for: 0 for special tokens, 1 for byte-fallback pieces."""
        types = _decoder_types(self.spec.get("decoder"))
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

        Texts are not cut into pieces as for SentencePiece: a tokenizer that prefixes a space to
        its input (Metaspace) would then insert one at every cut.
        """
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

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
            f"vocab_size={vocab_size} rows, so ids >= {vocab_size} would have no embedding; use the tokenizer "
            "the weights were trained with (or a model with a larger vocab_size)")
    if need_mask and tok.mask_id is None:
        raise ValueError(f"tokenizer {str(path)!r} has no mask_token (in its tokenizer_config.json), which the "
                         f"masked LM needs; add one ({MASK_PIECE!r}) or train a causal LM")
    return tok


__all__ = ["HFTokenizer", "load_hf_tokenizer", "is_hf_tokenizer_file", "special_tokens", "FILES"]
