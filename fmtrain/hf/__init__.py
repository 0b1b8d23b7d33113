"""Hugging Face interop, both ways, in one package.

- :mod:`.names`: the Llama-style layout and fmtrain's, both ways (config.json fields, tensor names).
- :mod:`.importing`: a Hugging Face folder read and checked (config.json, safetensors headers,
  weights); ``model.init_from = "PATH"`` (:mod:`fmtrain.init_from`) calls it. Needs no transformers.
- :mod:`.export`: ``python -m fmtrain.hf export RUN_OR_CHECKPOINT OUT`` (SentencePiece models
  converted by :mod:`.sentencepiece`).
- :mod:`.modeling`: ``model_type = "fmtrain"`` as transformers classes; importing it registers
  them with transformers' Auto classes, so that exported ``fma``/``local`` models load:

      import fmtrain.hf.modeling
      from transformers import AutoModelForCausalLM
      model = AutoModelForCausalLM.from_pretrained("exported")

  ``from fmtrain.hf import FmtrainForCausalLM`` (or ``FmtrainConfig``, ``register``) and an
  export do the same. The export and the transformers classes need ``pip install -e ".[hf]"``
  (transformers, tokenizers); this package itself imports no transformers, so the trainer (which
  imports :mod:`.importing` for ``model.init_from``) does not load it.
"""
from __future__ import annotations

import importlib

from ..errors import UserError
from .export import ExportError, export  # no transformers at import: export() asks for it

_FROM_MODELING = ("FmtrainConfig", "FmtrainForCausalLM", "register")


class ExtraMissing(UserError, ModuleNotFoundError):
    """The Hugging Face extra (transformers, tokenizers) is not installed; the message names the install."""


def require_extra():
    """:mod:`.modeling`, imported (which registers its classes with transformers); ExtraMissing naming
    the install when transformers or tokenizers is missing."""
    try:
        return importlib.import_module(".modeling", __name__)
    except ModuleNotFoundError as exc:
        if exc.name not in ("transformers", "tokenizers", "safetensors"):
            raise
        raise ExtraMissing(f'fmtrain.hf needs the Hugging Face extra: pip install -e ".[hf]" '
                           f"({exc.name} is not installed)", name=exc.name) from None


def __getattr__(name: str):
    if name in _FROM_MODELING:
        return getattr(require_extra(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FmtrainConfig", "FmtrainForCausalLM", "register", "export", "ExportError", "ExtraMissing", "require_extra"]
