"""Process groups: data parallelism now, sequence parallelism over the multipole hierarchy next."""
from .groups import World, init_world, shutdown

__all__ = ["World", "init_world", "shutdown"]
