"""The model alone, outside the training state: read a checkpoint's model back (any ZeRO
stage, or a model-only export) and write a model-only export.

    model, cfg = load_model("runs/tiny-gpt")        # newest valid checkpoint, fp32, CPU, eval mode
    python -m fmtrain.export runs/tiny-gpt OUT       # model.safetensors, config.toml, tokenizer

What ``fmtrain.eval``, ``fmtrain.generate``, ``model.init_from`` and the Hugging Face
export (:mod:`fmtrain.hf`) load. An export is a folder like a checkpoint (a
``meta.json`` with sizes and CRC-32s), which :func:`fmtrain.checkpoint.resolve` and
``validate`` accept.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from .checkpoint import META, CheckpointError, _checksums, _file_sizes, resolve, validate
from .config import CONFIG_FILE, Config
from .data.tokenizer import SETTINGS_IN_CHECKPOINT

EXPORTED = "model.safetensors"  # the weights of a model-only export


def load_config_of(ckpt: Path) -> Config:
    from .config import load_config

    return load_config(ckpt / CONFIG_FILE)


def load_model(ckpt: str | os.PathLike):
    """The model of a checkpoint, a run (its newest) or a model-only export, with its weights
    (fp32, on the CPU, in eval mode), and the config it was trained with: ``(model, config)``.
    What ``fmtrain.eval`` and ``fmtrain.generate`` run."""
    from .model import build_model

    ckpt = resolve(ckpt)
    cfg = load_config_of(ckpt)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(ckpt))
    return model.eval(), cfg


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


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it: set it back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    os.chmod(out / EXPORTED, 0o666 & ~current_umask())  # safetensors creates it 0600; the rest of the export is 0644
    for name in (CONFIG_FILE, "tokenizer.model", SETTINGS_IN_CHECKPOINT, "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        if (ckpt / name).is_file():
            shutil.copy2(ckpt / name, out / name)
    info = dict(step=meta["step"], tokens_seen=meta["tokens_seen"], source=str(ckpt), format="model-only",
                world_size=1, dp_size=1, sp_size=1, zero_stage=None, files=_file_sizes(out),
                crc32=_checksums(out))
    (out / META).write_text(json.dumps(info, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fmtrain.export",
                                 description="Write the model alone (safetensors, config.toml, tokenizer) "
                                             "for fmtrain.eval / fmtrain.generate; for Hugging Face, "
                                             "python -m fmtrain.hf export.")
    ap.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    ap.add_argument("out", help="the folder to write")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except OSError as exc:  # the output folder cannot be written (a full disk, no permission)
        raise CheckpointError(f"cannot write the export to {args.out}: {exc}") from None
    print(f"exported {resolve(args.checkpoint)} to {out}")
    return 0


if __name__ == "__main__":
    from .errors import run_main

    raise SystemExit(run_main(main))
