"""Generation: the cached path against the recompute path, sampling, and the command."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fmtrain.config import ModelConfig
from fmtrain.generate import generate, next_token
from fmtrain.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def _model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, block_size=4, rank=2,
                loss_chunk=37)
    return build_model(ModelConfig(**{**base, **kw})).to(dtype).eval()


@pytest.mark.parametrize("kw", [dict(attention="fma"), dict(attention="fma", variant="linear", summary="mean"),
                                dict(attention="local"), dict(attention="sdpa")],
                         ids=lambda kw: "-".join(kw.values()))
def test_cache_and_recompute_give_the_same_tokens(kw):
    """Greedy, and sampling with one seed: the cache changes the speed, not the text."""
    model = _model(**kw)
    prompt = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(3))
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9)):
        a = generate(model, prompt, 40, use_cache=True, generator=torch.Generator().manual_seed(7), **sampling)
        b = generate(model, prompt, 40, use_cache=False, generator=torch.Generator().manual_seed(7), **sampling)
        assert a.ids == b.ids and len(a.ids[0]) == 40, sampling
        assert a.cache_bytes > 0 and a.decoded == 39


def test_generation_stops_at_eos_per_sequence():
    model = _model()
    prompt = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, 30, temperature=0.0)
    eos = free.ids[0][4]  # the fifth greedy token of sequence 0 plays end-of-text
    out = generate(model, prompt, 30, temperature=0.0, eos_id=eos)
    assert out.ids[0] == free.ids[0][:free.ids[0].index(eos) + 1]
    if eos in free.ids[1]:
        assert out.ids[1] == free.ids[1][:free.ids[1].index(eos) + 1]
    else:
        assert out.ids[1] == free.ids[1]


def test_top_k_and_top_p_restrict_the_choice():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(4000, 5)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, temperature=1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # softmax: 0.64, 0.23, 0.09, ...: top_p=0.8 keeps the first two, top_p=0.5 only the first.
    assert set(next_token(logits, temperature=1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(next_token(logits, temperature=1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert next_token(logits, temperature=0.0).eq(0).all()


# --------------------------------------------------------------------------- the command
CONFIG = """
[run]
dir = "{run}"
[model]
kind = "{kind}"
vocab_size = 4096
dim = 32
n_layers = 2
n_heads = 2
block_size = 16
rank = 2
summary = "{summary}"
{extra}
[data]
corpus = ["{corpus}/*.txt"]
cache_dir = "{cache}"
tokenizer = "{root}/tokenizer/stdlib-4k.model"
seq_len = 128
batch_size = 2
[train]
steps = 2
warmup_steps = 1
eval_interval = 0
dtype = "fp32"
[checkpoint]
interval = 2
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A causal fma run, a conv one built for 256 tokens and a masked LM, 2 steps each."""
    tmp = tmp_path_factory.mktemp("gen")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]:
        (corpus / (f.stem + ".txt")).write_text(f.read_text(encoding="utf-8", errors="replace"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = {}
    for name, kind, summary, extra in (("gpt", "causal", "m2m", ""), ("conv", "causal", "conv", "max_seq_len = 256"),
                                       ("mlm", "mlm", "m2m", "")):
        cfg = tmp / f"{name}.toml"
        cfg.write_text(CONFIG.format(run=tmp / name, kind=kind, summary=summary, extra=extra, corpus=corpus,
                                     cache=tmp / "cache", root=ROOT))
        r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg)], capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = tmp / name
    out["tmp"] = tmp
    return out


def _gen(run, *args):
    return subprocess.run([sys.executable, "-m", "fmtrain.generate", str(run), *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_command_cache_matches_no_cache_and_reports_speed(runs):
    a = _gen(runs["gpt"], "--prompt", "def main(", "--greedy", "--max-new-tokens", "40")
    b = _gen(runs["gpt"], "--prompt", "def main(", "--greedy", "--max-new-tokens", "40", "--no-cache")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("def main(") and len(a.stdout) > len("def main(\n")
    assert "prefill 3 tokens" in a.stderr and "decode 39 tokens" in a.stderr and "cache" in a.stderr
    assert "recompute (no cache)" in b.stderr


@pytest.mark.slow
def test_command_prompt_file_longer_than_training(runs):
    prompt = runs["tmp"] / "prompt.txt"
    prompt.write_text((ROOT / "fmtrain" / "model.py").read_text())  # thousands of tokens; trained at 128
    r = _gen(runs["gpt"], "--prompt-file", str(prompt), "--max-new-tokens", "20", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt.read_text()) and "more than the 128 the model was trained on" in r.stderr


@pytest.mark.slow
def test_command_refusals_are_one_error_line(runs):
    long = "x = 1\n" * 200  # ~600 tokens: beyond the conv summaries' 256
    for run, args, needle in ((runs["mlm"], ["--prompt", "a"], "masked LM"),
                              (runs["conv"], ["--prompt", long], "conv summaries were built for (max_seq_len=256)"),
                              (runs["gpt"], ["--top-p", "0"], "--top-p")):
        r = _gen(run, *args)
        assert r.returncode == 2 and needle in r.stderr, (needle, r.stderr)
        assert "Traceback" not in r.stderr
    ok = _gen(runs["conv"], "--prompt", "x = 1\n", "--max-new-tokens", "30")  # within 256: fine
    assert ok.returncode == 0, ok.stderr
