"""Held-out evaluation: loss, bits per byte and perplexity.

    python -m fmtrain.eval RUN_DIR_OR_CHECKPOINT [--batches N] [--batch-size B]
    python -m fmtrain.eval RUN_DIR_OR_CHECKPOINT --by-position [--max-len N] [--out FILE]
    python -m fmtrain.eval RUN_DIR_OR_CHECKPOINT --needle [--lengths 1024,4096] [--depths 0,0.5,1] [--keys K]

``--by-position``: does the model use its context? Held-out loss by the predicted token's
position in its document (documents read one at a time from their start, so no target
crosses a document boundary), in log-spaced buckets with the tokens and documents behind
each (:mod:`fmtrain.by_position`): a table, and ``FILE.json`` / ``FILE.png`` with ``--out``.
``--needle``: a key-value pair hidden in held-out text at chosen depths of prompts of chosen
lengths, asked for at the end (RULER's single and multi-key needles, :mod:`fmtrain.needle`):
accuracy by length and depth, a table and ``FILE.json`` with ``--out``.

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the text the
scored tokens stand for, so numbers compare across tokenizers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch


@torch.no_grad()
def evaluate(model, loader, world, token_bytes: torch.Tensor, max_batches: int | None = None,
             stop=None, progress=None) -> dict | None:
    """Token-weighted held-out loss over ``loader`` (all ranks together).

    ``stop``: a :class:`fmtrain.signals.StopFlag`, asked after every batch (all ranks
    together) so that a long evaluation does not outlast SLURM's warning; None if it
    fired (the evaluation is abandoned, the trainer checkpoints and exits).
    """
    was_training = model.training
    model.eval()
    device = world.device
    token_bytes = token_bytes.to(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss (nats), tokens, bytes
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        targets = batch["targets"].to(device)
        loss_sum, count = model(batch["input_ids"].to(device), targets, batch["positions"].to(device))
        scored = targets[targets >= 0]
        totals += torch.stack([loss_sum.double(), count.double(), token_bytes[scored].sum().double()])
        if progress is not None:
            progress(i + 1)
        if stop is not None and stop.should_stop():
            model.train(was_training)
            return None
    world.all_reduce(totals)
    model.train(was_training)
    loss, tokens, nbytes = totals.tolist()
    mean = loss / max(tokens, 1)
    return dict(eval_loss=mean, eval_bpb=loss / (math.log(2) * max(nbytes, 1)), eval_ppl=math.exp(min(mean, 700)),
                eval_tokens=int(tokens))


def main(argv=None) -> int:
    from .checkpoint import resolve
    from .export import load_config_of, load_model
    from .data import loaders_for
    from .errors import UserError
    from .parallel import World

    ap = argparse.ArgumentParser(prog="python -m fmtrain.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    ap.add_argument("--batches", type=int, default=None, help="evaluate at most this many batches "
                                                              "(default: the whole held-out set)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--by-position", action="store_true",
                    help="held-out loss by position in the document instead (documents read from their start)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="--by-position: tokens read from each document (default: 8 x data.seq_len, to see "
                         "beyond the training length)")
    ap.add_argument("--min-doc-len", type=int, default=1, help="--by-position: skip shorter documents")
    ap.add_argument("--out", default=None, help="--by-position, --needle: write OUT.json (and --by-position "
                                                "OUT.png, with matplotlib)")
    ap.add_argument("--needle", action="store_true", help="a needle test on held-out text instead")
    ap.add_argument("--lengths", default=None, help="--needle: prompt lengths in tokens (default: data.seq_len "
                                                    "and 4x it)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="--needle: where the needle sits (0: start)")
    ap.add_argument("--samples", type=int, default=8, help="--needle: prompts per (length, depth)")
    ap.add_argument("--keys", type=int, default=1, help="--needle: needles per prompt, one asked for (RULER's "
                                                        "multi-key)")
    args = ap.parse_args(argv)
    ckpt = resolve(args.checkpoint)
    cfg = load_config_of(ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.by_position and args.needle:
        raise UserError("--by-position and --needle are two evaluations: run them one at a time")
    if args.by_position:
        return _by_position(args, ckpt, cfg, device)
    if args.needle:
        return _needle(args, ckpt, cfg, device)
    world = World(rank=0, local_rank=0, size=1, sp_size=1, device=device, backend="none")
    tok = ckpt / "tokenizer.model"
    try:
        data = loaders_for(cfg, world, tokenizer=str(tok), batch_size=args.batch_size, progress=True)
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        raise UserError(f"the data of {ckpt / 'config.toml'} (data.corpus = {cfg.data.corpus}): {exc}") from None
    if data.val is None:
        raise UserError(f"data.corpus = {cfg.data.corpus} holds no documents out for evaluation "
                        f"(data.val_fraction = {cfg.data.val_fraction} selected none)")
    model, _ = load_model(ckpt)
    model.to(device)
    if device.type == "cpu":
        from .attention.cpu import adapt_torch_threads

        adapt_torch_threads()  # the cores other processes leave free
    n = len(data.val) if args.batches is None else min(args.batches, len(data.val))
    rows = n * (args.batch_size or cfg.data.batch_size)
    print(f"evaluating {ckpt} on {n} held-out batches ({rows} sequences of {cfg.data.seq_len} tokens), on one "
          f"process. Training evaluated train.eval_batches = {cfg.train.eval_batches} batches per "
          f"data-parallel rank: the numbers agree when both cover the same sequences (the same batches, "
          f"batch size and ranks), and differ by the sample otherwise.", file=sys.stderr, flush=True)
    result = evaluate(model, data.val, world, data.tokenizer.token_bytes, args.batches,
                      progress=_progress(n))
    print(json.dumps(dict(checkpoint=str(ckpt), **result), indent=1))
    return 0


def _held_out_and_model(args, ckpt, cfg, device):
    """The run's held-out documents (token arrays, longest first) and its model, on ``device``."""
    from . import by_position
    from .errors import UserError
    from .export import load_model

    try:
        docs = by_position.held_out_documents(cfg, args.min_doc_len, str(ckpt / "tokenizer.model"))
    except (ValueError, OSError) as exc:
        raise UserError(f"the data of {ckpt / 'config.toml'} (data.corpus = {cfg.data.corpus}): {exc}") from None
    if not docs:
        raise UserError(f"data.corpus = {cfg.data.corpus} holds no held-out document of at least "
                        f"{args.min_doc_len} tokens; lower --min-doc-len or raise data.val_fraction")
    model, _ = load_model(ckpt)
    model.to(device).eval()
    if device.type == "cpu":
        from .attention.cpu import adapt_torch_threads

        adapt_torch_threads()
    return docs, model


def _write_json(path: str, data: dict) -> None:
    from pathlib import Path

    out = Path(path).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}", file=sys.stderr)


def _needle(args, ckpt, cfg, device) -> int:
    from . import needle
    from .data.tokenizer import load_tokenizer
    from .errors import UserError

    try:
        lengths = [int(x) for x in (args.lengths or f"{cfg.data.seq_len},{4 * cfg.data.seq_len}").split(",")]
        depths = [float(x) for x in args.depths.split(",")]
    except ValueError:
        raise UserError(f"--lengths {args.lengths!r} and --depths {args.depths!r}: give comma-separated numbers, "
                        "e.g. --lengths 1024,4096 --depths 0,0.5,1") from None
    if min(lengths) < 64 or not all(0 <= d <= 1 for d in depths) or args.samples < 1 \
            or not 1 <= args.keys <= len(needle.KEYS):
        raise UserError(f"--lengths at least 64 tokens, --depths within [0, 1], --samples >= 1 and --keys 1 to "
                        f"{len(needle.KEYS)}; got {lengths}, {depths}, {args.samples}, {args.keys}")
    docs, model = _held_out_and_model(args, ckpt, cfg, device)
    tok = load_tokenizer(ckpt / "tokenizer.model")
    print(f"needle test: {ckpt}, lengths {lengths}, depths {depths}, {args.keys} key(s), {args.samples} samples "
          "a cell, haystack from the held-out documents", file=sys.stderr, flush=True)
    report = _progress(len(lengths) * len(depths) * args.samples, what="prompt")
    try:
        rows = needle.needle_test(model, tok, docs, lengths, depths, args.samples, args.keys,
                                  progress=lambda i, n: report(i))
    except ValueError as exc:
        raise UserError(f"--needle: {exc}") from None
    print(needle.table(rows))
    if args.out:
        _write_json(args.out, dict(checkpoint=str(ckpt), seq_len=cfg.data.seq_len, rows=rows))
    return 0


def _by_position(args, ckpt, cfg, device) -> int:
    from . import by_position
    from .errors import UserError

    max_len = args.max_len or 8 * cfg.data.seq_len
    if max_len < 2 or args.min_doc_len < 1:
        raise UserError(f"--max-len {max_len} and --min-doc-len {args.min_doc_len}: give counts of at least 2 and 1")
    docs, model = _held_out_and_model(args, ckpt, cfg, device)
    tokens = sum(min(len(d), max_len) for d in docs)
    print(f"loss by position: {ckpt}, {len(docs)} held-out documents, up to {max_len:,} tokens each "
          f"({tokens:,} tokens), one at a time", file=sys.stderr, flush=True)
    report = _progress(len(docs), what="document")
    result = by_position.loss_by_position(model, docs, max_len, progress=lambda i, n: report(i))
    print(by_position.table(result, cfg.data.seq_len))
    if args.out:
        _write_json(args.out, dict(checkpoint=str(ckpt), seq_len=cfg.data.seq_len, edges=list(by_position.EDGES),
                                   **result))
        from pathlib import Path

        try:
            by_position.plot(result, cfg.data.seq_len, Path(args.out).with_suffix(".png"),
                             f"{ckpt}: held-out loss by position")
        except ImportError:
            print("note: no plot (matplotlib is not installed)", file=sys.stderr)
    return 0


def _progress(total: int, every: float = 10.0, what: str = "eval batch"):
    """A callback printing ``batch i/total`` to stderr every few seconds."""
    import time

    last = [time.monotonic()]

    def report(i: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every or i == total:
            last[0] = now
            print(f"{what} {i}/{total}", file=sys.stderr, flush=True)

    return report


if __name__ == "__main__":
    from .errors import run_main

    sys.exit(run_main(main))
