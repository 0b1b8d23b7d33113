"""bench/gpu_check.sh --dry-run: the GPU check's whole path (correctness gates, timed stages, the
trainer rows) under Triton's CPU interpreter at tiny sizes, so a lent GPU's 15 minutes are not
spent finding a broken script (issue #26's floor). About a minute on 2 cores."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    # The parts' budgets fit a GPU's loan; on a loaded 2-core CPU the trainer's dry-run cases (DeepSpeed
    # start-up included) can outrun them, and this test checks the plumbing, not the budget.
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500, env=dict(os.environ, OUT=str(tmp_path), KERNEL_BUDGET="600",
                                          TRAIN_BUDGET="600"))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    check = json.loads((tmp_path / "gpu_check-dry-run.json").read_text())
    assert check["checks"] and not check["failures"], check["failures"]
    assert check["bench"] and check["table"]
    timed = {(r["impl"], r.get("launch")) for r in check["bench"] if "ms" in r}
    assert {("fma", "occupancy"), ("fma-flash2", "flash2"), ("fma-run4", "run4")} <= timed, timed  # side by side
    rows = json.loads((tmp_path / "gpu_train-dry-run.json").read_text())["rows"]
    assert rows and all(row["status"] == "ok" and row["tokens_per_s"] > 0 for row in rows), rows


@pytest.mark.slow
def test_the_five_minute_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    """``bench/gpu_check.sh --quick --dry-run``: the card's rates, every launch candidate's gate and
    time, the default's host time, the trainer step; under a minute here."""
    from fmtrain.attention.kernels.function import LAUNCH_CONFIGS

    r = subprocess.run(["bash", "bench/gpu_check.sh", "--quick", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200, env=dict(os.environ, OUT=str(tmp_path), QUICK_BUDGET="900"))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((tmp_path / "gpu_quick-dry-run.json").read_text())
    assert res["card"]["tflops"] > 0 and res["card"]["tbps"] > 0
    assert set(res["gate"]) == set(LAUNCH_CONFIGS) and all(row["ok"] for rows in res["gate"].values() for row in rows)
    timed = {row["impl"]: row for row in res["timing"] if "fwdbwd_ms" in row}
    assert set(LAUNCH_CONFIGS) | {"sdpa flash", "separate"} <= set(timed), res["timing"]
    assert timed[LAUNCH_CONFIGS[0]]["host_ms"] > 0
    assert res["trainer"]["status"] == "ok" and res["trainer"]["tokens_per_s"] > 0
    assert res["seconds"] < 900
