"""What document masking costs: fma forward+backward over packed rows, with and without
``cu_seqlens``, on rows packed from a real corpus.

    python bench/documents.py                    # 16k tokens, the embedded corpus, CPU
    python bench/documents.py --n 16384 65536 --rows 3

The rows come from fmtrain's own loader (the shipped tokenizer on the stdlib corpus unless
``--corpus``/``--tokenizer`` say otherwise), so the documents have the corpus's lengths;
``--short`` packs documents of 20-2000 tokens instead, a corpus of short texts; ``--align`` packs them
as ``data.align_documents`` does (each document from a block, padded to a whole one). q, k, v are
random (the cost does not depend on them). Each row is timed with and without masking,
interleaved in one process (the machine's speed drifts), the rows in turn, median of ``--repeats``.
Prints a table and writes ``<--out>/documents-<tag>.json`` (``--short``: the tag ``cpu-short``;
``--align``: ``-aligned`` added).
"""
from __future__ import annotations

import argparse
import statistics
import time

from _results import add_result_arguments, meta, result_stem, write_results


def packed_rows(args, n: int) -> list[tuple[list[int], int]]:
    """(document lengths, real tokens) of ``--rows`` packed rows of ``n`` tokens. ``--align``: as
    ``data.align_documents`` packs them, each document's length its span (its tokens, then padding to
    a whole block), so the real tokens are fewer than ``n``."""
    import random

    import torch

    align = args.block_size if args.align else 0
    if args.short:
        rnd, rows = random.Random(0), []
        for _ in range(args.rows):
            lengths, real = [], 0
            while sum(lengths) < n:
                L = rnd.randint(20, 2000)
                span = min(-(-L // align) * align if align else L, n - sum(lengths))
                lengths.append(span)
                real += min(L, span)
            rows.append((lengths, real))
        return rows
    from fmtrain.attention.documents import cu_seqlens_from_doc_positions
    from fmtrain.data import build_loaders

    data = build_loaders(args.corpus, args.tokenizer, args.cache_dir, seq_len=n, batch_size=1, progress=False,
                         align_documents=align)
    pad, rows = data.tokenizer.special_ids["pad_id"], []
    for _ in range(args.rows):
        b = data.train.next_batch()
        cu = cu_seqlens_from_doc_positions(b["doc_positions"])
        rows.append((torch.diff(cu).tolist(), int((b["input_ids"] != pad).sum())))
    return rows


def row_timer(lengths: list[int], args):
    """``once(masked) -> seconds``: one forward+backward over a packed row of ``lengths``."""
    import torch

    from fmtrain.attention import fma

    n = sum(lengths)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, n, args.head_dim, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0)
    kw = dict(block_size=args.block_size, rank=args.rank, impl="torch")

    def once(masked: bool) -> float:
        t0 = time.perf_counter()
        o = fma(q, k, v, cu_seqlens=cu if masked else None, **kw)
        o.backward(torch.ones_like(o))
        q.grad = k.grad = v.grad = None
        return time.perf_counter() - t0
    return once


def time_rows(all_rows: list[tuple[list[int], int]], args) -> list[dict]:
    """Each row timed with and without masking, ``--repeats`` times, the rows in turn within each
    repeat (plain, then masked): the process's first calls are slower (its allocator settles over
    many), and timed row by row the first row paid for that alone."""
    import torch

    timers = [row_timer(lengths, args) for lengths, _ in all_rows]
    for _ in range(args.warmup):  # thread pools, the packings' tables
        for once in timers:
            once(False), once(True)
    runs = [([], []) for _ in timers]
    for _ in range(args.repeats):
        for once, (plain, masked) in zip(timers, runs):
            plain.append(once(False))
            masked.append(once(True))
    out = []
    for (lengths, real), (plain, masked) in zip(all_rows, runs):
        p, m = statistics.median(plain), statistics.median(masked)
        # Each masked run against the plain run just before it: the machine's drift (10-20% within
        # minutes here) moves both alike, so the paired ratios spread less than the two medians' ratio.
        pairs = sorted(b / a for a, b in zip(plain, masked))
        quart = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
        out.append(dict(n=sum(lengths), documents=len(lengths), shortest=min(lengths), longest=max(lengths),
                        median_length=statistics.median(lengths), lengths=lengths, real_tokens=real,
                        plain_s=p, masked_s=m, ratio=m / p,
                        paired_ratio=statistics.median(pairs), paired_quartiles=[quart[0], quart[2]],
                        threads=torch.get_num_threads(), plain_runs=plain, masked_runs=masked))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[16384], help="tokens per packed row")
    ap.add_argument("--rows", type=int, default=3, help="rows per length")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per row and arm (interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs per row and arm first")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--corpus", default="stdlib")
    ap.add_argument("--tokenizer", default="tokenizer/stdlib-4k.model")
    ap.add_argument("--cache-dir", default=".cache/fmtrain")
    ap.add_argument("--short", action="store_true", help="documents of 20-2000 tokens instead of the corpus")
    ap.add_argument("--align", action="store_true", help="documents padded to start on blocks, as "
                    "data.align_documents packs them (the row holds fewer real tokens: see real_tokens)")
    add_result_arguments(ap)
    args = ap.parse_args()
    import torch

    rows = []
    for n in args.n:
        for i, r in enumerate(time_rows(packed_rows(args, n), args)):
            r["row"] = i
            rows.append(r)
            print(f"n={n} row {i}: {r['documents']} documents, {r['plain_s']:.3f} s plain, "
                  f"{r['masked_s']:.3f} s masked ({r['ratio']:.3f}x; paired {r['paired_ratio']:.3f}x)", flush=True)
    print(f"\n{torch.get_num_threads()} thread(s); masked/plain: the medians' ratio; paired: the median (and "
          "quartiles) of each masked run over the plain run before it")
    print("\n| n | row | documents | shortest | median | longest | real tokens | plain f+b (s) | masked f+b (s) "
          "| masked/plain | paired (quartiles) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["paired_quartiles"]
        print(f"| {r['n']:,} | {r['row']} | {r['documents']} | {r['shortest']} | {r['median_length']:.0f} | "
              f"{r['longest']} | {r['real_tokens']:,} | {r['plain_s']:.3f} | {r['masked_s']:.3f} | "
              f"{r['ratio']:.3f} | "
              f"{r['paired_ratio']:.3f} ({lo:.3f}-{hi:.3f}) |")
    tag = "cpu" + ("-short" if args.short else "") + ("-aligned" if args.align else "")
    write_results(result_stem("documents", args, tag=None if tag == "cpu" else tag), dict(meta=meta(args), rows=rows))


if __name__ == "__main__":
    main()
