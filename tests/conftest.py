"""Session-wide test setup: run Triton kernels in its CPU interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before triton is first imported anywhere in the
process (deepspeed and others import it), hence here, before any test module.

And what several test modules need: a tmpfs to fill up (:func:`tmpfs`), real code as a corpus
(:func:`write_stdlib_corpus`, and the trainer tests' shared :func:`corpus`), a process killed
mid-write (:func:`kill_when`), the trainer run as a command on a small config (:func:`make_config`,
:func:`train`, :func:`metrics`, :func:`losses`) and the 2-step run the generate and eval commands
are tested on (:data:`COMMAND_CONFIG`).
"""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

# pyproject's `-n 2`: two workers on a 2-core machine. Each worker's own ops run on one thread (torch's
# intra-op team, OpenBLAS under Triton's interpreter), and so do the commands the tests start unless
# they say otherwise: a team of two beside another busy process waits at every op for the thread
# whose core the other holds (fmtrain/attention/cpu.py), which made the in-process tests 30-40% slower
# here. (`-n 0`, one process, keeps every thread; tests/attention/test_cpu.py sets its own counts.
# Not MKL_NUM_THREADS: torch takes it over an OMP_NUM_THREADS a command is given, and the trainer's
# thread-count tests give theirs.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import torch  # noqa: E402  (after the thread counts above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


def write_stdlib_corpus(folder: Path, n: int) -> Path:
    """The first ``n`` modules of this Python's standard library as text files in ``folder`` (made)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]:
        (folder / (f.stem + ".txt")).write_text(f.read_text(encoding="utf-8", errors="replace"))
    return folder


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(folder, options)``: a tmpfs at ``folder`` (made), e.g. ``"size=64k"`` to fill up or
    ``"ro,size=1m"`` read-only; unmounted after the test. Root only: the test is skipped elsewhere."""
    mounted = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Real code: 60 stdlib modules as text files (about 1 MB), and a shared token cache:
    ``(corpus folder, cache folder)``, for the trainer's tests (:func:`make_config`)."""
    return write_stdlib_corpus(tmp_path_factory.mktemp("corpus"), 60), tmp_path_factory.mktemp("cache")


def kill_when(cmd: list[str], ready, env: dict | None = None, timeout: float = 120) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds (a file it writes has appeared), and
    return its pid: a process killed mid-write, for the tests of what the next run does."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    return proc.pid


# --------------------------------------------------------------------------- the trainer as a command
TRAIN_CONFIG = """
[run]
dir = "{run}"
[model]
kind = "{kind}"
vocab_size = 512
dim = 32
n_layers = 2
n_heads = 2
block_size = 16
rank = 2
loss_chunk = 64
[data]
corpus = ["{corpus}/*.txt"]
cache_dir = "{cache}"
seq_len = 128
batch_size = 2
val_fraction = 0.1
[train]
steps = 8
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
log_interval = 1
eval_interval = 0
eval_batches = 2
dtype = "fp32"
[checkpoint]
interval = 3
keep = 2
[parallel]
zero_stage = 0
"""

# Seen on gloo at exit, after complete results (shared/notes/environment.md): a gloo thread
# outliving destroy_process_group. Tolerated only when the run itself finished.
GLOO_TEARDOWN = "terminate called without an active exception"


def make_config(tmp_path, corpus, kind="causal", name="run") -> Path:
    """``tmp_path/NAME.toml``: the trainer tests' 8-step run of :data:`TRAIN_CONFIG` on ``corpus`` (the fixture)."""
    root, cache = corpus
    run = tmp_path / name
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(TRAIN_CONFIG.format(run=run, kind=kind, corpus=root, cache=cache))
    return cfg


def train(cfg: Path, *overrides: str, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m fmtrain.train CFG OVERRIDES`` (under torchrun for ``nproc`` > 1); AssertionError
    unless it finished."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "fmtrain.train", str(cfg), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fmtrain.train", str(cfg), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    finished = "eval step" in r.stdout or "stopping after step" in r.stdout
    if r.returncode != 0 and not (GLOO_TEARDOWN in r.stderr and finished):
        raise AssertionError(f"training failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def metrics(cfg: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl."""
    run = Path(cfg.read_text().split('dir = "')[1].split('"')[0])
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(cfg: Path) -> list[float]:
    return [m["loss"] for m in metrics(cfg) if "loss" in m]


# A 2-step run with the shipped 4k tokenizer: what the generate and eval commands are tested on.
COMMAND_CONFIG = """
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


# A command run as a user runs it: one thread, no network for Hugging Face libraries.
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(r: subprocess.CompletedProcess, *words: str) -> None:
    """A refused command: exit 2, no traceback, one ``error:`` line, holding each of ``words``."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    for w in words:
        assert w in r.stderr, (w, r.stderr[-3000:])
