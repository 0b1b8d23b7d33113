"""Start a run from pretrained weights: ``model.init_from = "PATH"``.

PATH is either

- a Hugging Face folder: ``config.json`` whose ``architectures`` is one of
  :data:`~fmtrain.hf.names.HF_ARCHITECTURES` (Llama, Mistral, Qwen2-style decoders), the weights as
  ``model.safetensors`` or shards with their ``model.safetensors.index.json``, and
  the tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``), read by
  :mod:`fmtrain.hf.importing` and mapped by :mod:`fmtrain.hf.names`; or
- an fmtrain checkpoint, checkpoints folder, run folder (its newest valid
  checkpoint) or model-only export (``python -m fmtrain.export``).

Only the weights are taken: the optimizer, the schedule and the data position
start fresh, so a model continues on new data or at a new length in a new
``run.dir``. A run that already has a checkpoint of its own resumes it and does
not read PATH again (resume stays bitwise).

Three steps, each at the point of the run where it belongs:

    resolve_config(cfg)       when the run starts: the architecture fields of [model]
                              (:data:`~fmtrain.hf.names.ARCH_FIELDS`) and data.tokenizer from PATH;
                              an explicit value that contradicts PATH is an error
    init = prepare(cfg)       at the start of training, before anything is written:
                              every tensor is there, with its shape; None when resuming
    init.load(model)          copies the weights into the freshly built model

The attention (``model.attention`` and the multipole fields) is the user's choice.
Learned summaries (``m2m``, ``conv``) are not in a Hugging Face model: they keep
their initialisation, which is the mean (so the converted model starts as the
mean-summary model). Nothing here needs ``transformers``: config.json and the
safetensors headers are read directly.

    model = load_model("Llama-3.2-1B", attention="fma")     # the same, in Python: a converted model
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, ModelConfig, check_config, format_errors
from .errors import UserError
from .hf.importing import check_hf_weights, is_hf_folder, load_hf_state, read_hf_config
from .hf.names import ARCH_FIELDS, CONFIG_NAMES, OVERRIDABLE, fmtrain_model_fields, hf_model_fields
from .input_files import InputFileError


# --------------------------------------------------------------------------- sources
def _fmtrain_source(cfg: Config):
    """The validated :class:`~fmtrain.checkpoint.Checkpoint` of an fmtrain ``model.init_from``
    (a checkpoint, run or model-only export), resolved once per config: kept on ``cfg``, so that
    filling the config, :func:`prepare` and :func:`load_model` hash the source's files once."""
    from .checkpoint import CheckpointError, resolve

    src = cfg.model.init_from
    kept = getattr(cfg, "_init_checkpoint", None)
    if kept is not None and kept[0] == src:
        return kept[1]
    try:
        ckpt = resolve(Path(src))
        ckpt.config  # read now: a checkpoint whose config does not load is no source
    except (CheckpointError, ConfigError) as exc:
        raise ConfigError(f"model.init_from={str(Path(src))!r} is neither a Hugging Face folder (no config.json) "
                          f"nor a usable fmtrain checkpoint: {exc}") from None
    cfg._init_checkpoint = (src, ckpt)
    return ckpt


def _tokenizer_of(folder: Path) -> str | None:
    """``folder`` if it holds a tokenizer, else None; InputFileError when its tokenizer.json is damaged."""
    from .data.hf_tokenizer import hf_tokenizer_spec

    if hf_tokenizer_spec(folder / "tokenizer.json") is not None or (folder / "tokenizer.model").is_file():
        return str(folder)
    return None


# --------------------------------------------------------------------------- config
def resolve_config(cfg: Config) -> Config:
    """``cfg`` with [model]'s architecture fields and data.tokenizer filled from ``model.init_from``,
    validated again; ConfigError naming every problem. A config without init_from is returned as is."""
    if not cfg.model.init_from:
        return cfg
    given = getattr(cfg, "_given", None)
    if given is None:  # built without from_dict: the fields that differ from their defaults
        given = {sec: {k for k, v in vals.items() if v != getattr(type(getattr(cfg, sec))(), k)}
                 for sec, vals in cfg.to_dict().items()}
    errors = fill_config(cfg, given)
    if errors:
        raise ConfigError(format_errors(errors))
    check_config(cfg)
    cfg._given = {sec: set(vals) for sec, vals in cfg.to_dict().items()}  # everything is explicit now
    return cfg


def fill_config(cfg: Config, given: dict[str, set[str]]) -> list[str]:
    """Fill ``cfg.model``'s architecture fields (and ``data.tokenizer``) from ``model.init_from``.

    ``given``: the keys the user set, per section. Returns the problems (strings,
    each with its fix); ``cfg`` is changed in place. A config that already names
    every architecture field (a run's saved config) is left alone when the source
    has gone: eval and generate of the run's checkpoints do not need it.
    """
    src = cfg.model.init_from
    path = Path(src)
    model_given, data_given = given.get("model", set()), given.get("data", set())
    if not path.exists():
        if all(f in model_given or f == "n_kv_heads" for f in ARCH_FIELDS):
            return []
        return [f"model.init_from={src!r} does not exist; give a Hugging Face folder (config.json, *.safetensors) "
                "or an fmtrain checkpoint or run folder"]
    try:
        if is_hf_folder(path):
            fields, window = hf_model_fields(read_hf_config(path), src)
            names, folder = CONFIG_NAMES, path
        else:
            ckpt = _fmtrain_source(cfg)
            fields, window = fmtrain_model_fields(ckpt.config.model), None
            names, folder = {f: f"model.{f}" for f in ARCH_FIELDS}, ckpt
    except UserError as exc:  # ConfigError, or an InputFileError of config.json
        return [str(exc)]
    errors = []
    for name, value in fields.items():
        if name in model_given:
            mine = getattr(cfg.model, name)
            if name == "n_kv_heads":
                mine = cfg.model.kv_heads
            if mine != value and name not in OVERRIDABLE:
                errors.append(f"model.{name}={mine!r} contradicts model.init_from={src!r}, whose "
                              f"{names[name]} is {value!r}; remove model.{name} (it is taken from the weights)")
            continue
        setattr(cfg.model, name, value)
    if "tokenizer" not in data_given:
        errors += _fill_tokenizer(cfg, folder, src)
    if window is not None and window < cfg.data.seq_len:
        if cfg.model.attention == "sdpa":
            errors.append(
                f"model.init_from={src!r} attends within a sliding window of {window} tokens, shorter than "
                f"data.seq_len={cfg.data.seq_len}; fmtrain's sdpa is full attention and would change the "
                f"model: use data.seq_len <= {window}, or attention='fma' / 'local'")
        else:
            warnings.warn(f"model.init_from={src!r} was trained with a sliding window of {window} tokens; "
                          f"model.attention={cfg.model.attention!r} replaces it (not reproduced)", stacklevel=3)
    return errors


def _fill_tokenizer(cfg: Config, folder: Path, src: str) -> list[str]:
    """data.tokenizer from the source's folder; the problems."""
    try:
        tok = _tokenizer_of(folder)
    except InputFileError as exc:
        return [str(exc)]
    if tok is None:
        return [f"model.init_from={src!r} has no tokenizer (tokenizer.json or tokenizer.model); "
                "set data.tokenizer to the tokenizer the weights were trained with"]
    cfg.data.tokenizer = tok
    return []


# --------------------------------------------------------------------------- the run's start
@dataclass
class Init:
    """A checked source of initial weights (:func:`prepare`)."""

    source: str
    kind: str  # "hf" or "fmtrain"
    files: dict[str, Path] | None = None  # hf: tensor -> shard
    checkpoint: Any = None  # fmtrain: the validated Checkpoint (read without hashing it again)

    def state_dict(self, m: ModelConfig) -> dict[str, torch.Tensor]:
        if self.kind == "hf":  # read and converted one tensor at a time: no second copy of the model
            return load_hf_state(self.source, m, self.files, lazy=True)
        from .export import load_model_state

        return load_model_state(self.checkpoint)

    @torch.no_grad()
    def load(self, model: torch.nn.Module) -> str:
        """Copy the weights into ``model`` (fresh from ``build_model``); returns a line for the log."""
        return load_weights(model, self.state_dict(model.cfg), self.source)


@torch.no_grad()
def load_weights(model: torch.nn.Module, sd: dict, source: str) -> str:
    """Copy ``sd`` (tensors, or functions returning them) into ``model`` in place: every tensor but
    the multipole summaries must be there with its shape; summaries of another shape or absent
    keep their (mean-equivalent) initialisation."""
    own = model.state_dict()  # shares storage with the parameters
    kept = []
    for name, t in own.items():
        is_summary = ".summaries." in name
        if name not in sd:
            if is_summary:
                kept.append(name)
                continue
            raise ConfigError(f"model.init_from={source!r}: tensor {name} is missing from the weights")
        value = sd[name]() if callable(sd[name]) else sd[name]
        if tuple(value.shape) != tuple(t.shape):
            if is_summary:
                kept.append(name)
                continue
            raise ConfigError(f"model.init_from={source!r}: tensor {name} has shape {list(value.shape)}, "
                              f"the model needs {list(t.shape)}")
        t.copy_(value)
    dropped = sorted(set(sd) - set(own))
    note = f"weights from {source}"
    if kept:
        note += f" ({len(kept)} summary tensors at their mean initialisation)"
    if dropped:
        note += f" ({len(dropped)} tensors not used by model.attention={model.cfg.attention!r}, e.g. {dropped[0]})"
    return note


def prepare(cfg: Config) -> Init | None:
    """The checked weights of ``model.init_from`` for a fresh run; None without it or when the run
    resumes its own checkpoint. Raises ConfigError (InputFileError for a damaged or missing-by-LFS
    file) before anything is written."""
    if not cfg.model.init_from:
        return None
    from .checkpoint import latest_valid

    with warnings.catch_warnings():  # the resume reports damaged checkpoints itself
        warnings.simplefilter("ignore")
        if latest_valid(cfg.checkpoint_dir) is not None:
            return None
    path = Path(cfg.model.init_from)
    if not path.exists():
        raise ConfigError(f"model.init_from={str(path)!r} does not exist")
    check_tokenizer(cfg)
    if is_hf_folder(path):
        return Init(str(path), "hf", files=check_hf_weights(path, cfg.model))
    return Init(str(path), "fmtrain", checkpoint=_fmtrain_source(cfg))


def check_tokenizer(cfg: Config) -> None:
    """The run's tokenizer fits the embedding (ConfigError otherwise)."""
    from .data.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        return
    try:
        load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size, need_mask=cfg.model.kind == "mlm")
    except InputFileError:  # a damaged file: its own message says which and what to do
        raise
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.tokenizer does not fit model.init_from={cfg.model.init_from!r}: {exc}") from None


def load_model(path: str | os.PathLike, *, seq_len: int = 2048, **model_fields):
    """An fmtrain model with the weights of ``path`` (a Hugging Face folder or an fmtrain checkpoint),
    ``model_fields`` the rest of [model] (e.g. ``attention="fma", block_size=64``); in fp32, on the CPU.

        model = load_model("Llama-3.2-1B", attention="fma")
    """
    from .config import from_dict
    from .model import build_model

    cfg = resolve_config(from_dict({"run": {"dir": "."}, "model": {"init_from": str(path), **model_fields},
                                    "data": {"seq_len": seq_len, "tokenizer": "(not needed)"}}))
    files = check_hf_weights(Path(path), cfg.model) if is_hf_folder(path) else None
    init = (Init(str(path), "hf", files=files) if files else
            Init(str(path), "fmtrain", checkpoint=_fmtrain_source(cfg)))
    model = build_model(cfg.model)
    init.load(model)
    return model


__all__ = ["load_model", "resolve_config", "fill_config", "prepare", "Init", "load_weights", "check_tokenizer"]
