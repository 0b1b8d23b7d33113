"""bench/_harness.py: the trainer in a subprocess, a case in a fresh process, timing, metrics.jsonl;
and how bench/ imports (bench/__init__.py)."""
import ast
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import _harness

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_trainer_command_from_a_mapping_or_flags_and_a_launcher():
    cmd = _harness.trainer_command("configs/tiny-gpt.toml", {"run.dir": "/r", "train.steps": 3})
    assert cmd == [sys.executable, "-m", "fmtrain.train", "configs/tiny-gpt.toml", "--run.dir=/r", "--train.steps=3"]
    cmd = _harness.trainer_command(Path("c.toml"), ["--a.b=1"], "torchrun --standalone --nproc_per_node=8 -m")
    assert cmd == ["torchrun", "--standalone", "--nproc_per_node=8", "-m", "fmtrain.train", "c.toml", "--a.b=1"]


def test_read_metrics_and_its_rows(tmp_path):
    assert _harness.read_metrics(tmp_path) == []  # no file: a run that failed before its first step
    rows = [dict(step=0, eval_loss=5.0, eval_bpb=2.0), dict(step=1, loss=4.0, tokens_per_s=10.0),
            dict(step=2, loss=3.0, tokens_per_s=20.0), dict(step=2, eval_loss=3.5, eval_bpb=1.5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    assert _harness.read_metrics(tmp_path) == _harness.read_metrics(tmp_path / "metrics.jsonl") == rows
    steps = _harness.step_rows(rows)
    assert [r["step"] for r in steps] == [1, 2] and [r["step"] for r in _harness.eval_rows(rows)] == [0, 2]
    assert _harness.after_warmup(steps) == steps[1:] and _harness.after_warmup(steps[:1]) == steps[:1]


def fake_trainer(tmp_path, body: str) -> list[str]:
    """A command that stands for the trainer: ``body`` runs with ``run`` the run folder."""
    script = tmp_path / "fake_trainer.py"
    script.write_text("import json, sys, time\nfrom pathlib import Path\nrun = Path(sys.argv[1])\n"
                      + textwrap.dedent(body))
    return [sys.executable, str(script), str(tmp_path / "run")]


def test_run_trainer_starts_afresh_and_reads_the_metrics(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 9, "loss": 0.1}\n')  # an older run's
    cmd = fake_trainer(tmp_path, """
        print("12.5M parameters"); print("oops", file=sys.stderr)
        (run / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=2.0)) + "\\n")
    """)
    run = _harness.run_trainer(cmd, tmp_path / "run").check("fake")
    assert run.returncode == 0 and run.rows == [dict(step=1, loss=2.0)] and run.wall_s > 0
    assert "12.5M parameters" in run.output and "oops" in run.output  # stdout and stderr, in stdout.log


def test_run_trainer_failure_and_timeout(tmp_path):
    run = _harness.run_trainer(fake_trainer(tmp_path, "print('bad config'); sys.exit(3)"), tmp_path / "run")
    assert run.returncode == 3 and run.rows == []
    with pytest.raises(RuntimeError, match=r"(?s)causal sdpa failed \(exit 3\): .*bad config"):
        run.check("causal sdpa")
    run = _harness.run_trainer(fake_trainer(tmp_path, "print('started', flush=True); time.sleep(60)"),
                               tmp_path / "run", timeout=3)
    assert run.returncode is None and run.wall_s < 30 and "started" in run.output


def test_spawn_case_reads_the_last_line_and_says_why_not(tmp_path, capsys):
    case = tmp_path / "case.py"
    case.write_text(textwrap.dedent("""
        import os, sys, time
        from bench import _harness  # the checkout's root is on PYTHONPATH (child_env)
        if sys.argv[1] == "fail":
            sys.exit("no such case")
        if sys.argv[1] == "slow":
            time.sleep(60)
        print("noise")
        _harness.report_case(dict(ms=1.5, threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_")))
    """))
    row = _harness.spawn_case(case, ["ok"], label="x", env={**os.environ, **_harness.PEAK_ENV})
    assert row == dict(ms=1.5, threshold="65536")
    assert _harness.spawn_case(case, ["fail"], label="fma n=512 fwd") is None
    assert _harness.spawn_case(case, ["slow"], label="tiny sdpa n=4", timeout=2) is None
    out = capsys.readouterr().out
    assert "  fma n=512 fwd: failed (no such case)" in out and "  tiny sdpa n=4: over 2 s, skipped" in out


def test_time_calls_warm_up_repeats_and_budget():
    calls = []
    times = _harness.time_calls(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7 and len(times) == 5
    calls.clear()
    times = _harness.time_calls(lambda: (calls.append(1), time.sleep(0.05)), runs=20, budget_s=0.01)
    assert len(calls) == 1 and len(times) == 1  # the warm-up alone overran: its time, not none
    assert _harness.upper_median([3.0, 1.0, 2.0, 4.0]) == 3.0 and _harness.upper_median([2.0, 1.0, 3.0]) == 2.0
    seconds, out = _harness.time_call(lambda: 42)
    assert out == 42 and seconds >= 0


def test_logits_at_the_chosen_positions_and_tokens():
    import torch

    from fmtrain.config import ModelConfig
    from fmtrain.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, attention="sdpa")).eval()
    ids = torch.randint(0, 64, (2, 16))
    where = torch.zeros(2, 16, dtype=torch.bool)
    where[0, 3] = where[1, 15] = True
    vocab = torch.tensor([5, 7, 9])
    with torch.no_grad():
        got = _harness.logits_at(model, ids, where, vocab)
    full = model.logits(ids)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, full[where][:, vocab])


# --------------------------------------------------------------------------- how bench/ imports
def test_a_bench_module_imported_through_the_package_is_the_scripts_own():
    from bench import _results, recall

    import recall as by_name  # as bench/sweep.py imports quality: by its plain name

    assert recall is by_name and _results is sys.modules["_results"]
    with pytest.raises(ImportError):
        from bench import no_such_benchmark  # noqa: F401


SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name not in ("__init__.py", "_results.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_script_touches_sys_path_and_each_imports_results_before_fmtrain(path):
    """bench/__init__.py's rule: _results puts the checkout first, so it comes before any fmtrain import."""
    src = path.read_text()
    assert "sys.path" not in src
    top = [n for n in ast.parse(src).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name for n in top]
    first = [i for i, name in enumerate(names) if name and name.split(".")[0] == "fmtrain"]
    if first:
        assert "_results" in names[:first[0]], path.name
