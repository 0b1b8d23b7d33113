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

from .attention.cpu import adapt_torch_threads
from .checkpoint import Checkpointer, TrainState, all_finite, find_resume, tokenizer_comment
from .engine import apply_hyperparameters, build_engine, train_step
from .config import Config, config_from_argv, save_config
from .config.loading import input_candidates, input_exists
from .errors import DataError, Diverged, UserError, no_space, run_main
from .eval import evaluate
from .init_from import prepare as prepare_init, resolve_config
from .metrics import Metrics, peak_flops
from .model import build_model, flops_per_token
from .parallel import World, apply_sequence_parallel, init_world, shutdown
from .resume import reconcile
from .runlock import lock_run
from .signals import StopFlag, exit_status


def _finite_everywhere(world: World, *values: float) -> bool:
    """Whether every value is finite on every rank (collective: all ranks stop together)."""
    return not world.any(not all(math.isfinite(v) for v in values))


def _diverged(cfg: Config, step: int, what: str) -> Diverged:
    from .checkpoint import latest_valid_by_size

    last = latest_valid_by_size(cfg.checkpoint_dir)
    kept = (f"the last checkpoint, {last}, is finite and kept" if last else "there is no checkpoint yet")
    return Diverged(
        f"training diverged at step {step}: {what}. No checkpoint was written after it; {kept}. A restart "
        f"from it with the same settings repeats the same steps: to go on, change what diverged, e.g. a lower "
        f"train.lr or a longer train.warmup_steps, with --checkpoint.allow_changes=train.lr,train.warmup_steps")


def _dtype(cfg: Config, world: World) -> torch.dtype:
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and world.device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def _build_data(cfg: Config, world: World):
    from .data import loaders_for

    d = cfg.data
    try:
        return loaders_for(cfg, world, eval_max_batches=cfg.train.eval_batches, progress=world.is_main)
    except UserError:
        raise
    except (ValueError, OSError) as exc:  # the tokenizer's and loader's input checks, unreadable files
        if no_space(exc):
            raise DataError(f"no space left on device while writing the data cache under {d.cache_dir} ({exc}); "
                            f"free space there (df -h {d.cache_dir}) or set data.cache_dir elsewhere") from None
        raise DataError(f"data (data.corpus = {d.corpus}, data.tokenizer = {d.tokenizer or 'trained on it'}): "
                        f"{exc}") from None


def _run_dirs(cfg: Config) -> list[Path]:
    """The folders one run writes: run.dir, and checkpoint.dir when it lies elsewhere."""
    run, ckpt = Path(cfg.run.dir).resolve(), cfg.checkpoint_dir.resolve()
    return [run] if ckpt.is_relative_to(run) else [run, ckpt]


def _check_inputs(cfg: Config, config_file: Path | None = None) -> None:
    """What can be checked before the distributed start: a named tokenizer exists. ``config_file``:
    the file ``cfg`` was read from, whose folder a relative path was looked for in too."""
    tok = cfg.data.tokenizer
    if tok and not input_exists(Path(tok).expanduser()):
        tried = ", ".join(str(p) for p in input_candidates(tok, config_file))
        raise DataError(f"data.tokenizer = {tok!r} was not found (looked for: {tried}); give the path of a .model "
                        "or tokenizer.json, or leave data.tokenizer empty to train one on the corpus")


def train(cfg: Config) -> dict:
    """Run (or resume) the training ``cfg`` describes; returns the last metrics."""
    config_file = getattr(cfg, "_config_file", None)  # set by load_config; resolve_config may make a new cfg
    cfg = resolve_config(cfg)  # model.init_from: [model] and data.tokenizer from the weights' config
    _check_inputs(cfg, config_file)
    world = init_world(cfg.parallel.backend, cfg.parallel.sequence)
    cfg.check_world(world.size)
    init = prepare_init(cfg)  # model.init_from's weights, checked before anything is written; None: resume
    locks = lock_run(_run_dirs(cfg), world)  # before anything is written to the run
    try:
        result = _train(cfg, world, init)
    except BaseException:
        for lock in locks:  # a run that never started leaves no folder behind
            lock.release(failed_start=True)
        raise
    for lock in locks:
        lock.release()
    return result


def _cpu_threads(world: World, saved: int | None = None) -> str:
    """On CPU, take the cores other processes leave free now, and keep that count for the run:
    a changing count could round matrix products differently and break a bitwise resume. A
    resume takes the count its checkpoint was made with (``saved``) where the process may."""
    if world.device.type != "cpu":
        return ""
    ceiling = torch.get_num_threads()
    if saved:
        n = min(saved, ceiling)
        torch.set_num_threads(n)
        why = ("as its checkpoint was made" if n == saved else
               f"its checkpoint was made with {saved} but this process may use {ceiling} (OMP_NUM_THREADS): "
               "results can round differently from an uninterrupted run")
        return f" ({n} thread{'s' if n > 1 else ''}, {why})"
    n = adapt_torch_threads()
    return f" ({n} thread{'s' if n > 1 else ''}" + (f"; {ceiling - n} of {ceiling} cores busy elsewhere)"
                                                   if n < ceiling else ")")


def _say(world: World, text: str) -> None:
    if world.is_main:
        print(text, flush=True)


def _train(cfg: Config, world: World, init) -> dict:
    # What to resume, and whether the new config may continue it: before any data or engine.
    found = find_resume(cfg.checkpoint_dir, world)
    changes = reconcile(found, cfg) if found else None
    if found:
        for note in changes.notes:
            _say(world, f"resume: {note}")
        saved = found.meta
        done = saved["step"]
        if done >= cfg.train.steps:
            _say(world, f"{cfg.run.dir} already finished: its checkpoint {found} is at step {done} of "
                        f"train.steps = {cfg.train.steps}; nothing to do. To train on, raise it "
                        f"(--train.steps=N); to evaluate: python -m fmtrain.eval {cfg.run.dir}")
            return dict(step=done, stopped=False, preempted=False, finished_before=True)
    dtype = _dtype(cfg, world)
    threads = _cpu_threads(world, saved.get("cpu_threads") if found else None)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    data = _build_data(cfg, world)
    model = apply_sequence_parallel(build_model(cfg.model, position_reset=cfg.data.position_reset),
                                    world.sp_group)  # no group: one device
    init_note = init.load(model) if init else ""  # weights only: optimizer, schedule and data start fresh
    n_params = model.num_params()  # before ZeRO 3 partitions them away from this rank
    engine = build_engine(model, cfg, world, dtype)
    state = TrainState()
    ckpt = Checkpointer(cfg, world, data.tokenizer.path)
    resumed = ckpt.resume(engine, data.train, state, found) if found else None
    if changes and changes.notes:
        apply_hyperparameters(engine, cfg)
    if world.is_main:
        save_config(cfg, cfg.run.dir, tokenizer_comment(cfg, data.tokenizer.path))
    tokens_per_step = cfg.data.seq_len * cfg.data.batch_size * cfg.train.grad_accum * world.dp_size
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak, peak_src = peak_flops(world.device, dtype)
    log = Metrics(cfg.run.dir, total_steps=cfg.train.steps, start_step=state.step, enabled=world.is_main,
                  flops_per_token=fpt, peak=peak * world.size if peak else None)
    rate = f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_src})" if peak else f"achieved FLOP/s ({peak_src})"
    log.note(f"fmtrain: {cfg.name} | {n_params / 1e6:.2f}M parameters | {cfg.model.kind} "
             f"{cfg.model.attention} | {world.size} process(es), dp {world.dp_size} x sp {world.sp_size}, "
             f"ZeRO {cfg.parallel.zero_stage}, {dtype}, {world.device.type}{threads} | seq_len {cfg.data.seq_len} | "
             f"{tokens_per_step:,} tokens/step | {rate}" + (f" | resumed from {resumed}" if resumed else "")
             + (f" | {init_note}" if init_note else ""))
    if not cfg.data.tokenizer:
        log.note(f"tokenizer: data.tokenizer is empty, so a {data.tokenizer.vocab_size}-piece SentencePiece model was "
                 f"trained on the corpus (once; cached) at {data.tokenizer.path}; checkpoints carry a copy. Give "
                 "data.tokenizer that path to share it with other runs")
    if cfg.train.steps <= cfg.train.warmup_steps:
        log.note(f"note: train.steps = {cfg.train.steps} <= train.warmup_steps = {cfg.train.warmup_steps}: the run "
                 "ends during warmup, before the learning rate decays; shorten train.warmup_steps for a short run")
    if data.val is None:
        log.note(f"evaluation: off: data.corpus holds no documents out (data.val_fraction = "
                 f"{cfg.data.val_fraction} selected none); raise data.val_fraction or add documents")
    stop = StopFlag(world, cfg.train.max_minutes)
    t_start = time.perf_counter()
    start_step = state.step

    def run_eval() -> dict | None:
        if data.val is None:
            return None
        result = evaluate(engine, data.val, world, data.tokenizer.token_bytes, cfg.train.eval_batches, stop,
                          document_masking=cfg.data.document_masking)
        if result is not None:  # None: a stop signal cut it short (the loop then checkpoints)
            log.eval(state.step, result)
        return result

    last: dict = {}
    if not resumed:
        last["first_eval"] = run_eval()
    stopped = False
    path = resumed
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        batches = [data.train.next_batch() for _ in range(cfg.train.grad_accum)]
        t_data = time.perf_counter() - t0
        lr = engine.lr_scheduler.get_last_lr()[0]
        loss, gnorm = train_step(engine, batches, world, cfg.data.document_masking)
        state.step += 1
        state.tokens_seen += tokens_per_step
        dt = time.perf_counter() - t0
        last.update(step=state.step, loss=loss)
        finite = _finite_everywhere(world, loss, gnorm)
        if not finite or state.step % cfg.train.log_interval == 0 or state.step == cfg.train.steps:
            log.step(step=state.step, loss=loss, lr=lr, grad_norm=gnorm,
                     tokens_seen=state.tokens_seen, tokens_per_s=tokens_per_step / dt, step_time=dt,
                     data_time=t_data, device=world.device)
        if not finite:
            raise _diverged(cfg, state.step, f"loss {loss}, gradient norm {gnorm}")
        if cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0 and state.step < cfg.train.steps:
            last["eval"] = run_eval()
        stopped = stop.should_stop() or state.step == cfg.train.stop_at_step
        if state.step % cfg.checkpoint.interval == 0 or state.step == cfg.train.steps or stopped:
            if not all_finite(engine, world):  # never save what cannot be trained on
                raise _diverged(cfg, state.step, "the weights or optimizer state hold non-finite values")
            path = ckpt.save(engine, data.train, state)
            log.note(f"checkpoint {path}")
        if stopped:
            log.note(f"stopping after step {state.step}: {stop.reason}; restart with the same run.dir to resume")
            break
    if not stopped:
        last["eval"] = run_eval()
        log.note(_summary(cfg, state, start_step, time.perf_counter() - t_start, last.get("eval"), path))
    stop.restore()
    log.close()
    last["stopped"] = stopped
    # Stopped by a signal or train.max_minutes (not the planned stop_at_step): main exits 75.
    last["preempted"] = stopped and state.step != cfg.train.stop_at_step
    return last


def _summary(cfg: Config, state: TrainState, start_step: int, seconds: float, ev: dict | None,
             ckpt: Path | None) -> str:
    """The last line of a finished run: what was done and where everything is."""
    run = Path(cfg.run.dir)
    done = f"{state.step - start_step} steps this time" if start_step else f"{state.step} steps"
    result = (f"eval loss {ev['eval_loss']:.4f}, bpb {ev['eval_bpb']:.4f}" if ev else "no evaluation "
              "(nothing held out)")
    return (f"finished {cfg.name}: step {state.step}/{cfg.train.steps} ({done}), {state.tokens_seen:,} tokens, "
            f"{_clock(seconds)} | final {result} | checkpoint {ckpt} | logs {run / 'metrics.jsonl'}, "
            f"tensorboard --logdir {run / 'tb'}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv: list[str] | None = None) -> int:
    """The command: exit 0 finished, 75 stopped early, 2 a problem to fix (one error: line),
    3 diverged (see fmtrain/signals.py; under launch/run.sh the status goes through a file)."""
    def run() -> int:
        result = train(config_from_argv(argv))
        return exit_status("stopped" if result["preempted"] else "finished")

    try:
        return run_main(run, outcome=exit_status)
    finally:
        shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
