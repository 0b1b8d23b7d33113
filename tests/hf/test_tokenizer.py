"""Hugging Face tokenizers in fmtrain's data pipeline (fmtrain/data/hf_tokenizer.py): ids, special
tokens, damaged files, and long documents encoded in bounded pieces."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fmtrain.input_files import InputFileError  # noqa: E402
from tests.hf.conftest import VOCAB, stdlib_texts  # noqa: E402


def test_hf_tokenizer_in_the_data_pipeline(tmp_path, hf_tokenizer):
    from fmtrain.data.hf_tokenizer import HFTokenizer
    from fmtrain.data.tokenizer import load_tokenizer, tokenizer_files
    from fmtrain.data.tokens import TokenData, cached_tokens

    tok = load_tokenizer(hf_tokenizer)  # a folder holding tokenizer.json
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, None)
    text = "def f(x):\n\treturn  x ** 2  # 12345 é ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.bos_id not in ids
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))  # bits per byte count every byte
    assert int(tok.token_bytes[[tok.bos_id, tok.eos_id]].sum()) == 0
    # The embedding may be larger (padded), not smaller.
    load_tokenizer(hf_tokenizer / "tokenizer.json", vocab_size=VOCAB + 16)
    with pytest.raises(ValueError, match=f"has {VOCAB} tokens but the model's embedding has model.vocab_size=300"):
        load_tokenizer(hf_tokenizer, vocab_size=300)
    with pytest.raises(ValueError, match="no mask_token"):
        load_tokenizer(hf_tokenizer, need_mask=True)
    # A checkpoint keeps tokenizer.json and its config; loading its "tokenizer.model" finds them.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for src, name in tokenizer_files(tok.path):
        shutil.copy2(src, ckpt / name)
    assert sorted(p.name for p in ckpt.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = load_tokenizer(ckpt / "tokenizer.model")
    assert again.encode(text) == ids and again.eos_id == tok.eos_id
    # The token cache: documents back to back, each ending in EOS.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = stdlib_texts(4)
    for i, d in enumerate(docs):
        (corpus / f"{i}.txt").write_text(d)
    _, data = cached_tokens(str(corpus / "*.txt"), tok, tmp_path / "cache", progress=False)
    both = [data["train"].document(d) for d in range(data["train"].n_docs)] + \
        [data["validation"].document(d) for d in range(data["validation"].n_docs)]
    assert sorted(tok.decode(d[:-1].tolist()) for d in both) == sorted(docs)
    assert all(int(d[-1]) == tok.eos_id for d in both)
    assert isinstance(data["train"], TokenData)


def test_tokenizer_config_of_the_wrong_shape_names_the_field(tmp_path, hf_tokenizer):
    from fmtrain.data.tokenizer import load_tokenizer

    folder = Path(shutil.copytree(hf_tokenizer, tmp_path / "tok"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": 5}')
    with pytest.raises(InputFileError, match=r"tokenizer_config.json: eos_token must be a token .* found 5 \(an int"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("null")
    with pytest.raises(InputFileError, match=r"tokenizer_config.json must hold a JSON object .*, found null"):
        load_tokenizer(folder)


def prepend_tokenizer(folder: Path) -> Path:
    """A SentencePiece-style BPE laid out as Llama 2's legacy tokenizer.json: a normalizer that
    prepends "\u2581" to every input and turns spaces into "\u2581", no pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")  # no merge across a space
    trainer = trainers.BpeTrainer(vocab_size=VOCAB + 256, show_progress=False,
                                  special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(stdlib_texts(), trainer)
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder / "tokenizer.json"


class Recorder:
    """A ``tokenizers.Tokenizer`` that records the lengths of the texts of each encoding call."""

    def __init__(self, hf):
        self.hf, self.calls = hf, []

    def encode_batch_fast(self, texts, **kwargs):
        self.calls.append([len(t) for t in texts])
        return self.hf.encode_batch_fast(texts, **kwargs)


@pytest.mark.parametrize("layout", ["byte-level", "prepend-normalizer"])
def test_long_documents_are_encoded_in_pieces_to_the_same_ids(tmp_path, hf_tokenizer, monkeypatch, layout):
    from fmtrain.data import hf_tokenizer as H

    path = hf_tokenizer / "tokenizer.json" if layout == "byte-level" else prepend_tokenizer(tmp_path / "tok")
    tok = H.HFTokenizer(path)
    code = "".join(stdlib_texts(8))  # lines, indentation, single spaces
    docs = [code, code.replace("\n", " "), "a short one", ""]
    whole = [e.ids for e in tok.hf.encode_batch(docs, add_special_tokens=False)]
    monkeypatch.setattr(H, "_PIECE_CHARS", 1000)
    monkeypatch.setattr(H, "_BATCH_CHARS", 20_000)
    tok.hf = Recorder(tok.hf)
    assert tok.encode_batch(docs) == whole
    lengths = [n for call in tok.hf.calls for n in call]
    assert len(lengths) > 2 * len(code) // 2000 and max(lengths) <= 2000
    assert max(sum(call) for call in tok.hf.calls) <= 20_000
    assert tok.drop_space == (layout == "prepend-normalizer")
    if tok.drop_space:  # the normalizer's "\u2581" would double the space at every cut
        tok.drop_space = False
        assert tok.encode(code) != whole[0]


def test_a_long_document_is_encoded_in_bounded_pieces_at_the_real_sizes(hf_tokenizer):
    from fmtrain.data import hf_tokenizer as H

    tok = H.HFTokenizer(hf_tokenizer / "tokenizer.json")
    text = "".join(stdlib_texts(40)).replace("\n", " ")[:5 * H._PIECE_CHARS]  # one line
    whole = tok.hf.encode(text, add_special_tokens=False).ids
    tok.hf = Recorder(tok.hf)
    assert tok.encode(text) == whole
    lengths = [n for call in tok.hf.calls for n in call]
    assert len(lengths) >= 3 and sum(lengths) == len(text) and max(lengths) <= 2 * H._PIECE_CHARS


MEASURE_MEMORY = """
import json, sys, sysconfig
from pathlib import Path
from fmtrain.data import hf_tokenizer as H
from tests.hf.conftest import VOCAB, stdlib_texts  # noqa: E402

tok = H.HFTokenizer(sys.argv[1])
H._PIECE_CHARS, H._BATCH_CHARS = 1 << 13, 1 << 16  # the real ones at a smaller scale
files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files).replace("\\n", " ")[:2_000_000]
def peak_mb():  # not ru_maxrss, which keeps the peak of the parent (pytest) across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
start = peak_mb()
ids = tok.encode(text)
bounded = peak_mb() - start
same = tok.hf.encode(text, add_special_tokens=False).ids == ids
print(json.dumps({"bounded": bounded, "whole": peak_mb() - start, "same": same, "chars": len(text)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc (Linux)")
def test_encoding_a_long_one_line_document_takes_bounded_memory(hf_tokenizer):
    """The peak memory of encoding a 2M-character line in pieces, against encoding it whole
    (which takes about 200 bytes per character inside ``tokenizers``)."""
    r = subprocess.run([sys.executable, "-c", MEASURE_MEMORY, str(hf_tokenizer / "tokenizer.json")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, RAYON_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["same"] and got["chars"] == 2_000_000
    assert got["whole"] > 150, got  # what is bounded: the whole line takes this much
    assert got["bounded"] < got["whole"] / 3, got
