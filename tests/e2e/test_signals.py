"""Stopping for preemption: a stop signal cuts a long evaluation short; the wall-clock budget
stops the trainer with a checkpoint and exit status 75 (EX_TEMPFAIL), which the SLURM
script requeues on; a planned stop (train.stop_at_step) and a finished run exit 0."""
import os
import re
import signal
import subprocess
import sys

import torch

from fmtrain.checkpoint import find_checkpoints
from fmtrain.config import ModelConfig
from fmtrain.eval import evaluate
from fmtrain.model import build_model
from fmtrain.parallel import World
from fmtrain.signals import EXIT_STOPPED, StopFlag
from tests.conftest import make_config


class CountingBatches:
    """An endless held-out loader that counts the batches taken."""

    def __init__(self):
        self.taken = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            self.taken += 1
            ids = torch.randint(0, 64, (1, 32), generator=g)
            if self.taken == 3:
                os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning arrives mid-evaluation
            yield dict(input_ids=ids, targets=ids, positions=torch.arange(32)[None])


def test_a_signal_stops_a_long_evaluation():
    world = World(rank=0, local_rank=0, size=1, sp_size=1, device=torch.device("cpu"), backend="none")
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, block_size=16, rank=2))
    loader, stop = CountingBatches(), StopFlag(world)
    try:
        result = evaluate(model, loader, world, torch.ones(64), max_batches=1000, stop=stop)
    finally:
        stop.restore()
    assert result is None and loader.taken == 3  # not 1000 batches: stopped after the signal's batch
    assert model.training


def test_wall_clock_budget_exits_75_with_a_checkpoint(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1")
    env.pop("FMTRAIN_STATUS_FILE", None)
    r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg), "--train.steps=100000",
                        "--train.max_minutes=0.001"], capture_output=True, text=True, env=env)
    assert r.returncode == EXIT_STOPPED == 75, r.stderr[-3000:]
    step = int(re.search(r"stopping after step (\d+): wall-clock budget", r.stdout).group(1))
    assert step < 10  # a 0.06 s budget: the first step or two
    assert find_checkpoints(tmp_path / "run" / "checkpoints")[-1].name == f"step_{step:08d}"
    # The same with a status file (as under launch/run.sh): exit 0, "stopped" in the file.
    status = tmp_path / "status"
    r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg), "--train.steps=100000",
                        "--train.max_minutes=0.001"], capture_output=True, text=True,
                       env=dict(env, FMTRAIN_STATUS_FILE=str(status)))
    assert r.returncode == 0 and status.read_text() == "stopped\n" and "resumed from" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg), "--train.steps=3"],
                       capture_output=True, text=True, env=dict(env, FMTRAIN_STATUS_FILE=str(status)))
    assert r.returncode == 0 and status.read_text() == "finished\n", r.stderr[-3000:]
