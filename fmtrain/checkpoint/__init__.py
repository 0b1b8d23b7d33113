"""Checkpoints: the folder format (:mod:`.format`: write, validate, find, and the validated
:class:`Checkpoint` every consumer takes), saving and resuming a run (:mod:`.manager`) and the
training state around DeepSpeed's (:mod:`.state`)."""
from .format import (META, Checkpoint, CheckpointError, checksums, crc32, file_sizes, find_checkpoints,
                     latest_valid, latest_valid_by_size, newest_valid, none_valid_error, prune, read_config, resolve, scan, step_dir,
                     valid_by_size, validate, write_meta)
from ..engine import UNIVERSAL, inner_optimizer
from .manager import Checkpointer, find_resume, tokenizer_comment
from .state import TrainState, all_finite

__all__ = ["META", "UNIVERSAL", "Checkpoint", "CheckpointError", "Checkpointer", "TrainState", "all_finite",
           "checksums", "crc32", "file_sizes", "find_checkpoints", "find_resume", "inner_optimizer", "latest_valid",
           "latest_valid_by_size", "newest_valid", "none_valid_error", "prune", "read_config", "resolve", "scan", "step_dir",
           "tokenizer_comment", "valid_by_size", "validate", "write_meta"]
