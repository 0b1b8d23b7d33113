"""The five-minute GPU check (#26): what one short call on a lent card must settle.

    bash bench/gpu_check.sh --quick              # a CUDA machine: at most --budget seconds (300)
    bash bench/gpu_check.sh --quick --dry-run    # the plumbing: CPU, TRITON_INTERPRET=1, tiny sizes

A lent GPU comes for 15 minutes in all, start-up included; this leaves room to run it twice.
``bench/gpu_check.sh`` without ``--quick`` is the long sweep (both masks, head_dim 64 too).

1. The card: its bf16 matrix rate (an 8192^3 matmul) and device copy bandwidth (1 GiB),
   timed with CUDA events: the roofline the kernels are judged against.
2. The gate: every launch candidate (``fmtrain.attention.kernels.function.LAUNCH_CONFIGS``)
   in bf16 against the float64 PyTorch path on the same device, at two small shapes (GQA,
   ragged n, outputs and q/k/v gradients; ``gpu_check.check_fma``'s errors and tolerance).
   A candidate that fails is not timed.
3. Time, causal, head_dim 128, 16 heads, bf16, at 16k, 128k and 1M: forward+backward of each
   candidate that passed (median of CUDA-event timings), the default launch with the summaries'
   token gradients apart ("separate": FMTRAIN_SUMMARY_GRADS), SDPA flash at 16k only. For the
   default candidate, one profiled call per length splits the device time by kernel (each
   Triton kernel; the PyTorch ops around them: the summaries, the tables, the casts) and
   reports the host time apart: how long the call takes to return without synchronising
   (the launches and the Python around them). Host time above device time means the GPU
   waits on Python.
4. The trainer: the 125M causal config at 131072 tokens with fma (``bench/gpu_train.py``'s
   case, 3 steps), in the time left (at least 100 s).

Prints one table per part and writes ``<--out>/gpu_quick-<tag>.json`` (bench/_results.py; the
tag is the card and the date, or ``dry-run``). Exit status 1 if the default candidate fails
its gate or the trainer fails.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _results import add_result_arguments, meta as common_meta, result_stem, write_results
from gpu_check import TOL, check_fma, launch, sdpa_flash
from fmtrain.attention import fma
from fmtrain.attention.kernels.function import LAUNCH_CONFIGS

KERNEL_NAMES = ("_fwd_kernel", "_fwd_run_kernel", "_dq_kernel", "_dkv_kernel", "_dsum_kernel", "_up_kernel",
                "_top_kernel", "_top_bwd_kernel", "_up_bwd_kernel")
# The default launch with the summaries' token gradients formed apart and added by autograd
# (FMTRAIN_SUMMARY_GRADS=separate), timed beside it: what the dk/dv kernel's epilogue saves.
SEPARATE = "separate"


def device_ms(fn, dev, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after one warm-up: CUDA events on a GPU, the
    wall clock on the CPU."""
    fn()
    out = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def card_rates(dev, dry: bool) -> dict:
    """bf16 matrix rate (TFLOP/s) and device copy bandwidth (TB/s: bytes read plus written)."""
    n, mib = (256, 8) if dry else (8192, 1024)
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    mm = statistics.median(device_ms(lambda: a @ b, dev, 3 if dry else 20))
    x = torch.empty(mib << 20, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    cp = statistics.median(device_ms(lambda: y.copy_(x), dev, 3 if dry else 20))
    return dict(matmul_n=n, matmul_ms=mm, tflops=2 * n ** 3 / mm / 1e9, copy_mib=mib, copy_ms=cp,
                tbps=2 * x.numel() / cp / 1e9)


def gate(dev, dry: bool) -> dict[str, list[dict]]:
    """Each candidate's bf16 checks (gpu_check.check_fma rows, with ``ok``)."""
    # (a dry run checks the plumbing: one shape, GQA and ragged)
    shapes = [(100, 3, 1, 16, 16)] if dry else [(1000, 4, 2, 128, 64), (777, 3, 1, 128, 64)]
    out = {}
    for config in LAUNCH_CONFIGS:
        rows = []
        for n, H, Hkv, d, m in shapes:
            r = check_fma(dev, torch.bfloat16, n, H, Hkv, d, m, True, "nlogn", config=config)
            r["ok"] = r["nonfinite"] == 0 and max(r["errors"].values()) < TOL["bfloat16"]
            rows.append(r)
            worst = max(r["errors"], key=r["errors"].get)
            print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['case']:62s} max err {r['errors'][worst]:.1e} ({worst})",
                  flush=True)
        out[config] = rows
    return out


def stages(attn, xs, dout, dev) -> dict:
    """One profiled forward+backward: device ms by kernel (the Triton kernels by name, the rest as
    "pytorch ops"), and the host's ms to return from the call without synchronising."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        return torch.autograd.grad(attn(*xs), xs, dout)

    call()  # warm: compiled, tables cached
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    call()
    host = 1e3 * (time.perf_counter() - t0)  # no synchronisation: the launches and the Python
    if dev.type == "cuda":
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        call()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    by = {}
    for e in prof.key_averages():
        # The device's own events (kernels, copies) only: an operator's row repeats its kernels' time.
        if "CUDA" not in str(getattr(e, "device_type", "")) or not e.self_device_time_total:
            continue
        t = e.self_device_time_total
        name = next((k for k in KERNEL_NAMES if k in e.key), "pytorch ops")
        by[name] = by.get(name, 0.0) + t / 1e3
    return dict(host_ms=host, device_ms_by_kernel=by, device_ms=sum(by.values()))


def timing(dev, args, passed: list[str], deadline: float) -> list[dict]:
    dt, d, H = torch.bfloat16, args.head_dim, args.heads
    rows = []
    for n in args.n:
        g = torch.Generator(device="cpu").manual_seed(n)
        q, k, v, dout = (torch.randn(1, H, n, d, generator=g).to(dev, dt) for _ in range(4))
        xs = [t.requires_grad_() for t in (q, k, v)]
        impls = [(c, lambda a, b, c_: fma(a, b, c_, impl="triton")) for c in passed]
        if LAUNCH_CONFIGS[0] in passed:
            impls.insert(1, (SEPARATE, impls[0][1]))
        if n <= args.sdpa_max:
            impls.append(("sdpa flash", lambda a, b, c_: sdpa_flash(a, b, c_, True)))
        for name, attn in impls:
            row = dict(impl=name, n=n, heads=H, head_dim=d, causal=True, dtype="bfloat16")
            if time.time() > deadline:
                row["skipped"] = "time budget"
            else:
                try:
                    with launch(name if name in LAUNCH_CONFIGS else None, SEPARATE if name == SEPARATE else None):
                        ms = device_ms(lambda: torch.autograd.grad(attn(*xs), xs, dout), dev, args.repeats)
                        row.update(fwdbwd_ms=statistics.median(ms), runs=ms)
                        if name == LAUNCH_CONFIGS[0]:
                            row.update(stages(attn, xs, dout, dev))
                except torch.cuda.OutOfMemoryError:
                    row["skipped"] = "out of memory"
                except Exception as e:  # keep going: the table shows it
                    row["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            what = f"{row['fwdbwd_ms']:9.2f} ms" if "fwdbwd_ms" in row else row["skipped"]
            extra = f"  host {row['host_ms']:.2f} ms" if "host_ms" in row else ""
            print(f"  {name:10s} n={n:8d} f+b {what}{extra}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del q, k, v, dout, xs
    return rows


def trainer(args, deadline: float) -> dict:
    """bench/gpu_train.py's fma case at 131072 tokens (the tiny model at 2048 in a dry run)."""
    import gpu_train

    seq_len = 2048 if args.dry_run else 131072
    left = deadline - time.time()
    if left < args.train_min:
        return dict(attention="fma", seq_len=seq_len, status=f"skipped: time budget ({left:.0f} s left)")
    targs = argparse.Namespace(dry_run=args.dry_run, steps=3,
                               config="configs/tiny-gpt.toml" if args.dry_run else "configs/gpt-125m-128k.toml")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter: far too slow for it
    with tempfile.TemporaryDirectory(prefix="gpu_quick-") as tmp:
        return gpu_train.run_case(targs, "fma", seq_len, Path(tmp), left, env=env)


def tables(res: dict) -> str:
    c = res["card"]
    lines = [f"card: {c['tflops']:.0f} TFLOP/s bf16 ({c['matmul_n']}^3), {c['tbps']:.2f} TB/s copy ({c['copy_mib']} MiB)",
             "", "gate (bf16 vs float64 PyTorch path): " + ", ".join(
                 f"{k} {'ok' if all(r['ok'] for r in v) else 'FAIL'}" for k, v in res["gate"].items()), ""]
    ns = sorted({r["n"] for r in res["timing"]})
    names = list(dict.fromkeys(r["impl"] for r in res["timing"]))
    key = {(r["impl"], r["n"]): r for r in res["timing"]}
    lines.append(f"{'f+b ms':>10} | " + " | ".join(f"{n:>10}" for n in ns))
    for name in names:
        cells = []
        for n in ns:
            r = key.get((name, n))
            cells.append(f"{r['fwdbwd_ms']:10.2f}" if r and "fwdbwd_ms" in r else f"{'skip' if r else '-':>10}")
        lines.append(f"{name:>10} | " + " | ".join(cells))
    default = LAUNCH_CONFIGS[0]
    staged = [key[(default, n)] for n in ns if "device_ms_by_kernel" in key.get((default, n), {})]
    if staged:
        kernels = sorted({k for r in staged for k in r["device_ms_by_kernel"]})
        lines += ["", f"{default}, device ms by kernel (one profiled call) and host ms (return without sync):",
                  f"{'n':>8} | " + " ".join(f"{k:>14}" for k in kernels) + f" | {'device':>8} {'host':>8}"]
        for r in staged:
            lines.append(f"{r['n']:>8} | " + " ".join(f"{r['device_ms_by_kernel'].get(k, 0.0):14.2f}" for k in kernels)
                         + f" | {r['device_ms']:8.2f} {r['host_ms']:8.2f}")
    t = res.get("trainer")
    if t:
        tps = f"{t['tokens_per_s']:.0f} tokens/s, peak {t['peak_gib']:.1f} GiB" if "tokens_per_s" in t else ""
        lines += ["", f"trainer fma {t['seq_len']}: {t['status']} {tps}"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny sizes")
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check")
    ap.add_argument("--train-min", type=float, default=100.0, help="seconds the trainer step needs, at least")
    ap.add_argument("--n", type=int, nargs="+", default=[1 << 14, 1 << 17, 1 << 20])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sdpa-max", type=int, default=1 << 14)
    ap.add_argument("--repeats", type=int, default=10)
    add_result_arguments(ap)
    args = ap.parse_args()
    t0 = time.time()
    deadline = t0 + args.budget
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            sys.exit("--dry-run needs TRITON_INTERPRET=1 set before Python starts (bench/gpu_check.sh does it)")
        dev = torch.device("cpu")
        args.n, args.heads, args.head_dim, args.sdpa_max, args.repeats, args.train_min = [256], 2, 16, 256, 2, 20.0
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry-run to check the plumbing on CPU")
        dev = torch.device("cuda")
    import triton

    stem = result_stem("gpu_quick", args, dev)
    info = common_meta(args, device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)",
                       triton=triton.__version__, candidates=list(LAUNCH_CONFIGS), block_size=64, rank=2,
                       summaries="mean")
    print(f"gpu_quick: {info['device']}, torch {info['torch']}, triton {info['triton']}", flush=True)
    res = dict(card=card_rates(dev, args.dry_run))
    print(f"1. card: {res['card']['tflops']:.1f} TFLOP/s, {res['card']['tbps']:.2f} TB/s", flush=True)
    print("2. gate", flush=True)
    res["gate"] = gate(dev, args.dry_run)
    passed = [c for c, rows in res["gate"].items() if all(r["ok"] for r in rows)]
    print(f"3. time ({time.time() - t0:.0f} s so far)", flush=True)
    # The trainer keeps the time it needs; the timing stops short of it.
    res["timing"] = timing(dev, args, passed, deadline - args.train_min)
    print(f"4. trainer ({time.time() - t0:.0f} s so far)", flush=True)
    res["trainer"] = trainer(args, deadline)
    res["seconds"] = time.time() - t0
    print("\n" + tables(res))
    path = write_results(stem, dict(meta=info, **res, table=tables(res)))
    bad = [] if LAUNCH_CONFIGS[0] in passed else [f"the default launch ({LAUNCH_CONFIGS[0]}) failed its gate"]
    if not res["trainer"]["status"].startswith(("ok", "skipped", "does not fit")):
        bad.append(f"trainer: {res['trainer']['status']}")
    print(f"\nwrote {path}; {res['seconds']:.0f} s; " + (f"FAILURES: {bad}" if bad else "all checks passed"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
