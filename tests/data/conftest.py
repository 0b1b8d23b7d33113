"""Shared fixtures: small tokenizers trained once per session, small corpora on disk."""

import os

# HF datasets reads this when imported: tests never touch the network.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest

from fmtrain.data.corpus import Corpus, stdlib_directories
from fmtrain.data.tokenizer import train_tokenizer

PROSE = (
    "It was the best of times, it was the worst of times.  Two spaces here;\n"
    "\ttab-indented line, digits 1234567890 and 3.14159.\n\n"
    "Unicode: café, naïve, Straße, 東京, Ελληνικά, emoji 🚀🙂, math ∑∫√.\n"
    "   leading spaces and trailing spaces   \n"
)


def stdlib_sample(max_bytes: int) -> list[str]:
    """Whole .py files from a few stdlib packages, up to `max_bytes`: real code for small tokenizers."""
    groups = stdlib_directories()
    texts, total = [], 0
    for d in ("json", "email", "asyncio", "http", "logging", "."):
        for _, path in groups.get(d, []):
            text = path.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text)
            if total >= max_bytes:
                return texts
    return texts


@pytest.fixture(scope="session")
def code_texts() -> list[str]:
    return stdlib_sample(1_500_000)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, code_texts):
    """BPE, 1000 pieces, with MASK; trained on about 1.5 MB of stdlib code plus some prose."""
    out = tmp_path_factory.mktemp("tok") / "bpe1k"
    return train_tokenizer(code_texts + [PROSE] * 20, out, vocab_size=1000)


@pytest.fixture
def text_corpus(tmp_path) -> Path:
    """A folder of 40 small text files (one document each)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(40):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j}  # line {j}\n" for j in range(30 + i))
        (folder / f"doc{i:02d}.txt").write_text(body)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
