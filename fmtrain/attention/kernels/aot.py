"""Ahead-of-time compilation of the kernels for a GPU this machine does not have, and what
the compiled code uses (registers, spills, shared memory, tensor-core and vector
instructions): the resources a kernel's speed depends on, judged without a GPU.

The kernels are compiled as the JIT would compile them on a launch: the same tiles and
launch options as :mod:`.function` picks for ``(m, d, S)``, and pointer arguments marked
16-byte aligned (the JIT's ``tt.divisibility`` attribute for tensors from PyTorch's
allocator). Without that mark Triton cannot prove a row of 8 halves is one aligned
16-byte chunk and emits scalar 2-byte loads (224 instead of 20 in the forward), so a
compile without it says nothing about speed.

Registers and spills come from ``ptxas -v`` (Triton's bundled assembler that accepts the
PTX version it emits) on the PTX; shared memory and instruction counts from Triton's own
output. ``tests/attention/test_kernels.py`` compiles every variant; ``bench/kernel_resources.py``
prints the table.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

# Pointers whose tensors the launcher allocates in fp32 whatever the inputs' dtype; the opened-block
# kernels (refinement) also write their partial outputs and gradients, and read the lse, in fp32.
FP32_POINTERS = {"BIAS", "LSE", "DELTA", "DLSE", "SBIAS", "DKS", "DVS",
                 "TG", "LEAF", "DLEAF"}  # (the dk/dv kernel's epilogue: level-1 gradients, maps, partials)
OPENED_FP32_POINTERS = FP32_POINTERS | {"OUT", "LQ", "DQ", "DK", "DV"}
# The summary kernels (.summaries): their buffers, scales and maps are fp32; the tokens, the
# summaries and their gradients (GKS, GVS) in the inputs' dtype.
SUMMARY_FP32_POINTERS = {"Z", "G", "SCALE", "LEAF", "UP", "DLEAF", "DUP"}
INT_POINTERS = {"IDX", "SEEN", "ROWQ", "BLK", "BOUNDS", "ENDS"}  # ENDS: int64 when read (DOCS), never read else

# The summary kernels that only walk the levels above the chunks (.summaries): the gate asks them
# for registers and shared memory only.
TREE_ONLY = ("summ_top", "summ_top_bwd", "summ_levels_bwd")

# An H100 SM: 64K 32-bit registers and 228 KB of shared memory (227 KB usable by one block).
SM90_REGISTERS = 65536
SM90_SHARED = 227 * 1024


@dataclasses.dataclass
class Resources:
    """What one compiled kernel uses, per program (thread block)."""
    kernel: str
    registers: int          # per thread
    spill_bytes: int        # spill stores + spill loads, per thread
    shared_bytes: int
    warps: int
    tensor_core_ops: int    # wgmma / mma instructions in the PTX
    vector_loads: int       # 16-byte global loads (ld.global.v4)
    scalar_loads: int       # other global loads

    @property
    def programs_per_sm(self) -> int:
        """Resident programs an SM can hold, limited by registers and by shared memory."""
        by_regs = SM90_REGISTERS // max(self.registers * 32 * self.warps, 1)
        by_shared = SM90_SHARED // self.shared_bytes if self.shared_bytes else by_regs
        return min(by_regs, by_shared)

    def gate(self) -> list[str]:
        """The issue's resource gate: what this kernel misses (empty: it passes)."""
        misses = []
        if self.spill_bytes:
            misses.append(f"spills {self.spill_bytes} bytes")
        if self.programs_per_sm < 2:
            misses.append(f"{self.programs_per_sm} program per SM ({self.registers} registers x "
                          f"{self.warps} warps, {self.shared_bytes // 1024} KB shared)")
        if self.kernel in TREE_ONLY:  # p x 2p maps on a few dozen windows: no products for tensor cores
            return misses
        if not self.tensor_core_ops:
            misses.append("no tensor-core instructions")
        if not self.vector_loads:
            misses.append("no 16-byte loads")
        return misses


def signature(fn, consts: dict, dtype: str, aligned: bool = True):
    """Triton's signature and attributes of ``fn`` for inputs of ``dtype`` ('bf16', 'fp16', 'fp32'):
    unspecialised ints i32, scales fp32, the rest pointers (16-byte aligned when ``aligned``)."""
    ints = {p.name for p in fn.params if p.do_not_specialize}
    strides = set()  # specialised ints: divisible by 16, as the JIT marks them
    if fn.__module__.endswith("kernels.summaries"):
        from .summaries import STRIDES as strides
    fp32 = (OPENED_FP32_POINTERS if fn.__name__.startswith("_opened") else
            SUMMARY_FP32_POINTERS if fn.__module__.endswith("kernels.summaries") else FP32_POINTERS)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ints:
            sig[name] = "i32"
        elif name in strides:
            sig[name] = "i32"
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif "scale" in name:
            sig[name] = "fp32"
        else:
            sig[name] = "*i32" if name in INT_POINTERS else "*fp32" if name in fp32 else "*" + dtype
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def kernel_variants(dtype: str, m: int, d: int, S: int, causal: bool, docs: bool = False,
                    config: str | None = None):
    """``(name, kernel, constexprs, launch options, dtype)`` for every kernel a call with these
    shapes launches (each dq flag both ways), with the launcher's own tiles and launch options
    (``config``: one of :data:`.function.LAUNCH_CONFIGS`, default the one in use); then adaptive
    refinement's opened-block kernels (queries, keys and values in the inputs' dtype, partial outputs,
    gradients and lse in fp32; 64 query rows a tile), and with the causal mask the summary kernels
    (:func:`summary_variants`, which do not depend on the mask). ``docs``: instead, the kernels whose fine mask reads packed documents' key ranges."""
    import torch

    from ..hierarchy import SEEN_BY_COLS
    from . import function as Fn
    from . import triton_core as K

    blk = Fn._blocks(m, d, S)
    prec = "ieee" if dtype == "fp32" else "tf32"
    tiles = dict(m=m, d=d, F=2 if causal else 3, CAUSAL=causal, DOCS=docs, BLOCK_M=blk["BLOCK_M"],
                 BLOCK_D=blk["BLOCK_D"], PRECISION=prec, UPCAST=False)
    launch = Fn._launches(blk["BLOCK_M"], blk["BLOCK_D"], docs, config)
    out = [("fwd", K._fwd_kernel, dict(tiles, BLOCK_C=blk["BLOCK_C"]), launch["fwd"]) if launch["fwd_run"] == 1
           else ("fwd_run", K._fwd_run_kernel, dict(tiles, BLOCK_C=blk["BLOCK_C"], RUN=launch["fwd_run"]), launch["fwd"])]
    out += [(f"dq{'+dlse' if flag else ''}", K._dq_kernel, dict(tiles, BLOCK_C=blk["BLOCK_C"], HAS_DLSE=flag),
             launch["dq"]) for flag in (True, False)]
    no_tree = dict(TREE=False, MAP_GRADS=False, P=1, LEAF_P=16)
    # dkv+tree: with the summaries' share in the epilogue (whole sequences, the default), m2m's map
    # gradients included (the larger)
    tree = dict(TREE=True, MAP_GRADS=True, P=2, LEAF_P=16)
    out += [("dkv", K._dkv_kernel, dict(tiles, BLOCK_N=launch["dkv_keys"], **no_tree), launch["dkv"])]
    if launch["dkv_tree"]:
        out += [("dkv+tree", K._dkv_kernel, dict(tiles, BLOCK_N=launch["dkv_keys"], **tree), launch["dkv"])]
    out += [("dsum", K._dsum_kernel, dict(m=m, d=d, p=2, COLS=SEEN_BY_COLS, BLOCK_M=blk["BLOCK_M"],
                                          BLOCK_D=blk["BLOCK_D"], BLOCK_P=16, PRECISION=prec, UPCAST=False),
             launch["dsum"])]
    out = [x + (dtype,) for x in out]
    if docs:  # packed documents change only the fine mask of these three (DOCS): the rest are the same
        return [(f"{name}+docs", fn, c, opts, dt) for name, fn, c, opts, dt in out if name not in ("dsum", "dkv+tree")]
    inputs = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    opened, opened_launch = Fn._opened_tiles(m, d, 64, 1, inputs)
    opened["UPCAST"] = False  # the GPU's lowering, whatever this process interprets
    opened["DOCS"] = False  # one sequence end (packed documents read a per-block end: one more load)
    # queries, keys and values in the inputs' dtype (refine.FarField gives them so), the rest fp32
    out += [(name, fn, opened, opened_launch, dtype)
            for name, fn in (("opened_fwd", K._opened_fwd_kernel), ("opened_bwd", K._opened_bwd_kernel))]
    return out + (summary_variants(dtype, m, d) if causal else [])  # (the same for either mask: listed once)


def summary_variants(dtype: str, m: int, d: int, p: int = 2):
    """The summary kernels (:mod:`.summaries`) as :func:`kernel_variants` lists them; the
    backward's with m2m's map gradients (the larger). ``summ_levels_bwd``: the levels' backward
    without the tokens' pass (the fused path: the dk/dv kernel applies level 1). (There the
    summaries' gradients GKS, GVS come in fp32, here as the separate path's, in the inputs' dtype:
    p x d values a window, read once.)"""
    from . import summaries as T

    tiles = T._tiles_for(m, d, p)
    up = dict(tiles, M=m, PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    tree = T.tree_tiles(tiles)
    return [(name, fn, dict(c, **extra), T.LAUNCH, dtype) for name, fn, c, extra in (
        ("summ_up", T._up_kernel, up, {}),
        ("summ_top", T._top_kernel, tree, {}),
        ("summ_top_bwd", T._top_bwd_kernel, tree, dict(MAP_GRADS=True)),
        ("summ_up_bwd", T._up_bwd_kernel, up, dict(MAP_GRADS=True, BLOCK_T=T._bwd_rows(up["BLOCK_M"]), TOKENS=True)),
        ("summ_levels_bwd", T._up_bwd_kernel, up, dict(MAP_GRADS=True, BLOCK_T=T._bwd_rows(up["BLOCK_M"]),
                                                      TOKENS=False)))]


def compile_sm90(fn, consts: dict, dtype: str, options: dict, aligned: bool = True):
    """Triton IR -> PTX -> cubin for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = signature(fn, consts, dtype, aligned)
    return triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=options)


def _ptxas() -> str:
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one reads the PTX version Triton emits
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no ptxas in {folder}: Triton's NVIDIA backend is incomplete")


def resources(name: str, compiled) -> Resources:
    """Count what a compiled kernel uses (registers and spills by ``ptxas -v`` on its PTX)."""
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed on {name}: {r.stderr[-500:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    vec = len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4", ptx))
    return Resources(kernel=name, registers=int(regs.group(1)) if regs else 0,
                     spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else 0,
                     shared_bytes=int(compiled.metadata.shared), warps=int(compiled.metadata.num_warps),
                     tensor_core_ops=len(re.findall(r"\b(?:wgmma|mma)\.", ptx)), vector_loads=vec,
                     scalar_loads=len(re.findall(r"\bld\.global", ptx)) - vec)


__all__ = ["Resources", "signature", "kernel_variants", "compile_sm90", "resources"]
