"""The checkpoint folder format: what a complete checkpoint holds, and how it is checked.

A checkpoint is a folder ``<checkpoint dir>/step_NNNNNNNN/`` (or a model-only export, the same
format without the training state); ``meta.json``, written last, lists every other file with its
size and CRC-32. :func:`resolve` finds the checkpoint a path names and validates it once,
returning a :class:`Checkpoint` that every consumer (eval, generate, the exports,
``model.init_from``) takes as it is.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CONFIG_FILE, REMOVED_FIELDS, Config, ConfigError, from_dict
from ..errors import UserError
from ..input_files import SNIFF_BYTES, found, impostor

_NAME = re.compile(r"^step_(\d{8})$")
META = "meta.json"
_REQUIRED_META = ("step", "tokens_seen", "world_size", "dp_size", "sp_size", "zero_stage", "files")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META]


def file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in _files(folder)}


def crc32(path: Path) -> str:
    """The file's CRC-32 as 8 hex digits (zlib's; it catches any flipped block)."""
    value, buf = 0, bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            value = zlib.crc32(view[:n], value)
    return f"{value:08x}"


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): crc32(p) for p in _files(folder)}


def write_meta(folder: Path, **info: Any) -> dict[str, Any]:
    """Write ``folder/meta.json``: ``info`` plus the size and CRC-32 of every other file in the
    folder (all of them are written by now: this is the last file, what makes the folder complete)."""
    meta = dict(info, files=file_sizes(folder), crc32=checksums(folder))
    tmp = folder / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / META)
    return meta


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
    if not isinstance(meta, dict):
        raise CheckpointError(f"{folder}/{META} is damaged: it holds {found(meta)}, not a mapping of fields "
                              "(not written by fmtrain as it is)")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{folder}/{META} lacks {', '.join(missing)} (not a complete fmtrain checkpoint)")
    problem = _meta_problem(meta)
    if problem is not None:
        raise CheckpointError(f"{folder}/{META} is damaged: {problem} (not written by fmtrain as it is)")
    for rel, size in meta["files"].items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder}: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(_what_it_is(folder, rel, f"has {path.stat().st_size} bytes, {size} were written"))
    if checksums:
        for rel, want in meta.get("crc32", {}).items():
            got = crc32(folder / rel)
            if got != want:
                raise CheckpointError(_what_it_is(folder, rel, f"is corrupt (CRC-32 {got}, {want} was written)"))
    return meta


_KINDS = {".safetensors": "weights", ".pt": "training state", ".model": "tokenizer", ".toml": "config"}


def _what_it_is(folder: Path, rel: str, problem: str) -> str:
    """``FOLDER: REL PROBLEM`` (a file that is not what was written), or, when the file is a Git LFS
    pointer or an HTML page (a copy made without git-lfs, a failed download), that with the fix."""
    path = folder / rel
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError:
        head = b""
    instead = impostor(head, path, _KINDS.get(path.suffix, "file fmtrain wrote"))
    return f"{folder}: {rel} {problem}" if instead is None else f"{instead} ({rel} {problem})"


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


_CRC = re.compile(r"^[0-9a-f]{8}$")
# The fields of meta.json that validate() and the consumers read: (name, check, what is expected).
_META_FIELDS = (("step", lambda v: _whole(v, 0), "a whole number >= 0"),
                ("tokens_seen", lambda v: _whole(v, 0), "a whole number >= 0"),
                ("world_size", lambda v: _whole(v, 1), "a whole number >= 1"),
                ("dp_size", lambda v: _whole(v, 1), "a whole number >= 1"),
                ("sp_size", lambda v: _whole(v, 1), "a whole number >= 1"),
                ("zero_stage", lambda v: v is None or (_whole(v, 0) and v <= 3), "0 to 3, or null"),
                ("cpu_threads", lambda v: v is None or _whole(v, 1), "a whole number >= 1, or null"))


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a ``meta.json`` (valid JSON of the wrong shape: a field of
    the wrong type, a file named outside the folder), or None."""
    for name, ok, expected in _META_FIELDS:
        if name in meta and not ok(meta[name]):
            return f"{name} must be {expected}, found {found(meta[name])}"
    for name, ok, expected in (("files", lambda v: _whole(v, 0), "its size in bytes (a whole number >= 0)"),
                               ("crc32", lambda v: isinstance(v, str) and _CRC.match(v), "8 hex digits")):
        listed = meta.get(name, {})
        if not isinstance(listed, dict):
            return f"{name} must be a mapping of file names to {expected}, found {found(listed)}"
        for rel, value in listed.items():
            parts = Path(rel).parts
            if not rel or Path(rel).is_absolute() or ".." in parts or rel == META:
                return f"{name} names {rel!r}, not a file inside the checkpoint"
            if not ok(value):
                return f"{name}[{rel!r}] must be {expected}, found {found(value)}"
            if name == "crc32" and rel not in meta["files"]:
                return f"crc32 names {rel!r}, which files does not list"
    return None


def find_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (complete or not: see :func:`latest_valid`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_valid(root: str | os.PathLike, checksums: bool = True) -> tuple[Checkpoint | None, list[str]]:
    """(the newest checkpoint that validates, as a :class:`Checkpoint`, or None; why each newer one did not)."""
    failures = []
    for path in reversed(find_checkpoints(root)):
        try:
            return Checkpoint(path, validate(path, checksums)), failures
        except CheckpointError as exc:
            failures.append(str(exc))
    return None, failures


def scan(root: str | os.PathLike, checksums: bool = True) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint folder that validates or None, why each newer one did not)."""
    found, failures = newest_valid(root, checksums)
    return (found.path if found else None), failures


def latest_valid(root: str | os.PathLike, checksums: bool = True) -> Path | None:
    """The newest checkpoint that validates; damaged ones are reported and skipped."""
    path, failures = scan(root, checksums)
    for reason in failures:
        warnings.warn(f"skipping checkpoint: {reason}", stacklevel=2)
    return path


def valid_by_size(path: Path) -> bool:
    try:
        validate(path, checksums=False)
        return True
    except CheckpointError:
        return False


def latest_valid_by_size(root: Path) -> Path | None:
    """The newest checkpoint whose files all have their recorded sizes (cheap: no reading)."""
    return next((p for p in reversed(find_checkpoints(root)) if valid_by_size(p)), None)


def prune(root: Path, newest: Path, keep: int) -> None:
    """Delete old checkpoints beyond ``keep``, counting only those that validate (by size).

    The checkpoint just written (``newest``) is always kept; checkpoints of later steps
    (left by an earlier attempt that resumed from before them, because they were damaged)
    are not touched, so nothing newer than what is known good is lost.
    """
    older = [p for p in find_checkpoints(root) if p.name < newest.name]
    valid = [p for p in older if valid_by_size(p)]
    for old in valid[:max(0, len(valid) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob(".step_*.partial"):  # left by crashed saves
        if partial.name[1:-len(".partial")] <= newest.name:
            shutil.rmtree(partial, ignore_errors=True)


def none_valid_error(root: Path, failures: list[str]) -> CheckpointError:
    """Every checkpoint under ``root`` is damaged: refuse rather than start over and overwrite them."""
    listed = "\n".join(f"  - {reason}" for reason in failures)
    return CheckpointError(
        f"{root} holds {len(failures)} checkpoint(s) and none can be loaded:\n{listed}\n"
        f"Nothing was changed. To start the run over from step 0 on purpose, move or delete {root} "
        f"(e.g. mv {root} {root}.damaged), or use another run.dir")


# ---------------------------------------------------------------- the value consumers take
def read_config(folder: Path) -> Config:
    """The config a checkpoint was written with. Fields removed since (config/schema.py's
    ``REMOVED_FIELDS``) are dropped: an old checkpoint still resumes, evaluates and exports."""
    from ..config.loading import tomllib

    path = folder / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the config of the checkpoint {path}: {exc}") from None
    for name in REMOVED_FIELDS:
        sec, key = name.split(".")
        data.get(sec, {}).pop(key, None)
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"the config of the checkpoint {path} does not load here: {exc}") from None


@dataclass
class Checkpoint:
    """A checkpoint folder that validated (sizes and CRC-32s), with its metadata; its config is
    read on first use. What :func:`resolve` returns and every consumer takes, so that a command
    reads and checks a checkpoint's files once."""

    path: Path
    meta: dict[str, Any]
    _config: Config | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = read_config(self.path)
        return self._config

    def __fspath__(self) -> str:  # a Checkpoint goes wherever a path does
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)


def resolve(path: str | os.PathLike | Checkpoint) -> Checkpoint:
    """The checkpoint ``path`` names, validated: a checkpoint folder (or a model-only export), a
    checkpoints folder or a run folder (their newest valid one). A :class:`Checkpoint` is returned
    as it is (validated already)."""
    if isinstance(path, Checkpoint):
        return path
    path = Path(path)
    if (path / META).is_file():
        return Checkpoint(path, validate(path))
    failures: list[str] = []
    for root in (path, path / "checkpoints"):
        found, failed = newest_valid(root)
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


__all__ = ["META", "CheckpointError", "Checkpoint", "resolve", "read_config", "validate", "write_meta", "crc32",
           "checksums", "file_sizes", "find_checkpoints", "newest_valid", "scan", "latest_valid", "latest_valid_by_size",
           "valid_by_size", "none_valid_error", "step_dir", "prune"]
