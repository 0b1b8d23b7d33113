"""Checkpoints: save, find the newest valid one, load, read the model back alone.

A checkpoint is a folder ``<checkpoint dir>/step_NNNNNNNN/``:

    ds/                 DeepSpeed's engine state (model, optimizer, scheduler; ZeRO shards)
    rank_00000.pt ...   per rank: data position and every RNG
    config.toml         the resolved config of the run
    tokenizer.model     the tokenizer (and its settings, tokenizer.json, when present), or a
                        Hugging Face tokenizer's tokenizer.json and tokenizer_config.json
    meta.json           step, tokens seen, world layout, and the size of every file above

It is written as ``.step_NNNNNNNN.partial/``, flushed to disk, then renamed by
rank 0: a crash mid-save leaves only a ``.partial`` folder, which is never
loaded. ``meta.json`` is written last and lists every file with its size, so a
checkpoint damaged later (a truncated file) is detected and skipped for the
previous one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CONFIG_FILE, Config, save_config

_NAME = re.compile(r"^step_(\d{8})$")
META = "meta.json"
EXPORTED = "model.safetensors"  # the weights of a model-only export
UNIVERSAL = "universal"  # a re-split resume's conversion of ds/, beside it


class CheckpointError(RuntimeError):
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


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != META}


def validate(folder: Path) -> dict[str, Any]:
    """The checkpoint's metadata if every file it lists is there with its size; else CheckpointError."""
    meta_path = folder / META
    if not meta_path.is_file():
        raise CheckpointError(f"{folder}: no {META} (the save did not finish)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder}/{META} is unreadable: {exc}") from None
    for rel, size in meta.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder}: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{folder}: {rel} has {path.stat().st_size} bytes, {size} were written")
    return meta


def find_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first (complete or not: see :func:`latest_valid`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_valid(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint that validates; damaged ones are reported and skipped."""
    for path in reversed(find_checkpoints(root)):
        try:
            validate(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
    return None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a checkpoint, a checkpoints folder or a run folder (newest valid)."""
    path = Path(path)
    if (path / META).is_file():
        validate(path)
        return path
    for root in (path, path / "checkpoints"):
        found = latest_valid(root)
        if found:
            return found
    raise CheckpointError(f"no valid checkpoint at {path} (looked for {META} in it, in step_* folders "
                          f"under it and under {path / 'checkpoints'})")


class Checkpointer:
    """Saves and restores the whole training state of one rank of a run."""

    def __init__(self, cfg: Config, world, tokenizer_path: str | os.PathLike):
        self.cfg, self.world = cfg, world
        self.root = cfg.checkpoint_dir
        self.tokenizer_path = Path(tokenizer_path)

    # ------------------------------------------------------------------ save
    def save(self, engine, loader, state: TrainState) -> Path:
        """Write a checkpoint of ``state.step`` collectively (every rank calls it)."""
        w = self.world
        final = step_dir(self.root, state.step)
        tmp = self.root / f".{final.name}.partial"
        if w.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        w.barrier()
        engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        torch.save({"loader": loader.state_dict(), "rng": _rng_state()}, tmp / f"rank_{w.rank:05d}.pt")
        w.barrier()
        if w.is_main:
            save_config(self.cfg, tmp)
            from .data.tokenizer import tokenizer_files  # SentencePiece or Hugging Face files

            for src, name in tokenizer_files(self.tokenizer_path):
                shutil.copy2(src, tmp / name)
            for stray in tmp.glob("*.py"):  # DeepSpeed's zero_to_fp32 copies; not ours to ship
                stray.unlink()
            meta = dict(asdict(state), world_size=w.size, dp_size=w.dp_size, sp_size=w.sp_size,
                        zero_stage=self.cfg.parallel.zero_stage, time=time.time(), files=_file_sizes(tmp))
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(keep=self.cfg.checkpoint.keep)
        w.barrier()
        return final

    def _prune(self, keep: int) -> None:
        valid = [p for p in find_checkpoints(self.root) if (p / META).is_file()]
        for old in valid[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        newest = valid[-1].name if valid else ""
        for partial in self.root.glob(".step_*.partial"):  # left by crashed saves
            if partial.name[1:-len(".partial")] <= newest:
                shutil.rmtree(partial, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def resume(self, engine, loader, state: TrainState) -> Path | None:
        """Load the newest valid checkpoint into ``engine``, ``loader`` and ``state``; None if none."""
        path = latest_valid(self.root)
        if path is None:
            return None
        meta = validate(path)
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
        if resplit:
            load_path = self._load_universal(engine, path)
        else:
            load_path, _ = engine.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / 'ds'}")
        # A re-split run has no file of its own: every old rank saved the same stream position;
        # the RNG of old rank r (or rank 0's) seeds new rank r (dropout/masking draws differ anyway).
        old_rank = w.rank if w.rank < meta["world_size"] else 0
        mine = torch.load(path / f"rank_{old_rank:05d}.pt", weights_only=False)
        try:  # the same ranks with another data.batch_size also re-split the stream
            loader.load_state_dict(mine["loader"], allow_resplit=self.cfg.checkpoint.resplit)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}" + ("" if self.cfg.checkpoint.resplit or "init_from" in str(exc) else
                                  " (in fmtrain: set checkpoint.resplit = true, --checkpoint.resplit=true)")) from None
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


# ---------------------------------------------------------------------- the model alone
def load_config_of(ckpt: Path) -> Config:
    from .config import load_config

    return load_config(ckpt / CONFIG_FILE)


def load_model_state(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, on the CPU, in one process.

    ZeRO 3 shards the parameters over the ranks: DeepSpeed's own consolidation
    (``get_fp32_state_dict_from_zero_checkpoint``) gathers them. Other stages keep
    the whole module in ``mp_rank_00_model_states.pt``.
    """
    ckpt = resolve(ckpt)
    meta = validate(ckpt)
    if (ckpt / EXPORTED).is_file():  # a model-only export (see export())
        from safetensors.torch import load_file

        return load_file(ckpt / EXPORTED)
    ds = ckpt / "ds"
    if meta["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    else:
        sd = torch.load(ds / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def export(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the model alone: ``model.safetensors`` (fp32, consolidated from any ZeRO stage),
    ``config.toml``, the tokenizer and a ``meta.json``, a folder that ``fmtrain.eval`` and
    ``fmtrain.generate`` load on one process like a checkpoint."""
    from safetensors.torch import save_file

    ckpt = resolve(ckpt)
    meta = validate(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage, which safetensors refuses: store each tensor on its own.
    sd = {k: v.detach().clone().contiguous() for k, v in load_model_state(ckpt).items()}
    save_file(sd, out / EXPORTED, metadata={"step": str(meta["step"]), "source": str(ckpt)})
    for name in (CONFIG_FILE, "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, out / name)
    info = dict(step=meta["step"], tokens_seen=meta["tokens_seen"], source=str(ckpt), format="model-only",
                world_size=1, dp_size=1, sp_size=1, zero_stage=None, files=_file_sizes(out))
    (out / META).write_text(json.dumps(info, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m fmtrain.checkpoint",
                                 description="Checkpoint tools. export: the model alone (safetensors, "
                                             "config.toml, tokenizer) for fmtrain.eval / fmtrain.generate.")
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a model-only copy of a checkpoint")
    ex.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    ex.add_argument("out", help="the folder to write")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {resolve(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
