"""Training throughput: tokens/s and peak memory of whole training steps, fma against sdpa.

    python bench/train.py                     # tiny and small models, seq_len 4k-64k (CPU: ~15 min)
    python bench/train.py --quick             # tiny model, 4k and 16k
    python bench/train.py --device cuda --models gpt-125m --seq-lens 16384 131072

A step is forward, backward and an AdamW update of the model (batch 1, fp32 on
CPU, bf16 autocast on CUDA), on random tokens: the loader is not part of it
(the trainer reports its share separately). Each case runs in a fresh
subprocess so that its peak memory (resident set on CPU, allocations on CUDA)
is its own; on CPU the peak comes from a second, one-step run (see ``spawn``).
Prints a table and writes JSON to ``<--out>/train-<tag>.json`` (bench/_results.py: ``$OUT``,
else ``bench/results/``; the tag ``cpu``, ``quick``, or the CUDA card and the date).
"""
from __future__ import annotations

import argparse
import os
import resource

from _results import ROOT, add_result_arguments, meta, result_stem, write_results
from _harness import PEAK_ENV, report_case, spawn_case, time_calls, upper_median

MODELS = {  # name -> (config file or None, overrides of [model])
    "tiny": ("configs/tiny-gpt.toml", {}),
    "small": ("configs/tiny-gpt.toml", dict(dim=256, n_layers=6, n_heads=4, vocab_size=8192)),
    "gpt-125m": ("configs/gpt-125m-128k.toml", {}),
}


def model_config(name: str, attention: str, seq_len: int):
    from fmtrain.config import load_config

    path, over = MODELS[name]
    cfg = load_config(ROOT / path, [f"--model.{k}={v}" for k, v in over.items()]
                      + [f"--model.attention={attention}", f"--data.seq_len={seq_len}", "--run.dir=/tmp/bench"])
    return cfg.model


def run_case(name: str, attention: str, seq_len: int, device: str, steps: int) -> dict:
    import torch

    from fmtrain.model import build_model, flops_per_token

    mcfg = model_config(name, attention, seq_len)
    torch.manual_seed(0)
    model = build_model(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, mcfg.vocab_size, (1, seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss_sum, count = model(x, y)
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = time_calls(step, runs=steps, device=device)  # after one warm-up step
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    t = upper_median(times)
    return dict(model=name, attention=attention, seq_len=seq_len, device=device, params=model.num_params(),
                step_s=t, tokens_per_s=seq_len / t, peak_gib=peak / 2**30,
                tflops=flops_per_token(mcfg, seq_len) * seq_len / t / 1e12)


def spawn(args, name, attention, n) -> dict | None:
    """Time the case in one process; on CPU measure its peak in a second, one-step one, under
    ``PEAK_ENV`` (freed memory returned at once, so that the resident-set peak is what the step
    really holds; it slows allocation-heavy code down, so times come from a process without it)."""
    row = _spawn(args, name, attention, n, args.steps, {})
    if row and args.device == "cpu":
        peak = _spawn(args, name, attention, n, 1, PEAK_ENV)
        row["peak_gib"] = peak["peak_gib"] if peak else float("nan")
    return row


def _spawn(args, name, attention, n, steps, env_extra) -> dict | None:
    return spawn_case(__file__, ["--case", f"{name},{attention},{n}", "--device", args.device, "--steps", steps],
                      label=f"{name} {attention} n={n}", env={**os.environ, **env_extra}, timeout=args.timeout)


def table(rows: list[dict]) -> str:
    key = {(r["model"], r["attention"], r["seq_len"]): r for r in rows}
    lines = [f"{'model':>8} {'seq_len':>8} | {'fma tok/s':>10} {'sdpa tok/s':>10} {'x':>6} | "
             f"{'fma GiB':>8} {'sdpa GiB':>8} | {'fma TFLOP/s':>11}"]
    for model, n in sorted({(r["model"], r["seq_len"]) for r in rows}):
        f, s = key.get((model, "fma", n)), key.get((model, "sdpa", n))
        x = f"{f['tokens_per_s'] / s['tokens_per_s']:6.1f}" if f and s else f"{'-':>6}"
        lines.append(f"{model:>8} {n:8d} | {f['tokens_per_s'] if f else float('nan'):10.0f} "
                     f"{s['tokens_per_s'] if s else float('nan'):10.0f} {x} | "
                     f"{f['peak_gib'] if f else float('nan'):8.2f} {s['peak_gib'] if s else float('nan'):8.2f} | "
                     f"{f['tflops'] if f else float('nan'):11.4f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    ap.add_argument("--seq-lens", type=int, nargs="*", default=None)
    ap.add_argument("--sdpa-max", type=int, default=32768, help="longest seq_len sdpa is run at")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per case (after one warm-up)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per case")
    ap.add_argument("--quick", action="store_true")
    add_result_arguments(ap)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        name, attention, n = args.case.split(",")
        report_case(run_case(name, attention, int(n), args.device, args.steps))
        return
    import torch

    models = args.models or (["tiny"] if args.quick else ["tiny", "small"])
    lens = args.seq_lens or ([4096, 16384] if args.quick else [4096, 16384, 65536])
    print(f"fmtrain training benchmark: {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in models:
        for n in lens:
            for attention in ("fma", "sdpa"):
                if attention == "sdpa" and n > args.sdpa_max:
                    continue
                row = spawn(args, name, attention, n)
                if row:
                    rows.append(row)
                    print(f"  {name:6s} {attention:5s} n={n:6d} {row['tokens_per_s']:9.0f} tok/s "
                          f"{row['peak_gib']:6.2f} GiB", flush=True)
    print()
    print(table(rows))
    stem = result_stem("train", args, args.device)
    out = write_results(stem, dict(meta=meta(args, device=args.device), rows=rows, table=table(rows)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
