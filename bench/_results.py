"""How every benchmark in bench/ names and writes its results.

A benchmark writes ``<folder>/<name>-<tag>.json``, and ``.md`` (its table) and ``.png`` (its
plot) beside it where it has them; ``<name>`` is the script's name (``attention``, ``gpu_check``,
...). Its command line gets two flags from :func:`add_result_arguments`:

- ``--out FOLDER``: default ``$OUT`` when set (the lent GPU machine's output folder), else
  ``bench/results/``; a ``--dry-run`` without either writes to a fresh temporary folder;
- ``--tag TAG``: default ``quick`` for ``--quick`` runs, ``dry-run`` for ``--dry-run`` runs, else
  the device: ``cpu``, or on CUDA the card's name slugged and the UTC date
  (``nvidia-h200-2026-11-28``), so that a result can be committed under the name it has.

Every benchmark imports it before ``fmtrain``: importing it puts this checkout's root on
``sys.path`` (bench/__init__.py says how bench/ imports). In a script::

    add_result_arguments(ap)
    args = ap.parse_args()
    stem = result_stem("attention", args, device=args.device)   # bench/results/attention-cpu
    write_results(stem, dict(meta=meta(args, dtype=args.dtype), rows=rows, table=text))
    plot(rows, beside(stem, ".png"))
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
# Every benchmark imports this module first: from here on it runs this checkout's fmtrain, whatever
# is installed, and without installing it (the GPU machines); see bench/__init__.py.
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))


def add_result_arguments(ap) -> None:
    """``--out FOLDER`` and ``--tag TAG`` on an ``argparse.ArgumentParser``."""
    ap.add_argument("--out", default=None, metavar="FOLDER",
                    help="folder for <name>-<tag>.json (and .md, .png): default $OUT when set, else bench/results")
    ap.add_argument("--tag", default=None,
                    help="file name suffix: default quick for --quick, else the device: cpu, or the CUDA card "
                         "and the date (nvidia-h200-2026-11-28)")


def slug(text: str) -> str:
    """Lower case, every run of characters other than letters and digits one ``-``."""
    out = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")


def utc_now() -> str:
    """The one date format of the results: ``2026-11-28T04:30:37Z`` (UTC)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def card_name(device=None) -> str | None:
    """The CUDA card's name (``NVIDIA H200``) for a CUDA ``device``, else None; with no device,
    the current card's where CUDA is available."""
    import torch

    if device is None:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def device_tag(device="cpu", date: str | None = None) -> str:
    """``cpu`` for a CPU device; for a CUDA one the card's name slugged and the UTC date."""
    card = card_name(device) if str(device) != "cpu" else None
    if card is None:
        return "cpu"
    return f"{slug(card)}-{(date or utc_now())[:10]}"


def default_tag(args, device="cpu") -> str:
    if getattr(args, "quick", False):
        return "quick"
    if getattr(args, "dry_run", False):
        return "dry-run"
    return device_tag(device)


def result_stem(name: str, args, device="cpu", *, tag: str | None = None) -> Path:
    """``<folder>/<name>-<tag>`` (no suffix), its folder made. ``args`` is the parsed command
    line (``--out``, ``--tag``, ``--quick``, ``--dry-run``); ``tag`` is the script's own default
    where the device's is not it. ``args.out`` and ``args.tag`` are set to what was chosen, so
    that :func:`meta` records them. Call it once per run: a dry run's folder is a new one."""
    folder = getattr(args, "out", None) or os.environ.get("OUT")
    if not folder:
        folder = tempfile.mkdtemp(prefix=f"{name}-") if getattr(args, "dry_run", False) else RESULTS
    args.out = str(folder)
    args.tag = getattr(args, "tag", None) or tag or default_tag(args, device)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{name}-{args.tag}"


def beside(stem: Path, suffix: str) -> Path:
    """``<stem><suffix>`` (``.json``, ``.md``, ``.png``), whatever dots the tag holds."""
    return stem.with_name(stem.name + suffix)


def git_commit() -> str | None:
    """This checkout's short commit, ``+dirty`` where tracked files differ from it; None without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _plain(value):
    """A value as JSON holds it: paths and other objects as their text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def meta(args=None, **extra) -> dict:
    """The fields every result records, then the script's own (``extra``, which win):
    UTC date and time, git commit, host, platform, python, CPU count, torch's thread count,
    torch version, CUDA card (or None), load average, ``OMP_NUM_THREADS``, argv and the
    parsed arguments."""
    import torch

    out = dict(date=utc_now(), commit=git_commit(), host=platform.node(), platform=platform.platform(),
               machine=platform.machine(), python=platform.python_version(), cpus=os.cpu_count(),
               threads=torch.get_num_threads(), torch=torch.__version__, cuda=card_name(),
               load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), argv=list(sys.argv),
               args=_plain(vars(args)) if args is not None else None)
    out.update(_plain(extra))
    return out


def write_results(stem: Path, result: dict, markdown: str | None = None) -> Path:
    """``<stem>.json`` (indent 1) and, given ``markdown``, ``<stem>.md``; returns the JSON's path."""
    path = beside(stem, ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    if markdown is not None:
        beside(stem, ".md").write_text(markdown.rstrip("\n") + "\n")
    return path


def save_plot(fig, ax, path, *, xlabel: str, ylabel: str, title: str, **legend) -> None:
    """Label, grid and legend ``ax`` (``legend``: ``ax.legend``'s options, default a small font),
    then write ``fig`` to ``path`` and close it: how every benchmark's plot ends."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(**{"fontsize": 8, **legend})
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

