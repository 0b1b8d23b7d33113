"""fmtrain's models as transformers classes: ``model_type = "fmtrain"``.

:class:`FmtrainConfig` carries fmtrain's ``[model]`` section (``config.fmtrain``);
:class:`FmtrainForCausalLM` wraps :class:`fmtrain.model.CausalLM` unchanged (its
parameters are ``model.<fmtrain name>``), so multipole (``fma``) and local
attention run in transformers exactly as in fmtrain. :func:`register` adds both
to transformers' Auto classes; importing this module calls it.

Generation: ``generate()`` goes through fmtrain's decoding cache (``model.prefill``
once over the prompt, then ``model.decode`` per token: the multipole cache for
``fma``/``local``, a key/value cache for ``sdpa``); with ``use_cache=False`` every
new token re-runs the model over the whole context.

Padded batches: the hierarchy is positional, so padding cannot be masked inside one
row; a row whose ``attention_mask`` marks one contiguous run of tokens (left padding, as
``generate()`` and lm-eval pad, or right padding) is computed on its own tokens from
position 0, with its own decoding cache, so every row equals its result alone. Logits
at padded positions are zero, and the ``labels=`` loss counts only predictions made from a real
token of a real token (labels at padded positions are ignored, whatever they hold): the batch's
loss is the mean over all counted tokens of the batch, as transformers' own models average it.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import ModelConfig
from ..model import IGNORE_INDEX, build_model
from .remote import AUTO_MAP, REMOTE_CODE, REMOTE_FILE

MODEL_TYPE = "fmtrain"


class FmtrainConfig(PreTrainedConfig):
    """transformers' view of an fmtrain model; ``fmtrain`` is the ``[model]`` section."""

    model_type = MODEL_TYPE
    fmtrain: dict | None = None
    vocab_size: int = 32768
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.fmtrain:  # the standard names transformers looks for, from the fmtrain section
            m = self.model_config()
            self.vocab_size, self.hidden_size = m.vocab_size, m.dim
            self.num_hidden_layers, self.num_attention_heads = m.n_layers, m.n_heads
            self.tie_word_embeddings = m.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.fmtrain or {}) - names)
        if unknown:
            raise ValueError(f"this fmtrain model's config has fields {unknown} that this fmtrain does not know; "
                             "upgrade fmtrain")
        return ModelConfig(**{k: v for k, v in (self.fmtrain or {}).items()})


class FmtrainForCausalLM(PreTrainedModel, GenerationMixin):
    """fmtrain's causal LM (any attention: ``fma``, ``local``, ``sdpa``) behind transformers' API."""

    config_class = FmtrainConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.head.weight": "model.trunk.tok_emb.weight"}  # used when tie_word_embeddings

    def __init__(self, config: FmtrainConfig):
        super().__init__(config)
        m = config.model_config()
        if m.kind != "causal":
            raise ValueError(f"FmtrainForCausalLM needs model.kind='causal', this config has {m.kind!r}")
        self.model = build_model(m)
        self.post_init()

    def _init_weights(self, module):
        """fmtrain's own initialisation is done by ``build_model`` (summaries start as means)."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """transformers' ``save_pretrained``, and the folder always carries the remote code
        (``auto_map`` and ``modeling_fmtrain.py``), so that it loads with ``trust_remote_code=True``
        whichever class saved it. transformers copies remote code only for a class it loaded as
        remote; once this module is imported (the remote file imports it) it registers these classes,
        and transformers then prefers them to the folder's: loading a tokenizer before the model
        was enough to make a re-saved folder that no longer loaded."""
        if not getattr(self.config, "auto_map", None):
            self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            Path(save_directory, REMOTE_FILE).write_text(REMOTE_CODE)
        return result

    def get_input_embeddings(self):
        return self.model.trunk.tok_emb

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # fmtrain's own cache (DecodeCache), made by the first generation step

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                cache=None, use_cache: bool | None = None, fmtrain_generation: bool = False,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, n, vocab) for every position; with ``labels`` (transformers' convention: the
        inputs, shifted inside) also the mean cross-entropy of the next tokens over the whole batch
        (padded positions not counted). Within ``generate()``
        with ``use_cache``: the next token's logits (B, 1, vocab) and the decoding ``cache``."""
        spans = _row_spans(attention_mask)  # None: no padding
        if fmtrain_generation and use_cache:
            if spans is None:
                if cache is None:
                    logits, cache = self.model.prefill(input_ids)
                else:
                    logits, cache = self.model.decode(input_ids[:, -1], cache)
                return CausalLMOutputWithPast(logits=logits[:, None], cache=cache)
            if cache is None:  # a padded batch: one cache per row, prefilled on the row's own tokens
                rows = [self.model.prefill(input_ids[b:b + 1, lo:hi]) for b, (lo, hi) in enumerate(spans)]
            else:
                rows = [self.model.decode(input_ids[b:b + 1, -1], c) for b, c in enumerate(cache)]
            return CausalLMOutputWithPast(logits=torch.cat([r[0] for r in rows])[:, None], cache=[r[1] for r in rows])
        if spans is None:
            positions = position_ids[0] if position_ids is not None and position_ids.dim() == 2 \
                and bool((position_ids == position_ids[:1]).all()) else position_ids
            logits = self.model.head(self.model.trunk(input_ids, positions))  # (B, n, V)
        else:  # each row on its own tokens from position 0; zeros where padded
            logits = None
            for b, (lo, hi) in enumerate(spans):
                row = self.model.head(self.model.trunk(input_ids[b:b + 1, lo:hi]))  # (1, hi - lo, V)
                if logits is None:
                    logits = row.new_zeros(input_ids.shape[0], input_ids.shape[1], row.shape[-1])
                logits[b, lo:hi] = row[0]
        loss = None
        if labels is not None:
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            if spans is not None:
                # Position i predicts token i + 1: only a prediction from a real token of a real token
                # counts. Without this, left padding scores the last pad (zero logits) against the row's
                # first token and right padding scores the last token against the first pad, whatever
                # the caller put in labels at padded positions.
                real = torch.zeros_like(shifted, dtype=torch.bool)
                for b, (lo, hi) in enumerate(spans):
                    real[b, lo:hi - 1] = True
                shifted = shifted.masked_fill(~real, IGNORE_INDEX)
            # transformers' convention: the mean over every counted token of the batch (not a mean of row
            # means), in float32 at least (a float64 model's loss stays float64).
            dtype = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(logits.flatten(0, 1).to(dtype), shifted.flatten(), ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, attention_mask=None, cache=None,
                                      use_cache: bool | None = None, **kwargs):
        # The whole context on the first step (and on every step without the cache); then the new token.
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
                "use_cache": use_cache, "fmtrain_generation": True}


def _row_spans(attention_mask: torch.Tensor | None) -> list[tuple[int, int]] | None:
    """Each row's run of real tokens ``[lo, hi)``, or None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    spans = []
    for b, row in enumerate(attention_mask.bool()):
        idx = row.nonzero().flatten()
        if len(idx) == 0:
            raise ValueError(f"attention_mask row {b} marks no token; every row needs at least one")
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo != len(idx):
            raise ValueError(f"attention_mask row {b} has padding between its tokens; fmtrain models take "
                             "left or right padding (one run of tokens per row)")
        spans.append((lo, hi))
    return spans


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``model_type = "fmtrain"`` (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, FmtrainConfig)
    except ValueError:  # already registered (by an earlier import)
        pass
    try:
        AutoModelForCausalLM.register(FmtrainConfig, FmtrainForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["FmtrainConfig", "FmtrainForCausalLM", "register", "MODEL_TYPE"]
