"""The model alone, outside the training state: read a checkpoint's model back (any ZeRO
stage, or a model-only export) and write a model-only export.

    model, cfg = load_trained("runs/tiny-gpt")        # newest valid checkpoint, fp32, CPU, eval mode
    python -m fmtrain.export runs/tiny-gpt OUT       # model.safetensors, config.toml, tokenizer

What ``fmtrain.eval``, ``fmtrain.generate``, ``model.init_from`` and the Hugging Face
export (:mod:`fmtrain.hf`) load. An export is a folder like a checkpoint (a
``meta.json`` with sizes and CRC-32s), which :func:`fmtrain.checkpoint.resolve` and
``validate`` accept.

Both exports (this one and :mod:`fmtrain.hf`) write into ``.OUT.partial-HOST-PID`` beside
OUT and move the files into OUT once all are written (:func:`write_folder`): a failure (a full
disk, a read-only file system) leaves nothing behind, and a folder that a killed export left is
removed by the next export into the same parent folder, to OUT or any other name.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import META, Checkpoint, resolve, write_meta
from .config import CONFIG_FILE, Config
from .data.tokenizer import SETTINGS_IN_CHECKPOINT
from .engine import consolidated_weights
from .errors import UserError, write_problem
from .leftovers import remove_stale, temp_name

EXPORTED = "model.safetensors"  # the weights of a model-only export
TOKENIZER_FILES = ("tokenizer.model", SETTINGS_IN_CHECKPOINT, "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
EXPORT_FILES = (EXPORTED, CONFIG_FILE, *TOKENIZER_FILES, META)  # every file a model-only export may write


class ExportError(UserError, RuntimeError):
    """An export that cannot be done or written; the message says why and what to do."""


def load_config_of(ckpt: str | os.PathLike | Checkpoint) -> Config:
    """The config a checkpoint (or a run's newest, or a model-only export) was written with."""
    return resolve(ckpt).config


def load_trained(ckpt: str | os.PathLike | Checkpoint):
    """The model of a checkpoint, a run (its newest) or a model-only export, with its weights
    (fp32, on the CPU, in eval mode), and the config it was trained with: ``(model, config)``.
    What ``fmtrain.eval`` and ``fmtrain.generate`` run."""
    from .model import build_model

    ckpt = resolve(ckpt)
    model = build_model(ckpt.config.model, position_reset=ckpt.config.data.position_reset)
    model.load_state_dict(load_model_state(ckpt))
    return model.eval(), ckpt.config


def load_model_state(ckpt: str | os.PathLike | Checkpoint) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint, on the CPU, in one process.

    ZeRO 3 shards the parameters over the ranks: DeepSpeed's own consolidation
    (``get_fp32_state_dict_from_zero_checkpoint``) gathers them. Other stages keep
    the whole module in ``mp_rank_00_model_states.pt``.
    """
    ckpt = resolve(ckpt)
    meta = ckpt.meta
    if (ckpt / EXPORTED).is_file():  # a model-only export (see export())
        from safetensors.torch import load_file

        from .input_files import safetensors_header

        safetensors_header(ckpt / EXPORTED)  # a Git LFS pointer or an HTML page is named as such
        return load_file(ckpt / EXPORTED)
    return consolidated_weights(ckpt.path, meta["zero_stage"])


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export(ckpt: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the model alone: ``model.safetensors`` (fp32, consolidated from any ZeRO stage),
    ``config.toml``, the tokenizer and a ``meta.json``, a folder that ``fmtrain.eval`` and
    ``fmtrain.generate`` load on one process like a checkpoint.

    ``out`` is new or empty; with ``force`` it may hold other files: the export's own names are
    replaced (and an earlier export's files this one does not write are removed), the rest is kept
    and not listed in ``meta.json``.
    """
    from safetensors.torch import save_file

    ckpt = resolve(ckpt)
    meta = ckpt.meta
    out = Path(out)
    previous = check_target(out, EXPORT_FILES, force=force, source=ckpt.path)
    # Tied weights share storage, which safetensors refuses: store each tensor on its own.
    sd = {k: v.detach().clone().contiguous() for k, v in load_model_state(ckpt).items()}

    def write(tmp: Path, name: Callable[[str], Path]) -> None:
        save_file(sd, name(EXPORTED), metadata={"step": str(meta["step"]), "source": str(ckpt)})
        os.chmod(tmp / EXPORTED, 0o666 & ~current_umask())  # safetensors creates it 0600; the rest is 0644
        for file in (CONFIG_FILE, *TOKENIZER_FILES):
            if (ckpt / file).is_file():
                shutil.copy2(ckpt / file, name(file))
        name(META)  # what a failure names
        write_meta(tmp, step=meta["step"], tokens_seen=meta["tokens_seen"], source=str(ckpt), format="model-only",
                   world_size=1, dp_size=1, sp_size=1, zero_stage=None)

    # An earlier export's files that this one does not write would be taken for part of it.
    return write_folder(out, write, last=META, remove=previous)


def check_target(out: Path, owned: tuple[str, ...], *, force: bool | None = None,
                 source: Path | None = None) -> list[str]:
    """Refuse an OUT that is not a folder, that holds files (unless ``force``; None: no --force to
    offer), or that overlaps the checkpoint ``source``; returns the names among ``owned`` that an
    earlier export listed in its ``meta.json`` there (to be replaced or removed)."""
    if source is not None:
        o, c = out.resolve(), source.resolve()
        if o == c or o in c.parents or c in o.parents:
            where = "is" if o == c else "holds" if o in c.parents else "is inside"
            raise ExportError(f"{out} {where} the checkpoint {source}; export to a folder outside it")
    if not (out.exists() or out.is_symlink()):
        return []
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; give a new or empty folder as OUT")
    present = sorted(p.name for p in out.iterdir())
    if present and not force:
        replaced = [n for n in present if n in owned]
        kept = [n for n in present if n not in owned]
        if force is None:
            raise ExportError(f"{out} exists and is not empty ({_some(present)}); give a new or empty folder")
        effect = "; ".join(part for part in (f"replaces {_some(replaced)}" if replaced else "",
                                             f"keeps {_some(kept)}" if kept else "") if part)
        raise ExportError(f"{out} exists and is not empty ({_some(present)}); give a new or empty folder, "
                          f"or --force to write the export into it (it {effect})")
    try:
        listed = json.loads((out / META).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in owned if n in listed] if isinstance(listed, dict) else []  # damaged: lists nothing


def _some(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


_PARTIAL = re.compile(r"\..+\.partial-(?P<owner>.+)")  # .NAME.partial-HOST-PID (leftovers.temp_name)


def write_folder(out: Path, write: Callable[[Path, Callable[[str], Path]], None], *, last: str,
                 remove: list[str] | tuple[str, ...] = ()) -> Path:
    """Run ``write(tmp, name)`` in ``.OUT.partial-HOST-PID`` beside ``out`` (``name(file)``: the
    path to write ``file`` at, which a failure message names as ``out/file``), then move it in.

    ``out`` absent: the folder is renamed (it appears complete or not at all). ``out`` a folder:
    the files are moved into it one by one, ``last`` last after its old copy (and the names in
    ``remove``) went first, so a folder caught half-way reads as unfinished. A failure removes the
    partial folder, the folders made for it and the files moved in; the user's files stay as they were.
    """
    given, out = out, Path(os.path.abspath(out))  # "." and ".." have a name and a parent too
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # innermost first
    # A killed export's partial folder beside OUT, whatever it was to be called (an export to b
    # killed, then one to c): removed when its owner is dead, else said where it is.
    remove_stale(out.parent, _PARTIAL, "an export")
    if out.is_dir():  # files being copied into a mount point (see _move)
        remove_stale(out, _PARTIAL, "an export", warn=False)
    tmp = out.parent / temp_name(f".{out.name}.partial-")
    writing, placed = [out], []

    def name(file: str) -> Path:
        writing[0] = out / file
        return tmp / file

    try:
        shutil.rmtree(tmp, ignore_errors=True)  # this host's, of this PID: a dead process's whose PID came back
        tmp.mkdir(parents=True)
        write(tmp, name)
        writing[0] = out
        if not out.exists():
            os.rename(tmp, out)
            return given
        files = sorted((p.name for p in tmp.iterdir()), key=lambda n: n == last)
        for old in (last, *remove):
            writing[0] = out / old
            if old not in files[:-1]:  # those are replaced in one step below
                (out / old).unlink(missing_ok=True)
        for file in files:
            writing[0] = out / file
            _move(tmp / file, out / file)
            placed.append(out / file)
        tmp.rmdir()
        return given
    except BaseException as exc:
        # Look at the disk before cleaning up frees it.
        problem = write_problem(exc, writing[0], out, where=tmp) if isinstance(exc, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        for path in placed:
            path.unlink(missing_ok=True)
        for folder in made:  # only while empty: never what another process put there meanwhile
            try:
                folder.rmdir()
            except OSError:
                break
        if problem is None:
            raise
        raise ExportError(problem) from None


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # OUT is a mount point: its files cannot be renamed in from beside it. Copied under a
        # temporary name, so that a failed copy leaves the file it replaces as it was.
        part = dst.with_name(temp_name(f".{dst.name}.partial-"))
        try:
            shutil.copy2(src, part)
            os.replace(part, dst)
        except BaseException:
            try:
                part.unlink(missing_ok=True)
            except OSError:
                pass
            raise


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fmtrain.export",
                                 description="Write the model alone (safetensors, config.toml, tokenizer) "
                                             "for fmtrain.eval / fmtrain.generate; for Hugging Face, "
                                             "python -m fmtrain.hf export.")
    ap.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    ap.add_argument("out", help="the folder to write (new or empty)")
    ap.add_argument("--force", action="store_true",
                    help="write into a folder that holds files: the export's own (config.toml, model.safetensors, "
                         "tokenizer files, meta.json) are replaced, the others kept")
    args = ap.parse_args(argv)
    ckpt = resolve(args.checkpoint)
    out = export(ckpt, args.out, force=args.force)
    print(f"exported {ckpt} to {out}")
    return 0


if __name__ == "__main__":
    from .errors import run_command  # one error: line (exit 2); Ctrl-C: exit 130, the partial folder removed

    raise SystemExit(run_command(main))
