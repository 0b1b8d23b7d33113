"""Bytes one multipole attention forward+backward moves, counted (issue #26, item 2).

    python bench/traffic.py            # n=2048, m=64, d=128, 1 head, bf16: three paths side by side
    python bench/traffic.py --n 1024 4096

Writes ``bench/results/traffic-cpu.json`` (and ``.md``; ``--out``, ``--tag``: bench/_results.py).

Counted on the CPU, no GPU needed: the Triton kernels run under ``TRITON_INTERPRET=1``, where
every ``tl.load``/``tl.store`` is a Python call; each is counted by the elements its mask lets
through times their size, per kernel. The PyTorch ops around the kernels (buffers, casts, sums,
the summaries level by level where they are built in PyTorch) are counted with a
``TorchDispatchMode`` as the bytes of their tensor inputs and outputs (views and the
interpreter's own copies of the kernels' arguments excluded: on a GPU there are none).

What the numbers are: bytes *requested* by each kernel and op, the traffic a GPU's memory system
has to serve. Re-reads that hit L2 are counted each time (the forward reads a key tile for each
query block that sees it), so this is an upper bound on DRAM bytes; what changes between the
paths is what the table is for. The paths, the same call (causal, mean summaries):

- ``torch summaries``: the summaries built level by level in PyTorch (~6 ops a level each way),
  the core in the kernels (the state before the summary kernels);
- ``separate``: every summary level in 2 + 2 kernels (:mod:`fmtrain.attention.kernels.summaries`),
  their token gradients a second (B, Hkv, n, d) tensor per k and v that autograd adds to the core's
  (``FMTRAIN_SUMMARY_GRADS=separate``);
- ``fused``: the default, summaries and core as one autograd node, the summaries' share of the
  tokens' gradients added in the dk/dv kernel's epilogue.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from _results import add_result_arguments, meta, result_stem, write_results  # noqa: E402
from gpu_check import launch  # noqa: E402

PATHS = ("torch summaries", "separate", "fused")
# Ops that only describe memory (no kernel, no bytes).
METADATA = ("view", "permute", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select.int", "alias",
            "detach", "aten.t.", "as_strided", "split", "unbind", "empty")


def _bytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


class Traffic(TorchDispatchMode):
    """Bytes per kernel (loads, stores) and per PyTorch op (inputs + outputs) while active."""

    def __init__(self):
        super().__init__()
        self.kernels = collections.defaultdict(lambda: [0, 0])  # name -> [loaded, stored]
        self.ops = collections.Counter()  # op -> bytes
        self.kernel = None  # the kernel being interpreted, None between launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if self.kernel is None and not any(m in name for m in METADATA):
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}, out))
            self.ops[name] += sum(_bytes(x) for x in flat)
        return out

    @contextlib.contextmanager
    def counting(self):
        """Count the interpreter's loads and stores and name them by the running kernel."""
        from triton.runtime import interpreter as I

        builder, fn_cls = I.InterpreterBuilder, I.InterpretedFunction
        load, store, run = builder.create_masked_load, builder.create_masked_store, fn_cls.run
        seen = self

        def masked_load(b, ptrs, mask, *a, **k):
            seen.kernels[seen.kernel][0] += int(mask.data.sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)
            return load(b, ptrs, mask, *a, **k)

        def masked_store(b, ptrs, value, mask, *a, **k):
            seen.kernels[seen.kernel][1] += int(mask.data.sum()) * (ptrs.get_element_ty().primitive_bitwidth // 8)
            return store(b, ptrs, value, mask, *a, **k)

        def interpret(f, *a, **k):
            seen.kernel = f.fn.__name__
            try:
                return run(f, *a, **k)
            finally:
                seen.kernel = None

        builder.create_masked_load, builder.create_masked_store, fn_cls.run = masked_load, masked_store, interpret
        try:
            with self:
                yield self
        finally:
            builder.create_masked_load, builder.create_masked_store, fn_cls.run = load, store, run


def count(path: str, n: int, m: int, d: int, heads: int, dtype) -> dict:
    """One warm-up, then the counted forward+backward of ``fma`` along ``path``."""
    from fmtrain.attention import fma
    from fmtrain.attention.summaries import MeanSummaries

    class TorchMean(MeanSummaries):
        def maps(self, h, like):  # no bottom-up maps for the kernels: built level by level in PyTorch
            return None

    summaries = TorchMean() if path == "torch summaries" else None
    g = torch.Generator().manual_seed(n)
    q, k, v, dout = (torch.randn(1, heads, n, d, generator=g).to(dtype) for _ in range(4))
    xs = [t.requires_grad_() for t in (q, k, v)]

    def call():
        return torch.autograd.grad(fma(*xs, block_size=m, rank=2, summaries=summaries, impl="triton"), xs, dout)

    t = Traffic()
    with launch(None, "separate" if path == "separate" else "fused"):
        call()  # tables and maps cached
        with t.counting():
            call()
    kernels = {k: dict(loaded=v[0], stored=v[1]) for k, v in sorted(t.kernels.items())}
    total_k = sum(v[0] + v[1] for v in t.kernels.values())
    total_ops = sum(t.ops.values())
    return dict(path=path, n=n, block_size=m, head_dim=d, heads=heads, dtype=str(dtype).split(".")[-1],
                kernels=kernels, kernel_bytes=total_k, torch_ops=dict(t.ops.most_common()), torch_op_bytes=total_ops,
                total_bytes=total_k + total_ops, bytes_per_token=(total_k + total_ops) / n)


def table(rows: list[dict]) -> str:
    def mib(b):
        return f"{b / 2**20:9.2f}"

    lines = [f"{'n':>6} {'path':>16} | {'kernels MiB':>11} {'torch ops MiB':>13} {'total MiB':>10} {'B/token':>9} | "
             "largest PyTorch ops (MiB)"]
    for r in rows:
        top = ", ".join(f"{op.replace('aten.', '')} {b / 2**20:.2f}" for op, b in list(r["torch_ops"].items())[:3])
        lines.append(f"{r['n']:>6} {r['path']:>16} | {mib(r['kernel_bytes']):>11} {mib(r['torch_op_bytes']):>13} "
                     f"{mib(r['total_bytes']):>10} {r['bytes_per_token']:9.0f} | {top}")
    kernels = sorted({k for r in rows for k in r["kernels"]})
    lines += ["", "per kernel, MiB loaded + stored:", f"{'n':>6} {'path':>16} | " + " ".join(f"{k:>15}" for k in kernels)]
    for r in rows:
        cells = [mib(sum(r["kernels"][k].values())) if k in r["kernels"] else "-" for k in kernels]
        lines.append(f"{r['n']:>6} {r['path']:>16} | " + " ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2048])
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    add_result_arguments(ap)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        ap.error("the counts need Triton's interpreter: run without TRITON_INTERPRET=0")
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in args.n:
        for path in args.paths:
            t0 = time.time()
            rows.append(count(path, n, args.block_size, args.head_dim, args.heads, dtype))
            print(f"  {path:16s} n={n}: {rows[-1]['total_bytes'] / 2**20:.2f} MiB ({time.time() - t0:.0f} s)",
                  flush=True)
    text = table(rows)
    print("\n" + text)
    stem = result_stem("traffic", args, device="cpu")
    path = write_results(stem, dict(meta=meta(args, dtype=args.dtype, summaries="mean", causal=True), rows=rows,
                                    table=text),
                         f"# Bytes one fma forward+backward requests, counted (bench/traffic.py)\n\n"
                         f"Causal, mean summaries, block {args.block_size}, rank 2, head_dim {args.head_dim}, "
                         f"{args.heads} head(s), {args.dtype}; every tl.load/tl.store of the kernels under "
                         "TRITON_INTERPRET=1 (the elements its mask lets through) and every PyTorch op's inputs and "
                         "outputs. Requested bytes: a tile read again by another program counts again (an upper "
                         "bound on DRAM traffic).\n\n"
                         f"```\n{text}\n```")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
