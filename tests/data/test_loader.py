"""Loader tests on synthetic documents whose token ids are all distinct.

Token id = 10 + the token's place in the stored stream, so a token tells where
it came from: that makes "every token once, in order" checkable directly.
"""

import numpy as np
import pytest
import torch

from fmtrain.data.loader import EvalLoader, PackedLoader, build_loaders
from fmtrain.data.masking import IGNORE_INDEX
from fmtrain.data.tokens import TokenData

EOS, PAD, MASK, VOCAB = 2, 3, 4, 1 << 20
SPECIALS = dict(bos_id=1, eos_id=EOS, pad_id=PAD, mask_id=MASK, unk_id=0)


def unique_docs(n_docs=37, seed=0, lo=1, hi=400) -> TokenData:
    """Documents of random lengths; token ids distinct apart from the EOS after each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, n_docs)
    docs, nxt = [], 10
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n + 1
    data = TokenData.from_documents(docs, eos_id=EOS, vocab_size=VOCAB)
    return data


def loader(data, **kw):
    args = dict(seq_len=64, batch_size=2, seed=1, dp_rank=0, dp_size=1, vocab_size=VOCAB, **SPECIALS)
    args.update(kw)
    return PackedLoader(data, **args)


def rows(ld, steps):
    return [ld.next_batch() for _ in range(steps)]


def cat(batches, key):
    return torch.cat([b[key] for b in batches])


def test_batch_shapes_and_types():
    ld = loader(unique_docs(), seq_len=64, batch_size=3)
    b = ld.next_batch()
    assert set(b) == {"input_ids", "targets", "positions", "doc_positions"}
    for v in b.values():
        assert v.shape == (3, 64) and v.dtype == torch.int64
    assert torch.equal(b["positions"], torch.arange(64).expand(3, 64))


def test_packing_keeps_every_token_once_and_in_order():
    data = unique_docs()
    ld = loader(data, batch_size=1)
    n = ld.sequences_per_epoch
    epoch = rows(ld, n)
    inputs = cat(epoch, "input_ids")                           # (n, L)
    flat = inputs.flatten()
    assert flat.numel() == n * 64
    words = flat[flat != EOS]
    assert len(set(words.tolist())) == words.numel()           # each token at most once
    dropped = data.n_tokens - flat.numel()
    assert 1 <= dropped <= 64                                  # only the tail (< L + 1 tokens) is dropped
    # Inside a sequence, tokens follow their document: the next token of the same
    # document comes next, and after an EOS the next document starts at position 0.
    doc_pos = cat(epoch, "doc_positions")
    same_doc = doc_pos[:, 1:] == doc_pos[:, :-1] + 1
    assert ((inputs[:, :-1] == EOS) == ~same_doc).all()
    stored = torch.from_numpy(data.tokens.astype(np.int64))
    place = {int(t): i for i, t in enumerate(stored) if t != EOS}
    for row, row_pos in zip(inputs, doc_pos):
        for a, b, p in zip(row[:-1].tolist(), row[1:].tolist(), row_pos[1:].tolist()):
            if a != EOS and b != EOS:
                assert place[b] == place[a] + 1                # in order, nothing skipped
    # doc_positions: the distance from the document's first token.
    starts = data.offsets[:-1]
    for t, p in zip(flat.tolist(), doc_pos.flatten().tolist()):
        if t != EOS:
            d = np.searchsorted(starts, place[t], side="right") - 1
            assert p == place[t] - starts[d]


def test_causal_targets_are_next_tokens():
    data = unique_docs()
    ld = loader(data, batch_size=4)
    for b in rows(ld, 5):
        assert torch.equal(b["targets"][:, :-1], b["input_ids"][:, 1:])
        assert (b["targets"] != IGNORE_INDEX).all()
        # The last target is the stream's next token: in the same document, one further on.
        last_in, last_tg = b["input_ids"][:, -1], b["targets"][:, -1]
        ordinary = (last_in != EOS) & (last_tg != EOS)
        assert torch.equal(last_tg[ordinary], last_in[ordinary] + 1)


def test_epochs_reshuffle_deterministically():
    data = unique_docs()
    a, b = loader(data, batch_size=1), loader(data, batch_size=1)
    n = a.sequences_per_epoch
    ep0, ep1 = cat(rows(a, n), "input_ids"), cat(rows(a, n), "input_ids")
    assert a.epoch == 2
    assert torch.equal(cat(rows(b, 2 * n), "input_ids"), torch.cat([ep0, ep1]))   # same seed: same stream
    assert not torch.equal(ep0, ep1)                                            # new order each epoch
    words = ep1[ep1 != EOS]
    assert len(set(words.tolist())) == words.numel()                            # still each token once
    c = loader(data, batch_size=1, seed=2)
    assert not torch.equal(cat(rows(c, n), "input_ids"), ep0)


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_resume_gives_the_same_next_batches(objective):
    data = unique_docs()
    ref = loader(data, objective=objective)
    n_steps = ref.sequences_per_epoch // 2 + 3              # the resume point is inside, the rest crosses an epoch
    for _ in range(n_steps - 4):
        ref.next_batch()
    state = ref.state_dict()
    expected = rows(ref, 6)
    resumed = loader(data, objective=objective)
    resumed.load_state_dict(state)
    for want, got in zip(expected, rows(resumed, 6)):
        for key in want:
            assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("align", [4, 16])
def test_aligned_documents_start_on_blocks_and_keep_every_token_once(align):
    data = unique_docs(lo=1, hi=40)                         # many documents a row, of every remainder
    ld = loader(data, batch_size=1, align_documents=align)
    epoch = rows(ld, ld.sequences_per_epoch)
    inputs, targets, doc_pos = (cat(epoch, k) for k in ("input_ids", "targets", "doc_positions"))
    assert (doc_pos[:, 0] != 0).any()                       # some rows start inside a document
    starts = doc_pos == 0
    assert not starts[:, torch.arange(64) % align != 0].any()  # every document starts on a block
    pad = inputs == PAD
    assert pad.any() and (targets[pad] == IGNORE_INDEX).all()  # padding: no loss
    # Positions run on through a document's padding: the row is cut into documents where they restart.
    assert ((doc_pos[:, 1:] == doc_pos[:, :-1] + 1) | starts[:, 1:]).all()
    # Padding follows an EOS and runs to the next block; its targets, and a padded EOS's, are dropped.
    before = torch.cat([torch.full((inputs.shape[0], 1), EOS), inputs[:, :-1]], 1)
    assert ((before[pad] == EOS) | (before[pad] == PAD)).all()
    assert (targets[:, :-1][pad[:, 1:]] == IGNORE_INDEX).all()
    kept = ~pad
    scored = kept[:, :-1] & kept[:, 1:]                     # the rest are next tokens, across documents too
    assert torch.equal(targets[:, :-1][scored], inputs[:, 1:][scored])
    # The real tokens are the unaligned stream's: each document whole and once per epoch, bar the tail.
    words = inputs[kept & (inputs != EOS)]
    assert len(set(words.tolist())) == words.numel()
    assert data.n_tokens - (inputs[kept]).numel() <= 64 + data.n_docs  # at most the dropped tail and one EOS a document
    # An aligned epoch is longer by its padding: fewer real tokens a row, more rows.
    assert ld.sequences_per_epoch >= loader(data, batch_size=1).sequences_per_epoch


def test_aligned_resume_is_exact_and_refuses_another_alignment():
    data = unique_docs(lo=1, hi=40)
    ref = loader(data, align_documents=8)
    for _ in range(5):
        ref.next_batch()
    state, expected = ref.state_dict(), rows(ref, 4)
    resumed = loader(data, align_documents=8)
    resumed.load_state_dict(state)
    for want, got in zip(expected, rows(resumed, 4)):
        assert all(torch.equal(want[k], got[k]) for k in want)
    for other in (0, 16):
        with pytest.raises(ValueError, match=f"saved align_documents=8, now {other}"):
            loader(data, align_documents=other).load_state_dict(state)
    unsaved = {k: v for k, v in loader(data).state_dict().items() if k != "align_documents"}
    loader(data).load_state_dict(unsaved)                   # a checkpoint from before the setting: unaligned
    with pytest.raises(ValueError, match="must be 0 or divide seq_len=64"):
        loader(data, align_documents=24)
    with pytest.raises(ValueError, match="causal objective only"):
        loader(data, align_documents=8, objective="mlm")


def test_resume_under_another_dp_size_needs_allow_resplit():
    data = unique_docs()
    ranks = [loader(data, dp_rank=r, dp_size=2) for r in range(2)]
    for ld in ranks:
        rows(ld, 3)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    expected = [ld.next_batch() for ld in ranks]              # what the 2 ranks would read next
    single = loader(data, dp_size=1, batch_size=4)
    with pytest.raises(ValueError, match="allow_resplit"):
        single.load_state_dict(state)
    single.load_state_dict(state, allow_resplit=True)
    got = single.next_batch()
    assert torch.equal(got["input_ids"], torch.cat([e["input_ids"] for e in expected]))


def test_resume_refuses_other_data_or_seq_len():
    data = unique_docs()
    state = loader(data).state_dict()
    with pytest.raises(ValueError, match="different corpus or tokenizer"):
        loader(unique_docs(seed=5)).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        loader(data, seq_len=32).load_state_dict(state)


def test_resume_refuses_the_same_documents_in_another_order():
    data = unique_docs()
    state = loader(data).state_dict()
    docs = [data.document(d)[:-1] for d in range(data.n_docs)]
    reordered = TokenData.from_documents(docs[1:] + docs[:1], eos_id=EOS, vocab_size=VOCAB)
    assert (reordered.n_tokens, reordered.n_docs) == (data.n_tokens, data.n_docs)
    with pytest.raises(ValueError, match="not in the same order or with the same contents"):
        loader(reordered).load_state_dict(state)
    edited = TokenData(data.tokens.copy(), data.offsets)  # one token changed in place: the lengths stay
    edited.tokens[len(edited.tokens) // 2] += 1
    with pytest.raises(ValueError, match="not in the same order"):
        loader(edited).load_state_dict(state)
    loader(TokenData(data.tokens.copy(), data.offsets)).load_state_dict(state)  # a copy is the same stream
    del state["stream"]  # a checkpoint from before the fingerprint: resumed as before
    loader(reordered).load_state_dict(state)


@pytest.mark.parametrize("objective", ["causal", "mlm"])
def test_dp_shards_disjoint_and_covering(objective):
    data = unique_docs()
    dp = 3
    single = loader(data, batch_size=2 * dp, objective=objective)
    ranks = [loader(data, batch_size=2, dp_rank=r, dp_size=dp, objective=objective) for r in range(dp)]
    steps = single.sequences_per_epoch // (2 * dp)
    for _ in range(steps):
        whole = single.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        for key in whole:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
        firsts = [set(p["positions"].flatten().tolist()) for p in parts]
        ids = [set(p["targets"].flatten().tolist()) - {IGNORE_INDEX} if objective == "mlm"
               else set(p["input_ids"].flatten().tolist()) - {EOS} for p in parts]
        assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])


@pytest.mark.parametrize("objective,align", [("causal", 0), ("mlm", 0), ("causal", 8)])
def test_sp_slices_concatenate_to_the_whole_sequence(objective, align):
    data = unique_docs()
    sp = 4
    whole = loader(data, seq_len=64, objective=objective, align_documents=align)
    slices = [loader(data, seq_len=64, sp_rank=r, sp_size=sp, objective=objective, align_documents=align)
              for r in range(sp)]
    for _ in range(4):
        full = whole.next_batch()
        parts = [ld.next_batch() for ld in slices]
        for r, p in enumerate(parts):
            assert p["input_ids"].shape == (2, 16)
            assert torch.equal(p["positions"][0], torch.arange(r * 16, (r + 1) * 16))
        for key in full:
            assert torch.equal(torch.cat([p[key] for p in parts], dim=1), full[key]), key


def test_mlm_batches():
    data = unique_docs(n_docs=200, hi=2000)
    ld = loader(data, seq_len=4096, batch_size=4, objective="mlm")
    b = ld.next_batch()
    chosen = b["targets"] != IGNORE_INDEX
    eos = (b["targets"] == EOS) | ((b["input_ids"] == EOS) & ~chosen)
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert not ((b["targets"] == EOS)).any()                 # EOS never masked
    assert ((b["input_ids"] == MASK) == (chosen & (b["input_ids"] == MASK))).all()
    assert abs(((b["input_ids"] == MASK).sum() / chosen.sum()).item() - 0.8) < 0.03
    assert eos.any()


def test_corpus_smaller_than_one_sequence():
    data = TokenData.from_documents([[10, 11, 12]], eos_id=EOS)
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len=64"):
        loader(data)
    # Exactly enough: seq_len + 1 tokens for the causal target.
    ok = loader(TokenData.from_documents([list(range(10, 74))], eos_id=EOS), batch_size=1)
    assert ok.sequences_per_epoch == 1
    assert torch.equal(ok.next_batch()["input_ids"], ok.next_batch()["input_ids"])   # repeats, never hangs


def test_bad_arguments():
    data = unique_docs()
    with pytest.raises(ValueError, match="divisible by sp_size"):
        loader(data, seq_len=64, sp_size=3)
    with pytest.raises(ValueError, match="dp_rank"):
        loader(data, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="sp_rank"):
        loader(data, sp_rank=4, sp_size=4)
    with pytest.raises(ValueError, match="objective"):
        loader(data, objective="prefix")
    with pytest.raises(ValueError, match="mask_id"):
        loader(data, objective="mlm", mask_id=None)
    with pytest.raises(ValueError, match="seed"):
        loader(data, seed=-1)
    with pytest.raises(ValueError, match="batch_size"):
        loader(data, batch_size=0)


def eval_loader(data, **kw):
    args = dict(seq_len=64, batch_size=2, seed=1, dp_rank=0, dp_size=1, vocab_size=VOCAB, **SPECIALS)
    args.update(kw)
    return EvalLoader(data, **args)


@pytest.mark.parametrize("dp", [1, 3])
def test_eval_scores_every_held_out_token_once(dp):
    data = unique_docs(n_docs=11)
    ranks = [eval_loader(data, dp_rank=r, dp_size=dp) for r in range(dp)]
    lengths = {len(ld) for ld in ranks}
    assert len(lengths) == 1                                  # same number of batches on every rank
    batches = [b for ld in ranks for b in ld]
    targets = torch.cat([b["targets"].flatten() for b in batches])
    scored = targets[targets != IGNORE_INDEX]
    stored = data.tokens.astype(np.int64)
    assert sorted(scored.tolist()) == sorted(stored[1:].tolist())   # every next token, once
    for b in batches:
        pad = b["targets"] == IGNORE_INDEX
        assert (b["input_ids"][pad & (b["input_ids"] != EOS)] == PAD).all()
    again = [b for ld in ranks for b in ld]
    for x, y in zip(batches, again):
        assert torch.equal(x["input_ids"], y["input_ids"])  # deterministic, re-iterable


def test_eval_smaller_than_one_sequence_and_mlm_is_fixed():
    data = TokenData.from_documents([[10, 11, 12]], eos_id=EOS)
    ld = eval_loader(data, seq_len=64, batch_size=1)
    (b,) = list(ld)
    assert b["input_ids"][0, :4].tolist() == [10, 11, 12, EOS]
    assert (b["input_ids"][0, 4:] == PAD).all()
    assert b["targets"][0, :3].tolist() == [11, 12, EOS] and (b["targets"][0, 3:] == IGNORE_INDEX).all()
    # The padding is one document (document masking keeps it apart in one piece, not one per token).
    assert b["doc_positions"][0].tolist() == [0, 1, 2, 3] + list(range(60))
    mlm = eval_loader(unique_docs(n_docs=30), objective="mlm", max_batches=2)
    first, second = list(mlm), list(mlm)
    assert len(first) == 2
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))


def test_build_loaders_on_files(tokenizer, text_corpus, tmp_path):
    data = build_loaders(str(text_corpus), tokenizer.path, tmp_path / "cache", seq_len=128, batch_size=2,
                         vocab_size=1000, val_fraction=0.2, progress=False)
    assert data.tokenizer.vocab_size == 1000 and data.cache.parent == tmp_path / "cache"
    b = data.train.next_batch()
    assert b["input_ids"].shape == (2, 128)
    text = data.tokenizer.decode(b["input_ids"][0])
    assert "def f" in text and "return x *" in text
    assert data.val is not None and len(data.val) >= 1
    mlm = build_loaders(str(text_corpus), tokenizer.path, tmp_path / "cache", seq_len=128, batch_size=2,
                        objective="mlm", val_fraction=0.2, progress=False)
    assert (mlm.train.next_batch()["input_ids"] == tokenizer.mask_id).any()
    with pytest.raises(ValueError, match="vocab_size=4096"):
        build_loaders(str(text_corpus), tokenizer.path, tmp_path / "cache", seq_len=128, batch_size=2,
                      vocab_size=4096)


def test_build_loaders_trains_a_tokenizer_when_none_given(text_corpus, tmp_path):
    kw = dict(seq_len=64, batch_size=1, vocab_size=300, progress=False)
    a = build_loaders([str(text_corpus / "*.txt")], None, tmp_path / "cache", **kw)
    assert a.tokenizer.vocab_size == 300 and a.tokenizer.mask_id is not None
    assert a.tokenizer.path.parent == tmp_path / "cache" / "tokenizers"
    mtime = a.tokenizer.path.stat().st_mtime_ns
    b = build_loaders([str(text_corpus / "*.txt")], "", tmp_path / "cache", **kw)   # cached: not retrained
    assert b.tokenizer.path == a.tokenizer.path and b.tokenizer.path.stat().st_mtime_ns == mtime
    assert torch.equal(a.train.next_batch()["input_ids"], b.train.next_batch()["input_ids"])


@pytest.mark.slow
def test_stdlib_end_to_end_at_long_context(tmp_path):
    """The default corpus with the shipped 4k tokenizer: long documents, 128k-token batches, held-out pass."""
    from pathlib import Path
    model = Path(__file__).resolve().parents[2] / "tokenizer" / "stdlib-4k.model"
    data = build_loaders("stdlib", model, tmp_path, seq_len=131072, batch_size=1, vocab_size=4096,
                         objective="mlm", progress=False)
    train = data.train.data
    lengths = np.diff(train.offsets)
    assert (lengths >= 100_000).sum() >= 10                  # many documents of 100k+ tokens
    b = data.train.next_batch()
    assert b["input_ids"].shape == (1, 131072)
    assert abs((b["targets"] != IGNORE_INDEX).float().mean().item() - 0.15) < 0.01
    assert data.val is not None
    n = 0
    for batch in data.val:
        n += int((batch["targets"] != IGNORE_INDEX).sum())
    assert n > 1000
    text = data.tokenizer.decode(train.document(int(np.argmax(lengths)))[:-1].tolist())
    assert text.startswith("# ") and "def " in text and "import " in text
