"""Does it learn? Held-out quality of multipole attention against full and local attention.

    python bench/quality.py                      # CPU: seq_len 4096, causal + masked, 150 steps each
    python bench/quality.py --jobs 2 --mlm-variants fma-m2m,sdpa,local     # the committed CPU results
    python bench/quality.py --quick              # CI smoke: seq_len 512, a few steps, ~1-2 min
    python bench/quality.py --kinds causal --variants fma-m2m,sdpa --seq-len 16384 --steps 2000 \\
        --set model.dim=512 --set model.n_layers=8 --launcher "torchrun --standalone --nproc_per_node=8 -m"

Every variant trains the same model (configs/tiny-gpt.toml or tiny-mlm.toml, or
``--config-causal``/``--config-mlm``) with the same seed on the same tokens of the
embedded corpus; only the attention differs:

- ``fma-m2m``    multipole attention, learned bottom-up summaries (the product's default)
- ``fma-m2m-weighted`` the same with the paper's log(tokens) prior on summary scores (the old default)
- ``fma-mean``   multipole attention, parameter-free mean summaries
- ``fma-linear`` the O(n) variant (queries summarised on coarse levels too), m2m summaries
- ``sdpa``       full attention (the quality ceiling, O(n^2))
- ``local``      the fine level of fma alone (what the coarse levels add is the gap to it)

Each run is the real trainer (``python -m fmtrain.train`` in a subprocess, so that
its peak memory is its own) and the numbers come from its ``metrics.jsonl``:
held-out bits per byte (causal) or masked-token loss (masked) every
``--eval-interval`` steps, tokens/s (median over the logged steps after the
first) and peak memory (resident set on CPU, allocations on GPU). Writes
``<--out>/quality-<tag>.{json,md,png}`` (bench/_results.py: ``$OUT``, else ``bench/results/``;
the tag ``cpu``, ``quick``, or the CUDA card and the date); the PNG plots held-out loss
against training tokens.
"""
from __future__ import annotations

import argparse
import re
import shlex
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _results import ROOT, add_result_arguments, beside, meta, result_stem, write_results
from _harness import after_warmup, eval_rows, run_trainer, step_rows, trainer_command

# variant name -> [model] overrides; every other field comes from the base config.
VARIANTS = {
    "fma-m2m": dict(attention="fma", summary="m2m", variant="nlogn"),
    "fma-m2m-weighted": dict(attention="fma", summary="m2m", variant="nlogn", weighted=True),
    "fma-mean": dict(attention="fma", summary="mean", variant="nlogn"),
    "fma-linear": dict(attention="fma", summary="m2m", variant="linear"),
    "sdpa": dict(attention="sdpa"),
    "local": dict(attention="local"),
}
CONFIGS = {"causal": "configs/tiny-gpt.toml", "mlm": "configs/tiny-mlm.toml"}
# The number each kind is judged by: bits per byte for the causal LM, the
# masked-token cross-entropy (nats) for the masked LM.
METRIC = {"causal": "eval_bpb", "mlm": "eval_loss"}

NOISE_NOTE = ("tokens/s and wall times were measured on a shared machine (other jobs ran beside "
              "this one): they are noisy, compare them only roughly; the losses are deterministic "
              "given the seed.")


# --------------------------------------------------------------------------- one run
def run_overrides(args, kind: str, variant: str, run_dir: Path) -> list[str]:
    """Command-line overrides of one run: the variant's attention plus the study's shared sizes."""
    over = {f"model.{k}": v for k, v in VARIANTS[variant].items()}
    over.update({
        "run.dir": str(run_dir),
        "data.seq_len": args.seq_len,
        "data.batch_size": args.batch_size,
        "train.steps": args.steps,
        "train.seed": args.seed,
        "train.eval_interval": args.eval_interval,
        "train.eval_batches": args.eval_batches,
        "train.log_interval": args.log_interval,
        "checkpoint.interval": args.steps,  # only the final checkpoint: saving is not what we time
        "checkpoint.keep": 1,
    })
    if args.warmup_steps is not None:
        over["train.warmup_steps"] = args.warmup_steps
    for item in args.set:  # --set section.field=value, last one wins
        key, _, value = item.partition("=")
        over[key] = value
    return [f"--{k}={v}" for k, v in over.items()]


def train_one(args, kind: str, variant: str) -> dict:
    """Train one variant from scratch with the real trainer; return its row of the results."""
    run_dir = Path(args.work_dir) / f"{kind}-{variant}"
    config = getattr(args, f"config_{kind}")
    cmd = trainer_command(config, run_overrides(args, kind, variant, run_dir), args.launcher)
    run = run_trainer(cmd, run_dir).check(f"{kind} {variant}")
    row = summary(run.rows, kind)
    params = re.search(r"([\d.]+)M parameters", run.output)
    row.update(kind=kind, variant=variant, model=VARIANTS[variant], wall_s=run.wall_s,
               params_m=float(params.group(1)) if params else None, command=shlex.join(cmd))
    return row


def summary(rows: list[dict], kind: str) -> dict:
    """Final held-out numbers, the eval curve, throughput and peak memory from a run's ``metrics.jsonl`` rows."""
    train, evals = step_rows(rows), eval_rows(rows)
    tokens_per_step = train[-1]["tokens_seen"] / train[-1]["step"]
    # The first logged interval holds the warm-up (allocator, thread pools): leave it out.
    speeds = [r["tokens_per_s"] for r in after_warmup(train)]
    final = evals[-1]
    return dict(
        eval_bpb=final["eval_bpb"], eval_loss=final["eval_loss"], eval_tokens=final["eval_tokens"],
        metric=METRIC[kind], score=final[METRIC[kind]],
        train_tokens=int(train[-1]["tokens_seen"]), steps=train[-1]["step"],
        final_train_loss=train[-1]["loss"],
        tokens_per_s=statistics.median(speeds), peak_memory_gib=max(r["memory_gib"] for r in train),
        curve=[dict(step=r["step"], tokens=int(r["step"] * tokens_per_step), eval_bpb=r["eval_bpb"],
                    eval_loss=r["eval_loss"]) for r in evals])


# --------------------------------------------------------------------------- the study
def floors(rows: list[dict]) -> dict:
    """The issue's floors, judged on the causal rows: fma (m2m) held-out bpb within 3% of
    sdpa's and below local's. The masked rows get the same comparison, for information."""
    out = {}
    for kind in ("causal", "mlm"):
        by = {r["variant"]: r["score"] for r in rows if r["kind"] == kind}
        if not {"fma-m2m", "sdpa", "local"} <= by.keys():
            continue
        gap = by["fma-m2m"] / by["sdpa"] - 1
        out[kind] = dict(metric=METRIC[kind], fma_m2m=by["fma-m2m"], sdpa=by["sdpa"], local=by["local"],
                         gap_to_sdpa=gap, within_3pct_of_sdpa=gap <= 0.03,
                         below_local=by["fma-m2m"] < by["local"])
    return out


def table(rows: list[dict]) -> str:
    """Markdown table of the final numbers, one line per run."""
    lines = ["| kind | variant | held-out bpb | held-out loss | vs sdpa | tokens | tokens/s | peak mem GiB |",
             "|---|---|---|---|---|---|---|---|"]
    sdpa = {r["kind"]: r["score"] for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        rel = f"{100 * (r['score'] / sdpa[r['kind']] - 1):+.1f}%" if r["kind"] in sdpa else "-"
        lines.append(f"| {r['kind']} | {r['variant']} | {r['eval_bpb']:.4f} | {r['eval_loss']:.4f} | {rel} | "
                     f"{r['train_tokens']:,} | {r['tokens_per_s']:,.0f} | {r['peak_memory_gib']:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Held-out loss against training tokens, one panel per kind, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in CONFIGS if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for r in (r for r in rows if r["kind"] == kind):
            pts = [c for c in r["curve"] if c["step"] > 0]  # step 0 (untrained) squashes the axis
            ax.plot([c["tokens"] for c in pts], [c[METRIC[kind]] for c in pts], marker=".", label=r["variant"],
                    color=f"C{list(VARIANTS).index(r['variant'])}")  # one colour per variant in every panel
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out bits per byte" if kind == "causal" else "held-out masked-token loss (nats)")
        ax.set_title(f"{kind} LM")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: seq_len 512, 6 steps, 2 eval batches")
    ap.add_argument("--kinds", default="causal,mlm", help="comma-separated: causal, mlm")
    ap.add_argument("--variants", default="fma-m2m,fma-mean,fma-linear,sdpa,local",
                    help=f"comma-separated among {', '.join(VARIANTS)}")
    ap.add_argument("--mlm-variants", default="", help="variants of the masked LM if not all of --variants")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once (tokens/s is then shared)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps (every variant sees the same tokens)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: the base config's")
    ap.add_argument("--eval-interval", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation")
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="any trainer override for every run, e.g. --set model.dim=256 (repeatable)")
    ap.add_argument("--config-causal", default=CONFIGS["causal"])
    ap.add_argument("--config-mlm", default=CONFIGS["mlm"])
    ap.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m",
                    help="what runs 'fmtrain.train CONFIG ...', e.g. 'torchrun --standalone --nproc_per_node=8 -m'")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-quality"), help="run folders go here")
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.steps, args.eval_interval, args.eval_batches = 512, 6, 3, 2
        args.log_interval, args.warmup_steps = 3, args.warmup_steps or 3
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose among {', '.join(VARIANTS)}")
    for k in args.kinds.split(","):
        if k not in CONFIGS:
            ap.error(f"unknown kind {k!r}; choose among {', '.join(CONFIGS)}")
    return args


def save(args, rows: list[dict], stem: Path, wall: float) -> dict:
    """``<stem>.json``, ``.md`` and ``.png`` of the runs so far."""
    result = dict(meta=meta(args, sweep_wall_s=wall, note=NOISE_NOTE), rows=rows, floors=floors(rows),
                  table=table(rows))
    write_results(stem, result, markdown=result["table"])
    plot(rows, beside(stem, ".png"),
         f"seq_len {args.seq_len}, {rows[0]['train_tokens']:,} training tokens per run, seed {args.seed}")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that train_one stops the trainer it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    rows, t0 = [], time.perf_counter()
    stem = result_stem("quality", args, "cuda" if torch.cuda.is_available() else "cpu")
    cases = [(kind, variant) for kind in args.kinds.split(",") for variant in args.variants.split(",")
             if not (kind == "mlm" and args.mlm_variants and variant not in args.mlm_variants.split(","))]
    # --jobs > 1 trains several variants at once (each a subprocess): for shared or many-core machines.
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda case: train_one(args, *case), cases):
            rows.append(row)
            print(f"{row['kind']:6s} {row['variant']:10s} | {METRIC[row['kind']]} {row['score']:.4f} | "
                  f"bpb {row['eval_bpb']:.4f} | {row['tokens_per_s']:,.0f} tok/s | "
                  f"{row['peak_memory_gib']:.2f} GiB | {row['wall_s']:.0f} s", flush=True)
            result = save(args, rows, stem, time.perf_counter() - t0)  # after every run: partial results survive
    wall = time.perf_counter() - t0
    print(table(rows))
    for kind, f in result["floors"].items():
        print(f"{kind}: fma-m2m {f['metric']} {f['fma_m2m']:.4f} vs sdpa {f['sdpa']:.4f} ({100 * f['gap_to_sdpa']:+.1f}%, "
              f"floor <= +3%: {'met' if f['within_3pct_of_sdpa'] else 'MISSED'}), vs local {f['local']:.4f} "
              f"(floor below local: {'met' if f['below_local'] else 'MISSED'})")
    print(f"wrote {stem}.json, .md, .png in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
