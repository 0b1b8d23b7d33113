"""Faults produced for real (truncated and corrupted files, a full tmpfs, a kill, two trainers,
changed settings, bad input): nothing good is lost, and the message names the problem.

Most tests copy one trained run (checkpoints at steps 3 and 6) and break the copy. Those that
run the trainer several times are marked slow (5-25 s each here); the others take ~30 s together.
The full-disk tests mount a tmpfs (root only; skipped elsewhere).
"""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmtrain.checkpoint import CheckpointError, find_checkpoints, validate
from tests.conftest import ENV, assert_one_error_line, losses, make_config, metrics, snapshot, train

def run_train(cfg: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The trainer, whatever its exit status (``train`` asserts success)."""
    return subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg), *overrides], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def make6(tmp_path: Path, corpus) -> Path:
    """tests/conftest.py's make_config with train.steps = 6 in the file."""
    cfg = make_config(tmp_path, corpus)
    cfg.write_text(cfg.read_text().replace("steps = 8", "steps = 6"))
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    """A finished 6-step run: checkpoints step_00000003 and step_00000006."""
    cfg = make6(tmp_path_factory.mktemp("base"), corpus)
    train(cfg)
    return cfg


@pytest.fixture
def run(tmp_path, base, corpus):
    """A copy of the base run under tmp_path: (config, run dir, checkpoints dir)."""
    cfg = make6(tmp_path, corpus)
    shutil.copytree(base.parent / "run", tmp_path / "run")
    return cfg, tmp_path / "run", tmp_path / "run" / "checkpoints"


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*.pt")), key=lambda p: p.stat().st_size)


def flip_block(path: Path) -> None:
    """Overwrite 4 KB in the middle with other bytes: the size stays, the content does not."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes((b ^ 0xFF) for b in data[mid:mid + 4096])
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- checkpoints
def test_a_checkpoint_holds_no_tokenizer_json_that_is_not_a_hugging_face_tokenizer(run):
    _, _, ckpts = run
    for step in ckpts.glob("step_*"):
        names = {p.name for p in step.iterdir()}
        assert {"tokenizer.model", "sentencepiece_settings.json"} <= names and "tokenizer.json" not in names


def test_every_checkpoint_damaged_refuses_to_start_over(run):
    cfg, rundir, ckpts = run
    for step in ckpts.iterdir():
        victim = largest_file(step)
        victim.write_bytes(victim.read_bytes()[:1000])  # truncated
    before, log_before = snapshot(ckpts), (rundir / "metrics.jsonl").read_text()
    r = run_train(cfg)
    assert_one_error_line(r, "step_00000003", "step_00000006", "bytes", "none can be loaded",
                          f"mv {ckpts} {ckpts}.damaged")
    assert snapshot(ckpts) == before and (rundir / "metrics.jsonl").read_text() == log_before
    # The hint is true: moving the checkpoints away starts over from step 0.
    shutil.move(ckpts, f"{ckpts}.damaged")
    r = train(cfg, "--train.steps=2")
    assert "resumed" not in r.stdout and [m["step"] for m in metrics(cfg) if "loss" in m] == [1, 2]


def test_flipped_block_is_caught_by_checksum_and_the_previous_checkpoint_used(run, base):
    cfg, rundir, ckpts = run
    victim = largest_file(ckpts / "step_00000006")
    size = victim.stat().st_size
    flip_block(victim)
    assert victim.stat().st_size == size
    with pytest.raises(CheckpointError, match="is corrupt"):
        validate(ckpts / "step_00000006")
    validate(ckpts / "step_00000006", checksums=False)  # sizes alone do not see it
    r = train(cfg)
    assert "step_00000006" in r.stderr and "is corrupt (CRC-32" in r.stderr, r.stderr[-2000:]
    assert f"resumed from {ckpts / 'step_00000003'}" in r.stdout
    assert losses(cfg) == losses(base)  # retrained 4-6 bitwise, nothing from the corrupt state
    validate(ckpts / "step_00000006")  # rewritten whole


@pytest.mark.slow
def test_an_intact_checkpoint_that_does_not_load_is_named_with_the_way_back(run, base):
    from fmtrain.checkpoint import META, crc32

    cfg, rundir, ckpts = run
    newest = ckpts / "step_00000006"
    (newest / "rank_00000.pt").write_bytes(b"not a pickle " * 100)  # as if from another version ...
    meta = json.loads((newest / META).read_text())  # ... whose meta.json matches it
    meta["files"]["rank_00000.pt"] = (newest / "rank_00000.pt").stat().st_size
    meta["crc32"]["rank_00000.pt"] = crc32(newest / "rank_00000.pt")
    (newest / META).write_text(json.dumps(meta))
    r = run_train(cfg, "--train.steps=8")
    assert_one_error_line(r, f"{newest} is intact but does not load", "mv ")
    hint = r.stderr.split("(mv ")[1].split(")")[0]
    subprocess.run(["mv", *hint.split()], check=True)  # the hint, as given
    r = train(cfg)
    assert f"resumed from {ckpts / 'step_00000003'}" in r.stdout


@pytest.mark.slow
def test_pruning_never_deletes_the_newest_valid_checkpoint(run, base):
    cfg, rundir, ckpts = run
    victim = largest_file(ckpts / "step_00000006")
    victim.write_bytes(victim.read_bytes()[:100])  # damaged: step 3 is the only valid one
    train(cfg, "--checkpoint.keep=1", "--checkpoint.interval=1", "--train.stop_at_step=4")
    names = [p.name for p in find_checkpoints(ckpts)]
    assert "step_00000004" in names and "step_00000003" not in names, names
    validate(ckpts / "step_00000004")
    r = train(cfg, "--checkpoint.keep=1")  # skips the damaged 6, resumes from 4, finishes
    assert f"resumed from {ckpts / 'step_00000004'}" in r.stdout
    assert losses(cfg) == losses(base)


@pytest.mark.slow
def test_divergence_stops_without_a_checkpoint_and_keeps_the_last_finite_one(run, base):
    import torch

    from fmtrain.export import load_model_state

    cfg, rundir, ckpts = run
    before = snapshot(ckpts)
    # A huge learning rate from step 7 on: step 8's gradients are NaN (step 9 would checkpoint).
    r = run_train(cfg, "--train.steps=12", "--train.lr=1e30", "--train.min_lr=1e29",
                  "--checkpoint.allow_changes=train.lr,train.min_lr")
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "error: training diverged at step 8" in r.stderr, r.stderr[-3000:]
    assert "gradient norm nan" in r.stderr
    assert f"the last checkpoint, {ckpts / 'step_00000006'}, is finite and kept" in r.stderr
    assert snapshot(ckpts) == before
    assert all(bool(torch.isfinite(t).all()) for t in load_model_state(ckpts / "step_00000006").values())
    assert [m["step"] for m in metrics(cfg) if "loss" in m][-1] == 8  # the diverged step is on record
    # The hint holds: with a learning rate that does not diverge (the original one) it goes on.
    r = train(cfg, "--train.steps=12", "--checkpoint.allow_changes=train.lr,train.min_lr")
    assert f"resumed from {ckpts / 'step_00000006'}" in r.stdout
    assert losses(cfg)[:6] == losses(base) and len(losses(cfg)) == 12


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """A 1 MB tmpfs (root only: skipped elsewhere)."""
    return tmpfs(tmp_path / "disk", "size=1m")


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_says_so_and_cleans_up(tmp_path, corpus, small_disk):
    cfg = make_config(tmp_path, corpus)
    # One checkpoint of this model (~650 KB) fits in 1 MB, a second does not.
    r = run_train(cfg, "--train.steps=6", f"--checkpoint.dir={small_disk}")
    assert_one_error_line(r, "no space left on device", ".step_00000006.partial", "step_00000003 is kept")
    assert sorted(p.name for p in small_disk.iterdir()) == [".lock", "step_00000003"]  # the partial folder is gone
    validate(small_disk / "step_00000003")
    # The hint holds: with space freed (here: a larger file system), a restart resumes and finishes.
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    r = train(cfg, "--train.steps=6", f"--checkpoint.dir={small_disk}")
    assert f"resumed from {small_disk / 'step_00000003'}" in r.stdout and "finished run: step 6/6" in r.stdout


def test_metrics_lines_are_whole_on_a_full_disk_and_a_torn_line_does_not_block_a_restart(run, small_disk, capfd):
    from fmtrain.metrics import Metrics

    cfg, rundir, ckpts = run
    import torch

    log = Metrics(small_disk, total_steps=10, start_step=0, enabled=True, flops_per_token=1.0, peak=None)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # fill the disk to its last bytes (unbuffered: close cannot fail)
        try:
            while True:
                fh.write(b"x" * 512)
        except OSError:
            pass
    for step in range(1, 40):  # a few fit in the last block, then ENOSPC
        log.step(step=step, loss=1.0, lr=0.1, grad_norm=1.0, tokens_seen=step, tokens_per_s=1.0,
                 step_time=1.0, data_time=0.0, device=torch.device("cpu"))
    assert "cannot write" in capfd.readouterr().err  # said once, and training would go on
    text = (small_disk / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n")
    assert all(json.loads(line) for line in text.splitlines())  # every line whole
    # A line torn by a kill mid-write (written by something else) is dropped at the restart.
    with open(rundir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 5.1')
    r = train(cfg, "--train.steps=7")
    assert "dropped 1 unreadable line" in r.stderr and "resumed from" in r.stdout
    assert [m["step"] for m in metrics(cfg) if "loss" in m] == list(range(1, 8))


def fill(disk: Path) -> Path:
    """Fill ``disk`` to its last bytes (unbuffered: close cannot fail); the filler file, to free it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"x" * 512)
        except OSError:
            pass
    return filler


def test_metrics_jsonl_warns_once_per_outage_and_says_when_it_writes_again(tmp_path, small_disk, capfd):
    """metrics.jsonl warned of the first failed append of a run only: a second outage after it had
    recovered went unsaid."""
    import torch

    from fmtrain.metrics import Metrics

    log = Metrics(small_disk, total_steps=200, start_step=0, enabled=True, flops_per_token=1.0, peak=None)

    def steps(first, last):
        for step in range(first, last + 1):
            log.step(step=step, loss=1.0, lr=0.1, grad_norm=1.0, tokens_seen=step, tokens_per_s=1.0,
                     step_time=1.0, data_time=0.0, device=torch.device("cpu"))

    steps(1, 5)
    for outage, first in enumerate((6, 106), 1):
        filler = fill(small_disk)
        steps(first, first + 49)
        filler.unlink()
        steps(first + 50, first + 99)
        err = capfd.readouterr().err
        jsonl = small_disk / "metrics.jsonl"
        assert err.count(f"warning: cannot write {jsonl}") == 1, (outage, err)
        assert err.count(f"{jsonl}: writing again") == 1, (outage, err)
    log.close()
    rows = [json.loads(line) for line in (small_disk / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-50:] == list(range(156, 206))  # whole lines, written again after each


def test_tensorboard_logs_pause_on_a_full_disk_and_catch_up_when_it_empties(tmp_path, small_disk, capfd):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fmtrain.metrics import Metrics

    log = Metrics(small_disk, total_steps=60, start_step=0, enabled=True, flops_per_token=1.0, peak=None)

    def steps(first, last):
        for step in range(first, last + 1):
            log.step(step=step, loss=1.0 / step, lr=0.1, grad_norm=1.0, tokens_seen=step, tokens_per_s=1.0,
                     step_time=1.0, data_time=0.0, device=torch.device("cpu"))

    steps(1, 5)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # the disk fills up during the run
        try:
            while True:
                fh.write(b"x" * 512)
        except OSError:
            pass
    steps(6, 40)
    filler.unlink()  # and space comes back
    steps(41, 50)
    log.eval(50, dict(eval_loss=2.0, eval_bpb=1.0, eval_ppl=7.4, eval_tokens=10))
    log.close()
    err = capfd.readouterr().err
    assert err.count("cannot write TensorBoard logs") == 1 and "writing again" in err, err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    events = EventAccumulator(str(small_disk / "tb"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(loss) == list(range(1, 51)) and loss[42] == pytest.approx(1 / 42)  # the missed ones too
    assert [e.step for e in events.Scalars("eval/loss")] == [50]
    assert all(p.stat().st_size > 0 for p in (small_disk / "tb").iterdir())  # no empty file per retry


# ---------------------------------------------------------------------- two trainers, kills
def _wait_for_lock(rundir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    lock = rundir / ".lock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and f"pid {proc.pid}" in lock.read_text() and (rundir / "metrics.jsonl").exists():
            rows = (rundir / "metrics.jsonl").read_text().splitlines()
            if len(rows) > 2:
                return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError("the first trainer never started training")


@pytest.mark.slow
def test_two_trainers_on_one_run_dir_and_a_killed_run_restarts(run):
    cfg, rundir, ckpts = run
    long = ("--train.steps=100000", "--checkpoint.interval=100000")
    first = subprocess.Popen([sys.executable, "-m", "fmtrain.train", str(cfg), *long], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_lock(rundir, first)
        second = run_train(cfg, *long)
        assert_one_error_line(second, f"{rundir} is in use by another trainer", f"pid {first.pid}")
        first.send_signal(signal.SIGTERM)  # the first checkpoints and stops (exit 75)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 75, err[-3000:]
    steps = [m["step"] for m in metrics(cfg) if "loss" in m]
    assert steps == list(range(1, steps[-1] + 1)), steps  # one trainer's lines, in order, once
    # SIGKILL leaves no lock behind: the restart is not blocked.
    third = subprocess.Popen([sys.executable, "-m", "fmtrain.train", str(cfg), *long], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_lock(rundir, third)
        third.send_signal(signal.SIGKILL)
        third.communicate(timeout=60)
    finally:
        third.kill()
    last = find_checkpoints(ckpts)[-1]  # the first trainer's, written at SIGTERM
    r = train(cfg, f"--train.steps={int(last.name[5:]) + 2}")
    assert f"resumed from {last}" in r.stdout and "in use" not in r.stderr


@pytest.mark.slow
def test_under_torchrun_one_lock_per_run_not_per_rank(tmp_path, corpus):
    cfg, rundir = make6(tmp_path, corpus), tmp_path / "run"
    long = ("--train.steps=100000", "--checkpoint.interval=100000")
    # Two ranks share the run: neither refuses the other (rank 0 alone holds the lock) ...
    first = subprocess.Popen(["bash", "launch/run.sh", str(cfg), *long], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=dict(ENV, NPROC_PER_NODE="2"))
    try:
        deadline = time.monotonic() + 180
        while not (rundir / "metrics.jsonl").is_file() or len(metrics(cfg)) < 3:  # training, past eval
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.3)
        holder = (rundir / ".lock").read_text()
        # ... and a second trainer is refused, naming the holder.
        second = run_train(cfg, *long)
        assert_one_error_line(second, "is in use by another trainer", holder.split(" since")[0])
        first.send_signal(signal.SIGTERM)  # the wrapper forwards it: checkpoint, exit 75
        out, err = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 75, err[-3000:]
    assert "in use" not in err


# ---------------------------------------------------------------------- changed settings
def test_one_tokenizer_named_two_ways_is_no_change_on_resume(tmp_path, monkeypatch):
    """A run started elsewhere records the shipped tokenizer's absolute path (load_config finds it
    in the checkout); resumed from the checkout's root with the relative path, nothing changed."""
    from fmtrain.config import from_dict
    from fmtrain.resume import differences

    root = Path(__file__).parents[2]
    monkeypatch.chdir(root)
    other = tmp_path / "other.model"
    other.write_bytes((root / "tokenizer" / "stdlib-4k.model").read_bytes())

    def cfg(tok):
        return from_dict({"run": {"dir": "r"}, "data": {"tokenizer": tok}})
    assert differences(cfg(str(root / "tokenizer" / "stdlib-4k.model")), cfg("tokenizer/stdlib-4k.model")) == []
    assert [d[0] for d in differences(cfg(str(other)), cfg("tokenizer/stdlib-4k.model"))] == ["data.tokenizer"]
    assert [d[0] for d in differences(cfg("gone.model"), cfg("tokenizer/stdlib-4k.model"))] == ["data.tokenizer"]


@pytest.mark.slow
def test_changed_settings_on_resume_are_applied_or_refused_by_name(run):
    cfg, rundir, ckpts = run
    before = snapshot(ckpts)
    r = run_train(cfg, "--train.steps=8", "--train.lr=0.02")
    assert_one_error_line(r, "train.lr: 0.01 -> 0.02", "--checkpoint.allow_changes=train.lr")
    r = run_train(cfg, "--model.dim=64")
    assert_one_error_line(r, "model.dim: 32 -> 64", "model's shape")
    assert "size mismatch" not in r.stderr
    r = run_train(cfg, "--data.batch_size=1")
    assert_one_error_line(r, "data.batch_size: 2 -> 1", "--checkpoint.resplit=true")
    r = run_train(cfg, "--data.seq_len=64")
    assert_one_error_line(r, "data.seq_len", "start a new run.dir")
    assert "resplit" not in r.stderr  # it cannot help there, so it is not suggested
    assert snapshot(ckpts) == before
    assert 'lr = 0.01' in (rundir / "config.toml").read_text()  # the recorded config did not change
    # Re-running the finished run says so at once (no evaluation).
    t0 = time.monotonic()
    r = train(cfg)
    assert "already finished" in r.stdout and "eval step" not in r.stdout
    # Allowed: the new learning rate is the one used, and the free train.steps is printed.
    r = train(cfg, "--train.steps=8", "--train.lr=0.02", "--checkpoint.allow_changes=train.lr")
    assert "resume: train.steps: 6 -> 8" in r.stdout and "train.lr: 0.01 -> 0.02 (allowed" in r.stdout
    from fmtrain.config import load_config
    from fmtrain.engine import lr_factor

    new = load_config(rundir / "config.toml")
    assert new.train.lr == 0.02 and new.train.steps == 8
    lrs = {m["step"]: m["lr"] for m in metrics(cfg) if "loss" in m}
    assert lrs[7] == pytest.approx(0.02 * lr_factor(new, 6), rel=1e-12)
    assert time.monotonic() - t0 < 120
    # The batch-size hint holds too: with checkpoint.resplit the data position is re-split.
    r = train(cfg, "--train.steps=9", "--data.batch_size=1", "--checkpoint.resplit=true",
              "--train.lr=0.02", "--checkpoint.allow_changes=train.lr")
    assert "data.batch_size: 2 -> 1 (allowed" in r.stdout and "finished run: step 9/9" in r.stdout


@pytest.mark.slow
def test_a_renamed_corpus_is_refused_on_resume_as_a_reordered_stream(tmp_path, corpus):
    """Same files, new names: the token and document counts match, the order does not."""
    root = tmp_path / "corpus"
    shutil.copytree(corpus[0], root)
    cfg = make_config(tmp_path, (root, corpus[1]))
    shipped = f"--data.tokenizer={Path(__file__).parents[2] / 'tokenizer' / 'stdlib-4k.model'}"
    train(cfg, "--train.steps=3", shipped, "--model.vocab_size=4096")
    ckpts = snapshot(tmp_path / "run" / "checkpoints")
    files = sorted(root.glob("*.txt"))
    for i, f in enumerate(files):  # the last file sorts first now
        f.rename(root / f"{len(files) - i:03d}-{f.name}")
    r = run_train(cfg, "--train.steps=6", shipped, "--model.vocab_size=4096")
    assert_one_error_line(r, "not in the same order or with the same contents", "files renamed")
    assert snapshot(tmp_path / "run" / "checkpoints") == ckpts


@pytest.mark.slow
def test_evaluation_off_is_said_at_the_start_and_by_the_eval_command(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    r = train(cfg, "--train.steps=1", "--data.val_fraction=0")
    head = r.stdout.split("step 1/1")[0]
    assert "evaluation: off: data.corpus holds no documents out (data.val_fraction = 0.0" in head
    assert "no evaluation (nothing held out)" in r.stdout
    ev = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(tmp_path / "run")], capture_output=True,
                        text=True, env=ENV)
    assert_one_error_line(ev, "holds no documents out", "data.val_fraction = 0.0 selected none")


# ---------------------------------------------------------------------- one way to fail
@pytest.mark.slow
def test_data_and_checkpoint_errors_are_one_line_without_a_traceback(tmp_path, corpus, run):
    (tmp_path / "other").mkdir()
    cfg = make_config(tmp_path / "other", corpus)
    r = run_train(cfg, f"--data.corpus={tmp_path}/nothing/*.txt")
    assert_one_error_line(r, "no files match", "nothing/*.txt")
    r = run_train(cfg, "--data.tokenizer=/nonexistent/tok.model")
    assert_one_error_line(r, "/nonexistent/tok.model")
    ev = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(tmp_path / "missing")], capture_output=True,
                        text=True, env=ENV)
    assert_one_error_line(ev, "no valid checkpoint", "missing")
    _, rundir, _ = run
    ex = subprocess.run([sys.executable, "-m", "fmtrain.export", str(rundir), "/proc/no/such"],
                        capture_output=True, text=True, env=ENV)
    assert_one_error_line(ex, "/proc/no/such")


@pytest.mark.slow
def test_an_error_under_torchrun_is_printed_once_with_exit_2(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    r = subprocess.run(["bash", "launch/run.sh", str(cfg), f"--data.corpus={tmp_path}/nothing/*.txt"],
                       capture_output=True, text=True, timeout=300, env=dict(ENV, NPROC_PER_NODE="2"))
    assert "procs/node=2" in r.stderr
    assert_one_error_line(r, "no files match")
    assert "ChildFailedError" not in r.stderr and "rank" not in r.stderr.split("error:")[1]


def test_launcher_help_is_help_only():
    r = subprocess.run(["bash", "launch/run.sh", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "NPROC_PER_NODE" in r.stdout and "NNODES" in r.stdout
    assert "set -euo" not in r.stdout and not r.stderr
    r = subprocess.run(["bash", "launch/run.sh"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "NPROC_PER_NODE" in r.stderr


@pytest.mark.slow
def test_launcher_takes_nproc_and_a_config_error_is_one_line(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    r = subprocess.run(["bash", "launch/run.sh", str(cfg), "--train.stepz=4"], capture_output=True, text=True,
                       timeout=300, env=dict(ENV, NPROC="2"))
    assert "procs/node=2" in r.stderr
    assert_one_error_line(r, "train.stepz", "Did you mean 'steps'")


# ---------------------------------------------------------------------- data
def test_a_truncated_token_cache_is_detected_and_rebuilt(tmp_path, capfd):
    from fmtrain.data.tokens import cached_tokens

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    tok = Path(__file__).parents[2] / "tokenizer" / "stdlib-4k.model"
    folder, data = cached_tokens([str(docs)], tok, tmp_path / "cache", progress=False)
    want = data["train"].tokens.copy()
    del data
    bin_path = folder / "train.bin"
    with open(bin_path, "r+b") as fh:  # cut off mid-write
        fh.truncate(bin_path.stat().st_size // 2)
    folder2, data = cached_tokens([str(docs)], tok, tmp_path / "cache", progress=False)
    assert folder2 == folder and (data["train"].tokens == want).all()
    err = capfd.readouterr().err
    assert "damaged" in err and "train.bin" in err and "rebuilding" in err
    # A meta.json of the wrong shape (valid JSON) is damage too, not an AttributeError.
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(dict(meta, splits=[1])))
    folder3, data = cached_tokens([str(docs)], tok, tmp_path / "cache", progress=False)
    assert folder3 == folder and (data["train"].tokens == want).all()
    assert "AttributeError" in capfd.readouterr().err  # named in the warning, then rebuilt


def test_binary_files_in_a_corpus_are_skipped_with_a_count(tmp_path, capfd):
    from fmtrain.data.corpus import Corpus, CorpusError

    (tmp_path / "a.txt").write_text("hello world\n" * 10)
    (tmp_path / "b.txt").write_text("more text\n" * 10)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 64)  # NUL bytes: not text
    docs = [t for _, t in Corpus.parse([str(tmp_path)]).documents()]
    assert len(docs) == 2 and not any("\x00" in d for d in docs)
    err = capfd.readouterr().err
    assert "skipped 1 binary file(s) of 3" in err and "blob.bin" in err
    with pytest.raises(CorpusError, match="every corpus file is binary"):
        list(Corpus.parse([str(tmp_path / "blob.bin")]).documents())


def test_unknown_deepspeed_keys_are_refused_with_the_right_name():
    from fmtrain.config import ConfigError, from_dict

    with pytest.raises(ConfigError) as info:
        from_dict({"run": {"dir": "r"}, "parallel": {"deepspeed": {
            "zero_optimisation": {"overlap_comm": True}, "gradient_clipings": 1.0}}})
    text = str(info.value)
    assert "parallel.deepspeed.zero_optimisation" in text and "'zero_optimization'" in text
    assert "parallel.deepspeed.gradient_clipings" in text and "train.grad_clip" in text
    with pytest.raises(ConfigError, match="overlap_com is not a DeepSpeed zero_optimization key"):
        from_dict({"run": {"dir": "r"}, "parallel": {"deepspeed": {"zero_optimization": {"overlap_com": True}}}})
    cfg = from_dict({"run": {"dir": "r"}, "parallel": {"deepspeed": {"zero_optimization": {"overlap_comm": True},
                                                                     "wall_clock_breakdown": True}}})
    assert cfg.parallel.deepspeed["zero_optimization"] == {"overlap_comm": True}
    with pytest.raises(ConfigError, match="data.num_workers was removed"):
        from_dict({"run": {"dir": "r"}, "data": {"num_workers": 2}})


@pytest.mark.slow
def test_every_refused_start_leaves_no_run_folder(tmp_path, corpus):
    """Data and tokenizer refusals come after the run lock; the lock's folder goes with them, and in a
    run folder that existed the lock file that start made."""
    bad = tmp_path / "bad"
    (bad / "empty").mkdir(parents=True)
    (bad / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (bad / "broken.jsonl").write_text('{"text": "a"\n')
    (bad / "notext.jsonl").write_text('{"body": "a"}\n' * 5)
    (bad / "tiny.txt").write_text("x = 1\n")
    (bad / "tok.model").write_bytes(b"not a model")
    (bad / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)  # a parquet file cut short
    shipped = Path(__file__).parents[2] / "tokenizer" / "stdlib-4k.model"
    cases = [(f"--data.corpus={tmp_path}/nothing/*.txt",), (f"--data.corpus={bad}/empty",),
             (f"--data.corpus={bad}/missing.txt",), (f"--data.corpus={bad}/corrupt.parquet",),
             (f"--data.corpus={bad}/latin1.jsonl",), (f"--data.corpus={bad}/broken.jsonl",),
             (f"--data.corpus={bad}/notext.jsonl",), (f"--data.corpus={bad}/tiny.txt",),
             ("--data.tokenizer=/nonexistent/tok.model",), (f"--data.tokenizer={bad}/tok.model",),
             (f"--data.tokenizer={shipped}", "--model.vocab_size=100")]
    for i, overrides in enumerate(cases):
        cfg = make_config(tmp_path, corpus, name=f"run{i}")
        r = run_train(cfg, *overrides)
        assert_one_error_line(r)
        assert not (tmp_path / f"run{i}").exists(), (overrides, sorted((tmp_path / f"run{i}").rglob("*")))
    # A run folder that existed before keeps what it held, and loses the lock file the failed start made.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    cfg = make_config(tmp_path, corpus, name="kept")
    assert_one_error_line(run_train(cfg, f"--data.corpus={bad}/corrupt.parquet"))
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


def test_the_old_checkpoint_command_says_where_export_went():
    r = subprocess.run([sys.executable, "-m", "fmtrain.checkpoint", "export", "run", "out"], capture_output=True,
                       text=True, timeout=120, env=ENV)
    assert r.returncode == 2 and "python -m fmtrain.export RUN OUT" in r.stderr and not r.stdout


def test_eval_by_position_buckets_every_held_out_token_once(tmp_path, run):
    """python -m fmtrain.eval RUN --by-position: one line per position bucket, and JSON whose buckets
    hold every scored token of every held-out document once, with a loss equal to fmtrain's own
    per-token loss of those documents."""
    import numpy as np

    from fmtrain.by_position import held_out_documents, nll_by_position
    from fmtrain.export import load_trained

    cfg, rundir, ckpts = run
    out = tmp_path / "pos" / "run"
    r = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(rundir), "--by-position", "--max-len", "512",
                        "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| position | loss (nats/token)" in r.stdout and "| 1-64 |" in r.stdout and "held-out documents" in r.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    model, run_cfg = load_trained(rundir)
    docs = held_out_documents(run_cfg, 1, str(max(ckpts.glob("step_*")) / "tokenizer.model"))
    assert result["n_docs"] == len(docs) and sum(result["counts"]) == sum(min(len(d), 512) - 1 for d in docs)
    want = sum(nll_by_position(model, d[:512]).sum() for d in docs)
    assert abs(sum(result["sums"]) - want) < 1e-6 * want
    assert run_cfg.data.seq_len == 128 and "| 256-1k* |" in r.stdout  # beyond the training length, marked
    assert np.all(np.array(result["doc_counts"]) <= len(docs))
    r = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(rundir), "--by-position", "--min-doc-len",
                        "10000000"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "no held-out document of at least 10000000 tokens" in r.stderr


def test_needle_prompts_hold_the_needles_at_their_depth_and_end_in_the_question():
    import numpy as np

    from fmtrain.data.tokenizer import load_tokenizer
    from fmtrain.needle import build_prompt

    tok = load_tokenizer(Path(__file__).parents[2] / "tokenizer" / "stdlib-4k.model")
    hay = np.arange(1000, 1200)  # recognisable filler ids, shorter than the prompt: cycled
    for depth in (0.0, 0.5, 1.0):
        for pairs in ([("apple", "48213")], [("apple", "48213"), ("river", "11111"), ("violet", "99999")]):
            ids, answer, starts = build_prompt(tok, hay, 600, depth, pairs, asked=len(pairs) - 1)
            assert len(ids) == 600 and answer == tok.encode(f" {pairs[-1][1]}")
            text = tok.decode(ids)
            assert text.endswith(f"The secret number for {pairs[-1][0]} is")
            for (k, v), s in zip(pairs, starts):
                assert tok.decode(ids[s:]).startswith(f"\nThe secret number for {k} is {v}.")
            needles = sum(len(tok.encode(f"\nThe secret number for {k} is {v}.\n")) for k, v in pairs)
            k = pairs[-1][0]
            question = len(tok.encode(f"\nWhat is the secret number for {k}? The secret number for {k} is"))
            filler = 600 - needles - question
            assert abs(starts[0] - depth * filler) <= 8 * len(pairs), (depth, starts, filler)


def test_eval_needle_reports_accuracy_by_length_and_depth(tmp_path, run):
    cfg, rundir, _ = run
    out = tmp_path / "needle"
    r = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(rundir), "--needle", "--lengths", "128,256",
                        "--depths", "0,1", "--samples", "2", "--keys", "2", "--out", str(out)],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| length | depth 0 | depth 1 |" in r.stdout and "| 256 |" in r.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(x["length"], x["depth"]) for x in rows] == [(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)]
    assert all(0 <= x["accuracy"] <= 1 and x["answer_loglik"] < 0 and x["keys"] == 2 for x in rows)
    r = subprocess.run([sys.executable, "-m", "fmtrain.eval", str(rundir), "--needle", "--depths", "0,2"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and "--depths within [0, 1]" in r.stderr


def test_hf_commands_without_the_extra_name_the_install(tmp_path):
    fake = tmp_path / "site" / "transformers"  # transformers as a clone without the extra sees it: absent
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\", "
                                      "name='transformers')\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-m", "fmtrain.hf", "export", "run", "out"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert_one_error_line(r, 'pip install -e ".[hf]"')


def test_a_run_shorter_than_its_warmup_says_so(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    r = run_train(cfg, "--train.steps=2", "--train.warmup_steps=5", f"--data.cache_dir={tmp_path / 'cache'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train.steps = 2 <= train.warmup_steps = 5: the run ends during warmup" in r.stdout
    assert "tokenizer: data.tokenizer is empty, so a" in r.stdout and "trained on the corpus" in r.stdout
    # The training itself is announced before it starts, not only once it is done.
    assert r.stdout.index("[fmtrain.data] training a") < r.stdout.index("tokenizer: data.tokenizer is empty")
    # The saved configs (the run's and each checkpoint's) keep data.tokenizer empty, as the run was
    # given it, and say in a comment where the trained tokenizer is.
    import tomllib

    cached = r.stdout.split("trained on the corpus (once; cached) at ")[1].split(";")[0]
    assert Path(cached).is_file() and Path(cached).is_relative_to(tmp_path / "cache"), cached
    saved = [tmp_path / "run" / "config.toml", *(tmp_path / "run" / "checkpoints").glob("step_*/config.toml")]
    assert len(saved) >= 2, saved
    for f in saved:
        text = f.read_text()
        assert tomllib.loads(text)["data"]["tokenizer"] == ""
        assert (f"# empty: this run trained its tokenizer on the corpus, cached at {cached}; each checkpoint "
                "holds a copy as tokenizer.model\ntokenizer = \"\"\n") in text, text
        if f.parent.name.startswith("step_"):
            assert (f.parent / "tokenizer.model").read_bytes() == Path(cached).read_bytes()


@pytest.mark.slow
def test_a_resume_takes_the_thread_count_its_checkpoint_was_made_with(tmp_path, corpus):
    """Matrix products can round differently with another thread count, so a resume on a machine
    with more free cores keeps the count the run had: its losses stay those of the straight run. A
    resume allowed fewer threads than its checkpoint's says so."""
    (tmp_path / "straight").mkdir()
    (tmp_path / "split").mkdir()
    straight, split = make6(tmp_path / "straight", corpus), make6(tmp_path / "split", corpus)
    one = dict(ENV, OMP_NUM_THREADS="1")
    two = dict(ENV, OMP_NUM_THREADS="2", FMTRAIN_FIXED_THREADS="1")  # two threads, busy cores or not

    def trainer(cfg, env, *extra):
        r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg), *extra], capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode in (0, 75), r.stderr[-3000:]
        return r

    trainer(straight, one)
    trainer(split, one, "--train.stop_at_step=3")
    r = trainer(split, two)
    assert "(1 thread, as its checkpoint was made)" in r.stdout, r.stdout[:800]
    assert losses(split) == losses(straight)
    # Allowed fewer threads than its checkpoint was made with (OMP_NUM_THREADS lower): it resumes
    # with what it may use and says that the results can round differently.
    (tmp_path / "fewer").mkdir()
    fewer = make6(tmp_path / "fewer", corpus)
    trainer(fewer, two, "--train.stop_at_step=3")
    r = trainer(fewer, one)
    assert ("(1 thread, its checkpoint was made with 2 but this process may use 1 (OMP_NUM_THREADS): results can "
            "round differently from an uninterrupted run)") in r.stdout, r.stdout[:800]
    assert len(losses(fewer)) == len(losses(straight))
