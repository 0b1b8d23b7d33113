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
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs to see a core taken")
    torch.set_num_threads(len(cpus))  # (the test workers run on one thread each: tests/conftest.py)
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


def test_head_threads_give_the_numbers_of_one_thread(fresh, monkeypatch):
    """The PyTorch core runs (batch, kv head) pairs in threads where cores are free (``_each_chunk``):
    outputs and gradients are bitwise those of one thread. Threads fixed at 2 (the test workers run on
    one: tests/conftest.py), whatever the machine's load (FMTRAIN_FIXED_THREADS)."""
    from fmtrain.attention import fma

    monkeypatch.setenv("FMTRAIN_FIXED_THREADS", "1")
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, h, 300, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2)]
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert cpu.usable_threads() == threads
        ins = [x.clone().requires_grad_() for x in xs]
        out = fma(*ins, block_size=16, impl="torch")
        runs.append([out, *torch.autograd.grad(out, ins, torch.ones_like(out))])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
