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

from .modeling import FmtrainConfig, FmtrainForCausalLM, register

register()

from .export import ExportError, export  # noqa: E402

__all__ = ["FmtrainConfig", "FmtrainForCausalLM", "register", "export", "ExportError"]
