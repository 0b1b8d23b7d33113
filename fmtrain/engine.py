"""DeepSpeed, in one place: everything fmtrain knows about it, so an upgrade touches this file.

- building the engine: the generated JSON (:func:`deepspeed_config`), AdamW groups and the
  warmup + cosine schedule (:func:`build_engine`), and the keys a user may add
  (:func:`deepspeed_key_errors`);
- a step: token-weighted loss scaling against DeepSpeed's averaging, the gradient norm
  (:func:`train_step`); a resume's changed hyperparameters (:func:`apply_hyperparameters`);
- its state on disk: save and load under the tag ``ds``, a re-split resume through the
  universal format (:func:`load_universal`, with the work-arounds for DeepSpeed 0.19's bugs),
  and the consolidated fp32 weights of any ZeRO stage (:func:`consolidated_weights`);
- importing it quietly and without C++ builds on CPU (:func:`import_deepspeed`).

Nothing here imports the rest of fmtrain but its errors and schedule: configs and worlds come in
as values.
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .schedule import warmup_cosine

UNIVERSAL = "universal"  # a re-split resume's conversion of ds/, beside it
TAG = "ds"  # the engine's state inside a checkpoint folder


class EngineError(UserError, RuntimeError):
    """DeepSpeed could not do what was asked (a conversion failed); the message says what it said."""


def import_deepspeed():
    """``deepspeed``, imported without its console noise and its C++ builds on CPU machines.

    Without an accelerator DeepSpeed warns "Setting accelerator to CPU" on every start; naming
    the CPU accelerator (``DS_ACCELERATOR=cpu``, DeepSpeed's own setting) says the same without
    the warning. A user's own DS_ACCELERATOR is kept.

    On CPU, DeepSpeed's communication backend JIT-compiles its shared-memory all-reduce
    (``deepspeed_shm_comm``, for inference) at every start, after probing every op with
    compiler runs: a long silence whenever ``~/.cache/torch_extensions`` holds another
    environment's build. fmtrain trains with torch's optimizers and torch.distributed collectives
    and uses no DeepSpeed op on CPU, so the op table says none is available there, which
    DeepSpeed reads as "fall back to torch".

    DeepSpeed's ZeRO 2 calls ``all_gather_into_tensor``, which torch 2.13 deprecates: the
    ``FutureWarning`` came once per rank at the first step, about a call the user cannot change.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    import deepspeed

    if not torch.cuda.is_available():
        import deepspeed.ops as ds_ops

        if "__compatible_ops__" not in vars(ds_ops):  # not probed yet (the probe is lazy)
            from deepspeed.ops.op_builder.all_ops import ALL_OPS

            ds_ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
    return deepspeed


def lr_factor(cfg, step: int) -> float:
    """Linear warmup to ``train.lr``, cosine decay to ``train.min_lr`` at the last step."""
    t = cfg.train
    if not t.lr:
        return 0.0
    return warmup_cosine(step, steps=t.steps, warmup_steps=t.warmup_steps, lr=t.lr, min_lr=t.min_lr) / t.lr


def deepspeed_config(cfg, world, dtype: torch.dtype) -> dict:
    """The DeepSpeed JSON generated from the fmtrain config (plus ``parallel.deepspeed``)."""
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed averages gradients over every rank; the loss is scaled to match (train_step).
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world.size,
        "gradient_clipping": t.grad_clip,  # always explicit: DeepSpeed defaults to 1.0 otherwise
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    for key, value in cfg.parallel.deepspeed.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def build_engine(model: torch.nn.Module, cfg, world, dtype: torch.dtype):
    """DeepSpeed engine with AdamW (no weight decay on norms, biases and summary maps)
    and the warmup + cosine schedule."""
    deepspeed = import_deepspeed()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "summaries" in name or "level_offset" in name else decay).append(p)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                            fused=world.device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, world, dtype))
    return engine


def train_step(engine, batches: list[dict], world, document_masking: bool = False) -> tuple[float, float]:
    """One optimizer step over ``grad_accum`` micro-batches: the step's mean loss and the
    global gradient norm before clipping. ``document_masking`` (``data.document_masking``):
    the model gets the batches' ``doc_positions`` and attends within documents.

    The loss is the token-weighted mean over every rank's and micro-batch's targets:
    each micro-step's summed loss is divided by the step's global target count and
    multiplied by what DeepSpeed divides by (ranks x accumulation steps).
    Under sequence parallelism each rank's loss is its slice's sum and the global
    count covers every slice; the SP collectives' backward routes each rank's
    gradient contributions to the ranks whose tokens produced them, so DeepSpeed's
    sum over SP x DP ranks (mean times ``world.size``) is the exact gradient.
    """
    dev = world.device
    # The global target count stays on the device: no host sync before the forward.
    counts = torch.tensor([float((b["targets"] >= 0).sum()) for b in batches], dtype=torch.float64)
    total = world.all_reduce(counts.sum().reshape(1).to(dev)).clamp(min=1.0).reshape(())
    scale = world.size * len(batches) / total
    loss_total = torch.zeros((), dtype=torch.float64, device=dev)
    norm = None
    for b in batches:
        # doc_positions stay on the host: the model finds the documents there, without a device sync.
        docs = b["doc_positions"] if document_masking else None
        loss_sum, _ = engine(b["input_ids"].to(dev), b["targets"].to(dev), b["positions"].to(dev), docs)
        engine.backward(loss_sum * scale.to(loss_sum.dtype))
        loss_total += loss_sum.detach().double()
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            # ZeRO stage 0 keeps no norm: measure it before the step clips the gradients.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        engine.step()
    if norm is None:
        norm = engine.get_global_grad_norm()
    loss = (world.all_reduce(loss_total.reshape(1)).reshape(()) / total).item()
    return loss, float(norm) if norm is not None else float("nan")


def apply_hyperparameters(engine, cfg) -> None:
    """Give the resumed optimizer and schedule the config's values (a resume with changed settings).

    A checkpoint restores the optimizer's groups (lr, betas, eps, weight decay) and the
    schedule's base learning rate as they were saved; this sets them from ``cfg``, the
    learning rate of the resumed step included. With an unchanged config it changes nothing:
    LambdaLR computes the same ``base_lr * factor(step)``.
    """
    t = cfg.train
    sched = engine.lr_scheduler
    groups = inner_optimizer(engine).param_groups
    for i, g in enumerate(groups):  # build_engine: group 0 decays, group 1 does not
        g.update(initial_lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay if i == 0 else 0.0)
    sched.base_lrs = [t.lr] * len(groups)
    for g in groups:
        g["lr"] = t.lr * lr_factor(cfg, sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]


def inner_optimizer(engine):
    """The torch optimizer inside DeepSpeed's wrapper (ZeRO wraps it; stage 0 does not)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def save(engine, folder: Path) -> None:
    """The engine's state (model, optimizer, schedule; this rank's ZeRO shards) into ``folder/ds``."""
    engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)


def load(engine, folder: Path):
    """Load ``folder/ds`` saved with the same ZeRO partitioning (or ZeRO 0, any ranks); DeepSpeed's load path."""
    load_path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    return load_path


def load_universal(engine, path: Path, world):
    """Load ``path`` on a different number of ranks through DeepSpeed's universal checkpoint.

    ``ds_to_universal`` merges the ZeRO shards into one file per parameter (fp32 weights and
    Adam moments), which any number of ranks can partition anew. Rank 0 converts once, into
    ``universal/`` beside ``ds/`` (written under a temporary name, then renamed, so a crash
    mid-conversion is redone); the others wait at the barrier.
    """
    out = path / UNIVERSAL
    if world.is_main and not out.is_dir():
        tmp = path / f".{UNIVERSAL}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(path / "ds"), "--output_folder", str(tmp), "--inject_missing_state",
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise EngineError(f"converting {path / 'ds'} to a universal checkpoint failed:\n"
                                  f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        os.replace(tmp, out)
    world.barrier()
    # DeepSpeed 0.19's ZeRO 3 universal load copies the first parameter group's settings onto
    # every group (our no-decay group would get weight decay): keep what differs between groups.
    groups = inner_optimizer(engine).param_groups
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
    for st in inner_optimizer(engine).state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()
    return load_path


def consolidated_weights(folder: Path, zero_stage: int | None) -> dict[str, torch.Tensor]:
    """The full model state dict of ``folder/ds`` in fp32 on the CPU, in one process: ZeRO 3's
    shards gathered by DeepSpeed's own consolidation, other stages' whole module read as saved."""
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
    else:
        sd = torch.load(Path(folder) / TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


# DeepSpeed sections whose own pydantic schema (extra keys forbidden) checks them.
_DS_SCHEMAS = {
    "zero_optimization": "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "tensorboard": "deepspeed.monitor.config:TensorBoardConfig",
    "wandb": "deepspeed.monitor.config:WandbConfig",
    "csv_monitor": "deepspeed.monitor.config:CSVConfig",
    "comms_logger": "deepspeed.comm.config:CommsLoggerConfig",
    "compile": "deepspeed.compile.config:CompileConfig",
}
# Modules whose string constants name every top-level key DeepSpeed reads.
_DS_KEY_MODULES = ("deepspeed.runtime.constants", "deepspeed.runtime.zero.config",
                   "deepspeed.runtime.activation_checkpointing.config", "deepspeed.runtime.data_pipeline.constants",
                   "deepspeed.autotuning.constants", "deepspeed.monitor.config", "deepspeed.profiling.constants",
                   "deepspeed.runtime.swap_tensor.constants", "deepspeed.checkpoint.constants",
                   "deepspeed.runtime.precision_config", "deepspeed.comm.constants", "deepspeed.runtime.config")


def _deepspeed_top_level_keys() -> set[str]:
    import importlib

    keys = set()
    for name in _DS_KEY_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        keys |= {v for k, v in vars(mod).items() if k.isupper() and isinstance(v, str)
                 and re.fullmatch(r"[a-z][a-z0-9_]*", v)}
    return keys


def deepspeed_key_errors(extra: dict[str, Any], derived: dict[str, str]) -> list[str]:
    """Keys of ``[parallel.deepspeed]`` that DeepSpeed does not know (it would ignore them silently).

    Top-level keys are checked against the names DeepSpeed's config modules read; sections with a
    schema of their own (``zero_optimization``, ``bf16``, monitors, ...) are validated by it.
    ``derived``: the keys fmtrain generates, and from which fields (named in a did-you-mean).
    """
    import importlib

    import_deepspeed()
    known = _deepspeed_top_level_keys()
    errors = []
    for key, value in extra.items():
        where = f"parallel.deepspeed.{key}"
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known | set(derived)), n=1, cutoff=0.75)
            hint = ""
            if close:
                hint = f" Did you mean {close[0]!r}" + (f" (set by {derived[close[0]]})"
                                                         if close[0] in derived else "") + "?"
            errors.append(f"{where} is not a DeepSpeed config key.{hint}")
            continue
        if key in _DS_SCHEMAS and isinstance(value, dict):
            module, cls = _DS_SCHEMAS[key].split(":")
            try:
                schema = getattr(importlib.import_module(module), cls)
            except (ImportError, AttributeError):
                continue
            fields = {n for n, f in schema.model_fields.items()} | {
                f.alias for f in schema.model_fields.values() if f.alias}
            for sub in value:
                if sub not in fields:
                    errors.append(f"{where}.{sub} is not a DeepSpeed {key} key."
                                  f"{_did_you_mean(sub, sorted(fields))}")
            if not any(sub not in fields for sub in value):
                try:
                    schema(**value)
                except Exception as exc:  # pydantic's ValidationError: the value is wrong
                    first = str(exc).splitlines()
                    errors.append(f"{where}: DeepSpeed refuses it: {' '.join(first[:3])}")
    return errors


__all__ = ["import_deepspeed", "deepspeed_config", "build_engine", "train_step", "apply_hyperparameters",
           "lr_factor", "inner_optimizer", "save", "load", "load_universal", "consolidated_weights",
           "deepspeed_key_errors", "EngineError", "UNIVERSAL", "TAG"]
