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

Counts are positive whole numbers, and an option of another evaluation than the one run
(``--batches`` with ``--needle``, ``--max-len`` without ``--by-position``) is refused, not
ignored: one ``error:`` line, exit status 2. Ctrl-C stops with exit status 130, a closed
pipe quietly with 141.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import sys

import torch


@torch.no_grad()
def evaluate(model, loader, world, token_bytes: torch.Tensor, max_batches: int | None = None,
             stop=None, progress=None, document_masking: bool = False) -> dict | None:
    """Token-weighted held-out loss over ``loader`` (all ranks together).

    ``document_masking``: the run's ``data.document_masking``; the model gets the batches'
    ``doc_positions`` as in training, so the held-out loss is the one the model was trained for.

    ``stop``: a :class:`fmtrain.signals.StopFlag`, asked after every batch (all ranks
    together) so that a long evaluation does not outlast SLURM's warning; None if it
    fired (the evaluation is abandoned, the trainer checkpoints and exits). ``max_batches``
    None or >= 1 (else ValueError).
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral)
                                    or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r}: give a whole number >= 1 (None: the whole held-out set)")
    was_training = model.training
    model.eval()
    device = world.device
    token_bytes = token_bytes.to(device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss (nats), tokens, bytes
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        targets = batch["targets"].to(device)
        docs = batch["doc_positions"] if document_masking else None  # on the host, as train_step passes them
        loss_sum, count = model(batch["input_ids"].to(device), targets, batch["positions"].to(device), docs)
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
    from .export import load_config_of
    from .data import loaders_for
    from .errors import UserError
    from .parallel import World

    ap = argparse.ArgumentParser(prog="python -m fmtrain.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    ap.add_argument("--batches", type=int, default=None, help="evaluate at most this many batches, >= 1 "
                                                              "(default: the whole held-out set)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per batch, >= 1 (default: the run's "
                                                                 "data.batch_size)")
    ap.add_argument("--by-position", action="store_true",
                    help="held-out loss by position in the document instead (documents read from their start)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="--by-position: tokens read from each document, >= 2 (default: 8 x data.seq_len, to see "
                         "beyond the training length)")
    ap.add_argument("--min-doc-len", type=int, default=None, help="--by-position, --needle: skip held-out "
                                                                  "documents shorter than this, >= 1 (default 1)")
    ap.add_argument("--out", default=None, help="--by-position, --needle: write OUT.json (and --by-position "
                                                "OUT.png, with matplotlib)")
    ap.add_argument("--needle", action="store_true", help="a needle test on held-out text instead")
    ap.add_argument("--lengths", default=None, help="--needle: prompt lengths in tokens, each >= 64 (default: "
                                                    "data.seq_len and 4x it)")
    ap.add_argument("--depths", default=None, help="--needle: where the needle sits, within [0, 1] (0: start; "
                                                   f"default {DEPTHS})")
    ap.add_argument("--samples", type=int, default=None, help="--needle: prompts per (length, depth), >= 1 "
                                                              f"(default {SAMPLES})")
    ap.add_argument("--keys", type=int, default=None, help="--needle: needles per prompt, one asked for (RULER's "
                                                           "multi-key), 1 to 16 (default 1)")
    add_max_level_argument(ap)
    args = ap.parse_args(argv)
    _check_args(args)  # before anything is loaded
    ckpt = resolve(args.checkpoint)
    cfg = load_config_of(ckpt)
    past_training(args, cfg)
    args.max_level = max_level_of(args.max_level, cfg, args.flat_top)
    args.rope_scaling = rope_scaling_of(args.rope_scaling, cfg)
    args.select_reach = select_reach_of(args.select_reach, cfg)
    args.attend_reach = attend_reach_of(args.attend_reach, args.select_reach, cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.min_doc_len is None:
        args.min_doc_len = 1
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
    held = data.val.n_sequences
    if data.val.batch_size > held > 0:  # rows past the held-out set would be padding, and memory
        given = f"--batch-size {args.batch_size}" if args.batch_size else \
            f"data.batch_size = {cfg.data.batch_size} (of {ckpt / 'config.toml'})"
        print(f"note: {given} is more than the {held} sequences the held-out set has; batches of {held}",
              file=sys.stderr, flush=True)
        data = loaders_for(cfg, world, tokenizer=str(tok), batch_size=held)
    model = _model(ckpt, device, args.max_level, args.flat_top, args.rope_scaling, args.select_reach,
                   args.attend_reach)
    n = len(data.val) if args.batches is None else min(args.batches, len(data.val))
    rows = min(n * data.val.batch_size, data.val.n_sequences)  # the last batch may be part padding
    print(f"evaluating {ckpt} on {n} held-out batches ({rows} sequences of {cfg.data.seq_len} tokens), on one "
          f"process. Training evaluated train.eval_batches = {cfg.train.eval_batches} batches per "
          f"data-parallel rank: the numbers agree when both cover the same sequences (the same batches, "
          f"batch size and ranks), and differ by the sample otherwise.", file=sys.stderr, flush=True)
    result = evaluate(model, data.val, world, data.tokenizer.token_bytes, args.batches,
                      progress=_progress(n), document_masking=cfg.data.document_masking)
    if result["eval_tokens"] == 0:  # a loss of 0 and a perplexity of 1 from no tokens is no result
        raise UserError(f"data.corpus = {cfg.data.corpus} holds too few held-out tokens to score one (the held-out "
                        f"set is {n} batches of {cfg.data.seq_len}-token sequences); raise data.val_fraction")
    print(json.dumps(dict(checkpoint=str(ckpt), **result), indent=1))
    return 0


# --------------------------------------------------------------------------- arguments
DEPTHS = "0,0.25,0.5,0.75,1"  # --needle's default depths
SAMPLES = 8  # --needle's default prompts per (length, depth)
MIN_NEEDLE_LEN = 64  # --needle: shorter prompts hardly hold a needle and its question

# The options of each evaluation (None: the plain one); an option given to another is refused, not ignored.
_MODE_OPTIONS = {None: ("batches", "batch_size"),
                 "--by-position": ("max_len", "min_doc_len", "out"),
                 "--needle": ("lengths", "depths", "samples", "keys", "min_doc_len", "out")}
_PLAIN = "the plain evaluation (without --by-position or --needle)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_args(args) -> None:
    """Refuse, naming the option, what was given and what is accepted, every number that is not one
    and every option that the chosen evaluation would ignore."""
    from .errors import UserError

    if args.by_position and args.needle:
        raise UserError("--by-position and --needle are two evaluations: run them one at a time")
    mode = "--by-position" if args.by_position else "--needle" if args.needle else None
    for name in sorted({n for names in _MODE_OPTIONS.values() for n in names}, key=list(vars(args)).index):
        if getattr(args, name) is not None and name not in _MODE_OPTIONS[mode]:
            owners = [m for m, names in _MODE_OPTIONS.items() if name in names]
            fix = "leave it out" if None in owners else f"add {' or '.join(owners)}, or leave it out"
            raise UserError(f"{_flag(name)} {getattr(args, name)}: an option of "
                            f"{' and '.join(m or _PLAIN for m in owners)}, not of {mode or _PLAIN}; {fix}")
    for name, least, default in (("batches", 1, "the whole held-out set"),
                                 ("batch_size", 1, "the run's data.batch_size"), ("max_len", 2, "8 x data.seq_len"),
                                 ("min_doc_len", 1, "1"), ("samples", 1, str(SAMPLES))):
        value = getattr(args, name)
        if value is not None and value < least:
            raise UserError(f"{_flag(name)} {value}: give a whole number >= {least} (leave it out: {default})")
    from .needle import KEYS

    if args.keys is not None and not 1 <= args.keys <= len(KEYS):
        raise UserError(f"--keys {args.keys}: give a whole number from 1 to {len(KEYS)} (leave it out: 1)")
    if args.lengths is not None:  # parsed here, once: the lists replace the text
        args.lengths = _parse_list("--lengths", args.lengths, int, lambda x: x >= MIN_NEEDLE_LEN, "a length",
                                   f"give prompt lengths in tokens, each at least {MIN_NEEDLE_LEN}")
    if args.depths is not None:
        args.depths = _parse_list("--depths", args.depths, float, lambda x: 0 <= x <= 1, "a depth",
                                  "give --depths within [0, 1] (0: the prompt's start, 1: just before the question)")
    if args.out is not None:  # writable, before hours of evaluation
        from .errors import output_file_problem

        problem = output_file_problem(args.out, "--out", _out_suffixes(args))
        if problem is not None:
            raise UserError(problem)


def _out_suffixes(args) -> tuple[str, ...]:
    """The files --out names: OUT.json, and OUT.png for --by-position."""
    return (".json", ".png") if args.by_position else (".json",)


def _parse_list(flag: str, text: str, kind, ok, what: str, accepted: str) -> list:
    """``text``'s comma-separated values, each once, or a UserError saying which one is not ``what``."""
    from .errors import UserError

    values, shown = [], text if text.strip() else repr(text)
    for item in text.split(","):
        try:
            value = kind(item)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise UserError(f"{flag} {shown}: {item.strip()!r} is not {what}; {accepted}, comma-separated")
        if value in values:
            raise UserError(f"{flag} {shown}: {item.strip()!r} is given twice; {accepted}, comma-separated, each once")
        values.append(value)
    return values


def _lengths_within(lengths: list[int], held: int, given: bool, min_doc_len: int) -> list[int]:
    """The needle's prompt lengths that the held-out text can fill without repeating itself (a
    haystack is a stretch of it); given lengths beyond it are refused, default ones dropped with a note."""
    from .errors import UserError

    fit = [n for n in lengths if n <= held]
    if fit == lengths:
        return lengths
    longer = ",".join(str(n) for n in lengths if n > held)
    held_text = f"the {held:,} tokens of the held-out documents" + \
        (f" of at least {min_doc_len} tokens" if min_doc_len > 1 else "")
    if given:
        raise UserError(f"--lengths {','.join(map(str, lengths))}: {longer} is longer than {held_text}, which a "
                        f"prompt's haystack is taken from (it would repeat them); give lengths up to {held}, or "
                        "raise data.val_fraction")
    if not fit:
        raise UserError(f"the default --lengths ({longer}) are longer than {held_text}, which a prompt's haystack "
                        f"is taken from; give --lengths up to {held} (at least {MIN_NEEDLE_LEN})")
    print(f"note: no prompts of {longer} tokens (the default --lengths): longer than {held_text}", file=sys.stderr)
    return fit


def _held_out(args, ckpt, cfg):
    """The run's held-out documents (token arrays, longest first) of at least --min-doc-len tokens."""
    from . import by_position
    from .errors import UserError

    try:
        docs = by_position.held_out_documents(cfg, args.min_doc_len, str(ckpt / "tokenizer.model"))
    except (ValueError, OSError) as exc:
        raise UserError(f"the data of {ckpt / 'config.toml'} (data.corpus = {cfg.data.corpus}): {exc}") from None
    if not docs:
        raise UserError(f"data.corpus = {cfg.data.corpus} holds no held-out document of at least "
                        f"{args.min_doc_len} tokens; lower --min-doc-len or raise data.val_fraction")
    return docs


def _model(ckpt, device, max_level: int | None = None, flat_top: bool = False, rope_scaling: dict | None = None,
           select_reach: int | None = None, attend_reach: bool = False):
    """The checkpoint's model on ``device``, in eval mode, its coarse levels capped at ``max_level``
    (the top one flat with ``flat_top``), RoPE scaled by ``rope_scaling`` and refinement's selection
    (and with ``attend_reach`` its far field's attention) clamped at ``select_reach`` where given."""
    from .export import load_trained

    model, cfg = load_trained(ckpt)
    model.to(device).eval()
    apply_length_options(model, cfg, max_level, flat_top, rope_scaling, select_reach, attend_reach)
    if device.type == "cpu":
        from .attention.cpu import adapt_torch_threads

        adapt_torch_threads()
    return model


def apply_length_options(model, cfg, max_level: int | None, flat_top: bool, rope_scaling: dict | None,
                         select_reach: int | None, attend_reach: bool = False) -> None:
    """``--max-level``, ``--flat-top``, ``--rope-scaling``, ``--select-reach`` and ``--attend-reach`` (as
    checked by :func:`max_level_of` and its siblings) on a loaded model of the run ``cfg`` (eval and generate)."""
    from .model import cap_levels, scale_rope, set_select_reach

    if select_reach is not None or attend_reach:
        set_select_reach(model, cfg.model.select_reach if select_reach is None else select_reach,
                         attend_reach or cfg.model.attend_reach)
    if rope_scaling is not None:
        scale_rope(model, rope_scaling)
    if max_level is not None or flat_top:
        cap_levels(model, cfg.model.max_level if max_level is None else max_level, flat_top or None)


def add_max_level_argument(ap: argparse.ArgumentParser) -> None:
    """``--max-level N|trained`` and the other length options, as eval and generate take them
    (:func:`past_training`, :func:`max_level_of` and the others read them)."""
    ap.add_argument("--past-training", action="store_true",
                    help="multipole models, for lengths past the training length: what retrieves there on our "
                         "benchmarks (README, Adaptive refinement): --max-level trained, and for refined models "
                         "(model.refine > 0) --flat-top, --select-reach trained and --attend-reach too; an option "
                         "given beside it is kept")
    ap.add_argument("--max-level", default=None, metavar="N|trained",
                    help="multipole models: keep the coarse levels 1..N only (model.max_level); 'trained': those "
                         "the model's training length has, for lengths past it (levels it never saw collapse its "
                         "recall; README, Adaptive refinement)")
    ap.add_argument("--flat-top", action="store_true",
                    help="with --max-level (or model.max_level), refined models (model.refine > 0): the top kept "
                         "level's lists hold every earlier window of it, so nothing is out of reach "
                         "(model.flat_top; its cost grows with the length)")
    ap.add_argument("--select-reach", default=None, metavar="N|trained",
                    help="refined models (model.refine > 0): score summaries farther than N tokens as if N away when "
                         "choosing the blocks to open (model.select_reach); 'trained': data.seq_len. Past the "
                         "training length far windows' scores drift with unseen distances and take the selection")
    ap.add_argument("--attend-reach", action="store_true",
                    help="with --select-reach (or model.select_reach): the far field's attention too reads tokens and "
                         "summaries farther than it as if that far (model.attend_reach, ReRoPE-like), so far tokens "
                         "are scored at distances the model trained")
    ap.add_argument("--rope-scaling", default=None, metavar="KIND:FACTOR",
                    help="run with RoPE's frequencies scaled, without fine-tuning (model.rope_scaling), for "
                         "lengths past the training length: 'llama3:F' (Llama 3.1's: low frequencies divided by F, "
                         "high ones kept, original length data.seq_len) or 'linear:F' (position interpolation)")


def past_training(args, cfg) -> None:
    """``--past-training``: fills ``args``' length options not given with the settings that retrieve past
    the training length (the coarse levels trained, for refined models the top one flat and the far
    field's distances, selection and attention, clamped at the training length)."""
    if not args.past_training:
        return
    from .errors import UserError

    if cfg.model.attention != "fma":
        raise UserError(f"--past-training: sets multipole attention's length options; this model's attention is "
                        f"{cfg.model.attention!r}: leave it out (--rope-scaling llama3:F is the option for it)")
    if args.max_level is None:
        args.max_level = "trained"
    if cfg.model.refine:
        args.flat_top = True
        if args.select_reach is None:
            args.select_reach = "trained"
        args.attend_reach = True


def attend_reach_of(flag: bool, select_reach: int | None, cfg) -> bool:
    """``--attend-reach`` (eval and generate), checked against the reach it extends."""
    if flag and select_reach is None and cfg.model.select_reach is None:
        from .errors import UserError

        raise UserError("--attend-reach reads the far field as at --select-reach, which is not given (nor "
                        "model.select_reach): add --select-reach N|trained")
    return bool(flag)


def select_reach_of(flag: str | None, cfg) -> int | None:
    """``--select-reach N|trained`` (eval and generate): a distance in tokens, or None."""
    if flag is None:
        return None
    from .errors import UserError

    if cfg.model.attention != "fma" or not cfg.model.refine:
        raise UserError(f"--select-reach {flag}: changes adaptive refinement's selection; this model has attention="
                        f"{cfg.model.attention!r}, model.refine={cfg.model.refine}: leave it out")
    if flag == "trained":
        return cfg.data.seq_len
    if not flag.isdigit() or int(flag) < 1:
        raise UserError(f"--select-reach {flag}: give a distance in tokens >= 1, or 'trained' (data.seq_len = "
                        f"{cfg.data.seq_len})")
    return int(flag)


def rope_scaling_of(flag: str | None, cfg) -> dict | None:
    """``--rope-scaling KIND:FACTOR`` (eval and generate) as a ``model.rope_scaling`` dict, or None."""
    if flag is None:
        return None
    from .attention.rope import parse_scaling
    from .errors import UserError

    try:
        return parse_scaling(flag, cfg.data.seq_len)
    except ValueError as exc:
        raise UserError(f"--rope-scaling {exc}") from None


def max_level_of(flag: str | None, cfg, flat_top: bool = False) -> int | None:
    """``--max-level N|trained`` (eval and generate), checked against the run's config with
    ``--flat-top``: the level to cap the model's coarse levels at, or None (leave the run's
    model.max_level)."""
    from .errors import UserError
    from .model import trained_levels

    if flat_top and (cfg.model.attention != "fma" or not cfg.model.refine):
        raise UserError(f"--flat-top: widens the top level for adaptive refinement; this model has attention="
                        f"{cfg.model.attention!r}, model.refine={cfg.model.refine}: leave it out")
    if flat_top and flag is None and cfg.model.max_level is None:
        raise UserError("--flat-top: flattens the top level that --max-level keeps; give --max-level N or "
                        "--max-level trained with it")
    if flag is None:
        return None

    if cfg.model.attention != "fma":
        raise UserError(f"--max-level {flag}: caps multipole attention's coarse levels; this model's attention "
                        f"is {cfg.model.attention!r}: leave it out")
    if flag == "trained":
        return trained_levels(cfg.model, cfg.data.seq_len)
    try:
        level = int(flag)
    except ValueError:
        level = 0
    if level < 1:
        raise UserError(f"--max-level {flag}: give a whole number >= 1, or 'trained' (the levels of "
                        f"data.seq_len = {cfg.data.seq_len}: {trained_levels(cfg.model, cfg.data.seq_len)})")
    return level


def _write_json(path: str, data: dict) -> None:
    """``OUT.json``, whole or not at all (an earlier one stays until it is replaced); a failure to write
    it (a full disk) is one error line, after the results were printed."""
    from pathlib import Path

    from .errors import write_file

    out = Path(path).with_suffix(".json")
    write_file(out, json.dumps(data, indent=1).encode(), "--out")
    print(f"wrote {out}", file=sys.stderr)


def _needle(args, ckpt, cfg, device) -> int:
    from . import needle
    from .data.tokenizer import load_tokenizer
    from .errors import UserError

    # Parsed and checked by _check_args; the defaults here.
    lengths = args.lengths if args.lengths is not None else \
        sorted({max(cfg.data.seq_len, MIN_NEEDLE_LEN), max(4 * cfg.data.seq_len, MIN_NEEDLE_LEN)})
    depths = args.depths if args.depths is not None else [float(x) for x in DEPTHS.split(",")]
    args.samples = SAMPLES if args.samples is None else args.samples
    args.keys = 1 if args.keys is None else args.keys
    docs = _held_out(args, ckpt, cfg)
    lengths = _lengths_within(lengths, sum(map(len, docs)), args.lengths is not None, args.min_doc_len)
    model = _model(ckpt, device, args.max_level, args.flat_top, args.rope_scaling, args.select_reach,
                   args.attend_reach)
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

    max_len = args.max_len if args.max_len is not None else max(8 * cfg.data.seq_len, 2)  # checked: >= 2
    docs = _held_out(args, ckpt, cfg)
    model = _model(ckpt, device, args.max_level, args.flat_top, args.rope_scaling, args.select_reach,
                   args.attend_reach)
    tokens = sum(min(len(d), max_len) for d in docs)
    print(f"loss by position: {ckpt}, {len(docs)} held-out documents, up to {max_len:,} tokens each "
          f"({tokens:,} tokens), one at a time", file=sys.stderr, flush=True)
    report = _progress(len(docs), what="document")
    result = by_position.loss_by_position(model, docs, max_len, progress=lambda i, n: report(i))
    print(by_position.table(result, cfg.data.seq_len))
    if args.out:
        _write_json(args.out, dict(checkpoint=str(ckpt), seq_len=cfg.data.seq_len, edges=list(by_position.EDGES),
                                   **result))
        import io
        from pathlib import Path

        from .errors import write_file

        png = io.BytesIO()  # drawn in memory, written like the JSON (whole or not at all)
        try:
            by_position.plot(result, cfg.data.seq_len, png, f"{ckpt}: held-out loss by position")
        except ImportError:
            print("note: no plot (matplotlib is not installed)", file=sys.stderr)
        else:
            write_file(Path(args.out).with_suffix(".png"), png.getvalue(), "--out")
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
    from .errors import run_command  # run_main, and Ctrl-C (exit 130) or a closed pipe (141) without a traceback

    sys.exit(run_command(main))
