"""Hugging Face transformers interop.

- Import: ``model.init_from = "PATH"`` (:mod:`fmtrain.pretrained`, needs no transformers).
- Export: ``python -m fmtrain.hf export RUN_OR_CHECKPOINT OUT`` (:mod:`fmtrain.hf.export`).
- Importing this package registers ``model_type = "fmtrain"`` (:mod:`fmtrain.hf.modeling`)
  with transformers' Auto classes, so that exported ``fma``/``local`` models load:

      import fmtrain.hf
      from transformers import AutoModelForCausalLM
      model = AutoModelForCausalLM.from_pretrained("exported")

Needs ``pip install -e ".[hf]"`` (transformers, tokenizers).
"""
from __future__ import annotations

import sys

try:
    from .modeling import FmtrainConfig, FmtrainForCausalLM, register
except ModuleNotFoundError as exc:
    if exc.name not in ("transformers", "tokenizers", "safetensors"):
        raise
    _need = f'fmtrain.hf needs the Hugging Face extra: pip install -e ".[hf]" ({exc.name} is not installed)'
    if sys.argv[:1] == ["-m"]:  # python -m fmtrain.hf ...: one error line, as every fmtrain command
        print(f"error: {_need}", file=sys.stderr)
        raise SystemExit(2) from None
    raise ModuleNotFoundError(_need, name=exc.name) from None

register()

from .export import ExportError, export  # noqa: E402

__all__ = ["FmtrainConfig", "FmtrainForCausalLM", "register", "export", "ExportError"]
