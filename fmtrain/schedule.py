"""The learning-rate schedule: linear warmup, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, *, steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based): ``lr * (step + 1) / warmup_steps``
    during the warmup, then a cosine from ``lr`` down to ``min_lr`` at step ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
