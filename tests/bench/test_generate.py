"""Smoke test of the decoding benchmark (--quick), into a tmp folder: the rows are there and
consistent (every kind at every context, the multipole cache far smaller than the KV cache)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_generate_bench_quick(tmp_path):
    out = tmp_path / "generate-quick.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["kind"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(k, n) for k in ("fma", "sdpa", "recompute", "fma-refine4") for n in (1024, 4096)}
    refined = rows[("fma-refine4", 4096)]
    # The store holds the context's keys and values (fp32: as sdpa's cache, up to the capacity's doubling).
    assert rows[("sdpa", 4096)]["cache_bytes"] <= refined["store_bytes"] <= 2.1 * rows[("sdpa", 4096)]["cache_bytes"]
    assert refined["cache_bytes"] - refined["store_bytes"] < 0.5 * rows[("sdpa", 4096)]["cache_bytes"]
    for (kind, n), r in rows.items():
        assert r["tokens"] >= 8 and r["ms_per_token"] > 0, r
    assert rows[("fma", 4096)]["cache_bytes"] < 0.1 * rows[("sdpa", 4096)]["cache_bytes"]
    assert rows[("sdpa", 4096)]["cache_bytes"] == 4 * rows[("sdpa", 1024)]["cache_bytes"]
    assert rows[("fma", 4096)]["prefill_s"] > 0 and out.with_suffix(".png").is_file()
