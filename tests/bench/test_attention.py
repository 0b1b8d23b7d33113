"""Smoke test of the attention benchmark at one small length, into a tmp folder.

Its speed figures are for bench/results/; here they only have to be there, well
formed and consistent (quartiles around the median, both masks, both modes).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_attention_bench_small_sweep(tmp_path):
    out = tmp_path / "attention-cpu.json"
    cmd = [sys.executable, str(ROOT / "bench" / "attention.py"), "--n", "512", "--budget", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["impl"], r["causal"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(i, c, m) for i in ("fma", "sdpa") for c in (True, False) for m in ("fwd", "fwdbwd")}
    for r in rows.values():
        lo, hi = r["ms_quartiles"]
        assert 0 < lo <= r["ms"] <= hi, r
        assert r["runs"] >= 1 and r["peak_extra_mib"] >= 0
    assert "fma f+b" in result["table"] and "512" in proc.stdout


def side_by_side(tmp_path, *extra: str) -> dict:
    """The benchmark at n = 512, causal, block 32, with ``extra`` (several --rank or --refine)."""
    cmd = [sys.executable, str(ROOT / "bench" / "attention.py"), "--n", "512", "--budget", "0.5", "--causal-only",
           "--block-size", "32", *extra, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "attention-cpu.json").read_text())


@pytest.mark.slow
def test_attention_bench_times_each_rank_and_sdpa_once(tmp_path):
    result = side_by_side(tmp_path, "--rank", "2", "8")
    got = sorted((r["impl"], r["rank"] or 0, r["mode"]) for r in result["rows"])
    assert got == sorted([("fma", 2, m) for m in ("fwd", "fwdbwd")] + [("fma", 8, m) for m in ("fwd", "fwdbwd")]
                         + [("sdpa", 0, m) for m in ("fwd", "fwdbwd")])
    assert all(r["block_size"] == 32 for r in result["rows"])
    lines = [line.split() for line in result["table"].splitlines()[2:]]
    assert [line[2] for line in lines] == ["2", "8"]  # one line per rank, sdpa's time on both
    assert lines[0][5] == lines[1][5]


@pytest.mark.slow
def test_attention_bench_times_each_refine_and_reach_side_by_side(tmp_path):
    result = side_by_side(tmp_path, "--refine", "0", "2", "--reach", "100")
    got = sorted((r["impl"], r["refine"] or 0, r["reach"] or "", r["mode"]) for r in result["rows"])
    assert got == sorted([("fma", 0, "", m) for m in ("fwd", "fwdbwd")]  # no reach without refinement
                         + [("fma", 2, x, m) for x in ("", "select", "attend") for m in ("fwd", "fwdbwd")]
                         + [("sdpa", 0, "", m) for m in ("fwd", "fwdbwd")])
    assert {r["reach_distance"] for r in result["rows"] if r["reach"]} == {100}
    lines = [line.split() for line in result["table"].splitlines()[2:]]
    assert [line[2:4] for line in lines] == [["0", "-"], ["2", "-"], ["2", "attend"], ["2", "select"]]
    assert lines[0][6] == lines[3][6]  # one line per (refine, reach), no rank column; sdpa's time on each
