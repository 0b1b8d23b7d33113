"""GPU check of the trainer: the 125M causal config at 131072 tokens, fma against sdpa, and a 1M-token step.

    python bench/gpu_train.py                # one CUDA GPU (bench/gpu_check.sh runs it after the kernels)
    python bench/gpu_train.py --dry-run      # the plumbing on CPU: the tiny model at 2048 tokens

Each case is the real product: ``python -m fmtrain.train configs/gpt-125m-128k.toml``
(DeepSpeed ZeRO 2, bf16, activation checkpointing, the stdlib corpus and its 32k
tokenizer) in its own process for a few steps, with ``--model.attention`` and
``--data.seq_len`` set per case. Read back from the run's ``metrics.jsonl``:
tokens/s and MFU (the median over the steps after the first, which compiles the
kernels and warms the allocator), peak GPU memory (``max_memory_allocated``,
which includes the evals at the start and the end) and the losses (finite?).
A case that runs out of memory is reported as "does not fit", not as a failure.

DeepSpeed is not installed on the GPU machines this project is checked on: carry
it as wheels (``bench/gpu_wheels.sh`` builds them into ``.whl/``).
Writes ``<--out>/gpu_train-<tag>.json`` (bench/_results.py: ``$OUT``, else ``bench/results/``, a
temporary folder for ``--dry-run``; the tag is the card and the date, ``nvidia-h200-2026-11-28``,
or ``dry-run``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _results import add_result_arguments, meta, result_stem, write_results
from _harness import after_warmup, eval_rows, run_trainer, step_rows, trainer_command

# (attention, seq_len) per case; sdpa at 1M is left out: one step would take minutes.
CASES = [("fma", 131072), ("sdpa", 131072), ("fma", 1 << 20)]
DRY_CASES = [("fma", 2048)]  # the plumbing: one DeepSpeed start-up (the quick check's trainer is the same case)


def run_case(args, attention: str, seq_len: int, work: Path, timeout: float, env=None) -> dict:
    run_dir = work / f"{attention}-{seq_len}"
    overrides = [f"--run.dir={run_dir}", f"--model.attention={attention}", f"--data.seq_len={seq_len}",
                 f"--train.steps={args.steps}", "--train.log_interval=1", "--train.eval_interval=0",
                 "--train.eval_batches=1", "--train.warmup_steps=1", "--checkpoint.interval=100000",
                 f"--data.cache_dir={work / 'cache'}"]
    if args.dry_run:
        overrides += ["--train.dtype=fp32", "--parallel.zero_stage=2"]
    cmd = trainer_command(args.config, overrides)
    row = dict(attention=attention, seq_len=seq_len, steps=args.steps, command=" ".join(cmd[1:]))
    run = run_trainer(cmd, run_dir, timeout=timeout, env=env)
    tail = run.output.strip().splitlines()[-25:]
    if run.returncode is None:
        tail.append(f"timed out after {timeout:.0f} s")
    row["wall_s"] = run.wall_s
    steps, evals = step_rows(run.rows), eval_rows(run.rows)
    timed = after_warmup(steps)
    if timed:
        row.update(tokens_per_s=statistics.median(m["tokens_per_s"] for m in timed),
                   # MFU needs the card's peak: none on CPU (the dry run), where the trainer logs none
                   mfu=statistics.median(m["mfu"] for m in timed) if all("mfu" in m for m in timed) else None,
                   step_s=statistics.median(m["step_time"] for m in timed),
                   peak_gib=max(m["memory_gib"] for m in steps),
                   losses=[m["loss"] for m in steps], eval_loss=[m["eval_loss"] for m in evals])
    oom = any("OutOfMemoryError" in s or "out of memory" in s for s in tail)
    rc = run.returncode
    row["status"] = ("ok" if rc == 0 and len(steps) == args.steps else
                     "does not fit (out of memory)" if oom else
                     "timed out" if rc is None else f"failed (exit {rc})")
    if row["status"] != "ok":
        row["log_tail"] = tail
    return row


def table(rows: list[dict]) -> str:
    lines = [f"{'attention':>9} {'seq_len':>8} | {'tokens/s':>9} {'step s':>7} {'MFU %':>6} {'peak GiB':>8} | "
             f"{'loss first->last':>17} | status"]
    for r in rows:
        if "tokens_per_s" in r:
            losses = f"{r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}"
            mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] is not None else "-"
            lines.append(f"{r['attention']:>9} {r['seq_len']:>8} | {r['tokens_per_s']:9.0f} {r['step_s']:7.2f} "
                         f"{mfu:>6} {r['peak_gib']:8.1f} | {losses:>17} | {r['status']}")
        else:
            lines.append(f"{r['attention']:>9} {r['seq_len']:>8} | {'-':>9} {'-':>7} {'-':>6} {'-':>8} | "
                         f"{'-':>17} | {r['status']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, short sequences")
    ap.add_argument("--config", default=None, help="default configs/gpt-125m-128k.toml (tiny-gpt for --dry-run)")
    ap.add_argument("--steps", type=int, default=5, help="steps per case; the first is not timed")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for all cases")
    add_result_arguments(ap)
    args = ap.parse_args()
    import torch

    if args.dry_run:
        args.config = args.config or "configs/tiny-gpt.toml"
        cases, card = DRY_CASES, "cpu (dry run)"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry-run to check the plumbing on CPU")
        args.config = args.config or "configs/gpt-125m-128k.toml"
        cases, card = CASES, torch.cuda.get_device_name()
    import deepspeed  # fail here, not in every case, when the wheels were not carried

    stem = result_stem("gpu_train", args, "cpu" if args.dry_run else "cuda")
    info = meta(args, device=card, deepspeed=deepspeed.__version__, config=args.config, steps=args.steps)
    print(f"gpu_train: {card}, torch {info['torch']}, deepspeed {info['deepspeed']}, {args.config}", flush=True)
    deadline = time.time() + args.budget
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_train-") as tmp:
        for attention, seq_len in cases:
            left = deadline - time.time()
            if left < 20:
                rows.append(dict(attention=attention, seq_len=seq_len, status="skipped: time budget"))
                continue
            row = run_case(args, attention, seq_len, Path(tmp), left)
            rows.append(row)
            print(table([row]).splitlines()[1] + f"  ({row['wall_s']:.0f} s)", flush=True)
            for line in row.get("log_tail", []):
                print("    | " + line, flush=True)
    print("\n" + table(rows))
    path = write_results(stem, dict(meta=info, rows=rows, table=table(rows)))
    print(f"wrote {path}")
    bad = [r for r in rows if r["status"] not in ("ok",) and not r["status"].startswith(("does not fit", "skipped"))]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
