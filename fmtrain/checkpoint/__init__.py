"""Checkpoints: the folder format (:mod:`.format`: write, validate, find, and the validated
:class:`Checkpoint` every consumer takes), saving and resuming a run (:mod:`.manager`) and the
training state around DeepSpeed's (:mod:`.state`)."""
from .format import (META, Checkpoint, CheckpointError, crc32, file_sizes, find_checkpoints, latest_valid,
                     latest_valid_by_size, prune, resolve, scan, step_dir, validate, write_meta)
from .manager import Checkpointer, find_resume, tokenizer_comment
from .state import TrainState, all_finite

__all__ = ["META", "Checkpoint", "CheckpointError", "Checkpointer", "TrainState", "all_finite", "crc32", "file_sizes",
           "find_checkpoints", "find_resume", "latest_valid", "latest_valid_by_size", "prune", "resolve", "scan",
           "step_dir", "tokenizer_comment", "validate", "write_meta"]
