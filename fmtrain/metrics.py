"""What a run reports: a console line, TensorBoard scalars and ``metrics.jsonl``.

Only rank 0 writes. On a resume, TensorBoard purges the steps after the
checkpoint (``purge_step``) and ``metrics.jsonl`` drops its lines past it, so a
resumed run's logs read as one run.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak of the GPUs fmtrain is run on (FLOP/s), for MFU.
_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "A10": 125e12, "GH200": 989e12, "B200": 2250e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s per process, where the number comes from).

    GPUs: the datasheet's dense bf16 (fp32 runs are measured against it too, as is
    customary). CPUs have no datasheet figure here: a short fp32 matmul measures
    what this process can reach, so CPU MFU reads "share of attainable matmul rate".
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} datasheet bf16"
    a = torch.randn(1024, 1024, device=device, dtype=torch.float32)
    best = float("inf")
    for _ in range(4):  # best of a few: other load on the machine only slows a trial down
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 * 4 / best, "measured fp32 matmul"


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: GPU allocations, or the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Metrics:
    """Rank 0's logs of one run."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int, enabled: bool,
                 flops_per_token: float, peak: float):
        self.enabled, self.total = enabled, total_steps
        self.flops_per_token, self.peak = flops_per_token, peak
        self.start_step, self.t_start = start_step, time.perf_counter()
        self.tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl.exists():
            return
        keep = [line for line in self.jsonl.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.jsonl.write_text("".join(line + "\n" for line in keep))

    def _write(self, row: dict) -> None:
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key.replace("eval_", "eval/", 1) if key.startswith("eval_")
                                   else f"train/{key}", value, row["step"])
        self.tb.flush()

    def step(self, *, step: int, loss: float, lr: float, grad_norm: float, tokens_seen: int,
             tokens_per_s: float, step_time: float, data_time: float, device: torch.device) -> None:
        if not self.enabled:
            return
        mfu = tokens_per_s * self.flops_per_token / self.peak if self.peak else float("nan")
        done = step - self.start_step
        eta = (time.perf_counter() - self.t_start) / max(done, 1) * (self.total - step)
        mem = memory_gib(device)
        row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                   tokens_seen=tokens_seen, mfu=mfu, data_share=data_time / max(step_time, 1e-9),
                   step_time=step_time, memory_gib=mem)
        self._write(row)
        print(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
              f"{tokens_per_s:,.0f} tok/s | mfu {100 * mfu:.2f}% | data {100 * row['data_share']:.1f}% | "
              f"mem {mem:.2f} GiB | eta {_duration(eta)}", flush=True)

    def eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        self._write(dict(step=step, **result))
        print(f"eval step {step} | loss {result['eval_loss']:.4f} | bpb {result['eval_bpb']:.4f} | "
              f"ppl {result['eval_ppl']:.2f} | {result['eval_tokens']:,} tokens", flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
