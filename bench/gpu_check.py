"""GPU check of the Triton multipole kernels: correctness, then time and memory against SDPA flash.

    bash bench/gpu_check.sh              # a CUDA machine: under 8 minutes on an H100
    bash bench/gpu_check.sh --dry-run    # the plumbing only: CPU, TRITON_INTERPRET=1, tiny sizes

1. Correctness on the device: ``fma(impl="triton")`` output and q/k/v gradients
   against the blocked PyTorch path in float64 on the same device (an exact
   algorithm: only rounding differs), bf16 and fp32, causal and bidirectional,
   both variants, GQA, ragged n; the core contract (a range of query blocks,
   a loss on lse, summary gradients); NaN/inf counts. Errors are max |diff|
   over max(1, max |reference|). Tolerances: fp32 1e-4 (IEEE products, fp32
   sums: ~1e-6 expected), bf16 5e-2 (inputs rounded to 8 bits, probabilities
   rounded to bf16 before P@V, as FlashAttention does: ~1e-2 expected).
2. Speed: batch 1, 16 heads, head_dim 64 and 128, bf16, causal and
   bidirectional, n = 16k .. 1M: forward (no grad) and forward+backward
   (``torch.autograd.grad`` of out with a random dout) of ``fma(impl="triton")``
   (block 64, rank 2, mean summaries: the summaries' cost is included) and of
   SDPA restricted to its flash backend. After one warm-up call: the median of
   ``triton.testing.do_bench``, or, for a call slower than 1 s, the median of 3
   synchronised wall-clock calls (do_bench would make at least 8). SDPA is skipped above ``--sdpa-max`` (quadratic: at 1M
   one causal fwd+bwd takes minutes) and when the time budget would be exceeded;
   the table says so. Peak memory: ``max_memory_allocated`` during one call,
   above what was allocated before it (inputs).
   At n = 1M the kernels' output for the last query blocks of the last head is
   also checked against the PyTorch core on that range (int64 offsets).
   The other launch candidates (``OTHER_LAUNCHES``: ``flash2``, ``run4``; see
   ``fmtrain/attention/kernels/function.py``) are checked in part 1 and timed causal beside
   the default where they launch differently (the ``flash2 f+b`` and ``run4 f+b`` columns).
3. One table on stdout, and JSON to ``<--out>/gpu_check-<tag>.json`` (bench/_results.py: ``$OUT``,
   else ``bench/results/``, a temporary folder for ``--dry-run``; the tag is the card and the
   date, ``nvidia-h200-2026-11-28``, or ``dry-run``).
Exit status 1 if a correctness check failed.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _results import add_result_arguments, meta as common_meta, result_stem, write_results
from _harness import time_call, upper_median
from fmtrain.attention import fma
from fmtrain.attention.kernels.function import _launches, launch_config
from fmtrain.attention.hierarchy import extend_keys, hierarchy
from fmtrain.attention.torch_core import BlockAttention
from fmtrain.attention.summaries import MEAN

TOL = {"bfloat16": 5e-2, "float32": 1e-4, "float16": 1e-2}
# Launch configurations timed (and checked) beside the default (fmtrain/attention/kernels/function.py).
OTHER_LAUNCHES = ("flash2", "run4")
SLOW_MS = 1000.0


@contextlib.contextmanager
def launch(name: str | None, summary_grads: str | None = None):
    """The Triton core's launch configuration (``FMTRAIN_TRITON_LAUNCH``) and where the summaries'
    gradients meet the tokens' (``FMTRAIN_SUMMARY_GRADS``) for the calls inside; None: the default."""
    from fmtrain.attention.kernels.function import LAUNCH_ENV, SUMMARY_GRADS_ENV

    old = {e: os.environ.get(e) for e in (LAUNCH_ENV, SUMMARY_GRADS_ENV)}
    for env, value in ((LAUNCH_ENV, name), (SUMMARY_GRADS_ENV, summary_grads)):
        if value:
            os.environ[env] = value
    try:
        yield
    finally:
        for env, value in old.items():
            if value is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = value


def err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def nonfinite(*ts) -> int:
    return int(sum((~torch.isfinite(t)).sum().item() for t in ts))


# --- 1. correctness --------------------------------------------------------------------
def packed_lengths(n: int, seed: int, shortest: int = 20, longest: int = 2000) -> list[int]:
    """Document lengths that fill ``n`` tokens (the last one cut): a packed row of short texts."""
    import random

    rnd, out = random.Random(seed), []
    while sum(out) < n:
        out.append(min(rnd.randint(shortest, longest), n - sum(out)))
    return out


def check_fma(dev, dtype, n, H, Hkv, d, m, causal, variant, seed=0, docs=False, config=None) -> dict:
    """fma(impl="triton") in dtype vs fma(impl="torch") in float64 on the same device; ``docs``:
    packed documents (``cu_seqlens``), documents of 1 to n/3 tokens; ``config``: the kernels' launch
    configuration (default: the one in use)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    dout = torch.randn(1, H, n, d, generator=g, dtype=torch.float64)
    kw = dict(block_size=m, rank=2, causal=causal, variant=variant)
    if docs:
        kw["cu_seqlens"] = torch.tensor([0] + packed_lengths(n, seed, 1, n // 3)).cumsum(0)

    def run(dt, impl):
        xs = [t.to(dev, dt).requires_grad_() for t in (q, k, v)]
        out = fma(*xs, impl=impl, **kw)
        return (out, *torch.autograd.grad(out, xs, dout.to(dev, dt)))

    with launch(config):
        got = run(dtype, "triton")
    ref = run(torch.float64, "torch")
    errs = {name: err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}
    return dict(case=f"fma n={n} H={H}/{Hkv} d={d} m={m} {'causal' if causal else 'bidir'} {variant}"
                     + (f" {len(kw['cu_seqlens']) - 1} documents" if docs else "") + (f" [{config}]" if config else ""),
                dtype=str(dtype).split(".")[-1], errors=errs, nonfinite=nonfinite(*got))


def check_core(dev, dtype, causal, n=3000, m=64, d=64, H=4, Hkv=2, a0=17, nq=9, seed=0) -> dict:
    """The core contract: blocks [a0, a0+nq), loss on out and lse, gradients of the summaries."""
    from fmtrain.attention.kernels.function import TritonBlockAttention

    h = hierarchy(n, m, 2, causal)
    Fb = len(h.fine_blocks())
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, H, nq * m, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, Hkv, (nq + Fb - 1) * m, d, generator=g, dtype=torch.float64) for _ in range(2))
    ks, vs = (torch.randn(1, Hkv, h.num_summaries, d, generator=g, dtype=torch.float64) for _ in range(2))
    go = torch.randn(1, H, nq * m, d, generator=g, dtype=torch.float64)
    gl = torch.randn(1, H, nq * m, generator=g, dtype=torch.float64)

    def run(core, dt):
        xs = [t.to(dev, dt).requires_grad_() for t in (q, k, v, ks, vs)]
        out, lse = core.apply(*xs, h, True, 1 / math.sqrt(d), a0)
        loss = (out.double() * go.to(dev)).sum() + (lse.double() * gl.to(dev)).sum()
        return (out, lse, *torch.autograd.grad(loss, xs))

    got, ref = run(TritonBlockAttention, dtype), run(BlockAttention, torch.float64)
    names = ("out", "lse", "dq", "dk_ext", "dv_ext", "dks", "dvs")
    return dict(case=f"core n={n} a0={a0} nq={nq} H={H}/{Hkv} d={d} {'causal' if causal else 'bidir'} +dlse",
                dtype=str(dtype).split(".")[-1], errors={k_: err(a, b) for k_, a, b in zip(names, got, ref)},
                nonfinite=nonfinite(*got))


def correctness(dev, dry: bool) -> list[dict]:
    # Every (dtype, d, m, causal, coarse or not) compiles the kernels anew: bf16 takes a few seconds,
    # fp32 (IEEE products on CUDA cores) 10-140 s on a slow CPU (d = 128 the most), so fp32 gets
    # one shape and one variant here.
    if dry:  # the plumbing: every kind of check once or twice (tests/attention/ checks the kernels themselves)
        shapes = {torch.float32: [(150, 2, 1, 16, 16)], torch.bfloat16: [(150, 2, 1, 16, 16)]}
        variants = {torch.float32: ("nlogn", "linear"), torch.bfloat16: ("nlogn",)}
    else:
        shapes = {torch.bfloat16: [(1000, 4, 2, 64, 64), (4133, 2, 2, 128, 64), (777, 3, 1, 32, 32)],
                  torch.float32: [(1000, 4, 2, 64, 64)]}
        variants = {torch.bfloat16: ("nlogn", "linear"), torch.float32: ("nlogn",)}
    rows = []
    for dtype in shapes:
        # a dry run: each dtype under one mask, causal for fp32, bidirectional for bf16
        masks = ((True, False) if not dry else (dtype == torch.float32,))
        for n, H, Hkv, d, m in shapes[dtype]:
            for causal in masks:
                for variant in variants[dtype]:
                    rows.append(check_fma(dev, dtype, n, H, Hkv, d, m, causal, variant))
        for causal in masks:
            rows.append(check_core(dev, dtype, causal, **(dict(n=300, m=16, d=16, a0=5, nq=4) if dry else {})))
            n, H, Hkv, d, m = shapes[dtype][0]  # packed documents: one launch per kernel over all of them
            rows.append(check_fma(dev, dtype, n, H, Hkv, d, m, causal, "nlogn", docs=True))
            # The other launch configurations, on the shapes where they launch differently.
            for n, H, Hkv, d, m in shapes[dtype]:
                for config in OTHER_LAUNCHES:
                    if _launches(m, d, config=config) != _launches(m, d):
                        rows.append(check_fma(dev, dtype, n, H, Hkv, d, m, causal, "nlogn", config=config))
    for r in rows:
        r["ok"] = r["nonfinite"] == 0 and max(r["errors"].values()) < TOL[r["dtype"]]
        worst = max(r["errors"], key=r["errors"].get)
        print(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['dtype']:8s} {r['case']:60s} "
              f"max err {r['errors'][worst]:.1e} ({worst}), non-finite {r['nonfinite']}", flush=True)
    return rows


# --- 2. speed and memory ------------------------------------------------------------------
class Timer:
    """Median time of fn (ms) and its peak memory above what was allocated before it."""

    def __init__(self, dev, repeats: int = 3):
        self.dev, self.cuda, self.repeats = dev, dev.type == "cuda", repeats

    def once_ms(self, fn) -> float:
        return 1e3 * time_call(fn, self.dev)[0]

    def measure(self, fn) -> tuple[float, float, str]:
        self.once_ms(fn)  # warm-up: Triton compiles, allocators settle
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        first = self.once_ms(fn)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else None
        if first > SLOW_MS or not self.cuda:
            return upper_median([first] + [self.once_ms(fn) for _ in range(self.repeats - 1)]), peak, \
                f"median of {self.repeats} (wall clock, synchronised)"
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median"), peak, "do_bench median"


def sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def check_range_at_scale(q, k, v, out_full, causal, m=64) -> float:
    """Last query blocks of the last head by the PyTorch core vs the kernel's full-sequence output."""
    n, d = q.shape[2], q.shape[3]
    h = hierarchy(n, m, 2, causal)
    with torch.no_grad():
        ks, vs = MEAN(k[:, -1:], v[:, -1:], h)
        a0, nq, Fb = h.n_blocks - 2, 2, len(h.fine_blocks())
        qp = F.pad(q[:, -1:], (0, 0, 0, h.padded_len - n))[:, :, a0 * m:(a0 + nq) * m]
        ke, ve = (extend_keys(t[:, -1:], h)[:, :, a0 * m:(a0 + nq + Fb - 1) * m] for t in (k, v))
        ref, _ = BlockAttention.apply(qp, ke, ve, ks, vs, h, True, 1 / math.sqrt(d), a0)
        rows = n - a0 * m
        return err(out_full[:, -1:, a0 * m:], ref[:, :, :rows].float())


def bench(dev, args, deadline: float, save_partial=None) -> tuple[list[dict], list[str]]:
    timer = Timer(dev, repeats=1 if args.dry_run else 3)  # the dry run checks the plumbing, not the times
    dt = torch.bfloat16
    rows, notes = [], []
    est = {}  # (impl, mode, d, causal) -> (n, ms) of the last measurement, to predict the next one
    for d in args.head_dims:
        for causal in (True, False):
            for n in args.n:
                g = torch.Generator(device="cpu").manual_seed(n)
                q, k, v = (torch.randn(1, args.heads, n, d, generator=g).to(dev, dt) for _ in range(3))
                dout = torch.randn(1, args.heads, n, d, generator=g).to(dev, dt)
                # fma-docs: the same call on a row packed with documents of 20-2000 tokens (cu_seqlens)
                cu = torch.tensor([0] + packed_lengths(n, n)).cumsum(0)
                for impl in ("fma", *(f"fma-{c}" for c in OTHER_LAUNCHES), "fma-docs", "sdpa"):
                    config = impl[4:] if impl[4:] in OTHER_LAUNCHES else None  # fma under another launch
                    for mode in ("fwd", "fwdbwd"):
                        row = dict(impl=impl, mode=mode, n=n, head_dim=d, causal=causal, heads=args.heads,
                                   dtype="bfloat16")
                        prev = est.get((impl, mode, d, causal))
                        # Predicted time of one call: quadratic for SDPA, ~linear for fma.
                        guess = prev[1] * (n / prev[0]) ** (2 if impl == "sdpa" else 1) if prev else 0.0
                        calls = 4 if guess > SLOW_MS else 10  # warm-up + 3, or warm-up + do_bench
                        if impl == "sdpa" and n > args.sdpa_max:
                            row["skipped"] = f"n > --sdpa-max {args.sdpa_max} (quadratic: ~{guess / 1e3:.0f} s a call)"
                        elif config and _launches(64, d, config=config) == _launches(64, d) and not args.dry_run:
                            row["skipped"] = f"launches as fma at d={d} (block 64)"  # (the dry run: the plumbing)
                        elif config and not causal:
                            row["skipped"] = "other launches timed causal only (the floors' mask)"
                        elif args.dry_run and impl.startswith("fma-") and n != args.n[0]:
                            row["skipped"] = "dry run: timed at the first n only (the plumbing)"
                        elif impl == "fma-docs" and (n > args.docs_max or d != args.head_dims[0]):
                            row["skipped"] = f"documents timed at n <= --docs-max {args.docs_max}, d={args.head_dims[0]}"
                        elif time.time() + calls * guess / 1e3 > deadline or time.time() > deadline:
                            # (the second test: a first call of a kind has no guess, and compiling
                            # its kernels alone takes 10-30 s)
                            row["skipped"] = f"time budget (~{calls * guess / 1e3:.0f} s predicted)"
                        if "skipped" in row:
                            rows.append(row)
                            print(f"  {impl:8s} {mode:6s} n={n:8d} d={d:3d} causal={int(causal)} skipped: "
                                  f"{row['skipped']}", flush=True)
                            continue
                        xs = [t.detach().requires_grad_(mode == "fwdbwd") for t in (q, k, v)]
                        attn = (lambda a, b, c: fma(a, b, c, causal=causal, impl=args.impl)) \
                            if impl == "fma" or config else (lambda a, b, c: fma(a, b, c, causal=causal, impl=args.impl, cu_seqlens=cu)) \
                            if impl == "fma-docs" else (lambda a, b, c: sdpa_flash(a, b, c, causal))
                        if mode == "fwd":
                            def fn():
                                with torch.no_grad():
                                    return attn(*xs)
                        else:
                            def fn():
                                return torch.autograd.grad(attn(*xs), xs, dout)
                        try:
                            with launch(config):
                                ms, peak, how = timer.measure(fn)
                            if impl.startswith("fma"):
                                row["launch"] = config or launch_config()
                            row.update(ms=ms, peak_mib=peak, timing=how)
                            est[(impl, mode, d, causal)] = (n, ms)
                            if impl == "fma" and mode == "fwd":
                                with torch.no_grad():
                                    o = attn(*xs)
                                row["nonfinite"] = nonfinite(o)
                                if n == max(args.n):
                                    row["range_check_err"] = check_range_at_scale(q, k, v, o, causal)
                                del o
                        except torch.cuda.OutOfMemoryError:
                            row["skipped"] = "out of memory"
                        except Exception as e:  # keep the sweep going; the table shows the failure
                            row["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        del xs
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(row)
                        if save_partial:  # a run cut off by its time limit keeps what it measured
                            save_partial(rows)
                        peak = f"{row['peak_mib']:9.0f} MiB" if row.get("peak_mib") is not None else "n/a (CPU)"
                        extra = f"  range check err {row['range_check_err']:.1e}" if "range_check_err" in row else ""
                        print(f"  {impl:8s} {mode:6s} n={n:8d} d={d:3d} causal={int(causal)} "
                              + (f"{row['ms']:10.2f} ms  peak {peak}{extra}" if "ms" in row
                                 else f"skipped: {row['skipped']}"), flush=True)
                del q, k, v, dout
    return rows, notes


def table(rows: list[dict]) -> str:
    key = {(r["impl"], r["mode"], r["n"], r["head_dim"], r["causal"]): r for r in rows}
    other = [f"fma-{c}" for c in OTHER_LAUNCHES]
    lines = [f"{'d':>4} {'causal':>6} {'n':>8} | {'fma fwd':>9} {'sdpa fwd':>9} {'x':>6} | "
             f"{'fma f+b':>9} {'sdpa f+b':>9} {'x':>6} | {'fma MiB':>8} {'sdpa MiB':>9} | {'docs f+b':>9} "
             f"{'/fma':>5} | " + " | ".join(f"{c + ' f+b':>12} {'/fma':>5}" for c in OTHER_LAUNCHES)
             + f"  (ms; bf16; peak of f+b; docs: packed documents of 20-2000 tokens; fma: the "
             f"{launch_config()} launch)"]
    seen = sorted({(r["head_dim"], r["causal"], r["n"]) for r in rows}, key=lambda t: (t[0], not t[1], t[2]))

    def cell(r, f="ms"):
        if r is None or r.get(f) is None:
            return "skip" if r is not None and "skipped" in r else "-"
        return f"{r[f]:.2f}" if f == "ms" else f"{r[f]:.0f}"

    def ratio(a, b):
        return f"{b['ms'] / a['ms']:.2f}" if a and b and "ms" in a and "ms" in b else "-"

    for d, causal, n in seen:
        g = {(i, m_): key.get((i, m_, n, d, causal)) for i in ("fma", "fma-docs", "sdpa", *other)
             for m_ in ("fwd", "fwdbwd")}
        fb = g[("fma", "fwdbwd")]
        sp = []
        for m_ in ("fwd", "fwdbwd"):
            a, b = g[("fma", m_)], g[("sdpa", m_)]
            sp.append(f"{b['ms'] / a['ms']:.1f}" if a and b and "ms" in a and "ms" in b else "-")
        lines.append(f"{d:>4} {int(causal):>6} {n:>8} | {cell(g[('fma', 'fwd')]):>9} {cell(g[('sdpa', 'fwd')]):>9} "
                     f"{sp[0]:>6} | {cell(fb):>9} {cell(g[('sdpa', 'fwdbwd')]):>9} {sp[1]:>6} | "
                     f"{cell(fb, 'peak_mib'):>8} {cell(g[('sdpa', 'fwdbwd')], 'peak_mib'):>9} | "
                     f"{cell(g[('fma-docs', 'fwdbwd')]):>9} {ratio(fb, g[('fma-docs', 'fwdbwd')]):>5} | "
                     + " | ".join(f"{cell(g[(o, 'fwdbwd')]):>12} {ratio(fb, g[(o, 'fwdbwd')]):>5}" for o in other))
    return "\n".join(lines)


def floors(rows: list[dict]) -> list[str]:
    """The issue's floors (H100, bf16, causal, head_dim 128)."""
    key = {(r["impl"], r["mode"], r["n"], r["head_dim"], r["causal"]): r for r in rows}
    out = []
    a, b = key.get(("fma", "fwdbwd", 131072, 128, True)), key.get(("sdpa", "fwdbwd", 131072, 128, True))
    if a and b and "ms" in a and "ms" in b:
        x = b["ms"] / a["ms"]
        out.append(f"{'ok  ' if x >= 8 else 'MISS'} n=131072 causal d=128 fwd+bwd: {x:.1f}x SDPA flash (floor 8x)")
    else:
        out.append("n/a  n=131072 causal d=128 fwd+bwd: not measured")
    r = key.get(("fma", "fwdbwd", 1 << 20, 128, True))
    out.append(f"{'ok  ' if r and 'ms' in r else 'MISS'} n=1M causal d=128 fwd+bwd runs: "
               + (f"{r['ms']:.0f} ms, peak {r['peak_mib']:.0f} MiB" if r and "ms" in r else
                  (r or {}).get("skipped", "not measured")))
    return out


def save(stem: Path, meta: dict, result: dict) -> Path:
    """Write (or overwrite) the JSON: after the correctness part, then with everything."""
    return write_results(stem, dict(meta=meta, **result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny sizes")
    ap.add_argument("--n", type=int, nargs="+", default=[1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 20])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--sdpa-max", type=int, default=1 << 18, help="longest n timed for SDPA")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole script; SDPA skipped beyond")
    ap.add_argument("--docs-max", type=int, default=1 << 17, help="longest n timed with packed documents")
    ap.add_argument("--impl", default="triton")
    ap.add_argument("--skip-check", action="store_true")
    add_result_arguments(ap)
    args = ap.parse_args()
    t0 = time.time()
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            sys.exit("--dry-run needs TRITON_INTERPRET=1 set before Python starts (bench/gpu_check.sh does it)")
        dev = torch.device("cpu")
        args.n, args.head_dims, args.heads, args.sdpa_max, args.docs_max = [256], [16], 2, 256, 256
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --dry-run to check the plumbing on CPU")
        dev = torch.device("cuda")
    import triton

    stem = result_stem("gpu_check", args, dev)  # chosen once: later saves overwrite the same file
    meta = common_meta(args, device=torch.cuda.get_device_name() if dev.type == "cuda"
                       else "cpu (TRITON_INTERPRET=1 dry run)", triton=triton.__version__,
                       dry_run=args.dry_run, tolerances=TOL, block_size=64, rank=2, summaries="mean")
    print(f"gpu_check: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}", flush=True)

    checks = []
    if not args.skip_check:
        print("1. correctness (Triton vs PyTorch path in float64, same device)", flush=True)
        checks = correctness(dev, args.dry_run)
        print(f"   ({time.time() - t0:.0f} s so far)", flush=True)
        save(stem, meta, dict(checks=checks, partial="correctness only: the timing did not finish"))
    print(f"2. time and memory (budget {args.budget:.0f} s in all)", flush=True)
    rows, _ = bench(dev, args, t0 + args.budget, lambda rows: save(
        stem, meta, dict(checks=checks, bench=rows, table=table(rows), partial="cut off during the timing")))
    print("\n" + table(rows))
    fl = floors(rows) if not args.dry_run else []
    for line in fl:
        print("floor: " + line)
    bad = [c["case"] + " " + c["dtype"] for c in checks if not c["ok"]]
    bad += [f"nonfinite fma n={r['n']} d={r['head_dim']} causal={r['causal']}" for r in rows if r.get("nonfinite")]
    bad += [f"range check n={r['n']} d={r['head_dim']} causal={r['causal']}: {r['range_check_err']:.1e}"
            for r in rows if r.get("range_check_err", 0) > TOL["bfloat16"]]
    path = save(stem, meta, dict(checks=checks, bench=rows, table=table(rows), floors=fl, failures=bad,
                                 seconds=time.time() - t0))
    print(f"\nwrote {path}; {time.time() - t0:.0f} s; " + (f"FAILURES: {bad}" if bad else "all checks passed"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
