"""Smoke test of bench/documents.py (document masking's cost) at a small length, into a tmp folder:
its figures are for bench/results/; here they only have to be there and well formed."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_documents_bench_small(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "documents.py"), "--n", "4096", "--rows", "1", "--repeats", "2",
           "--short", "--block-size", "32", "--heads", "2", "--head-dim", "16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "documents-cpu-short.json").read_text())["rows"]
    assert row["n"] == 4096 and row["documents"] >= 2 and 1 <= row["shortest"] <= row["longest"] <= 2000
    assert row["plain_s"] > 0 and row["masked_s"] > 0 and row["ratio"] == row["masked_s"] / row["plain_s"]
    lo, hi = row["paired_quartiles"]
    assert row["paired_ratio"] > 0 and lo <= row["paired_ratio"] <= hi and row["threads"] >= 1
    assert "masked/plain" in proc.stdout


def test_documents_bench_aligned(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "documents.py"), "--n", "4096", "--rows", "1", "--repeats", "2",
           "--short", "--align", "--block-size", "32", "--heads", "2", "--head-dim", "16", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "documents-cpu-short-aligned.json").read_text())["rows"]
    lengths = row["lengths"]
    assert sum(lengths) == row["n"] == 4096 and len(lengths) == row["documents"] >= 2
    assert all(L % 32 == 0 for L in lengths[:-1])            # each document a whole number of blocks
    assert 0 < row["n"] - row["real_tokens"] < 32 * len(lengths)  # less than a block of padding each
    assert row["ratio"] == row["masked_s"] / row["plain_s"]
