"""CPU thread settings on a shared machine: the blocked core and the demo trainer, with and
without a competing process.

    python bench/threads.py                 # 16k causal forward+backward and the demo, 2 rounds
    python bench/threads.py --n 4096 --rounds 5 --no-train

A laptop or a login node runs other work beside a training run. Each round times, in a
fresh process per case, ``bench/attention.py``'s fma case and (``--train``) the CPU demo
(``configs/tiny-gpt.toml``, 12 steps; tokens/s of its last 10) under every setting, on an
idle machine and beside one busy-looping process per ``--compete``, interleaved so that
the machine's drift hits every setting alike. Settings: fmtrain's defaults (free cores:
``fmtrain/attention/cpu.py``), torch's fixed count (``FMTRAIN_FIXED_THREADS=1``, as
before) and one thread. Prints medians over rounds and writes ``<--out>/threads-<tag>.json``
(bench/_results.py: ``$OUT``, else ``bench/results/``; the tag ``cpu``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import ROOT, add_result_arguments, meta, result_stem, write_results
from _harness import run_trainer, spawn_case, step_rows, trainer_command

HERE = Path(__file__).resolve().parent

SETTINGS = {
    "default (adaptive)": {},
    "FMTRAIN_FIXED_THREADS=1": {"FMTRAIN_FIXED_THREADS": "1"},  # torch's count whatever the load (before)
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}


def _case(n: int, budget: float, env: dict) -> float | None:
    case = ["--case", f"fma,{n},1,fwdbwd,2,0", "--device", "cpu", "--dtype", "float32", "--heads", "4",
            "--head-dim", "64", "--budget", str(budget)]  # the case: impl,n,causal,mode,rank,refine
    row = spawn_case(HERE / "attention.py", case, label=f"fma n={n} fwdbwd", env=env)
    return row["ms"] if row else None


def _train_case(env: dict, tmp: Path) -> float | None:
    """tokens/s of the CPU demo over its last 10 of 12 steps (a fresh run each time)."""
    run_dir = tmp / "run"
    cmd = trainer_command(ROOT / "configs" / "tiny-gpt.toml",
                          [f"--run.dir={run_dir}", "--train.steps=12", "--train.log_interval=1",
                           "--train.eval_interval=0", "--checkpoint.interval=1000"])
    run = run_trainer(cmd, run_dir, env=env)
    if run.returncode:
        print(run.output[-2000:], file=sys.stderr)
        return None
    rates = [m["tokens_per_s"] for m in step_rows(run.rows)][2:]
    return statistics.median(rates) if rates else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per case")
    ap.add_argument("--compete", type=int, default=1, help="busy processes beside the run in the loaded rounds")
    ap.add_argument("--no-train", dest="train", action="store_false", help="time the attention case only")
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="threads-"))
    times: dict[tuple[str, str], list[float]] = {}
    rates: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.rounds):
        for load in ("idle", f"{args.compete} busy"):
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.compete)] \
                if load != "idle" else []
            try:
                time.sleep(0.5 if busy else 0)
                for name, extra in SETTINGS.items():
                    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FMTRAIN_FIXED_THREADS")}
                    ms = _case(args.n, args.budget, dict(env, **extra))
                    if ms is not None:
                        times.setdefault((name, load), []).append(ms)
                        print(f"round {rnd + 1} {load:>7} {name:>24}: {ms:8.1f} ms", flush=True)
                    if args.train:
                        tps = _train_case(dict(env, **extra), tmp)
                        if tps is not None:
                            rates.setdefault((name, load), []).append(tps)
                            print(f"round {rnd + 1} {load:>7} {name:>24}: {tps:8.0f} tok/s (demo)", flush=True)
            finally:
                for p in busy:
                    p.kill()
                    p.wait()
    loads = ["idle", f"{args.compete} busy"]
    rows = [dict(setting=name, load=load, ms=statistics.median(times[(name, load)]), runs=times[(name, load)],
                 demo_tokens_per_s=statistics.median(rates[(name, load)]) if (name, load) in rates else None)
            for name in SETTINGS for load in loads if (name, load) in times]
    best = {load: min(r["ms"] for r in rows if r["load"] == load) for load in loads}
    best_tps = {load: max((r["demo_tokens_per_s"] or 0) for r in rows if r["load"] == load) for load in loads}
    lines = [f"{'setting':>24} | " + " | ".join(f"{load + ' ms':>12} {'/best':>6} {'demo tok/s':>10} {'/best':>6}"
                                               for load in loads)]
    for name in SETTINGS:
        cells = []
        for load in loads:
            r = next((r for r in rows if r["setting"] == name and r["load"] == load), None)
            if r is None:
                cells.append(f"{'-':>12} {'-':>6} {'-':>10} {'-':>6}")
                continue
            tps = r["demo_tokens_per_s"]
            demo = f"{tps:10.0f} {best_tps[load] / tps:6.2f}" if tps else f"{'-':>10} {'-':>6}"
            cells.append(f"{r['ms']:12.1f} {r['ms'] / best[load]:6.2f} {demo}")
        lines.append(f"{name:>24} | " + " | ".join(cells))
    text = "\n".join(lines)
    print(text)
    stem = result_stem("threads", args, "cpu")
    info = meta(args, device="cpu", n=args.n, causal=True, mode="fwdbwd", compete=args.compete)
    print(f"wrote {write_results(stem, dict(meta=info, rows=rows, table=text))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
