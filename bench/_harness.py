"""What the benchmarks share besides their result files (``bench/_results.py``).

- The trainer: :func:`trainer_command` and :func:`run_trainer` run ``python -m fmtrain.train
  CONFIG --section.field=value ...`` in a subprocess (the real product, with a peak memory of
  its own), its output in ``<run dir>/stdout.log``; :func:`read_metrics` reads the
  ``metrics.jsonl`` it writes (``fmtrain/metrics.py``), :func:`step_rows` and :func:`eval_rows`
  split it, :func:`after_warmup` leaves the first logged steps out.
- A case in a fresh process: :func:`spawn_case` runs ``python SCRIPT --case ...`` and reads
  the JSON row the case prints last (:func:`report_case`); :data:`PEAK_ENV` is the setting
  under which a CPU case's peak resident set is its real peak.
- Timing a call: :func:`time_call` (one call, synchronised on CUDA before and after) and
  :func:`time_calls` (warm-up, then repeats within a time budget); :func:`upper_median`.
- :func:`logits_at`: a trained model's logits at chosen positions over chosen token ids.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from _results import ROOT

# --------------------------------------------------------------------------- processes
# Large allocations from mmap, so that freed memory leaves the resident set and its high-water
# mark is the real peak. Every large allocation then faults its pages in afresh, which distorts
# times: a case's time and its CPU peak come from two processes.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) and ``extra``, with this checkout's root
    first on ``PYTHONPATH``, so that a child imports this checkout's fmtrain."""
    env = dict(os.environ if base is None else base, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def spawn_case(script: str | Path, case_args: Sequence[str], *, label: str,
               env: Mapping[str, str] | None = None, timeout: float | None = None) -> dict | None:
    """``python SCRIPT *case_args`` in a fresh process (``env``: its environment, this one's by
    default; see :func:`child_env`): the JSON row on its last line of output
    (:func:`report_case`), or None, said on stdout with ``label``, when it fails or overruns
    ``timeout`` seconds."""
    cmd = [sys.executable, str(script), *map(str, case_args)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  {label}: over {timeout:g} s, skipped", flush=True)
        return None
    if r.returncode:
        last = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        print(f"  {label}: failed ({last})", flush=True)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def report_case(row: dict) -> None:
    """A case's side of :func:`spawn_case`: its row, as the last line of its output."""
    print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------- the trainer
def trainer_command(config: str | Path, overrides: Mapping[str, Any] | Sequence[str] = (),
                    launcher: str | None = None) -> list[str]:
    """``LAUNCHER fmtrain.train CONFIG --section.field=value ...``. ``overrides``: a mapping of
    dotted keys to values, or ``--key=value`` strings; ``launcher``: what runs a module, e.g.
    ``"torchrun --standalone --nproc_per_node=8 -m"`` (default: this Python's ``-m``)."""
    head = shlex.split(launcher) if launcher else [sys.executable, "-m"]
    if isinstance(overrides, Mapping):
        overrides = [f"--{k}={v}" for k, v in overrides.items()]
    return head + ["fmtrain.train", str(config), *overrides]


@dataclass
class TrainerRun:
    """One finished (or stopped) trainer run: what :func:`run_trainer` returns."""

    command: list[str]
    run_dir: Path
    returncode: int | None  # None: stopped at its timeout
    wall_s: float
    rows: list[dict]  # its metrics.jsonl

    @property
    def log(self) -> Path:
        """The trainer's stdout and stderr."""
        return self.run_dir / "stdout.log"

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def check(self, label: str) -> TrainerRun:
        """Itself, or a RuntimeError naming ``label``, the exit status, the command and the end of the log."""
        if self.returncode != 0:
            raise RuntimeError(f"{label} failed (exit {self.returncode}): {shlex.join(self.command)}\n"
                               f"{self.output[-3000:]}")
        return self


def run_trainer(command: Sequence[str], run_dir: str | Path, *, env: Mapping[str, str] | None = None,
                timeout: float | None = None) -> TrainerRun:
    """Run ``command`` (:func:`trainer_command`, whose ``--run.dir`` is ``run_dir``) from the
    checkout's root, in ``run_dir`` made afresh (never a resume of an older run), its output
    to ``run_dir/stdout.log``; ``env``: as :func:`child_env`'s ``base``. Past ``timeout``
    seconds it is killed; interrupted (Ctrl-C, SIGTERM raised as SystemExit, a test's timeout),
    it is stopped too, never left running."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(run_dir / "stdout.log", "w") as log:
        proc = subprocess.Popen(list(command), cwd=ROOT, env=child_env(env), stdout=log, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    return TrainerRun(list(command), run_dir, returncode, time.perf_counter() - t0, read_metrics(run_dir))


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (``path``: the file or its run folder), in order;
    none where there is no such file (a run that failed before its first step)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_rows(rows: list[dict]) -> list[dict]:
    """The training steps' rows (``loss``, ``tokens_per_s``, ``step_time``, ``memory_gib``, ...)."""
    return [r for r in rows if "loss" in r]


def eval_rows(rows: list[dict]) -> list[dict]:
    """The held-out evaluations' rows (``eval_loss``, ``eval_bpb``, ``eval_tokens``, ...)."""
    return [r for r in rows if "eval_loss" in r]


def after_warmup(steps: list[dict], skip: int = 1) -> list[dict]:
    """``steps`` without the first ``skip`` logged ones (the warm-up: kernels compiled, allocator
    and thread pools settled); all of them where there are no more."""
    return steps[skip:] or steps


# --------------------------------------------------------------------------- timing
def synchronize(device=None) -> None:
    """Wait for the CUDA device's queued work; nothing for a CPU device (or none)."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device=None) -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``, synchronised on a CUDA ``device`` before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def time_calls(fn: Callable[[], Any], *, runs: int, warmup: int = 1, budget_s: float | None = None,
               device=None) -> list[float]:
    """Seconds of each of ``runs`` calls of ``fn`` after ``warmup`` calls (:func:`time_call`).
    With ``budget_s``, no call starts once the calls so far plus the last one's time would
    exceed it (the warm-up counts); where that leaves no call after the warm-up, the warm-up's
    times are returned."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < warmup + runs:
        times.append(time_call(fn, device)[0])
        if budget_s is not None and time.perf_counter() - start + times[-1] > budget_s:
            break
    return times[warmup:] or times


def upper_median(xs: Sequence[float]) -> float:
    """The middle value; of an even count the upper of the two middle ones."""
    return sorted(xs)[len(xs) // 2]


# --------------------------------------------------------------------------- models
def logits_at(model, ids, where, vocab=None, autocast=None):
    """Float32 logits of ``model`` (an fmtrain language model) at the positions ``where`` (a
    boolean mask shaped like ``ids``), over the token ids ``vocab`` (all when None):
    (positions, tokens). The trunk runs under ``autocast`` (a context manager, none by default);
    the output matrix is applied in float32 at those positions only, so that a long sequence
    never forms its (n, vocab) logits (:meth:`fmtrain.model.LanguageModel.logits_at`)."""
    with autocast if autocast is not None else contextlib.nullcontext():
        return model.logits_at(ids, where, vocab)
