"""Process groups (data and sequence parallelism) and the ``World`` a process runs in.

Sequence-parallel multipole attention itself is an attention algorithm:
``fmtrain/attention/sequence_parallel.py``."""
from .groups import World, init_world, sequence_groups, shutdown

__all__ = ["World", "init_world", "sequence_groups", "shutdown"]
