"""What a run reports: a console line, TensorBoard scalars and ``metrics.jsonl``.

Only rank 0 writes. On a resume, TensorBoard purges the steps after the
checkpoint (``purge_step``) and ``metrics.jsonl`` drops its lines past it, so a
resumed run's logs read as one run.

A full disk pauses the logs, never the run. TensorBoard's writer thread dies on its first
failed write and stays dead, so a failed writer is dropped: the next rows open a new event
file in the same folder (TensorBoard reads them as one run), with the rows missed meanwhile.
"""
from __future__ import annotations

import errno
import json
import math
import os
import resource
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch

# Dense bf16 peak of the GPUs fmtrain is run on (FLOP/s), for MFU.
_GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                  "L40S": 362e12, "A10": 125e12, "GH200": 989e12, "B200": 2250e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s per process or None, where the number comes from).

    GPUs: the datasheet's dense bf16 (fp32 runs are measured against it too, as is
    customary). CPUs have no datasheet figure here, and a matmul timed at start-up
    moves with the machine's load (on a busy machine MFU read over 100%), so CPU runs
    report achieved FLOP/s and no MFU.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} datasheet bf16"
        return None, f"no datasheet peak known for {name}"
    return None, "no fixed peak known for CPUs"


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
                 flops_per_token: float, peak: float | None):
        self.enabled, self.total = enabled, total_steps
        self.flops_per_token, self.peak = flops_per_token, peak
        self.start_step, self.t_start = start_step, time.perf_counter()
        self.tb = None
        self._append_failed = False
        self._tb_missed: deque[dict] = deque(maxlen=100_000)  # rows not yet in TensorBoard (a full disk)
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tb"
        self._truncate_after(start_step)
        _quiet_tensorboard_thread()
        self._open_tb(purge_step=start_step + 1 if start_step else None)

    def _truncate_after(self, step: int) -> None:
        """Drop the lines past ``step`` (a resume rewrites them) and any torn line.

        A line is written whole by one ``write`` (see :meth:`_append`), but a kill or a full
        disk mid-write can still leave a torn last line; it is dropped with a warning rather
        than blocking the restart. The file is replaced atomically.
        """
        if not self.jsonl.exists():
            return
        keep, torn = [], 0
        for line in self.jsonl.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        if torn:
            print(f"warning: {self.jsonl}: dropped {torn} unreadable line(s) (torn by a kill or a full disk)",
                  file=sys.stderr, flush=True)
        tmp = self.jsonl.with_name(f".{self.jsonl.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.jsonl)

    def _append(self, line: str) -> None:
        """Append one line whole or not at all: one ``write`` on an O_APPEND file, cut back to the
        old length if it fails part-way (a full disk); the failure is then a warning, once per outage
        (writing again is said, and a later failure warned of again)."""
        data = (line + "\n").encode()
        try:
            fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:  # not even opened (a read-only file system, no inode left)
            self._append_failure(exc)
            return
        try:
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:
                os.ftruncate(fd, size)
                self._append_failure(exc)
                return
        finally:
            os.close(fd)
        if self._append_failed:  # the outage is over: the next one is warned of again
            self._append_failed = False
            print(f"{self.jsonl}: writing again (the rows of the outage are missing from it)", file=sys.stderr,
                  flush=True)

    def _append_failure(self, exc: OSError) -> None:
        if not self._append_failed:
            self._append_failed = True
            print(f"warning: cannot write {self.jsonl} ({exc}); metrics are not recorded while this lasts (the "
                  "console still shows them)", file=sys.stderr, flush=True)

    def _write(self, row: dict) -> None:
        self._append(json.dumps(row))
        self._tb_missed.append(row)
        try:
            if self.tb is None:  # dropped after a failure: try a new event file
                self._open_tb()
            for missed in self._tb_missed:
                self._add_scalars(missed)
            self.tb.flush()
        except OSError as exc:  # a full disk: the logs pause, training goes on (a checkpoint then says it)
            self._drop_tb(exc)
            return
        if len(self._tb_missed) > 1:
            print(f"TensorBoard logs: writing again ({len(self._tb_missed) - 1} missed row(s) written)",
                  file=sys.stderr, flush=True)
        self._tb_missed.clear()

    def _add_scalars(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key.replace("eval_", "eval/", 1) if key.startswith("eval_")
                                   else f"train/{key}", value, row["step"])

    def _open_tb(self, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb_files_before = set(self.tb_dir.glob("events.*")) if self.tb_dir.is_dir() else set()
        self._tb_flushed = False
        self.tb = SummaryWriter(str(self.tb_dir), purge_step=purge_step)

    def _drop_tb(self, exc: OSError) -> None:
        """Give up a writer whose thread died (it would raise the same error for ever)."""
        if self.tb is not None and not self._tb_failing():
            print(f"warning: cannot write TensorBoard logs ({exc}); they pause while this lasts and catch up "
                  "when writing works again", file=sys.stderr, flush=True)
        try:
            self.tb.close()
        except (OSError, AttributeError):
            pass
        self.tb = None
        for new in set(self.tb_dir.glob("events.*")) - self._tb_files_before:
            if new.stat().st_size == 0:  # a writer that never wrote: no empty files left per retry
                new.unlink(missing_ok=True)

    def _tb_failing(self) -> bool:
        return len(self._tb_missed) > 1  # rows already waiting: this outage was reported

    def step(self, *, step: int, loss: float, lr: float, grad_norm: float, tokens_seen: int,
             tokens_per_s: float, step_time: float, data_time: float, device: torch.device) -> None:
        if not self.enabled:
            return
        flops = tokens_per_s * self.flops_per_token  # model FLOP/s of the whole job
        done = step - self.start_step
        eta = (time.perf_counter() - self.t_start) / max(done, 1) * (self.total - step)
        mem = memory_gib(device)
        row = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                   tokens_seen=tokens_seen, flops_per_s=flops, data_share=data_time / max(step_time, 1e-9),
                   step_time=step_time, memory_gib=mem)
        if self.peak:
            row["mfu"] = flops / self.peak
        self._write(row)
        rate = f"mfu {100 * row['mfu']:.2f}%" if self.peak else f"{flops / 1e9:,.1f} GFLOP/s"
        print(f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | gnorm {grad_norm:.3f} | "
              f"{tokens_per_s:,.0f} tok/s | {rate} | data {100 * row['data_share']:.1f}% | "
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
            try:
                self.tb.close()
            except OSError:  # a full disk (already warned about)
                pass


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread re-raises its write error, which Python prints as a raw thread
    traceback; :meth:`Metrics._write` reports the same error once, in words."""
    previous = threading.excepthook
    if getattr(previous, "_fmtrain_quiet", False):
        return
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    hook._fmtrain_quiet = True
    threading.excepthook = hook
