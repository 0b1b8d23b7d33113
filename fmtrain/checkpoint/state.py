"""Training state that is not DeepSpeed's, and what a checkpoint must hold to be worth writing."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import inner_optimizer


@dataclass
class TrainState:
    """Progress that is not in the engine: counted in optimizer steps and tokens."""

    step: int = 0
    tokens_seen: int = 0


def all_finite(engine, world) -> bool:
    """Whether every weight and optimizer-state tensor is finite on every rank (collective).

    The optimizer's parameters are what is saved: the fp32 master copies (or their ZeRO
    partitions) where there are any, else the module's parameters.
    """
    ok = True
    opt = inner_optimizer(engine)
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            ok = False
            break
    return not world.any(not ok)


__all__ = ["TrainState", "all_finite"]
