"""A Hugging Face folder read and checked: its ``config.json``, where each tensor is (the index
or the single file), that every tensor is there with its shape (from the safetensors headers,
nothing loaded), and the weights as an fmtrain state dict. What ``model.init_from`` takes from a
Hugging Face folder (:mod:`fmtrain.init_from`); nothing here needs ``transformers``.

    is_hf_folder(path)              a folder with a config.json
    read_hf_config(path)            its config.json (:func:`.names.hf_model_fields` maps it)
    check_hf_weights(folder, m)     every expected tensor present, complete, of its shape: name -> file
    load_hf_state(folder, m)        the fmtrain state dict (each tensor read and converted when asked, with lazy=True)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from ..input_files import InputFileError, JsonFields, open_safetensors, read_json, safetensors_header
from .names import IGNORED_SUFFIXES, expected_hf_tensors, hf_to_fmtrain

INDEX = "model.safetensors.index.json"


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of ``path``/config.json; InputFileError when it is something else."""
    file = Path(path) / "config.json"
    return JsonFields(read_json(file, "model's config"), file).data


def hf_weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    index = folder / INDEX
    if index.is_file():
        weight_map = _weight_map(index)
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            names = [k for k, f in weight_map.items() if f == missing[0]]
            raise ConfigError(f"model.init_from={str(folder)!r}: shard {missing[0]} is missing (it holds "
                              f"{names[0]}{f' and {len(names) - 1} more tensors' if len(names) > 1 else ''}); "
                              f"{len(missing)} of {len(set(weight_map.values()))} shards are absent")
        return {k: folder / f for k, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pth")]
        hint = f" (found {', '.join(other)}: convert them to safetensors first)" if other else ""
        raise ConfigError(f"model.init_from={str(folder)!r} holds no *.safetensors weights{hint}")
    out = {}
    for f in files:
        for name in safetensors_header(f):
            out[name] = f
    return out


def _weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a ``model.safetensors.index.json``."""
    weight_map = JsonFields(read_json(index, "index of the weights"), index).mapping("weight_map")
    if not weight_map.data:
        raise InputFileError(f"{index}: weight_map is missing or empty; download the index again")
    for name in weight_map.data:
        weight_map.string(name)  # a shard's file name
    return weight_map.data


def check_hf_weights(folder: Path, m: ModelConfig) -> dict[str, Path]:
    """Every expected tensor is in a present, complete shard with the right shape; else ConfigError
    naming the tensor (InputFileError for a file that is no safetensors). Returns name -> file."""
    files = hf_weight_files(folder)
    headers = {f: safetensors_header(f) for f in sorted(set(files.values()))}
    expected = expected_hf_tensors(m)
    for name, shape in expected.items():
        if name not in files:
            raise ConfigError(f"model.init_from={str(folder)!r}: tensor {name} is missing "
                              f"(expected shape {list(shape)}; a partial download or a different architecture)")
        info = headers[files[name]].get(name)
        if info is None:
            raise ConfigError(f"model.init_from={str(folder)!r}: tensor {name} is listed in {INDEX} for "
                              f"{files[name].name}, which does not hold it (a partial shard)")
        if tuple(info["shape"]) != shape:
            raise ConfigError(f"model.init_from={str(folder)!r}: tensor {name} has shape {info['shape']}, the "
                              f"config.json implies {list(shape)}")
    optional = {"lm_head.weight"} if m.tie_embeddings else set()
    extra = sorted(k for k in files if k not in expected and k not in optional and not k.endswith(IGNORED_SUFFIXES))
    if extra:
        raise ConfigError(f"model.init_from={str(folder)!r}: tensor {extra[0]} (and {len(extra) - 1} more) is not "
                          "part of a Llama-style model of this config; fmtrain would drop it")
    return files


def load_hf_state(folder: str | os.PathLike, m: ModelConfig, files: dict[str, Path] | None = None,
                  dtype: torch.dtype = torch.float32, lazy: bool = False) -> dict:
    """fmtrain state dict (``dtype``) of a Hugging Face folder (checked by :func:`check_hf_weights`);
    ``lazy``: values are functions reading their tensor when called (see :func:`fmtrain.init_from.load_weights`)."""
    folder = Path(folder)
    files = files or check_hf_weights(folder, m)
    handles: dict[Path, Any] = {}

    def get(name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = open_safetensors(f)
        return handles[f].get_tensor(name).to(dtype)

    return hf_to_fmtrain(get, m, lazy=lazy)


__all__ = ["INDEX", "is_hf_folder", "read_hf_config", "hf_weight_files", "check_hf_weights", "load_hf_state"]
