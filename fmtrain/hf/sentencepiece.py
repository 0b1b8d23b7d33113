"""fmtrain's SentencePiece models as a Hugging Face ``tokenizer.json``.

fmtrain trains SentencePiece with identity normalisation, whitespace kept (spaces
become "\u2581"), no dummy prefix and byte fallback (fmtrain/data/tokenizer.py).
Such a model is the ``tokenizers`` model of the same kind with the same pieces:

- BPE: the pieces, and merges ``(left, right)`` for every split of every piece into
  two pieces, ranked by the merged piece's score (SentencePiece merges the
  best-scoring adjacent pair; its ids are in score order);
- unigram: the pieces with their scores (the same Viterbi segmentation), control, unknown and
  byte pieces scored below any ordinary segmentation (SentencePiece never matches them in text).
  Segmentations that tie, or nearly tie, can still differ: SentencePiece sums scores in float32
  and ``tokenizers`` in float64, so over a long text (a run of spaces split 12 + 1 or 1 + 12,
  "o|st" against "os|t") each picks by its own rounding; the export's check then names the place;

with a ``Replace(" ", "\u2581")`` normaliser, no pre-tokeniser (pieces were learned
within SentencePiece's word and script boundaries, so none cross them), byte
fallback, and a decoder that undoes both. Control pieces (``<s>``, ``</s>``,
``<pad>``, ``<mask>``, ``<unk>``) are special tokens, and, as in SentencePiece, never
matched inside text: a literal ``<s>`` in a document (the stdlib has some) is ordinary
characters. ``tokenizers`` matches added tokens in text unless the tokenizer's
``encode_special_tokens`` is set, which ``tokenizer.json`` cannot hold; transformers sets
it from ``split_special_tokens`` in ``tokenizer_config.json``, which
:func:`special_tokens_config` writes. (A program reading ``tokenizer.json`` with
``tokenizers`` alone sets ``tok.encode_special_tokens = True`` itself; without it, only text
holding a literal control string encodes differently.) The export checks the result against
SentencePiece on sample text, the control strings included, before writing it.
"""
from __future__ import annotations

from ..data.tokenizer import Tokenizer


def _pieces(tok: Tokenizer):
    sp = tok.sp
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(tok.vocab_size)]


def convert(tok: Tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes like the SentencePiece model ``tok``."""
    from tokenizers import AddedToken, Regex, Tokenizer as RustTokenizer, decoders, models, normalizers

    sp = tok.sp
    pieces = _pieces(tok)
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    unk = sp.id_to_piece(tok.unk_id) if tok.unk_id is not None else None
    kind = _model_type(tok)
    if kind == "bpe":
        normal = {p for i, (p, _) in enumerate(pieces)
                  if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
        merges = []
        for p in normal:
            for k in range(1, len(p)):
                left, right = p[:k], p[k:]
                if left in normal and right in normal:
                    merges.append((vocab[p], vocab[left], vocab[right], left, right))
        merges.sort()
        model = models.BPE(vocab=vocab, merges=[(l, r) for *_, l, r in merges], unk_token=unk,
                           byte_fallback=True, fuse_unk=True)
    else:
        model = models.Unigram(_unigram_scores(tok, pieces), unk_id=tok.unk_id, byte_fallback=True)
    out = RustTokenizer(model)
    out.normalizer = normalizers.Replace(Regex(" "), "\u2581")
    out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [sp.id_to_piece(i) for i in range(tok.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
    out.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    out.encode_special_tokens = True  # control strings in text are text, as in SentencePiece
    return out


def _unigram_scores(tok: Tokenizer, pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The pieces with their scores, control/unknown/byte pieces made unmatchable in text.

    SentencePiece's Viterbi only considers normal pieces; ``tokenizers``' Unigram matches every
    piece of its vocabulary, and control and byte pieces have score 0, above every normal piece,
    so a literal ``<s>`` or ``<0x41>`` in text became that one token. They must stay in the
    vocabulary (same ids; byte fallback looks ``<0x41>`` up by name), so they get a score below any
    segmentation of their characters into normal pieces: each of those is at most one piece per
    character, each scoring at least the lowest normal score."""
    sp = tok.sp
    special = [sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) for i in range(len(pieces))]
    normal = [s for (_, s), x in zip(pieces, special) if not x]
    longest = max((len(p) for (p, _), x in zip(pieces, special) if x), default=0)
    floor = (longest + 1) * min(min(normal, default=0.0), -1.0) - 1.0
    return [(p, floor if x else s) for (p, s), x in zip(pieces, special)]


def first_difference(tok: Tokenizer, converted, text: str, got: list[int] | None = None) -> str | None:
    """Where ``converted`` (a ``tokenizers.Tokenizer``) encodes ``text`` differently from SentencePiece:
    "at char N: Hugging Face [pieces] vs SentencePiece [pieces] (near 'text')", or None when equal."""
    enc = converted.encode(text, add_special_tokens=False)
    got = enc.ids if got is None else got
    want = tok.sp.encode(text)
    if got == want:
        return None
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    # The common prefix is the same tokens, so the differing token starts at the same character.
    char = enc.offsets[k][0] if k < len(enc.offsets) else len(text)
    pieces = lambda ids: [tok.sp.id_to_piece(i) for i in ids[k:k + 6]]  # noqa: E731
    return (f"at char {char}: Hugging Face {pieces(got)} vs SentencePiece {pieces(want)} "
            f"(near {text[max(0, char - 20):char + 40]!r})")


def _model_type(tok: Tokenizer) -> str:
    """'bpe' or 'unigram', from the model's own proto (its trainer_spec)."""
    proto = tok.sp.serialized_model_proto()
    # trainer_spec (field 2) holds model_type (field 3, an enum: 1 unigram, 2 bpe); read it without protobuf.
    from .._protobuf import field_varint

    t = field_varint(proto, [2, 3], default=1)
    if t not in (1, 2):
        raise ValueError(f"SentencePiece model type {t} (word/char) is not converted; bpe and unigram are")
    return "bpe" if t == 2 else "unigram"


def special_tokens_config(tok: Tokenizer, seq_len: int) -> dict:
    """tokenizer_config.json naming the special tokens, as transformers writes it."""
    sp = tok.sp
    name = {k: (sp.id_to_piece(i) if i is not None else None) for k, i in
            dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id, unk=tok.unk_id, mask=tok.mask_id).items()}
    cfg = {"backend": "tokenizers", "tokenizer_class": "TokenizersBackend", "model_max_length": seq_len,
           "clean_up_tokenization_spaces": False,
           "split_special_tokens": True}  # control strings in text are text (SentencePiece's rule)
    cfg |= {f"{k}_token": v for k, v in name.items() if v is not None}
    return cfg


__all__ = ["convert", "first_difference", "special_tokens_config"]
