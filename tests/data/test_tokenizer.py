import json
import re
import subprocess
import sys

import pytest
import torch

from fmtrain.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, SETTINGS_IN_CHECKPOINT, Tokenizer,
                                    load_tokenizer, model_paths, tokenizer_files, train_tokenizer)
from fmtrain.input_files import InputFileError
from tests.data.conftest import PROSE


def test_round_trip_code(tokenizer, code_texts):
    for text in code_texts[:20]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", [
    PROSE,
    "\t\treturn  y;",
    "  leading and trailing  ",
    "\n\n\nnewlines only\n\n",
    "",
    " ",
    "<mask> and <s></s> are text here, not special tokens",
    "unseen script: ᚠᛇᚻ ⠓⠑⠇⠇⠕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
])
def test_round_trip_prose_and_edge_cases(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids)) == text


def test_special_ids_and_mask_text_not_special(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert tokenizer.mask_id == 4
    assert tokenizer.vocab_size == 1000
    specials = {UNK_ID, BOS_ID, EOS_ID, PAD_ID, 4}
    assert not specials & set(tokenizer.encode("<mask> <s> </s> <pad> <unk>"))
    assert tokenizer.decode([BOS_ID, EOS_ID, PAD_ID, 4]) == ""


def test_token_bytes_counts_utf8_bytes(tokenizer, code_texts):
    tb = tokenizer.token_bytes
    assert tb.dtype == torch.int64 and tb.shape == (tokenizer.vocab_size,)
    assert tb[[UNK_ID, BOS_ID, EOS_ID, PAD_ID, 4]].tolist() == [0, 0, 0, 0, 0]
    byte_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.sp.is_byte(i)]
    assert len(byte_ids) == 256 and (tb[byte_ids] == 1).all()
    for text in [PROSE, code_texts[0], "ᚠᛇᚻ 🚀"]:
        ids = torch.tensor(tokenizer.encode(text))
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


def test_encode_batch_matches_encode_and_threads(tokenizer, code_texts):
    texts = code_texts[:8] + [PROSE, ""]
    one = [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, num_threads=1) == one
    assert tokenizer.encode_batch(texts, num_threads=2) == one


def test_long_text_is_encoded_in_pieces_and_round_trips(tokenizer, code_texts):
    text = "".join(code_texts)[:300_000]          # > 4 encoding pieces of 64K chars
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    one_line = "x = 1 " * 40_000                  # no newline to cut after: cut at spaces
    assert tokenizer.decode(tokenizer.encode(one_line)) == one_line
    no_space = "é" * 150_000                      # no break at all: hard cut between characters
    assert tokenizer.decode(tokenizer.encode(no_space)) == no_space


def test_settings_saved_side_by_side(tokenizer):
    model, settings = model_paths(tokenizer.path)
    assert model == tokenizer.path and model.is_file()
    import json
    meta = json.loads(settings.read_text())
    assert meta["vocab_size"] == 1000 and meta["model_type"] == "bpe"
    assert meta["normalization_rule_name"] == "identity" and meta["byte_fallback"] is True
    assert meta["train_bytes"] > 1_000_000


def test_a_checkpoint_keeps_the_settings_under_a_name_no_hugging_face_tool_takes_for_its_own(
        tokenizer, tmp_path):
    settings = model_paths(tokenizer.path)[1]
    assert tokenizer_files(tokenizer.path) == [(tokenizer.path, "tokenizer.model"),
                                               (settings, SETTINGS_IN_CHECKPOINT)]
    # A checkpoint written before the rename holds the settings as tokenizer.json: saved again,
    # they take the new name, and the folder still loads as the SentencePiece model.
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    (old / "tokenizer.json").write_bytes(settings.read_bytes())
    assert [name for _, name in tokenizer_files(old / "tokenizer.model")] == ["tokenizer.model",
                                                                            SETTINGS_IN_CHECKPOINT]
    assert load_tokenizer(old).encode("def f") == tokenizer.encode("def f")
    new = tmp_path / "new"
    new.mkdir()
    for src, name in tokenizer_files(old / "tokenizer.model"):
        (new / name).write_bytes(src.read_bytes())
    assert [name for _, name in tokenizer_files(new / "tokenizer.model")] == ["tokenizer.model",
                                                                            SETTINGS_IN_CHECKPOINT]


def test_load_by_path_prefix_and_folder(tokenizer, tmp_path):
    assert load_tokenizer(tokenizer.path).vocab_size == 1000
    assert load_tokenizer(tokenizer.path.with_suffix("")).vocab_size == 1000
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    assert load_tokenizer(folder).encode("def f") == tokenizer.encode("def f")


def test_load_errors(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found; train one"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="1000 pieces but the model config has model.vocab_size=32000; set model.vocab_size to 1000"):
        load_tokenizer(tokenizer.path, vocab_size=32000)
    assert load_tokenizer(tokenizer.path, vocab_size=1000, need_mask=True).mask_id == 4
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(junk)


HF_TOKENIZER_JSON = json.dumps({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                                "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
                                "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}})


def test_a_cut_short_tokenizer_json_is_reported_as_damaged(tokenizer, tmp_path, capsys):
    folder = tmp_path / "cut"
    folder.mkdir()
    cut = HF_TOKENIZER_JSON[:HF_TOKENIZER_JSON.index('"model"')]  # a download that stopped part way
    (folder / "tokenizer.json").write_text(cut)
    damaged = re.escape(f"tokenizer.json in {folder} is damaged (not valid JSON: Expecting property name enclosed "
                        f"in double quotes at char {len(cut)}); download it again")
    # Found in a folder, named, and as the tokenizer.model that a checkpoint of such a run lacks.
    for path in (folder, folder / "tokenizer.json", folder / "tokenizer.model"):
        with pytest.raises(InputFileError, match=damaged):
            load_tokenizer(path)
    # Not passed over for a SentencePiece model beside it (Hugging Face folders often hold both).
    (folder / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    with pytest.raises(InputFileError, match=damaged):
        load_tokenizer(folder)
    from fmtrain.data.tokenizer import main
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(folder / "tokenizer.json")])
    assert exit_.value.code == 2 and "is damaged (not valid JSON" in capsys.readouterr().err
    # The settings of a SentencePiece model under that name (older fmtrain checkpoints) are no damage.
    (folder / "tokenizer.json").write_bytes(model_paths(tokenizer.path)[1].read_bytes())
    assert load_tokenizer(folder).encode("def f") == tokenizer.encode("def f")


@pytest.mark.parametrize("text, found", [
    ("[]", "it holds [] (a list), not a mapping"),
    ("null", "it holds null, not a mapping"),
    ("{}", "it holds {} (an empty mapping)"),
    ('"tokenizer"', 'it holds "tokenizer" (a string), not a mapping'),
    ('{"version": "1.0"}', 'it has no "model" (its keys: version)'),
    (HF_TOKENIZER_JSON.replace('"model": {', '"model": 3, "x": {'), 'its "model" is 3 (an integer), not a mapping'),
    (HF_TOKENIZER_JSON.replace('"added_tokens": []', '"added_tokens": "x"'),
     'its "added_tokens" is "x" (a string), not a list'),
    (HF_TOKENIZER_JSON.replace('"added_tokens": []', '"added_tokens": [{"id": "0"}]'),
     'its "added_tokens" hold {"id": "0"} (a mapping), not a token'),
])
def test_a_tokenizer_json_of_the_wrong_shape_is_reported_as_damaged(tokenizer, tmp_path, text, found):
    """Valid JSON of another shape was "no tokenizer" when found in a folder and "not a SentencePiece
    model: could not parse ModelProto" when named: it is said to be damaged, with the file and what it holds."""
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(text)
    damaged = re.escape(f"tokenizer.json in {folder} is damaged or not a Hugging Face tokenizer: {found}") + \
        r".*download it again, or name the right file"
    for path in (folder, folder / "tokenizer.json", folder / "tokenizer.model"):
        with pytest.raises(InputFileError, match=damaged):
            load_tokenizer(path)
    (folder / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())  # not passed over for one beside it
    with pytest.raises(InputFileError, match=damaged):
        load_tokenizer(folder)


def test_a_tokenizer_json_without_tokens_is_reported_as_damaged(tmp_path):
    """An empty vocabulary ended in "max() arg is an empty sequence"."""
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text(HF_TOKENIZER_JSON.replace('{"a": 0, "b": 1}', "{}"))
    with pytest.raises(InputFileError, match=re.escape(f"tokenizer.json in {tmp_path} is damaged: it holds no tokens")):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(HF_TOKENIZER_JSON)
    assert load_tokenizer(tmp_path).vocab_size == 2


def test_a_git_lfs_pointer_for_a_tokenizer_says_so(tmp_path):
    pointer = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347\nsize 499723\n")
    for name in ("tokenizer.model", "tokenizer.json"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text(pointer)
        with pytest.raises(InputFileError, match=rf"^{name} in {re.escape(str(folder))} is a Git LFS pointer, not "
                                                 rf"the tokenizer .*: run `git lfs pull` in {re.escape(str(folder))}$"):
            load_tokenizer(folder)


def test_no_mask_model_refused_for_mlm(code_texts, tmp_path):
    tok = train_tokenizer(code_texts[:5], tmp_path / "nomask", vocab_size=400, with_mask=False)
    assert tok.mask_id is None
    assert tok.decode(tok.encode(PROSE)) == PROSE
    with pytest.raises(ValueError, match="no <mask> piece"):
        load_tokenizer(tok.path, need_mask=True)


def test_unigram(code_texts, tmp_path):
    tok = train_tokenizer(code_texts[:5], tmp_path / "uni", vocab_size=500, model_type="unigram")
    assert tok.vocab_size == 500 and tok.mask_id == 4
    assert tok.decode(tok.encode(code_texts[0])) == code_texts[0]
    assert tok.decode(tok.encode(PROSE)) == PROSE


def test_training_errors(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], tmp_path / "t", vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], tmp_path / "t", vocab_size=400)
    with pytest.raises(ValueError, match="bpe' or 'unigram"):
        train_tokenizer(["abc"], tmp_path / "t", model_type="wordpiece")
    with pytest.raises(ValueError, match="could not train"):   # vocabulary larger than the text allows
        train_tokenizer(["tiny text"], tmp_path / "t", vocab_size=5000)


def test_cli_help(capsys):
    out = subprocess.run([sys.executable, "-m", "fmtrain.data.tokenizer", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "train" in out and "info" in out
    from fmtrain.data.tokenizer import main
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--vocab-size" in out and "--files" in out and "--text-field" in out


@pytest.mark.slow
def test_cli_train_and_info(text_corpus, tmp_path):
    out = tmp_path / "cli" / "tok"
    subprocess.run([sys.executable, "-m", "fmtrain.data.tokenizer", "train", "--out", str(out),
                    "--vocab-size", "300", "--files", str(text_corpus / "*.txt")],
                   check=True, capture_output=True, text=True)
    tok = load_tokenizer(out.with_suffix(".model"))
    assert tok.vocab_size == 300
    assert (out.parent / "tok.json").is_file()
    info = subprocess.run([sys.executable, "-m", "fmtrain.data.tokenizer", "info", str(tok.path)],
                          check=True, capture_output=True, text=True).stdout
    assert "round trip: True" in info


def test_cli_missing_file_fails_clearly(tmp_path, capsys):
    from fmtrain.data.tokenizer import main
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(tmp_path / "t"), "--files", str(tmp_path / "nope.txt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nope.txt" in err and "does not exist" in err
