"""Process groups (data and sequence parallelism) and the ``World`` a process runs in.

Sequence-parallel multipole attention itself is an attention algorithm:
``fmtrain/attention/sequence_parallel.py``."""
from .groups import World, init_world, sequence_groups, shutdown
from .sequence import apply_sequence_parallel

__all__ = ["World", "init_world", "sequence_groups", "shutdown", "apply_sequence_parallel"]
