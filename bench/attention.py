"""Multipole attention against SDPA: forward and forward+backward time, peak memory.

    python bench/attention.py              # full sweep (CPU: about 15 minutes on 2 cores)
    python bench/attention.py --quick      # n <= 4k, a minute
    python bench/attention.py --device cuda

Each case runs in fresh subprocesses so that its peak memory is its own: on CPU
the peak resident set size above what the process held once the inputs were
allocated (measured in a second run, see ``spawn``), on CUDA ``max_memory_allocated``
above the inputs. Times are medians
of up to 21 runs after a warm-up, within ``--budget`` seconds per case (single runs
where one run takes minutes); the JSON keeps their quartiles too.
Prints a table and writes JSON to ``<--out>/attention-<tag>.json`` (bench/_results.py: ``$OUT``,
else ``bench/results/``; the tag ``cpu``, ``quick``, or the CUDA card and the date).
"""
from __future__ import annotations

import argparse
import math
import os
import resource

from _results import add_result_arguments, meta, result_stem, write_results
from _harness import PEAK_ENV, report_case, spawn_case, time_calls

MAX_RUNS = 21  # timed runs per case at most (after one warm-up), within --budget seconds


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(impl: str, n: int, causal: bool, mode: str, device: str, dtype: str, heads: int,
             head_dim: int, budget_s: float, block_size: int = 64, rank: int = 2, refine: int = 0,
             reach: str = "", reach_distance: int = 0) -> dict:
    """Time one case in this process; returns a result row. ``reach``: "" (real distances),
    "select" (refinement's selection clamped at ``reach_distance``: fma's ``select_reach``) or
    "attend" (its far field's attention too)."""
    import torch
    import torch.nn.functional as F

    from fmtrain.attention import fma
    from fmtrain.attention.refine import SelectionReach
    from fmtrain.attention.rope import inverse_frequencies

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    grad = mode == "fwdbwd"
    q, k, v = (torch.randn(1, heads, n, head_dim, device=device, dtype=dt, requires_grad=grad) for _ in range(3))
    sr = SelectionReach(reach_distance, inverse_frequencies(head_dim, device=device), reach == "attend") \
        if reach else None

    def step():
        if impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            o = fma(q, k, v, causal=causal, impl="auto", block_size=block_size, rank=rank, refine=refine,
                    select_reach=sr)
        if grad:
            o.backward(torch.ones_like(o))
            q.grad = k.grad = v.grad = None
        return o

    # Warm up the libraries (thread pools, kernels) at a tiny size before the baseline.
    with torch.set_grad_enabled(grad):
        small = [t[:, :, :256].detach().requires_grad_(grad) for t in (q, k, v)]
        o = (fma(*small, causal=causal, block_size=block_size, rank=rank, refine=refine, select_reach=sr)
             if impl == "fma"
             else F.scaled_dot_product_attention(*small, is_causal=causal))
        if grad:
            o.sum().backward()
    del small, o
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    # The first run is the warm-up unless it alone takes most of the budget. Fast cases repeat
    # up to MAX_RUNS: a shared machine's timings spread by tens of percent.
    with torch.set_grad_enabled(grad):
        timed = sorted(time_calls(step, runs=MAX_RUNS, budget_s=budget_s, device=device))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    elem = torch.finfo(dt).bits // 8
    return dict(impl=impl, n=n, causal=causal, mode=mode, device=device, dtype=dtype, heads=heads,
                head_dim=head_dim, block_size=block_size, rank=rank if impl == "fma" else None,
                refine=refine if impl == "fma" else None, reach=reach or None,
                reach_distance=reach_distance if reach else None,
                ms=1e3 * timed[len(timed) // 2], runs=len(timed),
                ms_quartiles=[1e3 * timed[len(timed) // 4], 1e3 * timed[(3 * len(timed)) // 4]],
                peak_extra_mib=max(0, peak) / 2**20,
                io_mib=(3 if not grad else 7) * n * heads * head_dim * elem / 2**20)


def _run(args, impl, n, causal, mode, budget, env, variant) -> dict | None:
    rank, refine, reach = variant
    return spawn_case(__file__, ["--case", f"{impl},{n},{int(causal)},{mode},{rank},{refine},{reach},{args.reach}",
                                 "--device", args.device,
                                 "--dtype", args.dtype, "--heads", args.heads, "--head-dim", args.head_dim,
                                 "--budget", budget, "--block-size", args.block_size],
                      label=f"{impl} n={n} {mode}", env=env)


def spawn(args, impl, n, causal, mode, variant) -> dict | None:
    """Time in one process, measure peak memory in another (CPU, under ``PEAK_ENV``: see bench/_harness.py)."""
    row = _run(args, impl, n, causal, mode, args.budget, dict(os.environ), variant)
    if row is None or args.device == "cuda":
        return row
    mem = _run(args, impl, n, causal, mode, 0.0, dict(os.environ, **PEAK_ENV), variant)
    if mem:
        row["peak_extra_mib"] = mem["peak_extra_mib"]
    return row


def sweep(args) -> list[dict]:
    if args.quick:
        both, alone = [1024, 4096], []
    else:
        both, alone = [1024, 4096, 16384, 65536], [131072, 262144]
    if args.n:
        both, alone = [n for n in args.n if n <= args.sdpa_max], [n for n in args.n if n > args.sdpa_max]
    rows = []
    for causal in (True, False) if not args.causal_only else (True,):
        for n in both + alone:
            # fma once per --rank, --refine and reach (interleaved, so drift hits every one alike), sdpa once
            reaches = ("", "select", "attend") if args.reach else ("",)
            cases = [("fma", (r, K, x)) for r in args.rank for K in args.refine for x in reaches if K or not x] + \
                ([("sdpa", (args.rank[0], 0, ""))] if n in both else [])
            for impl, variant in cases:
                for mode in ("fwd", "fwdbwd"):
                    row = spawn(args, impl, n, causal, mode, variant)
                    if row:
                        rows.append(row)
                        print(f"  {impl:5s} n={n:7d} causal={int(causal)} {mode:6s} rank {variant[0]} "
                              f"refine {variant[1]} {variant[2] or '-':6s} {row['ms']:10.1f} ms"
                              f"  peak+{row['peak_extra_mib']:8.1f} MiB", flush=True)
    return rows


def _variant(r: dict):
    """(rank, refine, reach) of an fma row (rows from before refinement have no refine: 0, before
    reaches no reach: ""); None for sdpa."""
    return (r["rank"], r.get("refine") or 0, r.get("reach") or "") if r["impl"] == "fma" else None


def table(rows: list[dict]) -> str:
    """One line per (n, mask, fma rank and refine); sdpa's columns repeat on each line. A ``rank``
    (``refine``) column only when several ranks (refines) ran."""
    key = {(r["impl"], r["n"], r["causal"], r["mode"], _variant(r)): r for r in rows}
    variants = sorted({_variant(r) for r in rows if r["impl"] == "fma"})
    many = len({v[0] for v in variants}) > 1
    refines = len({v[1] for v in variants}) > 1
    reaches = len({v[2] for v in variants}) > 1
    extra = (" rank" if many else "") + (" refine" if refines else "") + (" reach " if reaches else "")
    lines = [f"{'n':>8} {'causal':>6}{extra} | {'fma fwd':>9} {'sdpa fwd':>9} {'x':>6} |"
             f" {'fma f+b':>9} {'sdpa f+b':>9} {'x':>6} | {'fma peak':>9} {'sdpa peak':>9} {'fma io':>8}",
             f"{'':>8} {'':>6}{' ' * len(extra)} | {'ms':>9} {'ms':>9} {'':>6} | {'ms':>9} {'ms':>9} {'':>6} |"
             f" {'MiB':>9} {'MiB':>9} {'MiB':>8}"]
    def fmt(x, spec="9.1f"):
        return format(x, spec) if x is not None else f"{'-':>{spec.split('.')[0]}}"

    for n, causal in sorted({(r["n"], r["causal"]) for r in rows}, key=lambda t: (not t[1], t[0])):
        for variant in variants:
            def get(impl, mode, field="ms"):
                r = key.get((impl, n, causal, mode, variant if impl == "fma" else None))
                return r[field] if r else None

            def speedup(mode):  # sdpa's time over fma's
                return get("sdpa", mode) / get("fma", mode) if get("sdpa", mode) and get("fma", mode) else None

            fx, bx = speedup("fwd"), speedup("fwdbwd")
            cols = (f" {variant[0]:4d}" if many else "") + (f" {variant[1]:6d}" if refines else "") + \
                (f" {variant[2] or '-':>6s}" if reaches else "")
            lines.append(f"{n:8d} {int(causal):6d}{cols} | {fmt(get('fma', 'fwd'))}"
                         f" {fmt(get('sdpa', 'fwd'))} {fmt(fx, '6.1f')} | {fmt(get('fma', 'fwdbwd'))}"
                         f" {fmt(get('sdpa', 'fwdbwd'))} {fmt(bx, '6.1f')} |"
                         f" {fmt(get('fma', 'fwdbwd', 'peak_extra_mib'))}"
                         f" {fmt(get('sdpa', 'fwdbwd', 'peak_extra_mib'))}"
                         f" {fmt(get('fma', 'fwdbwd', 'io_mib'), '8.1f')}")
    return "\n".join(lines)


def growth(rows: list[dict]) -> list[str]:
    """Time and memory growth of fma forward+backward against n log n, per mask (the first rank and refine)."""
    variant = next((_variant(r) for r in rows if r["impl"] == "fma"), None)
    out = []
    for causal in (True, False):
        pts = sorted((r["n"], r["ms"], r["peak_extra_mib"]) for r in rows
                     if r["impl"] == "fma" and r["mode"] == "fwdbwd" and r["causal"] == causal and r["n"] >= 16384
                     and _variant(r) == variant)
        if len(pts) >= 2:
            (n0, t0, m0), (n1, t1, m1) = pts[0], pts[-1]
            nlogn = (n1 * math.log(n1)) / (n0 * math.log(n0))
            out.append(f"causal={int(causal)}: n {n0} -> {n1}: time x{t1 / t0:.1f}, peak memory x{m1 / max(m0, 1e-9):.1f},"
                       f" n log n x{nlogn:.1f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="n <= 4096 only")
    ap.add_argument("--causal-only", action="store_true")
    ap.add_argument("--n", type=int, nargs="*", help="sequence lengths (default: the standard sweep)")
    ap.add_argument("--sdpa-max", type=int, default=65536, help="largest n that also runs SDPA (with --n)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of repeated runs per case")
    ap.add_argument("--block-size", type=int, default=64, help="fma's fine block (model.block_size)")
    ap.add_argument("--rank", type=int, nargs="+", default=[2],
                    help="fma's summaries per window (model.rank); several are timed side by side")
    ap.add_argument("--refine", type=int, nargs="+", default=[0],
                    help="fma's opened far blocks per query (model.refine); several are timed side by side")
    ap.add_argument("--reach", type=int, default=0, metavar="N",
                    help="refined cases also with refinement's selection clamped at N tokens (model.select_reach) "
                         "and with its far field's attention too (model.attend_reach), side by side")
    add_result_arguments(ap)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        # impl,n,causal,mode,rank,refine[,reach,distance] (bench/threads.py gives the first six)
        impl, n, causal, mode, rank, refine, reach, distance = (args.case + ",,0").split(",")[:8]
        report_case(run_case(impl, int(n), bool(int(causal)), mode, args.device, args.dtype, args.heads,
                             args.head_dim, args.budget, args.block_size, int(rank), int(refine), reach,
                             int(distance)))
        return
    import torch
    print(f"fmtrain attention benchmark: {args.device}, {args.dtype}, batch 1, {args.heads} heads, "
          f"head_dim {args.head_dim}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = sweep(args)
    print()
    print(table(rows))
    for line in growth(rows):
        print(line)
    stem = result_stem("attention", args, args.device)
    info = meta(args, device=args.device, dtype=args.dtype, heads=args.heads, head_dim=args.head_dim, batch=1,
                block_size=args.block_size)
    out = write_results(stem, dict(meta=info, rows=rows, table=table(rows), growth=growth(rows)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
