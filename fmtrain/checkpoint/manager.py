"""Saving and resuming a run's whole training state with DeepSpeed (every rank takes part).

The folder it writes (:mod:`.format`) is ``<checkpoint dir>/step_NNNNNNNN/``:

    ds/                 DeepSpeed's engine state (model, optimizer, scheduler; ZeRO shards)
    rank_00000.pt ...   per rank: data position and every RNG
    config.toml         the resolved config of the run
    tokenizer.model     the SentencePiece tokenizer (and its training settings,
                        sentencepiece_settings.json, when present), or a Hugging Face
                        tokenizer's tokenizer.json and tokenizer_config.json
    latest              "ds": what DeepSpeed's own tools (zero_to_fp32) read
    meta.json           step, tokens seen, world layout, and the size and CRC-32 of every file above

It is written as ``.step_NNNNNNNN.partial/``, flushed to disk, then renamed by
rank 0: a crash mid-save leaves only a ``.partial`` folder, which is never
loaded. ``meta.json`` is written last and lists every file with its size and
CRC-32, so a checkpoint damaged later (a truncated file, a flipped block) is
detected on resume and skipped for the previous one (what hashing costs: the
README's Checkpoints paragraph).
What is never lost: a checkpoint is written only when the weights and optimizer
state are finite; pruning (``checkpoint.keep``) counts only checkpoints that
validate and never deletes the one just written; when checkpoints exist and none
validates, the run refuses to start (it would otherwise start over from step 0
and overwrite them); a failed save (a full disk) removes its partial folder and
says so.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import engine as engine_state
from ..config import Config, save_config
from ..errors import no_space
from .format import Checkpoint, CheckpointError, latest_valid_by_size, newest_valid, none_valid_error, prune, \
    step_dir, write_meta
from .state import TrainState



def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tokenizer_comment(cfg: Config, tokenizer_path: str | os.PathLike) -> dict[str, str]:
    """For a saved config.toml: where the tokenizer is when ``data.tokenizer`` is empty (the run
    trained one on its corpus). The field itself stays empty, so that a resume compares as before."""
    if cfg.data.tokenizer:
        return {}
    return {"data.tokenizer": f"empty: this run trained its tokenizer on the corpus, cached at {tokenizer_path}; "
                              "each checkpoint holds a copy as tokenizer.model"}


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _broadcast(world, value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    import torch.distributed as dist

    if world.size == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_resume(root: Path, world) -> Checkpoint | None:
    """The checkpoint to resume from, the same on every rank (rank 0 validates, checksums included).

    None when there is none; CheckpointError when there are checkpoints and none validates.
    """
    found = failures = None
    if world.is_main:
        found, failures = newest_valid(root)
        if found is not None and failures:
            for reason in failures:
                print(f"warning: skipping checkpoint: {reason}", file=sys.stderr, flush=True)
    found, failures = _broadcast(world, (found, failures))
    if found is None and failures:
        raise none_valid_error(root, failures)
    return found


class Checkpointer:
    """Saves and restores the whole training state of one rank of a run."""

    def __init__(self, cfg: Config, world, tokenizer_path: str | os.PathLike):
        self.cfg, self.world = cfg, world
        self.root = cfg.checkpoint_dir
        self.tokenizer_path = Path(tokenizer_path)

    # ------------------------------------------------------------------ save
    def save(self, engine, loader, state: TrainState) -> Path:
        """Write a checkpoint of ``state.step`` collectively (every rank calls it).

        Every phase ends with the ranks agreeing whether any failed, so a rank whose write
        failed (a full disk) does not leave the others waiting; the partial folder is then
        removed and the previous checkpoint stays the newest.
        """
        final = step_dir(self.root, state.step)
        tmp = self.root / f".{final.name}.partial"
        self._phase(tmp, self._prepare, tmp)
        self._phase(tmp, self._write_rank, engine, loader, tmp)
        self._phase(tmp, self._finish, state, tmp, final)
        return final

    def _prepare(self, tmp: Path) -> None:
        if self.world.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

    def _write_rank(self, engine, loader, tmp: Path) -> None:
        engine_state.save(engine, tmp)
        torch.save({"loader": loader.state_dict(), "rng": _rng_state()}, tmp / f"rank_{self.world.rank:05d}.pt")

    def _finish(self, state: TrainState, tmp: Path, final: Path) -> None:
        if not self.world.is_main:
            return
        save_config(self.cfg, tmp, tokenizer_comment(self.cfg, self.tokenizer_path))
        from ..data.tokenizer import tokenizer_files  # SentencePiece or Hugging Face files

        for src, name in tokenizer_files(self.tokenizer_path):
            shutil.copy2(src, tmp / name)
        # What DeepSpeed's own readers expect beside the tag folder: ``latest`` names it, so that
        # `python -m deepspeed.utils.zero_to_fp32 CHECKPOINT OUT` (and the zero_to_fp32.py copy
        # DeepSpeed leaves here) work on the folder as it is.
        (tmp / "latest").write_text("ds")
        w = self.world
        write_meta(tmp, **asdict(state), world_size=w.size, dp_size=w.dp_size, sp_size=w.sp_size,
                   cpu_threads=torch.get_num_threads() if w.device.type == "cpu" else None,
                   zero_stage=self.cfg.parallel.zero_stage, time=time.time())
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(self.root, final, keep=self.cfg.checkpoint.keep)

    def _phase(self, tmp: Path, fn, *args) -> None:
        """Run one phase of a save on every rank; if it failed on any, clean up and raise everywhere."""
        error: BaseException | None = None
        try:
            fn(*args)
        except Exception as exc:  # reach the agreement below, or the other ranks would hang
            error = exc
        if not self.world.any(error is not None):
            return
        full = error is not None and no_space(error, tmp)  # before the cleanup frees the space
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_valid_by_size(self.root)
        kept = f"the previous checkpoint {previous} is kept" if previous else "there is no earlier checkpoint"
        if full:
            raise CheckpointError(
                f"no space left on device while writing checkpoint {tmp} ({error}); removed what was "
                f"written, {kept}. Free space on the file system of {self.root} (df -h {self.root}) "
                f"and run again to resume") from None
        if error is not None:
            raise error
        raise CheckpointError(f"another rank failed writing checkpoint {tmp} (see its message); {kept}")

    # ------------------------------------------------------------------ load
    def resume(self, engine, loader, state: TrainState, found: Checkpoint | None = None) -> Path | None:
        """Load ``found`` (default: the newest valid checkpoint, :func:`find_resume`) into ``engine``,
        ``loader`` and ``state``; its folder, or None if there is none."""
        found = found or find_resume(self.root, self.world)
        if found is None:
            return None
        path, meta = found.path, found.meta
        w = self.world
        if meta["sp_size"] != w.sp_size:
            raise CheckpointError(
                f"{path} was written with {meta['sp_size']}-way sequence parallelism; this run has "
                f"parallel.sequence={w.sp_size}. Resume with the same parallel.sequence, or start a new run.dir")
        if meta["zero_stage"] != self.cfg.parallel.zero_stage:
            raise CheckpointError(f"{path} was written with ZeRO stage {meta['zero_stage']}, this run uses "
                                  f"parallel.zero_stage={self.cfg.parallel.zero_stage}; use the same stage")
        resplit = meta["world_size"] != w.size
        if resplit and not self.cfg.checkpoint.resplit:
            raise CheckpointError(
                f"{path} was written by {meta['world_size']} processes ({meta['dp_size']} data-parallel x "
                f"{meta['sp_size']} sequence-parallel); this run has {w.size} ({w.dp_size} x {w.sp_size}). "
                "To continue it on the new number of ranks, set checkpoint.resplit = true "
                "(--checkpoint.resplit=true): the checkpoint is converted to DeepSpeed's universal format "
                "and the data position re-split. Or resume with the same layout, or start a new run.dir")
        try:
            if resplit and meta["zero_stage"] != 0:
                load_path = engine_state.load_universal(engine, path, self.world)
            else:  # ZeRO 0 keeps the whole model and optimizer in one file: any number of ranks loads it
                load_path = engine_state.load(engine, path)
            # A re-split run has no file of its own: every old rank saved the same stream position;
            # the RNG of old rank r (or rank 0's) seeds new rank r (dropout/masking draws differ anyway).
            old_rank = w.rank if w.rank < meta["world_size"] else 0
            mine = torch.load(path / f"rank_{old_rank:05d}.pt", weights_only=False)
        except CheckpointError:
            raise
        except engine_state.EngineError as exc:  # the universal conversion failed: DeepSpeed's words
            raise CheckpointError(f"{path}: {exc}") from None
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
            # Its files are whole (sizes and CRC-32s match): written by another version, or a bug.
            raise CheckpointError(
                f"{path} is intact but does not load: {type(exc).__name__}: {str(exc)[:500]}. To resume from "
                f"the previous checkpoint instead, move it away (mv {path} {path.parent / ('bad-' + path.name)})"
            ) from exc
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / 'ds'}")
        from ..data.loader import ResplitNeeded

        try:  # the same ranks with another data.batch_size also re-split the stream
            loader.load_state_dict(mine["loader"], allow_resplit=self.cfg.checkpoint.resplit)
        except ResplitNeeded as exc:
            raise CheckpointError(f"{path}: {exc} (in fmtrain: set checkpoint.resplit = true, "
                                  "--checkpoint.resplit=true)") from None
        except ValueError as exc:  # another corpus, tokenizer or seq_len: re-splitting cannot help
            raise CheckpointError(f"{path}: {exc}; resume with the data.corpus, data.tokenizer, data.seq_len "
                                  "and train.seed of the checkpoint's config.toml, or start a new run.dir "
                                  "(model.init_from = this run starts it from these weights)") from None
        _set_rng_state(mine["rng"])
        state.step, state.tokens_seen = meta["step"], meta["tokens_seen"]
        return path



__all__ = ["Checkpointer", "find_resume", "tokenizer_comment"]
