"""slurm/train.sbatch on a real SLURM controller (slurmctld + slurmd + munge on this machine,
started by slurm/testing/local_slurm.sh): a 2-rank CPU job completes; a job signalled
mid-run checkpoints, requeues itself and finishes with the losses of the uninterrupted job.

One node with 2 CPUs: a 2-rank job takes the whole node, so the jobs run one at a time.
"""
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import losses, make_config, metrics

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "slurm" / "testing" / "local_slurm.sh"
STEPS = 150

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("slurm"),  # one test worker: one controller on fixed ports for the module
    pytest.mark.skipif(shutil.which("slurmctld") is None or shutil.which("sbatch") is None,
                       reason="SLURM is not installed (.ci/run installs slurmctld slurmd slurm-client munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting slurmctld/slurmd/munged needs root"),
]


@pytest.fixture(scope="module")
def slurm():
    """A running one-node cluster; the environment its client commands need."""
    subprocess.run([str(LOCAL_SLURM), "start"], check=True, timeout=120)
    conf = subprocess.run([str(LOCAL_SLURM), "env"], check=True, capture_output=True, text=True).stdout
    env = dict(os.environ, SLURM_CONF=conf.strip().split("=", 1)[1])
    yield env
    subprocess.run([str(LOCAL_SLURM), "stop"], timeout=180)


def job_info(env, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def submit(env, cfg: Path, *overrides: str, log: Path) -> str:
    """sbatch slurm/train.sbatch as a user would: from the repository root, 2 workers on the CPUs."""
    env = dict(env, NGPU="2", OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(["sbatch", "--parsable", "-N1", "-c2", f"--output={log}", "--time=10",
                        "slurm/train.sbatch", str(cfg), *overrides],
                       cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return r.stdout.strip().split(";")[0]


def wait_done(env, job: str, log: Path, timeout: float = 240, skip_begin_delay: bool = False) -> dict:
    """Wait until the job leaves the queue; its last `scontrol show job` fields."""
    deadline = time.monotonic() + timeout
    held_since = None
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        if skip_begin_delay and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            # SLURM holds a requeued job for ~2 minutes (BeginTime); the test need not wait for it.
            # But not at once: started while its previous run is still completing, the job fails
            # ("Killing non-startable batch job: Job credential revoked"). Wait for an idle node.
            held_since = held_since or time.monotonic()
            node = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
            if time.monotonic() - held_since > 5 and node.strip() == "idle":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
                held_since = None
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_info(env, job)}\n"
                         f"{log.read_text()[-4000:] if log.exists() else ''}")


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("slurm_straight")
    cfg = make_config(tmp, corpus, name="straight")
    log = tmp / "job.out"
    t0 = time.monotonic()
    job = submit(slurm, cfg, f"--train.steps={STEPS}", "--checkpoint.interval=50", log=log)
    info = wait_done(slurm, job, log)
    return cfg, log, info, time.monotonic() - t0


def test_two_rank_job_completes(uninterrupted):
    cfg, log, info, seconds = uninterrupted
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "0"
    # The job log starts with the environment and versions.
    assert "=== fmtrain job" in text and "torch 2." in text and "deepspeed" in text and "slurm-wlm" in text
    assert "rendezvous 127.0.0.1:" in text and "workers/node 2" in text
    assert "2 process(es), dp 2" in text and "=== trainer: finished" in text
    ls = losses(cfg)
    assert len(ls) == STEPS and ls[-1] < ls[0] - 0.5
    assert metrics(cfg)[-2]["tokens_seen"] == STEPS * 2 * 2 * 128
    print(f"uninterrupted 2-rank job: {seconds:.0f} s")


def test_signalled_job_checkpoints_requeues_and_finishes_the_same(slurm, uninterrupted, tmp_path, corpus):
    straight = uninterrupted[0]
    cfg = make_config(tmp_path, corpus, name="split")
    log = tmp_path / "job.out"
    t0 = time.monotonic()
    job = submit(slurm, cfg, f"--train.steps={STEPS}", "--checkpoint.interval=50", log=log)
    jsonl = tmp_path / "split" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 10):  # mid-run: ~10 steps done
        assert time.monotonic() < deadline, log.read_text()[-4000:] if log.exists() else "no job log"
        time.sleep(0.2)
    # What --signal=USR1@N does ahead of a time limit: USR1 to the job's steps (not the batch script).
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    info = wait_done(slurm, job, log, skip_begin_delay=True)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-4000:])
    assert info["Restarts"] == "1", info
    stopped_at = int(re.search(r"stopping after step (\d+): signal SIGUSR1", text).group(1))
    assert 10 <= stopped_at < STEPS
    assert "=== trainer: stopped" in text and "requeueing job" in text
    assert "(restart 1)" in text and f"resumed from {tmp_path / 'split' / 'checkpoints'}/step_{stopped_at:08d}" in text
    assert "=== trainer: finished" in text
    assert losses(cfg) == losses(straight)  # bitwise, every step, the final one included
    print(f"signalled + requeued job: {time.monotonic() - t0:.0f} s (stopped after step {stopped_at})")
