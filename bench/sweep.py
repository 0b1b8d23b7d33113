"""Is the comparison robust? A learning-rate sweep per variant, then seeds at each one's best.

    python bench/sweep.py --jobs 2                # the committed CPU study (causal, seq_len 4096)
    python bench/sweep.py --quick                 # CI smoke: seq_len 512, a few steps
    python bench/sweep.py --variants fma-m2m,sdpa --seq-len 16384 --steps 2000 \\
        --launcher "torchrun --standalone --nproc_per_node=8 -m"

Phase 1 trains every variant at every ``--lrs`` value with the first of ``--seeds``;
phase 2 trains each variant at its own best learning rate (lowest final held-out bits
per byte) with the other seeds. Every run is the real trainer on the embedded corpus
(:func:`quality.train_one`: only the attention, the learning rate and the seed differ;
``train.min_lr`` stays lr/10). The seed sets the initial weights and the data order.
Reports, per variant, mean and standard deviation over seeds of the final held-out
bpb, the gap of ``fma-m2m`` to the best-tuned ``sdpa``, and whether the ordering holds
along the whole curve or only early; the plot shows each variant's mean curve with a
band of one standard deviation. A run folder that already holds the same finished run
is reused, so a sweep can be extended across sittings.
Writes ``sweep-<tag>.{json,md,png}`` (``bench/_results.py``: ``--out``, ``--tag``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _results import add_result_arguments, beside, meta, result_stem, save_plot, write_results
import quality  # bench/quality.py: one trainer run per variant


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def run_one(args, variant: str, lr: float, seed: int) -> dict:
    """One finished run (trained now, or reused when its folder holds the same command's result)."""
    a = copy.copy(args)
    a.seed = seed
    a.set = [*args.set, f"train.lr={lr}", f"train.min_lr={lr / 10}"]
    a.work_dir = str(Path(args.work_dir) / f"lr{lr_tag(lr)}-seed{seed}")
    run_dir = Path(a.work_dir) / f"causal-{variant}"
    cmd = quality.run_overrides(a, "causal", variant, run_dir)
    saved = run_dir / "sweep_row.json"
    if not args.retrain and saved.is_file():
        row = json.loads(saved.read_text())
        if row.get("overrides") == cmd:
            print(f"{variant} lr {lr:g} seed {seed}: reusing {run_dir}", flush=True)
            return row
    row = quality.train_one(a, "causal", variant)
    row.update(lr=lr, seed=seed, overrides=cmd)
    saved.write_text(json.dumps(row, indent=1))
    print(f"{variant} lr {lr:g} seed {seed}: bpb {row['eval_bpb']:.4f} in {row['wall_s']:.0f} s", flush=True)
    return row


def summarise(rows: list[dict], variants: list[str], lrs: list[float], seeds: list[int]) -> dict:
    """Best learning rate per variant (first seed) and the seed statistics there."""
    out = {}
    for v in variants:
        first = {r["lr"]: r["eval_bpb"] for r in rows if r["variant"] == v and r["seed"] == seeds[0]}
        if not first:
            continue
        best = min(first, key=first.get)
        at_best = [r for r in rows if r["variant"] == v and r["lr"] == best]
        bpbs = [r["eval_bpb"] for r in at_best]
        out[v] = dict(lr_sweep={lr_tag(k): first[k] for k in sorted(first)}, best_lr=best,
                      seeds=[r["seed"] for r in at_best], bpb=bpbs, mean=statistics.mean(bpbs),
                      std=statistics.stdev(bpbs) if len(bpbs) > 1 else 0.0,
                      curve=mean_curve(at_best))
    return out


def mean_curve(runs: list[dict]) -> list[dict]:
    """Held-out bpb against training tokens: mean and std over the runs, per evaluation."""
    by_tokens: dict[int, list[float]] = {}
    for r in runs:
        for c in r["curve"]:
            by_tokens.setdefault(c["tokens"], []).append(c["eval_bpb"])
    return [dict(tokens=t, mean=statistics.mean(x), std=statistics.stdev(x) if len(x) > 1 else 0.0, n=len(x))
            for t, x in sorted(by_tokens.items())]


def verdict(summary: dict) -> dict:
    """fma-m2m against the best-tuned sdpa: the final gap, the floor (within 3%), and where along
    the curve fma's mean is below sdpa's."""
    if not {"fma-m2m", "sdpa"} <= summary.keys():
        return {}
    f, s = summary["fma-m2m"], summary["sdpa"]
    gap = f["mean"] / s["mean"] - 1
    sc = {c["tokens"]: c["mean"] for c in s["curve"]}
    ahead = [c["tokens"] for c in f["curve"] if c["tokens"] in sc and c["tokens"] > 0 and c["mean"] < sc[c["tokens"]]]
    spread = max(f["std"], s["std"])
    return dict(fma_mean=f["mean"], sdpa_mean=s["mean"], gap_to_sdpa=gap, within_3pct=gap <= 0.03,
                gap_in_stds=(s["mean"] - f["mean"]) / spread if spread else None,
                fma_ahead_at_tokens=ahead,
                fma_ahead_at_end=bool(f["curve"]) and f["curve"][-1]["tokens"] in ahead)


def table(summary: dict, lrs: list[float]) -> str:
    lines = ["| variant | " + " | ".join(f"lr {lr:g} (seed 0)" for lr in lrs) + " | best lr | seeds | "
             "mean bpb | std |", "|---" * (len(lrs) + 5) + "|"]
    for v, s in summary.items():
        cells = [f"{s['lr_sweep'][lr_tag(lr)]:.4f}" if lr_tag(lr) in s["lr_sweep"] else "-" for lr in lrs]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {s['best_lr']:g} | {len(s['bpb'])} | "
                     f"{s['mean']:.4f} | {s['std']:.4f} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.3))
    for i, (v, s) in enumerate(summary.items()):
        pts = [c for c in s["curve"] if c["tokens"] > 0]
        x = [c["tokens"] for c in pts]
        m = [c["mean"] for c in pts]
        sd = [c["std"] for c in pts]
        ax.plot(x, m, marker=".", color=f"C{i}", label=f"{v} (lr {s['best_lr']:g}, {len(s['bpb'])} seeds)")
        ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=f"C{i}", alpha=0.2)
    save_plot(fig, ax, path, xlabel="training tokens", ylabel="held-out bits per byte (mean ± std over seeds)",
              title=title)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: seq_len 512, 4 steps, two lrs and seeds")
    ap.add_argument("--variants", default="fma-m2m,sdpa,local", help=f"among {', '.join(quality.VARIANTS)}")
    ap.add_argument("--lrs", default="1.5e-3,3e-3,6e-3", help="learning rates of phase 1")
    ap.add_argument("--seeds", default="0,1,2", help="the first is phase 1's; the others phase 2's")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--config-causal", default=quality.CONFIGS["causal"])
    ap.add_argument("--launcher", default=quality.parse_args([]).launcher)
    ap.add_argument("--work-dir", default=str(quality.ROOT / "runs" / "bench-sweep"))
    ap.add_argument("--retrain", action="store_true")
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.steps, args.eval_interval, args.eval_batches, args.log_interval = 512, 4, 2, 2, 2
        args.warmup_steps, args.lrs, args.seeds = 2, "3e-3,6e-3", "0,1"
    for v in args.variants.split(","):
        if v not in quality.VARIANTS:
            ap.error(f"unknown variant {v!r}; choose among {', '.join(quality.VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = args.variants.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: run_one(args, *c), [(v, lr, seeds[0]) for v in variants for lr in lrs]))
        best = summarise(rows, variants, lrs, seeds[:1])
        rows += list(pool.map(lambda c: run_one(args, *c),
                              [(v, best[v]["best_lr"], s) for v in variants for s in seeds[1:]]))
    summary = summarise(rows, variants, lrs, seeds)
    v = verdict(summary)
    md = table(summary, lrs)
    import torch

    stem = result_stem("sweep", args, device="cuda" if torch.cuda.is_available() else "cpu")
    write_results(stem, dict(meta=meta(args, sweep_wall_s=time.perf_counter() - t0), summary=summary, verdict=v,
                             rows=rows, table=md), md)
    tokens = rows[0]["train_tokens"]
    plot(summary, beside(stem, ".png"), f"causal LM, seq_len {args.seq_len}, {tokens:,} tokens per run")
    print(md)
    if v:
        print(f"fma-m2m {v['fma_mean']:.4f} vs best-tuned sdpa {v['sdpa_mean']:.4f}: {100 * v['gap_to_sdpa']:+.1f}% "
              f"(floor <= +3%: {'met' if v['within_3pct'] else 'MISSED'}); fma ahead at the end: "
              f"{v['fma_ahead_at_end']}")
    print(f"wrote {beside(stem, '.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
