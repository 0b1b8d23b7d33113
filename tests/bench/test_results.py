"""bench/_results.py: how every benchmark names and writes its results (``<folder>/<name>-<tag>.json``)."""
import argparse
import json
from pathlib import Path

import pytest

from bench import _results


def parse(*argv, quick=False, dry_run=False):
    ap = argparse.ArgumentParser()
    if quick:
        ap.add_argument("--quick", action="store_true")
    if dry_run:
        ap.add_argument("--dry-run", action="store_true")
    _results.add_result_arguments(ap)
    return ap.parse_args(list(argv))


@pytest.fixture
def no_out(monkeypatch, tmp_path):
    """No $OUT, and bench/results/ redirected so that nothing is written into the checkout."""
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setattr(_results, "RESULTS", tmp_path / "results")
    return tmp_path / "results"


def test_default_folder_and_cpu_tag(no_out):
    args = parse()
    stem = _results.result_stem("attention", args, "cpu")
    assert stem == no_out / "attention-cpu" and no_out.is_dir()
    assert (args.out, args.tag) == (str(no_out), "cpu")


def test_the_real_default_folder_is_bench_results(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert _results.RESULTS == Path(__file__).resolve().parents[2] / "bench" / "results"


def test_quick_tag(no_out):
    args = parse("--quick", quick=True)
    assert _results.result_stem("generate", args, "cpu") == no_out / "generate-quick"


def test_out_env_then_flag(no_out, monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path / "env"))
    assert _results.result_stem("train", parse(), "cpu") == tmp_path / "env" / "train-cpu"
    stem = _results.result_stem("train", parse("--out", str(tmp_path / "flag"), "--tag", "t1"), "cpu")
    assert stem == tmp_path / "flag" / "train-t1"
    assert _results.result_stem("roofline", parse(), tag="nvidia-h200") == tmp_path / "env" / "roofline-nvidia-h200"


def test_dry_run_gets_a_fresh_folder(no_out):
    a = _results.result_stem("gpu_check", parse("--dry-run", dry_run=True), "cuda")
    b = _results.result_stem("gpu_check", parse("--dry-run", dry_run=True), "cuda")
    assert a.name == b.name == "gpu_check-dry-run" and a.parent != b.parent
    assert no_out not in a.parents and a.parent.is_dir()


def test_card_tag(monkeypatch):
    monkeypatch.setattr(_results, "card_name", lambda device=None: "NVIDIA H200")
    assert _results.device_tag("cuda", date="2026-11-28T04:30:37Z") == "nvidia-h200-2026-11-28"
    assert _results.device_tag("cpu") == "cpu"
    assert _results.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_write_results_and_meta(no_out, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = parse("--tag", "v1.2")
    stem = _results.result_stem("quality", args, "cpu")
    result = dict(meta=_results.meta(args, dtype="float32", heads=4, path=Path("/x")), rows=[1, 2])
    path = _results.write_results(stem, result, markdown="| a |\n|---|")
    assert path == no_out / "quality-v1.2.json"  # a dot in the tag is not a suffix
    assert json.loads(path.read_text()) == json.loads(json.dumps(result, default=str))
    assert path.read_text().startswith('{\n "meta"')  # indent 1
    assert _results.beside(stem, ".md").read_text() == "| a |\n|---|\n"
    assert _results.write_results(no_out / "recall-cpu", {}).is_file()
    assert not (no_out / "recall-cpu.md").exists()  # no table, no .md
    m = json.loads(path.read_text())["meta"]
    for key in ("date", "commit", "host", "cpus", "threads", "torch", "cuda", "load_average", "omp_num_threads",
                "argv", "args"):
        assert key in m, key
    assert m["date"].endswith("Z") and m["date"][10] == "T" and len(m["date"]) == 20
    assert m["omp_num_threads"] == "1" and m["dtype"] == "float32" and m["heads"] == 4 and m["path"] == "/x"
    assert m["args"]["tag"] == "v1.2" and m["args"]["out"] == str(no_out)


BENCH = Path(__file__).resolve().parents[2] / "bench"
NAMES = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))  # every benchmark, new ones too


@pytest.mark.parametrize("name", NAMES)
def test_every_benchmark_names_its_results_here(name):
    src = (BENCH / f"{name}.py").read_text()
    # --out and --tag: its own parser's, or recall.py's (whose arguments bench/selection.py takes)
    assert "add_result_arguments(" in src or "recall.parse_args(" in src
    assert f'result_stem("{name}"' in src and "write_results(" in src


def test_roofline_names_its_json_after_the_gpu_check_it_reads(no_out, tmp_path):
    from bench import roofline

    source = BENCH / "results" / "gpu_check-nvidia-h200-2026-11-28.json"
    assert roofline.main([str(source), "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "roofline-nvidia-h200-2026-11-28.json").read_text())
    assert got["rows"] == json.loads((BENCH / "results" / "roofline-nvidia-h200-2026-11-28.json").read_text())["rows"]
