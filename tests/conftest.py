"""Session-wide test setup: run Triton kernels in its CPU interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before triton is first imported anywhere in the
process (deepspeed and others import it), hence here, before any test module.

And what several test modules need: a tmpfs to fill up (:func:`tmpfs`), real code as a corpus
(:func:`write_stdlib_corpus`, and the trainer tests' shared :func:`corpus`).
"""
import os
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
    ``(corpus folder, cache folder)``, for the trainer's tests (``tests/test_train.py``'s make_config)."""
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
