import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fmtrain.data import tokens as tokens_mod
from fmtrain.data.corpus import Corpus, CorpusError
from fmtrain.data.tokens import TokenData, build_tokens, cache_key, cached_tokens, token_dtype
from tests.conftest import kill_when, make_config


def test_dtype_by_vocabulary():
    assert token_dtype(1000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert TokenData.from_documents([[70000, 3]], eos_id=2, vocab_size=100_000).tokens.dtype == np.uint32


def test_build_round_trips_every_document(tokenizer, text_corpus, tmp_path):
    corpus = Corpus.parse({"paths": [str(text_corpus)], "val_fraction": 0.2})
    folder, data = cached_tokens(corpus, tokenizer, tmp_path / "cache", progress=False)
    docs = list(corpus.documents())
    train = [t for s, t in docs if s == "train"]
    val = [t for s, t in docs if s == "validation"]
    assert val and train
    for split, texts in (("train", train), ("validation", val)):
        d = data[split]
        assert isinstance(d.tokens, np.memmap) and d.tokens.dtype == np.uint16
        assert d.n_docs == len(texts)
        for i, text in enumerate(texts):
            ids = d.document(i)
            assert ids[-1] == tokenizer.eos_id
            assert tokenizer.decode(ids[:-1].tolist()) == text
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["splits"]["train"]["n_tokens"] == data["train"].n_tokens
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1000


def test_cache_is_reused_and_keyed_by_corpus_and_tokenizer(tokenizer, text_corpus, tmp_path, monkeypatch, code_texts):
    corpus = Corpus.parse(str(text_corpus))
    folder, _ = cached_tokens(corpus, tokenizer, tmp_path, progress=False)
    calls = []
    real = tokens_mod.build_tokens
    monkeypatch.setattr(tokens_mod, "build_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = cached_tokens(corpus, tokenizer.path, tmp_path, progress=False)
    assert again == folder and calls == []                        # reused, not rebuilt
    (text_corpus / "doc00.txt").write_text("changed text\n")
    changed, _ = cached_tokens(corpus, tokenizer, tmp_path, progress=False)
    assert changed != folder and calls == [1]                     # the corpus changed: a new entry
    from fmtrain.data.tokenizer import train_tokenizer
    other_tok = train_tokenizer(code_texts[:3], tmp_path / "other", vocab_size=400)
    assert cache_key(corpus, other_tok) != cache_key(corpus, tokenizer)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]   # no leftovers


def test_progress_is_shown(tokenizer, text_corpus, tmp_path, capsys):
    cached_tokens(str(text_corpus), tokenizer, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "[fmtrain.data] tokenised files" in err and "docs" in err and "MB/s" in err


def test_empty_corpus_is_an_error_and_leaves_nothing(tokenizer, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="no training text"):
        cached_tokens(str(tmp_path / "data" / "empty.txt"), tokenizer, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_file_is_an_error(tokenizer, tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        cached_tokens(str(tmp_path / "missing.jsonl"), tokenizer, tmp_path / "cache", progress=False)


def test_non_utf8_bytes_become_replacement_characters(tokenizer, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 \xff bytes\n" * 20)
    _, data = cached_tokens(Corpus.parse({"paths": [str(tmp_path / "bad.txt")], "val_fraction": 0}),
                            tokenizer, tmp_path / "cache", progress=False)
    text = tokenizer.decode(data["train"].document(0)[:-1].tolist())
    assert text == "caf\ufffd latin-1 \ufffd bytes\n" * 20


def test_empty_validation_split_opens_as_empty(tokenizer, text_corpus, tmp_path):
    _, data = cached_tokens(Corpus.parse({"paths": [str(text_corpus)], "val_fraction": 0}),
                            tokenizer, tmp_path, progress=False)
    assert data["validation"].n_tokens == 0 and data["validation"].n_docs == 0
    assert data["train"].n_docs == 40


@pytest.mark.slow
def test_cli_prebuild(tokenizer, text_corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fmtrain.data.tokens", "--tokenizer", str(tokenizer.path),
                        "--cache-dir", str(tmp_path), "--files", str(text_corpus)],
                       capture_output=True, text=True, env=dict(os.environ, HF_DATASETS_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert "train: " in r.stdout and "tokenised" in r.stderr
    folder, _ = cached_tokens(str(text_corpus), tokenizer, tmp_path, progress=False)
    assert str(folder) in r.stdout                                 # the training run finds that entry


# ------------------------------------------------------------------ distributed: build once

def _dist_worker(rank, world, init_file, model, corpus_dir, cache_dirs, log_dir, local_ranks, bad_file):
    import torch.distributed as dist
    from fmtrain.data import tokens as tm

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    real = tm.build_tokens

    def counting(*a, **k):
        with open(os.path.join(log_dir, f"built-{rank}-{os.getpid()}-{len(os.listdir(log_dir))}"), "w"):
            pass
        return real(*a, **k)

    tm.build_tokens = counting
    try:
        folder, data = tm.cached_tokens(str(corpus_dir), model, cache_dirs[rank], progress=False)
        with open(os.path.join(log_dir, f"result-{rank}"), "w") as f:
            f.write(f"{data['train'].n_tokens}\n")
        # A build that fails on rank 0: every rank gets an error, none waits forever.
        try:
            tm.cached_tokens(str(bad_file), model, cache_dirs[rank], progress=False)
        except (CorpusError, RuntimeError) as err:
            with open(os.path.join(log_dir, f"error-{rank}"), "w") as f:
                f.write(type(err).__name__)
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path, tokenizer, text_corpus, cache_dirs, local_ranks):
    log = tmp_path / "log"
    log.mkdir()
    bad = tmp_path / "empty.txt"
    bad.write_text("")
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "pg"), str(tokenizer.path), text_corpus,
                                           [str(c) for c in cache_dirs], str(log), local_ranks, bad),
                       nprocs=2, join=True, start_method="spawn")
    return sorted(p.name for p in log.iterdir())


@pytest.mark.slow
def test_distributed_rank0_builds_others_wait(tokenizer, text_corpus, tmp_path):
    shared = tmp_path / "cache"
    names = _run_ranks(tmp_path, tokenizer, text_corpus, [shared, shared], local_ranks=[0, 1])
    built = [n for n in names if n.startswith("built-")]
    # One build of the corpus (by rank 0), one failed build of the empty file (rank 0).
    assert len(built) == 2 and all(n.startswith("built-0-") for n in built)
    assert "result-0" in names and "result-1" in names
    results = {(tmp_path / "log" / n).read_text() for n in names if n.startswith("result-")}
    assert len(results) == 1
    assert {"error-0", "error-1"} <= set(names)


@pytest.mark.slow
def test_distributed_node_local_caches_build_per_node(tokenizer, text_corpus, tmp_path):
    # Two "nodes" of one rank each, with separate cache dirs: each node's local rank 0 builds.
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    names = _run_ranks(tmp_path, tokenizer, text_corpus, dirs, local_ranks=[0, 0])
    assert any(n.startswith("built-0-") for n in names) and any(n.startswith("built-1-") for n in names)
    assert all((d / os.listdir(d)[0] / "meta.json").is_file() for d in dirs)


# ------------------------------------------------------------------ a full disk, a killed build

@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """64 KB: less than the tokens of `big_corpus`."""
    return tmpfs(tmp_path / "disk", "size=64k")


@pytest.fixture
def big_corpus(tmp_path):
    """About 400 KB of code in 40 files: some 200 KB of uint16 tokens."""
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}  # line {j}\n"
                                                        for j in range(250)))
    return folder


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_numpy_short_write_counts_as_a_full_disk():
    from fmtrain.errors import no_space

    assert no_space(OSError("7793 requested and 2825 written"))  # numpy's tofile: no errno, only counts
    assert not no_space(OSError("7793 requested"))


@pytest.mark.slow
def test_a_full_disk_while_building_says_so_and_leaves_nothing(tokenizer, big_corpus, small_disk):
    with pytest.raises(CorpusError) as err:
        cached_tokens(str(big_corpus), tokenizer, small_disk, progress=False)
    assert str(err.value) == (f"no space left on device while writing the token cache under {small_disk}; "
                              "free space there or set data.cache_dir elsewhere")
    assert list(small_disk.iterdir()) == []
    # The command: one line, exit 2, nothing left.
    r = subprocess.run([sys.executable, "-m", "fmtrain.data.tokens", "--tokenizer", str(tokenizer.path),
                        "--cache-dir", str(small_disk), "--files", str(big_corpus)],
                       capture_output=True, text=True, env=dict(os.environ, HF_DATASETS_OFFLINE="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [f"error: {err.value}"]
    assert list(small_disk.iterdir()) == []


@pytest.mark.slow
def test_a_full_disk_under_the_trainer_is_one_line(tmp_path, big_corpus, small_disk):
    cfg = make_config(tmp_path, (big_corpus, small_disk))
    # 300 pieces: what SentencePiece can make of this repetitive text.
    r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg), "--model.vocab_size=300"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"no space left on device while writing the token cache under {small_disk}" \
        in errors[0] and "set data.cache_dir elsewhere" in errors[0], r.stderr[-3000:]
    assert "requested and" not in r.stderr
    # The tokenizer trained on the corpus fitted and is kept; no half-written entry is.
    assert [p.name for p in small_disk.iterdir()] == ["tokenizers"]
    assert not [p for p in (small_disk / "tokenizers").iterdir() if ".tmp-" in p.name]


STUCK_BUILD = """
import sys, time
from pathlib import Path
from fmtrain.data import tokens

def stuck(corpus, tokenizer, folder, **kw):  # half-written, then stuck until killed
    Path(folder, "train.bin").write_bytes(b"x" * 1000)
    time.sleep(300)

tokens.build_tokens = stuck
tokens.cached_tokens(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""


def test_a_killed_build_leaves_its_folder_and_the_next_run_removes_it(tokenizer, text_corpus, tmp_path, capfd):
    from fmtrain.leftovers import owner_tag

    cache = tmp_path / "cache"
    pid = kill_when([sys.executable, "-c", STUCK_BUILD, str(text_corpus), str(tokenizer.path), str(cache)],
                    lambda: list(cache.glob("*.tmp-*/train.bin")),
                    env=dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1"))
    [left] = cache.glob("*.tmp-*")
    assert left.name.endswith(f".tmp-{owner_tag()}-{pid}")
    key = left.name.split(".")[0]
    # Beside it: a live build here (left alone, quietly), one of another host and one named before
    # owners were recorded (left: this host cannot check their owners; said where they are).
    live = subprocess.Popen(["sleep", "300"])
    try:
        running = cache / f"{'1' * 20}.tmp-{owner_tag()}-{live.pid}"
        elsewhere = cache / f"{'2' * 20}.tmp-gpu-node-3-{_dead_pid()}"
        unrecorded = cache / f"{'3' * 20}.tmp-k2j_x8"  # tempfile.mkdtemp's, from before
        for folder in (running, elsewhere, unrecorded):
            folder.mkdir()
        capfd.readouterr()
        folder, data = cached_tokens(str(text_corpus), tokenizer, cache, progress=False)
        err = capfd.readouterr().err
        assert folder.name == key and data["train"].n_docs > 0
        assert not left.exists() and running.is_dir() and elsewhere.is_dir() and unrecorded.is_dir()
        assert f"removed {left}, left by a token cache build that was killed (pid {pid} is gone)" in err
        assert f"warning: {elsewhere} is left by a token cache build that was killed, or in use by pid" in err
        assert "on gpu-node-3" in err and f"warning: {unrecorded}" in err and str(running) not in err
    finally:
        live.kill()
        live.wait()


def test_a_killed_tokenizer_training_leaves_files_the_next_training_removes(text_corpus, tmp_path, capfd):
    from fmtrain.data.tokens import cached_tokenizer
    from fmtrain.leftovers import owner_tag

    cache = tmp_path / "cache"
    (cache / "tokenizers").mkdir(parents=True)
    pid = _dead_pid()
    stale = [cache / "tokenizers" / f"{'a' * 20}.tmp-{owner_tag()}-{pid}{ext}" for ext in (".model", ".json")]
    for path in stale:
        path.write_bytes(b"half")
    tok = cached_tokenizer(str(text_corpus), cache, vocab_size=300)
    assert tok.vocab_size == 300 and not any(p.exists() for p in stale)
    assert f"removed {stale[0]}, left by a tokenizer training that was killed (pid {pid} is gone)" in \
        capfd.readouterr().err
    assert sorted(p.suffix for p in (cache / "tokenizers").iterdir()) == [".json", ".model"]


def test_a_full_disk_while_training_the_tokenizer_says_so_and_leaves_no_file(text_corpus, tmp_path, tmpfs):
    from fmtrain.data.tokens import cached_tokenizer

    disk = tmpfs(tmp_path / "tiny", "size=4k")  # one page: less than the model
    with pytest.raises(CorpusError, match=f"no space left on device while writing the tokenizer under {disk}; "
                                          "free space there or set data.cache_dir elsewhere"):
        cached_tokenizer(str(text_corpus), disk, vocab_size=300)
    assert list((disk / "tokenizers").iterdir()) == []
