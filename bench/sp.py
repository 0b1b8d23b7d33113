"""Sequence-parallel multipole attention: bytes each rank moves per layer, and time
per layer against DeepSpeed-Ulysses, on CPU gloo ranks.

Bytes: one layer's forward and backward run for real on ``P`` gloo processes;
the collectives in ``fmtrain/attention/sequence_parallel.py`` count what they send and
receive (ring all-gather / reduce-scatter volumes: ``P-1`` pieces each way). The
counts do not depend on the machine. Next to them, per rank and layer, forward +
backward, sent + received, for the same shapes and dtype:
  ring attention: K and V go around the ring (P-1 hops) in the forward; K, V and
    dK, dV in the backward: 2 * (P-1) * (2 + 4) * C * Hkv * d numbers;
  DeepSpeed-Ulysses: all-to-alls of q, k, v, out (forward) and of dout, dq, dk, dv
    (backward), each moving (P-1)/P of the local tensor: 2 * 2 * (P-1)/P * C * (2H + 2Hkv) * d.
Time: DeepSpeed-Ulysses' own ``DistributedAttention`` (SDPA inside, all heads
scattered over the ranks) against ``fma(..., group=...)``, forward + backward of
one layer at P = 4, largest-n both run in the time limit.

    python bench/sp.py            # table + bench/results/sp-cpu.json
    python bench/sp.py --quick    # small n only (a smoke test): sp-quick.json
    python bench/sp.py --docs     # the bytes with packed documents (document masking): sp-docs-cpu.json

Writes ``<--out>/sp-<tag>.json`` (bench/_results.py: ``$OUT``, else ``bench/results/``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _results import add_result_arguments, meta, result_stem, write_results

M, RANK_P, D, ELEM = 64, 2, 16, 4  # block size, summaries per window, head_dim, fp32 bytes


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed  # Ulysses' layer talks through deepspeed.comm, which must be initialised too

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


PACKINGS = ("none", "shifted", "mixed")


def packing_lengths(n: int, packing: str) -> list[int] | None:
    """Document lengths of one row of ``n`` tokens (None: no document masking).
    ``shifted``: a 37-token document, then one over the rest, so that every block and window of
    the long one is misaligned with the ranks' slices (the most windows cross rank boundaries);
    ``mixed``: lengths drawn log-uniformly from 64 to n/4 (seeded by n), as packed corpora mix them."""
    if packing == "none":
        return None
    if packing == "shifted":
        return [37, n - 37]
    rng, out = random.Random(n), []
    while sum(out) < n:
        out.append(min(int(math.exp(rng.uniform(math.log(64), math.log(n / 4)))), n - sum(out)))
    return out


def _bytes_worker(rank, world, port, ns, causal, packing, out_file):
    from fmtrain.attention import fma
    from fmtrain.attention.summaries import M2MSummaries
    from fmtrain.attention.sequence_parallel import TRAFFIC, reset_traffic

    _init(rank, world, port)
    try:
        results = []
        for n in ns:
            C = n // world
            g = torch.Generator().manual_seed(rank)
            q, k, v = (torch.randn(1, 1, C, D, generator=g).requires_grad_() for _ in range(3))
            summ = M2MSummaries(1, M, RANK_P)
            lengths = packing_lengths(n, packing)
            cu = None if lengths is None else torch.tensor([0] + lengths).cumsum(0)
            reset_traffic()
            out = fma(q, k, v, block_size=M, rank=RANK_P, causal=causal, summaries=summ, group=dist.group.WORLD,
                      cu_seqlens=cu)
            fwd = dict(TRAFFIC)
            out.backward(torch.randn(out.shape, generator=g))
            res = {"fwd_sent": fwd["fwd_sent"], "fwd_recv": fwd["fwd_recv"],
                   "bwd_sent": TRAFFIC["bwd_sent"], "bwd_recv": TRAFFIC["bwd_recv"]}
            allres = [None] * world
            dist.all_gather_object(allres, res)
            results.append(allres)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _time_worker(rank, world, port, n, which, iters, out_file):
    import torch.nn.functional as F

    from fmtrain.attention import fma
    from fmtrain.attention.summaries import M2MSummaries

    _init(rank, world, port)
    try:
        H, C = 4, n // world
        g = torch.Generator().manual_seed(rank)
        if which == "ulysses":
            from deepspeed.sequence.layer import DistributedAttention

            def local(q, k, v, *args, **kw):  # [s, b, h/P, d] -> SDPA on (b, h, s, d)
                o = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True)
                return o.permute(2, 0, 1, 3)

            attn = DistributedAttention(local, dist.group.WORLD, scatter_idx=2, gather_idx=0)
            shape = (C, 1, H, D)

            def step(q, k, v):
                return attn(q, k, v, 1)
        else:
            summ = M2MSummaries(H, M, RANK_P)
            shape = (1, H, C, D)

            def step(q, k, v):
                return fma(q, k, v, block_size=M, rank=RANK_P, causal=True, summaries=summ,
                           group=dist.group.WORLD)
        q, k, v = (torch.randn(shape, generator=g).requires_grad_() for _ in range(3))
        times = []
        for i in range(iters + 1):  # the first is a warm-up
            dist.barrier()
            t0 = time.perf_counter()
            out = step(q, k, v)
            out.backward(torch.ones_like(out))
            dist.barrier()
            times.append(time.perf_counter() - t0)
        allres = [None] * world
        dist.all_gather_object(allres, min(times[1:]))
        if rank == 0:
            Path(out_file).write_text(json.dumps(max(allres)))
    finally:
        dist.destroy_process_group()


def _spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(fn, args=(world, _port(), *args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def closed_forms(n: int, P: int, H: int = 1, Hkv: int = 1, d: int = D, elem: int = ELEM) -> dict:
    C = n // P
    ring = 2 * (P - 1) * (2 + 4) * C * Hkv * d * elem
    ulysses = 2 * 2 * (P - 1) / P * C * (2 * H + 2 * Hkv) * d * elem
    return {"ring": ring, "ulysses": ulysses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    add_result_arguments(ap)
    ap.add_argument("--time-n", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--time-limit", type=float, default=150.0, help="stop growing n past this many seconds")
    ap.add_argument("--docs", action="store_true",
                    help="the bytes with document masking (packings: " + ", ".join(PACKINGS) + "), no timing; "
                         "writes sp-docs-<tag>.json")
    args = ap.parse_args(argv)
    ns = [8192, 16384] if args.quick else [65536, 262144, 1048576]
    packings = PACKINGS if args.docs else ("none",)
    rows = []
    print(f"bytes per rank per layer (fwd+bwd, sent+received), fp32, 1 kv head, head_dim {D}, "
          f"m={M}, p={RANK_P}, m2m summaries, variant nlogn"
          + ("; packed documents: " + packing_lengths.__doc__.split(".", 1)[1].strip().replace("\n    ", " ")
             if args.docs else ""))
    print(f"{'mask':>6} {'docs':>7} {'P':>2} {'n':>8} | {'fma-SP fwd':>11} {'fma-SP bwd':>11} {'fma-SP':>11} | "
          f"{'ring':>14} {'ulysses':>13} | {'SP/ring':>9}")
    for packing in packings:
        for causal in (True, False):
            for P in (2, 4, 8):
                for n, per_rank in zip(ns, _spawn(_bytes_worker, P, ns, causal, packing)):
                    worst = max(per_rank, key=lambda r: sum(r.values()))
                    fwd = worst["fwd_sent"] + worst["fwd_recv"]
                    bwd = worst["bwd_sent"] + worst["bwd_recv"]
                    cf = closed_forms(n, P)
                    row = dict(causal=causal, P=P, n=n, packing=packing, fwd=fwd, bwd=bwd, total=fwd + bwd,
                               per_rank=per_rank, **cf)
                    rows.append(row)
                    print(f"{'causal' if causal else 'bidir':>6} {packing:>7} {P:>2} {n:>8} | {fwd:>11,} {bwd:>11,} "
                          f"{fwd + bwd:>11,} | {cf['ring']:>14,.0f} {cf['ulysses']:>13,.0f} | "
                          f"{(fwd + bwd) / cf['ring']:>9.2e}")
                    sys.stdout.flush()
    floors = {}
    for packing in packings:
        tag = "" if packing == "none" else f"{packing}_"
        for causal in (True, False):
            for P in (2, 4, 8):
                r = [x for x in rows if x["causal"] == causal and x["P"] == P and x["packing"] == packing]
                floors[f"growth_{tag}{'causal' if causal else 'bidir'}_P{P}"] = r[-1]["total"] / r[0]["total"] - 1
        big = [x for x in rows if x["P"] == 8 and x["n"] == ns[-1] and x["packing"] == packing]
        floors[f"max_ratio_to_ring_at_largest_n_{tag}P8"] = max(x["total"] / x["ring"] for x in big)
    print("growth from n=%d to n=%d at fixed P: " % (ns[0], ns[-1])
          + ", ".join(f"{k[7:]} {v:+.1%}" for k, v in floors.items() if k.startswith("growth")))
    for packing in packings:
        tag = "" if packing == "none" else f"{packing}_"
        print(f"at n={ns[-1]}, P=8, documents {packing}: {floors[f'max_ratio_to_ring_at_largest_n_{tag}P8']:.2e} "
              "of ring attention's bytes")
    if args.docs:
        settings = {"block_size": M, "rank": RANK_P, "head_dim": D, "dtype": "float32", "kv_heads": 1,
                    "summary": "m2m", "variant": "nlogn", "packings": packing_lengths.__doc__}
        stem = result_stem("sp-docs", args, "cpu")
        result = {"meta": meta(args, device="cpu"), "settings": settings, "bytes": rows, "floors": floors}
        print(f"wrote {write_results(stem, result)}")
        return 0

    timing = []
    print(f"\ntime per layer, forward + backward, P=4 gloo ranks on {os.cpu_count()} CPU cores, "
          f"fp32, 4 heads, head_dim {D}, causal (min over 2 runs, max over ranks)")
    tns = [4096, 8192] if args.quick else args.time_n
    for n in tns:
        entry = {"n": n}
        for which in ("ulysses", "fma_sp"):
            t0 = time.perf_counter()
            entry[which] = _spawn(_time_worker, 4, n, which, 2)
            entry[which + "_wall"] = time.perf_counter() - t0
        timing.append(entry)
        print(f"n={n:>7}: DeepSpeed-Ulysses (SDPA) {entry['ulysses'] * 1e3:9.1f} ms | "
              f"fma-SP {entry['fma_sp'] * 1e3:9.1f} ms | {entry['ulysses'] / entry['fma_sp']:.1f}x")
        sys.stdout.flush()
        if entry["ulysses_wall"] > args.time_limit:
            break
    settings = {"block_size": M, "rank": RANK_P, "head_dim": D, "dtype": "float32", "kv_heads": 1,
                "summary": "m2m", "variant": "nlogn"}
    stem = result_stem("sp", args, "cpu")
    result = {"meta": meta(args, device="cpu"), "settings": settings,
              "bytes": rows, "floors": floors, "timing_P4": timing}
    print(f"wrote {write_results(stem, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
