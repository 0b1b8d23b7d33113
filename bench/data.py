"""Data pipeline benchmark: tokenisation throughput and batch latency at long seq_len.

    python bench/data.py                 # stdlib corpus, tokenizer/stdlib-32k.model, seq_len 131072
    python bench/data.py --quick         # fewer repetitions

Measures, on this machine's CPUs:
- tokenisation: `Tokenizer.encode_batch` over the stdlib training documents on
  1 thread and on all, and the whole cache build (read, encode, write) in MB/s;
- batch latency: `PackedLoader.next_batch()` at seq_len = 131072 for the causal
  and masked objectives, whole sequences and one sequence-parallel slice.

Prints a table and writes ``<--out>/data-<tag>.json`` (bench/_results.py: ``$OUT``, else
``bench/results/``; the tag ``cpu``, or ``quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from _results import ROOT, add_result_arguments, meta, result_stem, write_results
from _harness import time_call, time_calls
from fmtrain.data.corpus import Corpus
from fmtrain.data.loader import PackedLoader
from fmtrain.data.tokenizer import default_num_threads, load_tokenizer
from fmtrain.data.tokens import cached_tokens


def bench_tokenisation(tok, texts: list[str], repeats: int) -> list[dict]:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    rows = []
    for threads in sorted({1, default_num_threads()}):
        times = []
        for _ in range(repeats):
            seconds, ids = time_call(lambda: tok.encode_batch(texts, num_threads=threads))
            times.append(seconds)
        n_tokens = sum(map(len, ids))
        best = min(times)
        rows.append(dict(what=f"encode_batch, {threads} thread(s)", mb=n_bytes / 1e6, seconds=best,
                         mb_per_s=n_bytes / 1e6 / best, tokens=n_tokens, tokens_per_byte=n_tokens / n_bytes))
    return rows


def bench_cache_build(tok, corpus: Corpus) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder, data = cached_tokens(corpus, tok, tmp, progress=False)
        seconds = time.perf_counter() - start
        meta = json.loads((folder / "meta.json").read_text())
    mb = meta["text_bytes"] / 1e6
    return dict(what="cache build (read + encode + write)", mb=mb, seconds=seconds, mb_per_s=mb / seconds,
                tokens=data["train"].n_tokens + data["validation"].n_tokens)


def bench_batches(tok, train, seq_len: int, n: int) -> list[dict]:
    rows = []
    for objective in ("causal", "mlm"):
        for batch_size, sp_size in ((1, 1), (4, 1), (1, 4)):
            loader = PackedLoader(train, seq_len=seq_len, batch_size=batch_size, seed=0, dp_rank=0, dp_size=1,
                                  sp_rank=0, sp_size=sp_size, objective=objective,
                                  vocab_size=tok.vocab_size, **tok.special_ids)
            tokens = loader.next_batch()["input_ids"].numel()  # warm-up: the epoch's permutations
            times = time_calls(loader.next_batch, runs=n, warmup=0)
            med = statistics.median(times)
            rows.append(dict(objective=objective, seq_len=seq_len, batch_size=batch_size, sp_size=sp_size,
                             tokens_per_batch=tokens, median_ms=med * 1e3,
                             p90_ms=sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
                             mtokens_per_s=tokens / med / 1e6))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(ROOT / "tokenizer" / "stdlib-32k.model"))
    p.add_argument("--seq-len", type=int, default=131072)
    p.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    p.add_argument("--quick", action="store_true", help="1 encode repeat, 5 batches")
    add_result_arguments(p)
    args = p.parse_args()
    repeats, n_batches = (1, 5) if args.quick else (2, args.batches)

    tok = load_tokenizer(args.tokenizer)
    corpus = Corpus()
    texts = [t for split, t in corpus.documents() if split == "train"]
    print(f"tokenizer {tok.path.name} ({tok.vocab_size} pieces); stdlib train split: {len(texts)} documents, "
          f"{sum(len(t.encode()) for t in texts) / 1e6:.1f} MB; {default_num_threads()} CPU threads; "
          f"load average {os.getloadavg()[0]:.1f}")

    enc = bench_tokenisation(tok, texts, repeats)
    enc.append(bench_cache_build(tok, corpus))
    print(f"\n{'tokenisation':<40} {'MB':>7} {'s':>7} {'MB/s':>7} {'tokens/byte':>12}")
    for r in enc:
        tpb = f"{r['tokens_per_byte']:.3f}" if "tokens_per_byte" in r else ""
        print(f"{r['what']:<40} {r['mb']:>7.1f} {r['seconds']:>7.2f} {r['mb_per_s']:>7.2f} {tpb:>12}")

    with tempfile.TemporaryDirectory() as tmp:
        _, data = cached_tokens(corpus, tok, tmp, progress=False)
        batches = bench_batches(tok, data["train"], args.seq_len, n_batches)
    print(f"\n{'objective':<9} {'seq_len':>8} {'B':>3} {'SP':>3} {'tokens/rank':>12} {'median ms':>10} "
          f"{'p90 ms':>8} {'Mtok/s':>8}")
    for r in batches:
        print(f"{r['objective']:<9} {r['seq_len']:>8} {r['batch_size']:>3} {r['sp_size']:>3} "
              f"{r['tokens_per_batch']:>12} {r['median_ms']:>10.1f} {r['p90_ms']:>8.1f} {r['mtokens_per_s']:>8.1f}")

    stem = result_stem("data", args, "cpu")
    info = meta(args, device="cpu", cpu_threads=default_num_threads(), tokenizer=tok.path.name,
                vocab_size=tok.vocab_size)
    out = write_results(stem, dict(meta=info, tokenisation=enc, batches=batches))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
