"""Where the GPU benchmarks (gpu_check.py, gpu_train.py) write their JSON."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(stem: str, device: str, date: str, *, dry_run: bool, out: str | None = None) -> Path:
    """``<out or $OUT>/<stem>.json``; a fresh temporary folder for a dry run; else
    ``bench/results/<stem>-<card>-<date>.json``, named to be committed as it is."""
    out = out or os.environ.get("OUT")
    if out:
        folder, name = Path(out), f"{stem}.json"
    elif dry_run:
        folder, name = Path(tempfile.mkdtemp(prefix=f"{stem}-")), f"{stem}.json"
    else:
        card = "".join(ch if ch.isalnum() else "-" for ch in device.lower()).strip("-")
        folder, name = RESULTS, f"{stem}-{card}-{date[:10]}.json"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name
