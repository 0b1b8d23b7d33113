"""What the Triton kernels use on an H100 (sm_90), compiled here without a GPU.

    python bench/kernel_resources.py                 # the standard shapes, both masks
    python bench/kernel_resources.py --cases bf16,64,128,200

Each kernel is compiled as the JIT compiles it on a launch (the launcher's tiles and
options, pointers 16-byte aligned: fmtrain/attention/kernels/aot.py), in the default launch
configuration and, where they differ from it, in the others (function.LAUNCH_CONFIGS); registers and spills
by ptxas -v, shared memory and instruction counts from Triton's output. The gate column
is #26's resource gate (no spills, two programs per SM, tensor-core instructions, 16-byte
loads): what a kernel misses. Prints a table and writes JSON to
``<--out>/kernel_resources-sm90.json`` (bench/_results.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; Triton 3.9 warns when unset
os.environ.pop("TRITON_INTERPRET", None)  # the real lowering, not the interpreter

from _results import add_result_arguments, meta, result_stem, write_results  # noqa: E402
from fmtrain.attention.kernels import aot  # noqa: E402
from fmtrain.attention.kernels.function import LAUNCH_CONFIGS  # noqa: E402

# (dtype, block size m, head_dim d, coarse slots S): the 125M config's shape first.
CASES = [("bf16", 64, 128, 200), ("bf16", 64, 64, 40), ("fp16", 32, 32, 40), ("fp32", 64, 64, 40)]


def _case(text: str):
    dtype, m, d, S = text.split(",")
    return dtype, int(m), int(d), int(S)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", type=_case, default=CASES, help="dtype,m,d,S (default: the standard shapes)")
    ap.add_argument("--causal-only", action="store_true")
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    stem = result_stem("kernel_resources", args, tag="sm90")
    rows = []
    print(f"{'dtype':>5} {'m':>3} {'d':>4} {'S':>4} {'mask':>6} {'launch':>9} {'kernel':>8} {'regs':>5} {'spill':>6} "
          f"{'smem KB':>7} {'warps':>5} {'prog/SM':>7} {'mma':>5} {'ld.v4':>5} {'ld':>5}  gate")
    default = LAUNCH_CONFIGS[0]
    for dtype, m, d, S in args.cases:
        for causal in (True,) if args.causal_only else (True, False):
            # Another configuration's kernels only where they differ from the default's.
            plain = {(n_, repr(c_), repr(o_)) for n_, _, c_, o_, _ in aot.kernel_variants(dtype, m, d, S, causal,
                                                                                         config=default)}
            for config in LAUNCH_CONFIGS:
                for name, fn, consts, launch, kdtype in aot.kernel_variants(dtype, m, d, S, causal, config=config):
                    if name.startswith("opened") and (not causal or config != default):
                        continue  # no mask or launch of their own: once per case
                    if config != default and (name, repr(consts), repr(launch)) in plain:
                        continue
                    r = aot.resources(name, aot.compile_sm90(fn, consts, kdtype, launch))
                    misses = r.gate()
                    rows.append(dict(dtype=dtype, m=m, d=d, S=S, causal=causal, launch=config, **dataclasses.asdict(r),
                                     programs_per_sm=r.programs_per_sm, gate_misses=misses))
                    print(f"{dtype:>5} {m:>3} {d:>4} {S:>4} {'causal' if causal else 'full':>6} {config:>9} {name:>8} "
                          f"{r.registers:>5} {r.spill_bytes:>6} {r.shared_bytes / 1024:>7.1f} {r.warps:>5} "
                          f"{r.programs_per_sm:>7} {r.tensor_core_ops:>5} {r.vector_loads:>5} {r.scalar_loads:>5}  "
                          f"{'pass' if not misses else '; '.join(misses)}", flush=True)
    import triton
    path = write_results(stem, dict(meta=meta(args, target="sm_90", triton=triton.__version__), rows=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
