"""Process groups (data and sequence parallelism) and sequence-parallel multipole attention."""
from .groups import World, init_world, sequence_groups, shutdown

__all__ = ["World", "init_world", "sequence_groups", "shutdown"]
