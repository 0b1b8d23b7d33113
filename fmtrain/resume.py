"""What may change between a checkpoint and the run that resumes it.

A resume compares the new config with the one saved in the checkpoint, field by
field, before any data is read or engine built:

- fields that only steer the run (``train.steps``, the eval/log/checkpoint
  cadence, ``train.max_minutes``, where things are cached, ...) change freely;
  each change is printed. A new ``train.steps`` reshapes the cosine schedule
  from the current step on, and the message says so.
- fields the checkpoint's state was made with (learning-rate schedule,
  optimizer settings, the DeepSpeed JSON, the masking rate) are refused, each
  named, unless listed in ``checkpoint.allow_changes`` (e.g.
  ``--checkpoint.allow_changes=train.lr,train.warmup_steps``); then they are
  applied from the resumed step on (the optimizer's groups and the scheduler get
  the new values, see ``fmtrain.engine.apply_hyperparameters``).
- fields that cannot change (the model's shape, the data stream the saved
  position refers to, the seed, the dtype, the ZeRO stage, sequence parallelism)
  are refused with what to do instead; ``data.batch_size`` follows
  ``checkpoint.resplit``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from .checkpoint import Checkpoint
from .config import CONFIG_FILE, Config, ConfigError

# Fields that steer the run but not the state it trains: applied on resume, and printed.
FREE = {
    "run.dir", "run.name", "train.steps", "train.log_interval", "train.eval_interval", "train.eval_batches",
    "train.max_minutes", "train.stop_at_step", "checkpoint.interval", "checkpoint.keep", "checkpoint.dir",
    "checkpoint.resplit", "checkpoint.allow_changes", "data.cache_dir", "data.max_missing_text", "parallel.backend", "model.impl",
    "model.loss_chunk", "model.activation_checkpointing", "model.init_std",
    "model.init_from",  # only starts a run: a resumed run continues its own checkpoint
}

# Fields whose change the saved state cannot follow, with what to do instead.
_SHAPE = ("changes the model's shape (its parameters would not load); resume with the checkpoint's value, "
          "or start a new run.dir")
_STREAM = ("changes the data stream the saved position refers to; resume with the checkpoint's value, or "
           "start a new run.dir with model.init_from set to this run to continue its weights on the new data")
FIXED = {
    **{f"model.{name}": _SHAPE for name in ("kind", "vocab_size", "dim", "n_layers", "n_heads", "kv_heads",
                                            "hidden", "tie_embeddings", "attention", "summary", "max_seq_len",
                                            "block_size", "rank", "qkv_bias", "out_bias", "mlp_bias",
                                            "level_offset")},
    **{f"data.{name}": _STREAM for name in ("corpus", "text_field", "tokenizer", "seq_len", "val_fraction",
                                            "align_documents")},
    "train.seed": "sets the data order and the RNG streams the checkpoint continues; resume with its value",
    "train.dtype": "sets the precision of the saved weights and optimizer state; resume with the checkpoint's value",
    "parallel.zero_stage": "sets how the checkpoint's state is partitioned; resume with the same stage",
    "parallel.sequence": "sets the checkpoint's sequence-parallel layout; resume with the same value",
}

# Config fields compared through a derived value (the default None means "computed").
_DERIVED = {"model.n_kv_heads": "model.kv_heads", "model.mlp_hidden": "model.hidden",
            "model.mlp_multiple": "model.hidden"}

def _values(cfg: Config) -> dict[str, Any]:
    out = {f"{sec}.{key}": value for sec, fields in cfg.to_dict().items() for key, value in fields.items()}
    for raw, derived in _DERIVED.items():
        out.pop(raw)
    out["model.kv_heads"], out["model.hidden"] = cfg.model.kv_heads, cfg.model.hidden
    return out


# Paths that load_config may have made absolute (found beside the config file or in the
# checkout): the same file named two ways is no change.
_PATHS = ("data.tokenizer",)


def _same(name: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if name in _PATHS and a and b:
        try:
            return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
        except OSError:
            return False
    return False


def differences(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, new value) for every field that differs."""
    a, b = _values(old), _values(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not _same(k, a.get(k), b.get(k))]


@dataclasses.dataclass
class Reconciled:
    notes: list[str]       # what changed and is applied, one line each
    applied: list[str]     # the fields of checkpoint.allow_changes that did change


def reconcile(ckpt: Checkpoint, cfg: Config) -> Reconciled:
    """Compare ``cfg`` with the checkpoint's config; ConfigError naming every refused field."""
    old = ckpt.config
    allowed = set(cfg.checkpoint.allow_changes)
    notes, applied, refused = [], [], []
    for name, before, after in differences(old, cfg):
        change = f"{name}: {_show(before)} -> {_show(after)}"
        if name in FREE:
            if name == "train.steps":
                change += " (the cosine schedule now ends there)"
            notes.append(change)
        elif name in FIXED:
            refused.append(f"{change}: {name} {FIXED[name]}")
        elif name == "data.batch_size" and not cfg.checkpoint.resplit:
            refused.append(f"{change}: the saved data position is split by batch size; to continue with "
                           "the new one, set --checkpoint.resplit=true")
        elif name == "data.batch_size" or name in allowed:
            notes.append(change + " (allowed, applied from this step on)")
            applied.append(name)
        else:
            refused.append(f"{change}: the checkpoint's state was made with the old value (it would be "
                           f"ignored or mixed in); to apply the new one from this step on, add "
                           f"--checkpoint.allow_changes={name}")
    if refused:
        lines = "\n".join(f"  - {r}" for r in refused)
        raise ConfigError(f"the config differs from that of the checkpoint {ckpt} in what cannot change "
                          f"silently:\n{lines}\n(the checkpoint's config: {ckpt / CONFIG_FILE})")
    return Reconciled(notes, applied)


def _show(value: Any) -> str:
    return "none" if value is None else repr(value)
