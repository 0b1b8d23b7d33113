"""The world of processes and its data- and sequence-parallel groups.

Ranks are read from torchrun's variables (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``), SLURM's only as a fallback (under ``srun torchrun`` workers see
``SLURM_PROCID=0``); a plain ``python -m fmtrain.train`` is a world of one.
Sequence-parallel groups are ``parallel.sequence`` contiguous ranks (one node
holds a group); data-parallel ranks are the groups' counterparts.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..engine import import_deepspeed


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    sp_size: int
    device: torch.device
    backend: str
    sp_group: object = None  # this rank's sequence-parallel process group (None: no SP)

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.size // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized() and self.size > 1:
            dist.barrier()

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the whole world (a no-op for one process)."""
        if dist.is_initialized() and self.size > 1:
            dist.all_reduce(x, op=op)
        return x

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (collective: every rank must call it)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.backend == "nccl" else "cpu")
        return bool(self.all_reduce(t, op=dist.ReduceOp.MAX).item() > 0)


def local_rank() -> int:
    """This process's rank on its node: torchrun's ``LOCAL_RANK``, else SLURM's, else 0."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def init_world(backend: str = "auto", sp_size: int = 1, timeout_minutes: float = 30) -> World:
    """Initialise torch.distributed (through DeepSpeed, which the engine needs) and the device."""
    from ..errors import UserError  # (not config.ConfigError: config imports this module)

    deepspeed = import_deepspeed()  # imported here: a world of one for tools that never train needs no DeepSpeed

    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = local_rank()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise UserError("parallel.backend='nccl' needs CUDA GPUs; this machine has none: "
                           "use --parallel.backend=gloo (or auto)")
    if size % sp_size:
        raise UserError(f"parallel.sequence={sp_size} does not divide the world size {size}")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    fresh = not dist.is_initialized()
    if fresh and size == 1:
        # A world of one needs no rendezvous: an in-process store rather than a port. A port picked
        # free and bound seconds later (after DeepSpeed's import), or a MASTER_PORT inherited from the
        # parent, was taken in between when two runs started at once (EADDRINUSE). DeepSpeed keeps
        # the group it finds.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if fresh:
        # On CPU DeepSpeed builds its shared-memory collectives and prints "... built successfully"
        # on every start: nothing the user needs (a failed build still raises or warns on stderr).
        with contextlib.redirect_stdout(io.StringIO()):
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       timeout=timeout)
    return World(rank=rank, local_rank=local, size=size, sp_size=sp_size, device=device, backend=backend,
                 sp_group=sequence_groups(rank, size, sp_size))


def sequence_groups(rank: int, size: int, sp_size: int):
    """This rank's group of ``sp_size`` contiguous ranks (None when ``sp_size == 1``).

    ``new_group`` is collective over the whole world: every rank creates every group,
    in the same order, and keeps its own.
    """
    if sp_size == 1:
        return None
    groups = [dist.new_group(list(range(g, g + sp_size))) for g in range(0, size, sp_size)]
    return groups[rank // sp_size]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
