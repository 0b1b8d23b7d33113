"""The trainer end to end, through its command line: DeepSpeed ZeRO 0-3 on 1 and 2
gloo ranks, exact resume, damaged checkpoints, TensorBoard logs, eval and generate."""
import json
import math
import subprocess
import sys

import pytest

from fmtrain.checkpoint import find_checkpoints, latest_valid
from tests.conftest import ENV, losses, make_config, metrics, train


def test_causal_lm_trains_and_logs(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    r = train(cfg)
    rows = metrics(cfg)
    steps = [m for m in rows if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    for m in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= set(m)
    assert steps[-1]["tokens_seen"] == 8 * 2 * 128
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3, [m["loss"] for m in steps]
    evals = [m for m in rows if "eval_loss" in m]
    assert len(evals) == 2 and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert 0 < evals[1]["eval_bpb"] < evals[0]["eval_bpb"]
    assert "step 8/8" in r.stdout and "tok/s" in r.stdout and "GFLOP/s" in r.stdout
    assert "finished run: step 8/8" in r.stdout  # the summary line
    assert "Setting accelerator to CPU" not in r.stderr and "built successfully" not in r.stdout
    run = tmp_path / "run"
    assert (run / "config.toml").is_file()
    assert [p.name for p in find_checkpoints(run / "checkpoints")] == ["step_00000006", "step_00000008"]
    # TensorBoard's own reader sees the scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([m["loss"] for m in steps])
    assert len(acc.Scalars("eval/bpb")) == 2


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, corpus):
    straight = make_config(tmp_path, corpus, name="straight")
    train(straight, "--train.steps=6")
    split = make_config(tmp_path, corpus, name="split")
    r1 = train(split, "--train.steps=6", "--train.stop_at_step=3")
    assert "stopping after step 3" in r1.stdout
    r2 = train(split, "--train.steps=6")
    assert "resumed from" in r2.stdout
    assert losses(split) == losses(straight)  # bitwise: JSON keeps every bit of a float
    gn = lambda c: [m["grad_norm"] for m in metrics(c) if "loss" in m]  # noqa: E731
    assert gn(split) == gn(straight)


@pytest.mark.slow
def test_document_masking_trains_resumes_bitwise_and_evaluates_as_it_trained(tmp_path, corpus):
    """data.document_masking (with position_reset): the loss is finite and falls and differs from the unmasked
    run's, a resume reproduces the run bitwise (doc_positions come from the loader's state), and fmtrain.eval
    runs on it and agrees with training's evaluation (whether it masks: tests/test_eval.py)."""
    masking = ("--data.document_masking=true", "--data.position_reset=true")
    straight = make_config(tmp_path, corpus, name="straight")
    train(straight, "--train.steps=6", *masking)
    split = make_config(tmp_path, corpus, name="split")
    train(split, "--train.steps=6", "--train.stop_at_step=3", *masking)
    r = train(split, "--train.steps=6", *masking)
    assert "resumed from" in r.stdout
    ls = losses(split)
    assert ls == losses(straight) and all(math.isfinite(x) for x in ls) and ls[-1] < ls[0] - 0.3, ls
    plain = make_config(tmp_path, corpus, name="plain")
    train(plain, "--train.steps=6", "--train.stop_at_step=2")
    assert losses(plain)[1] != ls[1]  # the trainer did mask: attention across documents trains otherwise
    ev = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(tmp_path / "split"), "--batches", "2"],
                        capture_output=True, text=True, env=ENV)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert result["eval_loss"] == pytest.approx(metrics(split)[-1]["eval_loss"], rel=1e-6)


def test_damaged_and_partial_checkpoints_are_skipped(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    train(cfg, "--train.steps=6")
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpts / "step_00000006"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # cut off mid-write
    (ckpts / ".step_00000009.partial").mkdir()  # a save that crashed
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest_valid(ckpts) == ckpts / "step_00000003"
    before = losses(cfg)
    r = train(cfg, "--train.steps=6")
    assert "resumed from" in r.stdout and "step_00000003" in r.stdout
    assert losses(cfg) == before


def test_bad_config_is_refused_with_the_fix(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg), "--model.n_heads=3",
                        "--train.stepz=4"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "train.stepz" in r.stderr and "Did you mean 'steps'" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_tokenizer_found_nowhere_is_refused_naming_every_place_looked(tmp_path, monkeypatch):
    from fmtrain.config import load_config
    from fmtrain.config.loading import PROJECT
    from fmtrain.train import DataError, train

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run.toml").write_text(f'[run]\ndir = "{tmp_path / "r"}"\n[data]\ntokenizer = "missing.model"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:  # before the distributed start: nothing is written
        train(load_config("exp/run.toml"))
    message = str(info.value)
    tried = ", ".join(str(folder / "missing.model") for folder in (tmp_path, tmp_path / "exp", PROJECT))
    assert f"data.tokenizer = 'missing.model' was not found (looked for: {tried}); " in message, message
    assert "leave data.tokenizer empty to train one" in message and not (tmp_path / "r").exists()


def test_eval_and_generate_from_a_checkpoint(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    train(cfg, "--train.steps=3")
    run = tmp_path / "run"
    ev = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(run), "--batches", "2"],
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert "eval batch 2/2" in ev.stderr and "train.eval_batches = 2" in ev.stderr  # progress, and why it differs
    assert result["eval_loss"] == pytest.approx(metrics(cfg)[-1]["eval_loss"], rel=1e-6)
    gen = subprocess.run([sys.executable, "-m", "fmtrain.generate", str(run), "--prompt", "def ",
                          "--tokens", "20", "--temperature", "0"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("def ") and len(gen.stdout) > len("def \n")


@pytest.mark.slow
# Every stage on 2 ranks, where ZeRO partitions, and on one rank the stages without (0) and with the
# most partitioning machinery (3); each model under ZeRO 0 and 3 on 2 ranks, the other cases shared
# between them (the model and the stage are independent: ZeRO partitions whatever the model holds).
@pytest.mark.parametrize("kind,zero,nproc", [("causal", 0, 1), ("mlm", 3, 1), ("causal", 0, 2), ("mlm", 0, 2),
                                             ("causal", 1, 2), ("mlm", 2, 2), ("causal", 3, 2), ("mlm", 3, 2)])
def test_both_models_train_under_every_zero_stage(tmp_path, corpus, kind, zero, nproc):
    cfg = make_config(tmp_path, corpus, kind=kind)
    train(cfg, f"--parallel.zero_stage={zero}", "--train.eval_batches=1", nproc=nproc)
    ls = losses(cfg)
    assert len(ls) == 8 and ls[-1] < ls[0] - 0.3, ls
    assert metrics(cfg)[-2]["tokens_seen"] == 8 * 2 * 128 * nproc


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])  # ZeRO 1 takes ZeRO 2's optimizer class and files in DeepSpeed
def test_resume_bitwise_on_two_ranks(tmp_path, corpus, zero):
    straight = make_config(tmp_path, corpus, kind="mlm", name="straight")
    train(straight, "--train.steps=6", f"--parallel.zero_stage={zero}", nproc=2)
    split = make_config(tmp_path, corpus, kind="mlm", name="split")
    train(split, "--train.steps=6", "--train.stop_at_step=3", f"--parallel.zero_stage={zero}", nproc=2)
    train(split, "--train.steps=6", f"--parallel.zero_stage={zero}", nproc=2)
    assert losses(split) == losses(straight)
