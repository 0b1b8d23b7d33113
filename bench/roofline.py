"""What multipole attention must compute and move, and the time that allows on a card.

    python bench/roofline.py bench/results/gpu_check-nvidia-h200-2026-11-28.json  # roofline-nvidia-h200-2026-11-28
    python bench/roofline.py --n 131072 1048576 --heads 16 --head-dim 128           # roofline-nvidia-h200

For one case (batch 1, ``heads`` query and key/value heads, bf16 inputs):
- FLOPs: 2 per multiply-add of the scores ``q.k`` and of ``p.v`` over the keys and
  summaries each query really sees (unmasked: causal own block up to the query,
  summary slots inside the sequence). The forward is 2 such products, the backward
  5 (scores recomputed, dV, dP, dQ, dK): forward+backward = 3.5x the forward, the
  FlashAttention convention. ``computed`` counts what the kernels multiply, masked
  entries included (whole fine blocks and every slot of the table).
- Bytes: the compulsory traffic, each tensor read or written once: forward q, k, v,
  the summaries, out and lse; backward q, k, v, summaries, out, dout, lse and the
  gradients dq, dk, dv and of the summaries.
- Bounds: FLOPs at the card's matrix rate and bytes at its copy bandwidth (measured on
  such cards: see ``CARDS``); the achieved fraction is the better bound over the time.

Prints a table and writes ``<--out>/roofline-<tag>.json`` (bench/_results.py: ``$OUT``, else
``bench/results/``). The tag is that of the gpu_check JSON read (``gpu_check-<tag>.json``: the
card and the date), or without one the ``--card``'s name slugged (``nvidia-h200``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from _results import add_result_arguments, meta, result_stem, slug, write_results
from fmtrain.attention.hierarchy import block_tables, hierarchy

# Measured bf16 dense matmul rate (8192^3) and device copy bandwidth (shared/notes/environment.md).
CARDS = {"NVIDIA H200": dict(tflops=790.0, tbps=4.3), "NVIDIA H100 80GB HBM3": dict(tflops=790.0, tbps=3.0)}


def scores_seen(n: int, block_size: int, rank: int, causal: bool) -> tuple[int, int]:
    """(scores a query really needs, scores the kernels compute), summed over all n queries."""
    h = hierarchy(n, block_size, rank, causal)
    m = block_size
    needed = computed = 0
    coarse = (~block_tables(h, True).bias.isinf()).sum(1).tolist()  # unmasked slots per block
    F = len(h.fine_blocks())
    for a in range(h.n_blocks):
        rows = min(m, n - a * m)
        lo, hi = max(0, (a - 1) * m), min(n, (a + 2) * m)  # the neighbourhood's real keys
        if causal:  # block a-1 whole, own block up to the query
            fine = rows * (a * m - lo) + rows * (rows + 1) // 2
        else:
            fine = rows * (hi - lo)
        needed += fine + rows * coarse[a]
        computed += m * (F * m + h.coarse_slots)  # whole tiles: padded rows too
    return needed, computed


def case(n, heads, head_dim, causal, block_size=64, rank=2, elem=2) -> dict:
    h = hierarchy(n, block_size, rank, causal)
    needed, computed = scores_seen(n, block_size, rank, causal)
    fwd = 4 * head_dim * heads * needed  # q.k and p.v: 2 FLOPs per multiply-add each
    tok = n * heads * head_dim * elem  # one (n, heads, head_dim) tensor
    summ = h.num_summaries * heads * head_dim * elem
    lse = n * heads * 4
    bytes_fwd = 3 * tok + 2 * summ + tok + lse
    bytes_bwd = 5 * tok + 2 * summ + lse + 3 * tok + 2 * summ
    return dict(n=n, heads=heads, head_dim=head_dim, causal=causal, block_size=block_size, rank=rank,
                flops_fwd=fwd, flops_fwdbwd=3.5 * fwd, flops_fwd_computed=4 * head_dim * heads * computed,
                bytes_fwd=bytes_fwd, bytes_fwdbwd=bytes_fwd + bytes_bwd)


def bounds(c: dict, mode: str, ms: float | None, card: dict) -> dict:
    flops, nbytes = c[f"flops_{mode}"], c[f"bytes_{mode}"]
    t_flops = flops / (card["tflops"] * 1e12) * 1e3  # ms
    t_bytes = nbytes / (card["tbps"] * 1e12) * 1e3
    out = dict(mode=mode, flops=flops, bytes=nbytes, ms_at_peak_flops=t_flops, ms_at_peak_bandwidth=t_bytes,
               bound="compute" if t_flops >= t_bytes else "memory")
    if ms:
        out.update(ms=ms, tflops=flops / ms / 1e9, fraction_of_bound=max(t_flops, t_bytes) / ms)
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'n':>8} {'mode':>7} | {'GFLOP':>8} {'MB':>8} | {'t_flop ms':>9} {'t_byte ms':>9} | "
             f"{'ms':>7} {'TFLOP/s':>8} {'of bound':>8}"]
    for r in rows:
        ms = f"{r['ms']:7.2f} {r['tflops']:8.1f} {100 * r['fraction_of_bound']:7.1f}%" if "ms" in r else \
            f"{'-':>7} {'-':>8} {'-':>8}"
        lines.append(f"{r['n']:>8} {r['mode']:>7} | {r['flops'] / 1e9:8.1f} {r['bytes'] / 1e6:8.1f} | "
                     f"{r['ms_at_peak_flops']:9.3f} {r['ms_at_peak_bandwidth']:9.3f} | {ms}")
    return "\n".join(lines)


def from_gpu_check(path: Path) -> list[dict]:
    d = json.loads(path.read_text())
    card = CARDS.get(d["meta"]["device"], CARDS["NVIDIA H200"])
    m, p = d["meta"].get("block_size", 64), d["meta"].get("rank", 2)
    rows = []
    for b in d["bench"]:
        if b.get("impl") != "fma" or not b.get("ms"):
            continue
        c = case(b["n"], b["heads"], b["head_dim"], b["causal"], m, p)
        mode = "fwd" if b["mode"] == "fwd" else "fwdbwd"
        rows.append(dict(n=b["n"], **bounds(c, mode, b["ms"], card)))
    return rows


def gpu_check_tag(path: Path) -> str:
    """The tag of ``gpu_check-<tag>.json``; for another name, its card and date as gpu_check names them."""
    if path.stem.startswith("gpu_check-"):
        return path.stem[len("gpu_check-"):]
    m = json.loads(path.read_text())["meta"]
    return f"{slug(m['device'])}-{m['date'][:10]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", help="a gpu_check JSON: its fma rows with their bounds")
    ap.add_argument("--n", type=int, nargs="+", default=[16384, 131072, 1048576])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--card", default="NVIDIA H200", choices=sorted(CARDS))
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    if args.results:
        rows = from_gpu_check(Path(args.results))
        tag = gpu_check_tag(Path(args.results))
    else:
        rows = [dict(n=n, **bounds(case(n, args.heads, args.head_dim, True), mode, None, CARDS[args.card]))
                for n in args.n for mode in ("fwd", "fwdbwd")]
        tag = slug(args.card)
    text = table(rows)
    print(text)
    stem = result_stem("roofline", args, tag=tag)
    path = write_results(stem, dict(meta=meta(args), source=args.results, cards=CARDS, rows=rows, table=text))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
