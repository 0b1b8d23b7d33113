"""CPU threads follow the cores other processes leave free (fmtrain/attention/cpu.py)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from fmtrain.attention import cpu


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(cpu, "_state", {})
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_a_busy_process_takes_a_core(fresh, monkeypatch):
    cpus = cpu._cpus()
    if len(cpus) < 2 or torch.get_num_threads() < 2:
        pytest.skip("needs 2 CPUs and 2 torch threads to see a core taken")
    monkeypatch.setattr(cpu, "FIRST_SAMPLE_S", 0.5)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(len(cpus) // 2)]
    try:
        time.sleep(0.3)  # let them start spinning
        n = cpu.usable_threads()
    finally:
        for p in busy:
            p.kill()
            p.wait()
    ceiling = torch.get_num_threads()
    assert 1 <= n <= ceiling - len(busy) + 1 and n < ceiling, (n, ceiling, len(busy))
    assert cpu.adapt_torch_threads() == torch.get_num_threads() == n  # applied (cached within the interval)


def test_the_users_thread_count_is_the_ceiling(fresh):
    torch.set_num_threads(1)
    assert cpu.usable_threads() == 1 and cpu.adapt_torch_threads() == 1
