"""Generation: the cached path against the recompute path, sampling, and the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fmtrain.config import ModelConfig
from fmtrain.generate import generate, next_token
from tests.conftest import COMMAND_CONFIG, ROOT, write_stdlib_corpus
from fmtrain.model import build_model

def _model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, block_size=4, rank=2,
                loss_chunk=37)
    return build_model(ModelConfig(**{**base, **kw})).to(dtype).eval()


@pytest.mark.parametrize("kw", [dict(attention="fma"), dict(attention="fma", variant="linear", summary="mean"),
                                dict(attention="fma", refine=2), dict(attention="local"), dict(attention="sdpa")],
                         ids=lambda kw: "-".join(map(str, kw.values())))
def test_cache_and_recompute_give_the_same_tokens(kw):
    """Greedy, and sampling with one seed: the cache changes the speed, not the text (a refined
    model's key/value store on the host, as ``--refine-store host`` puts it)."""
    model = _model(**kw)
    prompt = torch.randint(0, 61, (2, 21), generator=torch.Generator().manual_seed(3))
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9)):
        a = generate(model, prompt, 40, use_cache=True, generator=torch.Generator().manual_seed(7), **sampling,
                     store_device="cpu")
        b = generate(model, prompt, 40, use_cache=False, generator=torch.Generator().manual_seed(7), **sampling)
        assert a.ids == b.ids and len(a.ids[0]) == 40, sampling
        assert a.cache_bytes > 0 and a.decoded == 39
        assert (a.store_bytes > 0) == bool(kw.get("refine"))


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


def test_tiny_and_huge_temperatures_and_extreme_cuts_sample_from_a_distribution():
    """--temperature 1e-300 passed the check and died in torch ("probability tensor contains either inf,
    nan"): the scaled logits are formed in float64 after the row's largest is subtracted, so every
    temperature > 0 samples (a tiny one as greedy, a huge one near uniform), and top-k / top-p at their
    extremes keep at least the most likely token."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [1e38, -1e38, 0.0, 5.0, 5.0]]).to(torch.bfloat16)
    logits = logits.float().repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    greedy = next_token(logits, temperature=0.0)
    for t in (1e-300, 5e-324, 1e-45, 1e-8):
        assert torch.equal(next_token(logits, temperature=t, generator=g), greedy), t
        assert torch.equal(next_token(logits.to(torch.bfloat16), temperature=t, generator=g), greedy), t
    flat = torch.bincount(next_token(logits[:1].expand(5000, 5), temperature=1e300, generator=g), minlength=5)
    assert flat.min() > 800, flat  # near uniform, no nan
    for kw in (dict(top_k=1), dict(top_p=1e-300), dict(top_p=5e-324), dict(top_k=1, top_p=1e-300)):
        assert torch.equal(next_token(logits, temperature=1.0, generator=g, **kw), greedy), kw
    assert set(next_token(logits[:1].expand(4000, 5), temperature=1.0, top_k=10**30, top_p=1 - 1e-16,
                          generator=g).tolist()) == {0, 1, 2, 3, 4}
    masked = torch.tensor([[0.0, float("-inf"), -1.0]])  # -inf: a token ruled out, never drawn
    assert all(next_token(masked, temperature=t, generator=g).item() == 0 for t in (1e-300, 1.0))
    assert set(next_token(masked.expand(2000, 3), temperature=1e300, generator=g).tolist()) == {0, 2}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_logits_that_are_not_finite_are_named_not_sampled(bad):
    from fmtrain.generate import NonFiniteLogits

    for t in (0.0, 1.0):
        with pytest.raises(NonFiniteLogits, match="next-token logits are not finite"):
            next_token(torch.tensor([[0.0, 1.0], [bad, 0.0]]), temperature=t)
    with pytest.raises(NonFiniteLogits):
        next_token(torch.full((1, 3), float("-inf")), temperature=1.0)


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A causal fma run, a conv one built for 256 tokens and a masked LM, 2 steps each."""
    tmp = tmp_path_factory.mktemp("gen")
    corpus = write_stdlib_corpus(tmp / "corpus", 20)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = {}
    for name, kind, summary, extra in (("gpt", "causal", "m2m", ""), ("conv", "causal", "conv", "max_seq_len = 256"),
                                       ("mlm", "mlm", "m2m", "")):
        cfg = tmp / f"{name}.toml"
        cfg.write_text(COMMAND_CONFIG.format(run=tmp / name, kind=kind, summary=summary, extra=extra, corpus=corpus,
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
    assert "its coarse levels above 2 were never trained (--past-training keeps to those)" in r.stderr
    assert "RoPE meets distances it never trained on (--rope-scaling llama3:" in r.stderr
    capped = _gen(runs["gpt"], "--prompt-file", str(prompt), "--max-new-tokens", "20", "--seed", "1",
                  "--max-level", "trained", "--rope-scaling", "llama3:8")
    assert capped.returncode == 0 and "never trained" not in capped.stderr, capped.stderr
    assert capped.stdout.startswith(prompt.read_text()) and capped.stdout != r.stdout  # scaled RoPE: other tokens
    past = _gen(runs["gpt"], "--prompt-file", str(prompt), "--max-new-tokens", "20", "--seed", "1", "--past-training")
    assert past.returncode == 0, past.stderr  # plain fma: the trained levels, so no note about the others
    assert "coarse levels" not in past.stderr and "RoPE meets distances" in past.stderr, past.stderr


@pytest.mark.slow
def test_command_refusals_are_one_error_line(runs):
    long = "x = 1\n" * 200  # ~600 tokens: beyond the conv summaries' 256
    for run, args, needle in ((runs["mlm"], ["--prompt", "a"], "masked LM"),
                              (runs["conv"], ["--prompt", long], "conv summaries were built for (max_seq_len=256)"),
                              (runs["gpt"], ["--top-p", "0"], "--top-p"),
                              (runs["gpt"], ["--max-level", "0"], "--max-level 0: give a whole number >= 1"),
                              (runs["gpt"], ["--rope-scaling", "yarn:4"],
                               "--rope-scaling 'yarn:4': give llama3:F or linear:F with a factor F > 0"),
                              (runs["gpt"], ["--flat-top", "--max-level", "1"],
                               "--flat-top: widens the top level for adaptive refinement")):
        r = _gen(run, *args)
        assert r.returncode == 2 and needle in r.stderr, (needle, r.stderr)
        assert "Traceback" not in r.stderr
    ok = _gen(runs["conv"], "--prompt", "x = 1\n", "--max-new-tokens", "30")  # within 256: fine
    assert ok.returncode == 0, ok.stderr


@pytest.mark.slow
def test_command_tiny_temperature_is_greedy_and_weights_that_overflow_are_one_line(runs, tmp_path):
    greedy = _gen(runs["gpt"], "--prompt", "def main(", "--greedy", "--max-new-tokens", "12", "--ignore-eos")
    for t in ("1e-300", "5e-324"):
        r = _gen(runs["gpt"], "--prompt", "def main(", "--temperature", t, "--top-k", "0", "--top-p", "1e-300",
                 "--max-new-tokens", "12", "--ignore-eos")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == greedy.stdout, (t, r.stdout, greedy.stdout)
    # A model-only export whose head weights hold a nan (written so, with a meta.json that matches):
    # the text so far is kept and one line says what is wrong.
    from safetensors.torch import load_file, save_file

    from fmtrain.checkpoint import write_meta

    out = tmp_path / "nan"
    assert subprocess.run([sys.executable, "-m", "fmtrain.export", str(runs["gpt"]), str(out)],
                          capture_output=True, timeout=300).returncode == 0
    sd = load_file(out / "model.safetensors")
    sd["head.weight" if "head.weight" in sd else "embed.weight"][:, 0] = float("nan")
    save_file(sd, out / "model.safetensors")
    meta = json.loads((out / "meta.json").read_text())
    write_meta(out, **{k: v for k, v in meta.items() if k not in ("files", "crc32")})
    r = _gen(out, "--prompt", "def main(", "--max-new-tokens", "5")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "next-token logits are not finite (nan or inf) after 0 new token(s)" in errors[0]
    assert f"the model of {out}" in errors[0] and r.stdout == "def main(\n", r.stderr


# --------------------------------------------------------------------------- arguments mean what they say
@pytest.mark.parametrize("kw, words", [
    (dict(max_new_tokens=-1), "max_new_tokens=-1: give a whole number >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5: give a whole number >= 0"),
    (dict(temperature=float("nan")), "temperature=nan: give a finite number >= 0 (0: greedy)"),
    (dict(temperature=float("inf")), "temperature=inf: give a finite number >= 0"),
    (dict(temperature=-0.5), "temperature=-0.5: give a finite number >= 0"),
    (dict(top_k=-1), "top_k=-1: give a whole number >= 0"),
    (dict(top_p=0.0), "top_p=0.0: give a number in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5: give a number in (0, 1]"),
    (dict(top_p=float("nan")), "top_p=nan: give a number in (0, 1]"),
])
def test_the_python_api_refuses_sampling_arguments_by_name(kw, words):
    """generate() and next_token() say which argument is out of range before the model runs (no
    error from inside torch, no division by zero)."""
    model = _model()
    prompt = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    call = {"max_new_tokens": 4, "temperature": 1.0, **kw}
    with pytest.raises(ValueError) as exc:
        generate(model, prompt, call.pop("max_new_tokens"), **call)
    assert words in str(exc.value)
    if "max_new_tokens" not in kw:
        with pytest.raises(ValueError) as exc:
            next_token(torch.zeros(1, 61), **{"temperature": 1.0, **kw})
        assert words in str(exc.value)


def test_zero_new_tokens_is_an_empty_continuation_and_off_values_are_accepted():
    model = _model()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt, 0)
    assert out.ids == [[], []] and out.decoded == 0 and out.prefill_s == 0
    # The documented "off" values: top_k 0 or None, top_p 1 or None, temperature 0 (greedy).
    for kw in (dict(top_k=0), dict(top_k=None), dict(top_p=1.0), dict(top_p=None), dict(temperature=0.0)):
        assert len(generate(model, prompt, 3, **kw).ids[0]) == 3, kw
    with pytest.raises(ValueError, match=r"prompt of shape \(5,\)"):
        generate(model, prompt[0], 3)


@pytest.mark.parametrize("args, words", [
    (["--max-new-tokens", "-1"], "--max-new-tokens -1: give a whole number >= 0"),
    (["--top-k", "-1"], "--top-k -1: give a whole number >= 0 (0: no cut"),
    (["--temperature", "nan"], "--temperature nan: give a finite number >= 0 (0: greedy)"),
    (["--temperature", "inf", "--greedy"], "--temperature inf: give a finite number >= 0"),
    (["--temperature", "-1"], "--temperature -1.0: give a finite number >= 0"),
    (["--top-p", "0"], "--top-p 0.0: give a number in (0, 1]"),
    (["--top-p", "nan"], "--top-p nan: give a number in (0, 1]"),
    (["--seed", "-1"], "--seed -1: give a whole number from 0 to 18446744073709551615"),
    (["--seed", str(2**64)], f"--seed {2**64}: give a whole number from 0 to"),
])
def test_command_refuses_each_sampling_argument_by_name_before_loading(tmp_path, args, words):
    """One error: line naming the option, the value and what is accepted; checked before the
    checkpoint is looked for (there is none here)."""
    r = _gen(tmp_path / "no-run", "--prompt", "a", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not r.stdout


@pytest.mark.slow
def test_command_zero_and_one_new_tokens_report_sensibly(runs):
    r = _gen(runs["gpt"], "--prompt", "def main(", "--max-new-tokens", "0")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "def main(\n" and "no new tokens asked for (--max-new-tokens 0)" in r.stderr
    r = _gen(runs["gpt"], "--prompt", "def main(", "--max-new-tokens", "1", "--seed", str(2**64 - 1))
    assert r.returncode == 0, r.stderr
    assert "prefill 3 tokens" in r.stderr and "decode 0 tokens" in r.stderr and "nan" not in r.stderr, r.stderr


def _read_until(stream, n: int, timeout: float = 240) -> bytes:
    """At least ``n`` bytes from a pipe, or what came within ``timeout`` seconds."""
    import select
    import time

    got, deadline = b"", time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if select.select([stream], [], [], 1.0)[0]:
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            got += chunk
    return got


def _endless(run, **popen):
    """The command generating (nearly) without end, its SIGINT not ignored whatever this process does
    (a shell without job control starts background jobs with SIGINT ignored, which children inherit; a
    Python handler is reset to the default at exec, and Python then turns SIGINT into KeyboardInterrupt)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "fmtrain.generate", str(run), "--prompt", "def main(",
                                 "--max-new-tokens", "1000000", "--ignore-eos"],
                                env=dict(os.environ, OMP_NUM_THREADS="1"), **popen)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_ctrl_c_stops_generation_with_the_text_kept_and_exit_130(runs):
    import signal

    proc = _endless(runs["gpt"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = _read_until(proc.stdout, len("def main(") + 20)  # the prompt and generated text: decoding
        assert len(seen) >= len("def main(") + 20, proc.stderr.read() if proc.poll() is not None else seen
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    out = seen + rest
    assert out.startswith(b"def main(") and out.endswith(b"\n") and len(out) > len(seen) - 1
    assert b"prefill" not in out  # the speed report goes to stderr, and none is printed for a stop


@pytest.mark.slow
def test_a_closed_pipe_stops_generation_quietly(runs):
    """`... | head -c 10` in a shell: head exits after 10 bytes, the generator stops at its next write
    with exit status 141 (as a command killed by SIGPIPE reports) and nothing on stderr."""
    script = ('OMP_NUM_THREADS=1 "$0" -m fmtrain.generate "$1" --prompt "def main(" --max-new-tokens 1000000 '
              '--ignore-eos | head -c 10; exit "${PIPESTATUS[0]}"')
    r = subprocess.run(["bash", "-c", script, sys.executable, str(runs["gpt"])], capture_output=True, timeout=300)
    assert r.returncode == 141, (r.returncode, r.stderr[-3000:])
    assert r.stdout.startswith(b"def main(") and len(r.stdout) == 10
    assert r.stderr == b"", r.stderr[-3000:]  # no traceback, no "Exception ignored ... BrokenPipeError"
