"""Training: ``python -m fmtrain.train CONFIG.toml [--section.field=value ...]``.

The same command under ``torchrun`` trains on many processes and nodes. A
restart with the same ``run.dir`` resumes from the newest valid checkpoint.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, Checkpointer, TrainState
from .config import Config, ConfigError, parse_args, save_config
from .eval import evaluate
from .metrics import Metrics, peak_flops
from .model import build_model, flops_per_token, set_sequence_group
from .parallel import World, init_world, shutdown
from .pretrained import prepare as prepare_init, resolve_config
from .signals import StopFlag, exit_status


def lr_factor(cfg: Config, step: int) -> float:
    """Linear warmup to ``train.lr``, cosine decay to ``train.min_lr`` at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return (t.min_lr + (t.lr - t.min_lr) * cosine) / t.lr if t.lr else 0.0


def deepspeed_config(cfg: Config, world: World, dtype: torch.dtype) -> dict:
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


def build_engine(model: torch.nn.Module, cfg: Config, world: World, dtype: torch.dtype):
    """DeepSpeed engine with AdamW (no weight decay on norms, biases and summary maps)
    and the warmup + cosine schedule."""
    import deepspeed

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "summaries" in name else decay).append(p)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                            fused=world.device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, world, dtype))
    return engine


def grad_norm(engine) -> float:
    """The global gradient norm before clipping of the step just taken."""
    norm = engine.get_global_grad_norm()
    if norm is None:  # ZeRO stage 0 does not keep it: train_step measures it
        norm = getattr(engine, "_fmtrain_grad_norm", float("nan"))
    return float(norm)


def train_step(engine, batches: list[dict], world: World) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's mean loss.

    The loss is the token-weighted mean over every rank's and micro-batch's targets:
    each micro-step's summed loss is divided by the step's global target count and
    multiplied by what DeepSpeed divides by (ranks x accumulation steps).
    Under sequence parallelism each rank's loss is its slice's sum and the global
    count covers every slice; the SP collectives' backward routes each rank's
    gradient contributions to the ranks whose tokens produced them, so DeepSpeed's
    sum over SP x DP ranks (mean times ``world.size``) is the exact gradient.
    """
    dev = world.device
    counts = torch.tensor([float((b["targets"] >= 0).sum()) for b in batches], dtype=torch.float64)
    total = world.all_reduce(counts.sum().reshape(1).to(dev)).item()
    scale = world.size * len(batches) / max(total, 1.0)
    loss_total = torch.zeros((), dtype=torch.float64, device=dev)
    for b in batches:
        loss_sum, _ = engine(b["input_ids"].to(dev), b["targets"].to(dev), b["positions"].to(dev))
        engine.backward(loss_sum * scale)
        loss_total += loss_sum.detach().double()
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            engine._fmtrain_grad_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
        engine.step()
    return world.all_reduce(loss_total.reshape(1)).item() / max(total, 1.0)


def _dtype(cfg: Config, world: World) -> torch.dtype:
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and world.device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def train(cfg: Config) -> dict:
    """Run (or resume) the training ``cfg`` describes; returns the last metrics."""
    from .data import build_loaders

    cfg = resolve_config(cfg)  # model.init_from: [model] and data.tokenizer from the weights' config
    world = init_world(cfg.parallel.backend, cfg.parallel.sequence)
    cfg.check_world(world.size)
    dtype = _dtype(cfg, world)
    init = prepare_init(cfg)  # model.init_from's weights, checked before anything is written; None: resume
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    data = build_loaders(cfg.data.corpus, cfg.data.tokenizer or None, cfg.data.cache_dir,
                         seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size, seed=cfg.train.seed,
                         dp_rank=world.dp_rank, dp_size=world.dp_size, sp_rank=world.sp_rank,
                         sp_size=world.sp_size, objective=cfg.model.kind, vocab_size=cfg.model.vocab_size,
                         text_field=cfg.data.text_field, val_fraction=cfg.data.val_fraction,
                         mask_prob=cfg.data.mask_prob, eval_max_batches=cfg.train.eval_batches,
                         progress=world.is_main)
    model = set_sequence_group(build_model(cfg.model), world.sp_group)  # None unless parallel.sequence > 1
    init_note = init.load(model) if init else ""  # weights only: optimizer, schedule and data start fresh
    engine = build_engine(model, cfg, world, dtype)
    state = TrainState()
    ckpt = Checkpointer(cfg, world, data.tokenizer.path)
    resumed = ckpt.resume(engine, data.train, state)
    if world.is_main:
        save_config(cfg, cfg.run.dir)
    tokens_per_step = cfg.data.seq_len * cfg.data.batch_size * cfg.train.grad_accum * world.dp_size
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_src = peak_flops(world.device, dtype)
    log = Metrics(cfg.run.dir, total_steps=cfg.train.steps, start_step=state.step, enabled=world.is_main,
                  flops_per_token=fpt, peak=peak * world.size)
    log.note(f"fmtrain: {cfg.name} | {model.num_params() / 1e6:.2f}M parameters | {cfg.model.kind} "
             f"{cfg.model.attention} | {world.size} process(es), dp {world.dp_size} x sp {world.sp_size}, "
             f"ZeRO {cfg.parallel.zero_stage}, {dtype}, {world.device.type} | seq_len {cfg.data.seq_len} | "
             f"{tokens_per_step:,} tokens/step | MFU against {peak / 1e12:.2f} TFLOP/s ({peak_src})"
             + (f" | resumed from {resumed}" if resumed else "") + (f" | {init_note}" if init_note else ""))
    stop = StopFlag(world, cfg.train.max_minutes)

    def run_eval() -> dict | None:
        if data.val is None:
            return None
        result = evaluate(engine, data.val, world, data.tokenizer.token_bytes, cfg.train.eval_batches, stop)
        if result is not None:  # None: a stop signal cut it short (the loop then checkpoints)
            log.eval(state.step, result)
        return result

    last: dict = {}
    if not resumed:
        last["first_eval"] = run_eval()
    stopped = False
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        batches = [data.train.next_batch() for _ in range(cfg.train.grad_accum)]
        t_data = time.perf_counter() - t0
        lr = engine.lr_scheduler.get_last_lr()[0]
        loss = train_step(engine, batches, world)
        state.step += 1
        state.tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        last.update(step=state.step, loss=loss)
        if state.step % cfg.train.log_interval == 0 or state.step == cfg.train.steps:
            log.step(step=state.step, loss=loss, lr=lr, grad_norm=grad_norm(engine),
                     tokens_seen=state.tokens_seen, tokens_per_s=tokens_per_step / dt, step_time=dt,
                     data_time=t_data, device=world.device)
        if cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0 and state.step < cfg.train.steps:
            last["eval"] = run_eval()
        stopped = stop.should_stop() or state.step == cfg.train.stop_at_step
        if state.step % cfg.checkpoint.interval == 0 or state.step == cfg.train.steps or stopped:
            path = ckpt.save(engine, data.train, state)
            log.note(f"checkpoint {path}")
        if stopped:
            log.note(f"stopping after step {state.step}: {stop.reason}; restart with the same run.dir to resume")
            break
    if not stopped:
        last["eval"] = run_eval()
    stop.restore()
    log.close()
    last["stopped"] = stopped
    # Stopped by a signal or train.max_minutes (not the planned stop_at_step): main exits 75.
    last["preempted"] = stopped and state.step != cfg.train.stop_at_step
    return last


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        result = train(cfg)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return exit_status(result["preempted"])  # 0 finished, 75 stopped early (fmtrain/signals.py)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
