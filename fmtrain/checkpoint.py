"""Checkpoints: save, find the newest valid one, load (the model alone: :mod:`fmtrain.export`).

A checkpoint is a folder ``<checkpoint dir>/step_NNNNNNNN/``:

    ds/                 DeepSpeed's engine state (model, optimizer, scheduler; ZeRO shards)
    rank_00000.pt ...   per rank: data position and every RNG
    config.toml         the resolved config of the run
    tokenizer.model     the SentencePiece tokenizer (and its training settings,
                        sentencepiece_settings.json, when present), or a Hugging Face
                        tokenizer's tokenizer.json and tokenizer_config.json
    meta.json           step, tokens seen, world layout, and the size and CRC-32 of every file above

It is written as ``.step_NNNNNNNN.partial/``, flushed to disk, then renamed by
rank 0: a crash mid-save leaves only a ``.partial`` folder, which is never
loaded. ``meta.json`` is written last and lists every file with its size and
CRC-32, so a checkpoint damaged later (a truncated file, a flipped block) is
detected on resume and skipped for the previous one. CRC-32 (zlib) hashes 2-3 GB/s
on one core of the 2-core development VM (sha256 1.4, blake2b 0.9): a 125M-parameter
fp32 model with its AdamW state (1.5 GB) costs 0.5-0.8 s on save (the files are in the
page cache) and on resume; from a cold cache the disk read dominates (3 s at 0.5 GB/s
there), and the resume's load then reads the files from the page cache.

What is never lost: a checkpoint is written only when the weights and optimizer
state are finite; pruning (``checkpoint.keep``) counts only checkpoints that
validate and never deletes the one just written; when checkpoints exist and none
validates, the run refuses to start (it would otherwise start over from step 0
and overwrite them); a failed save (a full disk) removes its partial folder and
says so.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import zlib
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, save_config
from .errors import UserError, no_space

_NAME = re.compile(r"^step_(\d{8})$")
META = "meta.json"
UNIVERSAL = "universal"  # a re-split resume's conversion of ds/, beside it


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class TrainState:
    """Progress that is not in the engine: counted in optimizer steps and tokens."""

    step: int = 0
    tokens_seen: int = 0


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


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


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META]


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in _files(folder)}


def crc32(path: Path) -> str:
    """The file's CRC-32 as 8 hex digits (zlib: about 3 GB/s; it catches any flipped block)."""
    value, buf = 0, bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            value = zlib.crc32(view[:n], value)
    return f"{value:08x}"


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): crc32(p) for p in _files(folder)}


_REQUIRED_META = ("step", "tokens_seen", "world_size", "dp_size", "sp_size", "zero_stage", "files")


def validate(folder: Path, checksums: bool = True) -> dict[str, Any]:
    """The checkpoint's metadata if every file it lists is there with its size (and, with
    ``checksums``, its CRC-32); else CheckpointError saying which file is wrong.

    Checkpoints written before checksums were recorded are checked by size only.
    """
    meta_path = folder / META
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: no {META} (the save did not finish)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{folder}/{META} is unreadable: {exc}") from None
    missing = [k for k in _REQUIRED_META if k not in meta] if isinstance(meta, dict) else list(_REQUIRED_META)
    if missing:
        raise CheckpointError(f"{folder}/{META} lacks {', '.join(missing)} (not a complete fmtrain checkpoint)")
    for rel, size in meta["files"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder}: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{folder}: {rel} has {path.stat().st_size} bytes, {size} were written")
    if checksums:
        for rel, want in meta.get("crc32", {}).items():
            got = crc32(folder / rel)
            if got != want:
                raise CheckpointError(f"{folder}: {rel} is corrupt (CRC-32 {got}, {want} was written)")
    return meta


def find_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (complete or not: see :func:`latest_valid`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def scan(root: str | os.PathLike, checksums: bool = True) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint that validates or None, why each newer one did not)."""
    failures = []
    for path in reversed(find_checkpoints(root)):
        try:
            validate(path, checksums)
            return path, failures
        except CheckpointError as exc:
            failures.append(str(exc))
    return None, failures


def latest_valid(root: str | os.PathLike, checksums: bool = True) -> Path | None:
    """The newest checkpoint that validates; damaged ones are reported and skipped."""
    path, failures = scan(root, checksums)
    for reason in failures:
        warnings.warn(f"skipping checkpoint: {reason}", stacklevel=2)
    return path


def _valid_by_size(path: Path) -> bool:
    try:
        validate(path, checksums=False)
        return True
    except CheckpointError:
        return False


def latest_valid_by_size(root: Path) -> Path | None:
    """The newest checkpoint whose files all have their recorded sizes (cheap: no reading)."""
    return next((p for p in reversed(find_checkpoints(root)) if _valid_by_size(p)), None)


def none_valid_error(root: Path, failures: list[str]) -> CheckpointError:
    """Every checkpoint under ``root`` is damaged: refuse rather than start over and overwrite them."""
    listed = "\n".join(f"  - {reason}" for reason in failures)
    return CheckpointError(
        f"{root} holds {len(failures)} checkpoint(s) and none can be loaded:\n{listed}\n"
        f"Nothing was changed. To start the run over from step 0 on purpose, move or delete {root} "
        f"(e.g. mv {root} {root}.damaged), or use another run.dir")


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint, a checkpoints folder or a run folder (newest valid)."""
    path = Path(path)
    if (path / META).is_file():
        validate(path)
        return path
    failures: list[str] = []
    for root in (path, path / "checkpoints"):
        found, failed = scan(root)
        if found:
            for reason in failed:
                warnings.warn(f"skipping checkpoint: {reason}", stacklevel=2)
            return found
        failures += failed
    if failures:
        listed = "\n".join(f"  - {reason}" for reason in failures)
        raise CheckpointError(f"no checkpoint at {path} can be loaded:\n{listed}")
    raise CheckpointError(f"no valid checkpoint at {path} (looked for {META} in it, in step_* folders "
                          f"under it and under {path / 'checkpoints'})")


def _broadcast(world, value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    import torch.distributed as dist

    if world.size == 1 or not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_resume(root: Path, world) -> Path | None:
    """The checkpoint to resume from, the same on every rank (rank 0 validates, checksums included).

    None when there is none; CheckpointError when there are checkpoints and none validates.
    """
    found = failures = None
    if world.is_main:
        found, failures = scan(root)
        if found is not None and failures:
            for reason in failures:
                print(f"warning: skipping checkpoint: {reason}", file=sys.stderr, flush=True)
    found, failures = _broadcast(world, (found, failures))
    if found is None and failures:
        raise none_valid_error(root, failures)
    return found


def _inner_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def all_finite(engine, world) -> bool:
    """Whether every weight and optimizer-state tensor is finite on every rank (collective).

    The optimizer's parameters are what is saved: the fp32 master copies (or their ZeRO
    partitions) where there are any, else the module's parameters.
    """
    ok = True
    opt = _inner_optimizer(engine)
    tensors = [p for g in opt.param_groups for p in g["params"]]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for t in tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            ok = False
            break
    return not world.any(not ok)


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
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        torch.save({"loader": loader.state_dict(), "rng": _rng_state()}, tmp / f"rank_{self.world.rank:05d}.pt")

    def _finish(self, state: TrainState, tmp: Path, final: Path) -> None:
        if not self.world.is_main:
            return
        save_config(self.cfg, tmp)
        from .data.tokenizer import tokenizer_files  # SentencePiece or Hugging Face files

        for src, name in tokenizer_files(self.tokenizer_path):
            shutil.copy2(src, tmp / name)
        # What DeepSpeed's own readers expect beside the tag folder: ``latest`` names it, so that
        # `python -m deepspeed.utils.zero_to_fp32 CHECKPOINT OUT` (and the zero_to_fp32.py copy
        # DeepSpeed leaves here) work on the folder as it is.
        (tmp / "latest").write_text("ds")
        w = self.world
        meta = dict(asdict(state), world_size=w.size, dp_size=w.dp_size, sp_size=w.sp_size,
                    cpu_threads=torch.get_num_threads() if w.device.type == "cpu" else None,
                    zero_stage=self.cfg.parallel.zero_stage, time=time.time(), files=_file_sizes(tmp),
                    crc32=_checksums(tmp))
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune(final, keep=self.cfg.checkpoint.keep)

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

    def _prune(self, newest: Path, keep: int) -> None:
        """Delete old checkpoints beyond ``keep``, counting only those that validate (by size).

        The checkpoint just written (``newest``) is always kept; checkpoints of later steps
        (left by an earlier attempt that resumed from before them, because they were damaged)
        are not touched, so nothing newer than what is known good is lost.
        """
        older = [p for p in find_checkpoints(self.root) if p.name < newest.name]
        valid = [p for p in older if _valid_by_size(p)]
        for old in valid[:max(0, len(valid) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.root.glob(".step_*.partial"):  # left by crashed saves
            if partial.name[1:-len(".partial")] <= newest.name:
                shutil.rmtree(partial, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def resume(self, engine, loader, state: TrainState, path: Path | None = None) -> Path | None:
        """Load ``path`` (default: the newest valid checkpoint) into ``engine``, ``loader`` and
        ``state``; None if there is none."""
        path = path or find_resume(self.root, self.world)
        if path is None:
            return None
        meta = validate(path, checksums=False)  # rank 0 checked the checksums (find_resume)
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
                load_path = self._load_universal(engine, path)
            else:  # ZeRO 0 keeps the whole model and optimizer in one file: any number of ranks loads it
                load_path, _ = engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
            # A re-split run has no file of its own: every old rank saved the same stream position;
            # the RNG of old rank r (or rank 0's) seeds new rank r (dropout/masking draws differ anyway).
            old_rank = w.rank if w.rank < meta["world_size"] else 0
            mine = torch.load(path / f"rank_{old_rank:05d}.pt", weights_only=False)
        except CheckpointError:
            raise
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
            # Its files are whole (sizes and CRC-32s match): written by another version, or a bug.
            raise CheckpointError(
                f"{path} is intact but does not load: {type(exc).__name__}: {str(exc)[:500]}. To resume from "
                f"the previous checkpoint instead, move it away (mv {path} {path.parent / ('bad-' + path.name)})"
            ) from exc
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / 'ds'}")
        from .data.loader import ResplitNeeded

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

    def _load_universal(self, engine, path: Path):
        """Load ``path`` on a different number of ranks through DeepSpeed's universal checkpoint.

        ``ds_to_universal`` merges the ZeRO shards into one file per parameter (fp32 weights and
        Adam moments), which any number of ranks can partition anew. Rank 0 converts once, into
        ``universal/`` beside ``ds/`` (written under a temporary name, then renamed, so a crash
        mid-conversion is redone); the others wait at the barrier.
        """
        import subprocess
        import sys

        out = path / UNIVERSAL
        if self.world.is_main and not out.is_dir():
            tmp = path / f".{UNIVERSAL}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(path / "ds"), "--output_folder", str(tmp), "--inject_missing_state",
                   "--num_extract_workers", "1", "--num_merge_workers", "1"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise CheckpointError(f"converting {path / 'ds'} to a universal checkpoint failed:\n"
                                      f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            os.replace(tmp, out)
        self.world.barrier()
        # DeepSpeed 0.19's ZeRO 3 universal load copies the first parameter group's settings onto
        # every group (our no-decay group would get weight decay): keep what differs between groups.
        groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
        differing = {k for g in groups for k in g if k != "params" and any(g.get(k) != h.get(k) for h in groups)}
        own = [{k: g[k] for k in differing if k in g} for g in groups]
        # The engine reads this setting when loading (not only at initialize): switch it for this load.
        engine._config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(str(path), tag=UNIVERSAL, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            engine._config.load_universal_checkpoint = False  # later saves are ordinary ones
        for g, settings in zip(groups, own):
            g.update(settings)
        # ... and gives every group's Adam state one shared `step` tensor, which torch's AdamW then
        # increments once per group per step (wrong bias correction): give each its own.
        for st in getattr(engine.optimizer, "optimizer", engine.optimizer).state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
        return load_path


if __name__ == "__main__":  # the export command lived here once: say where it went
    import sys

    print("error: python -m fmtrain.checkpoint is not a command (its export moved): the model alone is "
          "python -m fmtrain.export RUN OUT, a Hugging Face folder python -m fmtrain.hf export RUN OUT",
          file=sys.stderr)
    sys.exit(2)
