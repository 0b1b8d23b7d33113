"""Decoding speed and cache size by context length: fma's multipole cache, sdpa's key/value
cache and the recompute path (no cache).

    python bench/generate.py              # contexts 1k .. 1M (CPU: about 10 minutes on 2 cores)
    python bench/generate.py --quick      # 1k and 4k, 16 tokens: a smoke test
    python bench/generate.py --config configs/gpt-125m-128k.toml --device cuda --contexts 131072 1048576

The model is the config's (default: the tiny causal CPU demo), randomly initialised: speed
and bytes do not depend on the weights. For each context ``n``:
- ``fma``: a real prefill of ``n`` random tokens (its time is reported), then ``--tokens``
  decode steps;
- ``sdpa``: its key/value cache filled with random keys and values of ``n`` tokens (a real
  prefill would be the O(n^2) full forward), where they fit in ``--sdpa-max-gib``; beyond,
  its bytes by formula;
- ``recompute``: one full forward over ``n`` tokens per new token, for ``n <= --recompute-max``;
- ``fma-refineK`` for each ``--refine K``: the same model with adaptive refinement, whose cache
  also keeps every window's summaries (hot) and the fine keys and values it fetches opened blocks
  from (the store: ``--refine-store host`` keeps it in host memory). A real prefill up to
  ``--refine-prefill-max`` tokens (the refined forward is slow on CPU); beyond, each layer's
  cache is filled from random queries, keys and values of ``n`` tokens, which costs the decode
  step the same (the selection's work does not depend on the values).
Per-token latency is the median over the decode steps, after 4 warm-up steps. Prints a table
and writes ``<--out>/generate-<tag>.json`` and a plot beside it (bench/_results.py: ``$OUT``, else
``bench/results/``; the tag ``cpu``, ``quick``, or the CUDA card and the date).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from _results import ROOT, add_result_arguments, beside, meta, result_stem, write_results
from _harness import time_call

WARMUP = 4


def _model(cfg_path: str, attention: str, device, dtype, refine: int = 0):
    from fmtrain.config import load_config
    from fmtrain.model import build_model

    cfg = load_config(cfg_path, [f"--model.attention={attention}", f"--model.refine={refine}"])
    torch.manual_seed(0)
    return build_model(cfg.model).to(device=device, dtype=dtype).eval(), cfg.model


def _decode_latency(model, cache, logits, steps: int, device) -> list[float]:
    """Seconds per decode step (after the warm-up), greedy."""
    times = []
    for _ in range(WARMUP + steps):
        tok = logits.argmax(-1)
        seconds, (logits, cache) = time_call(lambda: model.decode(tok, cache), device)
        times.append(seconds)
    return times[WARMUP:]


def _row(kind, n, times, cache_bytes, **extra):
    ms = sorted(1e3 * t for t in times)
    return dict(kind=kind, context=n, ms_per_token=statistics.median(ms) if ms else None,
                ms_quartiles=[ms[len(ms) // 4], ms[(3 * len(ms)) // 4]] if ms else None,
                tokens=len(ms), cache_bytes=cache_bytes, **extra)


@torch.no_grad()
def bench_fma(cfg_path, n, steps, device, dtype, attention="fma") -> dict:
    model, mcfg = _model(cfg_path, attention, device, dtype)
    ids = torch.randint(0, mcfg.vocab_size, (1, n), device=device, generator=None)
    prefill_s, (logits, cache) = time_call(lambda: model.prefill(ids), device)
    times = _decode_latency(model, cache, logits, steps, device)
    return _row(attention, n, times, cache.nbytes(), prefill_s=prefill_s)


@torch.no_grad()
def bench_refined(cfg_path, n, refine, steps, device, dtype, prefill_max, store) -> dict:
    from fmtrain.model import DecodeCache

    model, mcfg = _model(cfg_path, "fma", device, dtype, refine)
    store_device = torch.device("cpu") if store == "host" else None
    if n <= prefill_max:
        ids = torch.randint(0, mcfg.vocab_size, (1, n), device=device)
        prefill_s, (logits, cache) = time_call(lambda: model.prefill(ids, store_device), device)
        note = None
    else:
        layers = []
        for block in model.trunk.blocks:
            q = torch.randn(1, mcfg.n_heads, n, mcfg.head_dim, device=device, dtype=dtype)
            k, v = (torch.randn(1, mcfg.kv_heads, n, mcfg.head_dim, device=device, dtype=dtype) for _ in range(2))
            layers.append(block.attn.new_cache(store_device).prefill(q, k, v))
        cache, logits = DecodeCache(layers, n), torch.zeros(1, mcfg.vocab_size, device=device)
        prefill_s, note = None, "caches filled from random q, k, v of n tokens (no prefill timed)"
    nbytes, store_bytes = cache.nbytes(), cache.cold_nbytes()  # at n tokens, as sdpa's
    times = _decode_latency(model, cache, logits, steps, device)
    return _row(f"fma-refine{refine}", n, times, nbytes, store_bytes=store_bytes, refine=refine,
                store=store, prefill_s=prefill_s, **({"note": note} if note else {}))


def refined_table(rows: list[dict]) -> str:
    """Refined rows beside plain fma at each context: latency, hot bytes and the store's."""
    get = {(r["kind"], r["context"]): r for r in rows}
    lines = [f"{'context':>9} | {'K':>2} | {'ms/tok':>7} {'x fma':>6} | {'hot MiB':>8} {'store MiB':>9} | "
             f"{'prefill s':>9}"]
    for r in sorted((r for r in rows if r["kind"].startswith("fma-refine")), key=lambda r: (r["context"], r["refine"])):
        plain = get.get(("fma", r["context"]))
        ratio = r["ms_per_token"] / plain["ms_per_token"] if plain and plain["ms_per_token"] else None
        hot = (r["cache_bytes"] - r["store_bytes"]) / 2**20
        pre = f"{r['prefill_s']:9.2f}" if r.get("prefill_s") is not None else "-".rjust(9)
        lines.append(f"{r['context']:>9} | {r['refine']:>2} | {r['ms_per_token']:7.2f} "
                     f"{ratio if ratio is not None else float('nan'):6.2f} | {hot:8.2f} "
                     f"{r['store_bytes'] / 2**20:9.2f} | {pre}")
    return "\n".join(lines)


def _sdpa_bytes(mcfg, n, dtype) -> int:
    return 2 * mcfg.n_layers * mcfg.kv_heads * mcfg.head_dim * n * torch.finfo(dtype).bits // 8


@torch.no_grad()
def bench_sdpa(cfg_path, n, steps, device, dtype, max_gib) -> dict:
    from fmtrain.attention.cache import KVCache
    from fmtrain.model import DecodeCache

    model, mcfg = _model(cfg_path, "sdpa", device, dtype)
    nbytes = _sdpa_bytes(mcfg, n + WARMUP + steps, dtype)
    if nbytes > max_gib * 2**30:
        return _row("sdpa", n, [], _sdpa_bytes(mcfg, n, dtype), note="bytes by formula (too large to hold)")
    layers = []
    for _ in range(mcfg.n_layers):
        k, v = (torch.randn(1, mcfg.kv_heads, n, mcfg.head_dim, device=device, dtype=dtype) for _ in range(2))
        q = k.new_empty(1, mcfg.n_heads, 1, mcfg.head_dim)  # only its head count is read
        layers.append(KVCache(reserve=WARMUP + steps).prefill(q, k, v))
    cache = DecodeCache(layers, n)
    logits = torch.zeros(1, mcfg.vocab_size, device=device)
    bytes_at_n = cache.nbytes()
    times = _decode_latency(model, cache, logits, steps, device)
    return _row("sdpa", n, times, bytes_at_n, note="random keys and values of n tokens")


@torch.no_grad()
def bench_recompute(cfg_path, n, steps, device, dtype) -> dict:
    model, mcfg = _model(cfg_path, "fma", device, dtype)
    ids = torch.randint(0, mcfg.vocab_size, (1, n), device=device)
    times = []
    for _ in range(2 + steps):
        seconds, tok = time_call(lambda: model.logits(ids)[:, -1].argmax(-1), device)
        times.append(seconds)
        ids = torch.cat([ids[:, 1:], tok[:, None]], dim=1)  # the same context length each time
    return _row("recompute", n, times[2:], 0)


def table(rows: list[dict]) -> str:
    ctx = sorted({r["context"] for r in rows})
    get = {(r["kind"], r["context"]): r for r in rows}
    lines = [f"{'context':>9} | {'fma ms/tok':>10} {'sdpa ms/tok':>11} {'recomp ms':>10} {'sdpa/fma':>8} | "
             f"{'fma cache':>10} {'sdpa cache':>11} {'fma/sdpa':>8} | {'fma prefill s':>13}"]

    def f(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))

    for n in ctx:
        a, s, r = get.get(("fma", n)), get.get(("sdpa", n)), get.get(("recompute", n))
        ams = a["ms_per_token"] if a else None
        sms = s["ms_per_token"] if s else None
        ratio = sms / ams if ams and sms else None
        ab, sb = (a["cache_bytes"] if a else None), (s["cache_bytes"] if s else None)
        frac = 100 * ab / sb if ab and sb else None
        lines.append(f"{n:>9} | {f(ams, '10.2f')} {f(sms, '11.2f')} {f(r['ms_per_token'] if r else None, '10.1f')} "
                     f"{f(ratio, '8.1f')} | {f(ab / 2**20 if ab else None, '7.2f')} MiB "
                     f"{f(sb / 2**20 if sb else None, '7.1f')} MiB {f(frac, '7.3f')}% | "
                     f"{f(a.get('prefill_s') if a else None, '13.2f')}")
    return "\n".join(lines)


def floors(rows: list[dict]) -> list[str]:
    get = {(r["kind"], r["context"]): r for r in rows}
    out = []

    def ms(kind, n):
        r = get.get((kind, n))
        return r["ms_per_token"] if r else None

    if ms("fma", 1 << 20) and ms("fma", 4096):
        x = ms("fma", 1 << 20) / ms("fma", 4096)
        out.append(f"fma latency 1M / 4k: {x:.2f} (floor <= 2): {'met' if x <= 2 else 'MISSED'}")
    if get.get(("fma", 1 << 20)) and get.get(("sdpa", 1 << 20)):
        x = get[("fma", 1 << 20)]["cache_bytes"] / get[("sdpa", 1 << 20)]["cache_bytes"]
        out.append(f"fma cache bytes at 1M / sdpa's: {100 * x:.4f}% (floor < 1%): {'met' if x < 0.01 else 'MISSED'}")
    if ms("fma", 65536) and ms("sdpa", 65536):
        x = ms("sdpa", 65536) / ms("fma", 65536)
        out.append(f"sdpa / fma per-token time at 64k: {x:.1f}x (floor >= 5x): {'met' if x >= 5 else 'MISSED'}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    kinds = ["fma", "sdpa", "recompute"] + sorted({r["kind"] for r in rows if r["kind"].startswith("fma-refine")})
    for i, kind in enumerate(kinds):
        colour = f"C{i}"
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["context"])
        lat = [(r["context"], r["ms_per_token"]) for r in rs if r["ms_per_token"]]
        if lat:
            a1.plot(*zip(*lat), "o-", color=colour, label=kind)
        by = [(r["context"], r["cache_bytes"] / 2**20) for r in rs if r["cache_bytes"]]
        if by:
            a2.plot(*zip(*by), "o-", color=colour, label=kind)
    for ax, title in ((a1, "decode latency (ms / token)"), (a2, "cache (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-gpt.toml"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20])
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per case (after 4 warm-up steps)")
    ap.add_argument("--recompute-max", type=int, default=4096, help="largest context timed without a cache")
    ap.add_argument("--sdpa-max-gib", type=float, default=8.0, help="largest sdpa cache held in memory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--refine", type=int, nargs="*", default=[4],
                    help="refined models timed too, one per K (default 4; none: --refine with no value)")
    ap.add_argument("--refine-prefill-max", type=int, default=16384,
                    help="largest context a refined model prefills for real (beyond: caches from random q, k, v)")
    ap.add_argument("--refine-store", choices=("device", "host"), default="device",
                    help="where refined caches keep the fine keys and values (host: main memory)")
    ap.add_argument("--quick", action="store_true", help="contexts 1k and 4k, 16 tokens")
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.tokens = [1024, 4096], 16
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for n in args.contexts:
        for kind in ("fma", "sdpa", "recompute"):
            if kind == "recompute" and n > args.recompute_max:
                continue
            if kind == "fma":
                row = bench_fma(args.config, n, args.tokens, device, dtype)
            elif kind == "sdpa":
                row = bench_sdpa(args.config, n, args.tokens, device, dtype, args.sdpa_max_gib)
            else:
                row = bench_recompute(args.config, n, min(args.tokens, 8), device, dtype)
            rows.append(row)
            print(f"  {kind:>9} {n:>8}: {row['ms_per_token'] or float('nan'):.2f} ms/token, "
                  f"{row['cache_bytes'] / 2**20:.2f} MiB", flush=True)
        for K in args.refine:
            row = bench_refined(args.config, n, K, args.tokens, device, dtype, args.refine_prefill_max,
                                args.refine_store)
            rows.append(row)
            print(f"  {row['kind']:>9} {n:>8}: {row['ms_per_token']:.2f} ms/token, {row['cache_bytes'] / 2**20:.2f} "
                  f"MiB ({row['store_bytes'] / 2**20:.2f} MiB store)", flush=True)
    stem = result_stem("generate", args, device)
    config = Path(args.config).resolve()
    info = meta(args, config=str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else args.config,
                device=args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
                dtype=args.dtype, batch=1)
    text, fl = table(rows), floors(rows)
    if args.refine:
        text += "\n\nadaptive refinement (store: " + args.refine_store + ")\n" + refined_table(rows)
    print(text)
    print("\n".join(fl))
    out = write_results(stem, dict(meta=info, rows=rows, table=text, floors=fl))
    plot(rows, beside(stem, ".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
