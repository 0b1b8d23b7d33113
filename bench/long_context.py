"""Does it use long context? Held-out loss by position within a document.

    python bench/long_context.py                 # the committed CPU study (see --help for sizes)
    python bench/long_context.py --quick         # CI smoke: seq_len 256, a few steps, ~1-2 min
    python bench/long_context.py --arms local,sdpa,fma-m2m --seq-len 8192 --steps 4000 \\
        --eval-len 131072 --launcher "torchrun --standalone --nproc_per_node=8 -m"   # a GPU node

Every arm trains the tiny causal model (``configs/tiny-gpt.toml`` or ``--config``)
from scratch with the real trainer, on the same tokens of the embedded corpus with
the same seed; an arm changes only what its name says:

- ``local``, ``sdpa``: the fine level of fma alone, and full attention;
- ``fma-m2m`` (the product's default summaries), ``fma-mean``, ``fma-conv``;
- any arm followed by ``+section.field=value`` overrides, e.g.
  ``fma-m2m+model.weighted=false`` or ``local+train.lr=1.5e-3``.

Then each trained model reads every held-out document that has at least
``--min-doc-len`` tokens (or, ``--eval-docs packages``, up to ``--max-docs`` of the
installed torch and numpy source directories, long documents that exist wherever
fmtrain is installed and no corpus trains on) from its start, one document at a time, up to
``--eval-len`` tokens (``sdpa``: ``--sdpa-eval-len``, as its cost is quadratic;
``conv``: its ``max_seq_len``). A position is the distance of the predicted token
from its document's start, so no target crosses a document boundary. Held-out
loss (nats per token) is reported in log-spaced position buckets, each with the
number of tokens and documents it averages over. Positions past ``--seq-len`` were
never trained on: that is extrapolation, which only the arms whose reach does not
depend on ``n`` can do.

An arm also given at other seeds (``local,local+train.seed=1,...``) gets the mean and
standard deviation over its seeds per bucket, and the paired difference from ``local`` at the
same seeds (the seed also sets the data order, which moves every arm alike).

A run whose folder already holds a finished run of the same command is reused, so
the study can be extended arm by arm (``--arms``) across sittings; ``--retrain``
starts over. ``--rows-from FILE.json`` (repeatable) takes the measured rows of arms an earlier
run of the same study wrote (the same training and reading options, checked), so a study split
over machines or sittings whose run folders are gone is put together without training again:
only the arms of ``--arms`` found in none of the files are trained. Writes ``long_context-<tag>.{json,md,png}`` (``bench/_results.py``: ``--out``, ``--tag``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from _results import ROOT, add_result_arguments, beside, meta, result_stem, save_plot, write_results
from _harness import eval_rows, read_metrics, run_trainer, step_rows, trainer_command
from fmtrain.by_position import EDGES, bucket_name, held_out_documents, loss_by_position, mean_loss

# base arm -> [model] overrides; every other field comes from the base config.
BASE_ARMS = {
    "local": dict(attention="local"),
    "sdpa": dict(attention="sdpa"),
    "fma-m2m": dict(attention="fma", summary="m2m"),
    "fma-mean": dict(attention="fma", summary="mean"),
    "fma-conv": dict(attention="fma", summary="conv"),
}
# --------------------------------------------------------------------------- arms
def parse_arm(spec: str) -> tuple[str, dict[str, str]]:
    """``"fma-m2m+model.weighted=false"`` -> (base arm, {dotted key: value}) of its trainer overrides."""
    base, *extras = spec.split("+")
    if base not in BASE_ARMS:
        raise SystemExit(f"error: unknown arm {base!r} in {spec!r}; the bases are {', '.join(BASE_ARMS)}")
    over = {f"model.{k}": str(v) for k, v in BASE_ARMS[base].items()}
    for e in extras:
        key, eq, value = e.partition("=")
        if not eq or "." not in key:
            raise SystemExit(f"error: arm {spec!r}: {e!r} is not section.field=value")
        over[key] = value
    return base, over


def arm_dir_name(spec: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in spec)


def run_command(args, spec: str, run_dir: Path) -> list[str]:
    base, over = parse_arm(spec)
    shared = {
        "run.dir": str(run_dir), "data.seq_len": args.seq_len, "data.batch_size": args.batch_size,
        "train.steps": args.steps, "train.seed": args.seed, "train.eval_interval": args.steps,
        "train.eval_batches": args.eval_batches, "train.log_interval": args.log_interval,
        "checkpoint.interval": args.steps, "checkpoint.keep": 1,
    }
    if base == "fma-conv":  # its parameters are sized for the longest sequence it will read
        shared["model.max_seq_len"] = max(args.seq_len, args.conv_eval_len)
    for item in args.set:
        key, _, value = item.partition("=")
        shared[key] = value
    shared.update(over)  # the arm's own settings win
    return trainer_command(args.config, shared, args.launcher)


def train(args, spec: str) -> Path:
    """Train one arm (or reuse its finished run of the same command); its run folder."""
    # Absolute: the command is the reuse key, and "runs/x" and "/repo/runs/x" are the same run.
    run_dir = Path(args.work_dir).resolve() / arm_dir_name(spec)
    cmd = run_command(args, spec, run_dir)
    done = run_dir / "long_context_run.json"
    if not args.retrain and done.is_file() and json.loads(done.read_text()).get("command") == cmd:
        print(f"{spec}: reusing {run_dir}", flush=True)
        return run_dir
    env = dict(os.environ)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in env:  # arms side by side share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    run = run_trainer(cmd, run_dir, env=env).check(spec)  # a fresh run, never a resume of a different one
    done.write_text(json.dumps(dict(command=cmd, train_wall_s=run.wall_s), indent=1))
    print(f"{spec}: trained in {run.wall_s:.0f} s", flush=True)
    return run_dir


# --------------------------------------------------------------------------- evaluation
_PACKAGE_DOCS: dict = {}  # tokenizer path -> tokenised package documents (one tokenisation per study)


def package_documents_tokens(cfg, min_len: int, max_docs: int) -> list[np.ndarray]:
    """``--eval-docs packages``: the installed torch/numpy source directories of at least
    ``min_len`` tokens (``fmtrain.data.corpus.package_documents``), in name order, at most
    ``max_docs``; tokenised with the run's tokenizer."""
    from fmtrain.data.corpus import package_documents
    from fmtrain.data.tokenizer import load_tokenizer

    key = (str(cfg.data.tokenizer), min_len, max_docs)
    if key not in _PACKAGE_DOCS:
        tok, docs, out = load_tokenizer(cfg.data.tokenizer), package_documents(), []
        for name in sorted(docs):
            ids = np.asarray(tok.encode(docs[name]), dtype=np.int64)
            if len(ids) >= min_len:
                out.append(ids)
            if len(out) == max_docs:
                break
        _PACKAGE_DOCS[key] = out
    return _PACKAGE_DOCS[key]


def eval_len_of(args, spec: str, model_cfg) -> int:
    if model_cfg.attention == "sdpa":
        return args.sdpa_eval_len
    if model_cfg.summary == "conv" and model_cfg.attention == "fma":
        return min(args.eval_len, model_cfg.max_seq_len or args.seq_len)
    return args.eval_len


LENGTH_OPTIONS = ("max_level", "flat_top", "rope_scaling", "select_reach", "attend_reach")  # apply_length_options' order


def past_training_options(cfg) -> tuple | None:
    """``--past-training``: ``fmtrain.eval --past-training``'s length options for a multipole arm, as
    ``apply_length_options`` takes them (the coarse levels trained; for refined arms the top one flat
    and the far field read within the training length); None for the other attentions."""
    from fmtrain.eval import attend_reach_of, max_level_of, past_training, select_reach_of

    if cfg.model.attention != "fma":
        return None
    flags = argparse.Namespace(past_training=True, max_level=None, flat_top=False, select_reach=None,
                               attend_reach=False)
    past_training(flags, cfg)
    reach = select_reach_of(flags.select_reach, cfg)
    return (max_level_of(flags.max_level, cfg, flags.flat_top), flags.flat_top, None, reach,
            attend_reach_of(flags.attend_reach, reach, cfg))


def evaluate(args, spec: str, run_dir: Path) -> dict:
    """Loss by position bucket of one trained arm: sums and counts, so buckets can be merged."""
    from fmtrain.attention.cpu import adapt_torch_threads
    from fmtrain.export import load_trained

    model, cfg = load_trained(run_dir)
    options = past_training_options(cfg) if args.past_training else None
    if options:
        from fmtrain.eval import apply_length_options

        apply_length_options(model, cfg, *options)
    adapt_torch_threads()
    length = eval_len_of(args, spec, cfg.model)
    docs = (held_out_documents(cfg, args.min_doc_len) if args.eval_docs == "heldout"
            else package_documents_tokens(cfg, args.min_doc_len, args.max_docs))
    if not docs:
        raise SystemExit(f"error: no held-out document has {args.min_doc_len} tokens; lower --min-doc-len")
    result = loss_by_position(model, docs, length)
    train_log = read_metrics(run_dir)
    final_eval = eval_rows(train_log)[-1]
    train_rows = step_rows(train_log)
    speeds = [r["tokens_per_s"] for r in train_rows[1:] if r.get("tokens_per_s")]  # the first: warm-up
    return dict(arm=spec, run_dir=str(run_dir), train_tokens=int(train_rows[-1]["tokens_seen"]),
                length_options=options and {k: v for k, v in zip(LENGTH_OPTIONS, options) if k != "rope_scaling"},
                trainer_eval_loss=final_eval["eval_loss"], trainer_eval_bpb=final_eval["eval_bpb"],
                train_tokens_per_s=float(np.median(speeds)) if speeds else None, **result)


# --------------------------------------------------------------------------- report
def buckets(rows: list[dict]) -> list[tuple[int, int]]:
    """The buckets any row has tokens in, as (lo, hi) edge indices."""
    used = [i for i in range(len(EDGES) - 1) if any(r["counts"][i] for r in rows)]
    return [(i, i + 1) for i in used]


def headers(groups: list[tuple[int, int]], seq_len: int) -> list[str]:
    """Column names of the buckets; ``*``: beyond the training length."""
    return [bucket_name(EDGES[lo], EDGES[hi]) + ("*" if EDGES[lo] >= seq_len else "") for lo, hi in groups]


def table(rows: list[dict], groups: list[tuple[int, int]], seq_len: int) -> str:
    """Markdown: one line per arm, one column per position bucket (the best in bold, ``*``: beyond
    the training length), then the tokens and documents each bucket averages over."""
    lines = ["| arm | " + " | ".join(headers(groups, seq_len)) + " | trainer's held-out loss | training tokens/s |",
             "|---" * (len(groups) + 3) + "|"]
    means = [[mean_loss(r, lo, hi)[0] for lo, hi in groups] for r in rows]
    best = [min((m[i] for m in means if not math.isnan(m[i])), default=None) for i in range(len(groups))]
    for r, m in zip(rows, means):
        cells = ["-" if math.isnan(x) else (f"**{x:.3f}**" if x == best[i] else f"{x:.3f}") for i, x in enumerate(m)]
        speed = f"{r['train_tokens_per_s']:,.0f}" if r.get("train_tokens_per_s") else "-"
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + f" | {r['trainer_eval_loss']:.3f} | {speed} |")
    support = []
    for lo, hi in groups:  # from the arm that read the most: every arm reads the same documents
        c, d = max((mean_loss(r, lo, hi)[1:] for r in rows), key=lambda t: t[0])
        support.append(f"{c:,} ({d})")
    lines.append("| tokens (documents) | " + " | ".join(support) + " | | |")
    lines.append(f"\nHeld-out loss (nats per token) by the predicted token's position in its document; "
                 f"* beyond the training length ({seq_len:,}), never trained on.")
    read = [r["length_options"] for r in rows if r.get("length_options")]
    if read:
        reach = next((o["select_reach"] for o in read if o["select_reach"]), None)
        lines.append(f"Multipole arms read with `--past-training`: coarse levels 1..{read[0]['max_level']} only "
                     "(those trained)" + (f"; refined arms with a flat top level, the far field's selection and "
                                         f"attention clamped at {reach:,} tokens" if reach else "") + ".")
    return "\n".join(lines)


def seed_of(spec: str, default: int) -> tuple[str, int]:
    """``"fma-m2m+train.seed=2"`` -> ("fma-m2m", 2): the arm without its seed, and the seed."""
    kept, seed = [], default
    for part in spec.split("+"):
        key, _, value = part.partition("=")
        if key == "train.seed":
            seed = int(value)
        else:
            kept.append(part)
    return "+".join(kept), seed


def seed_summary(rows: list[dict], groups: list[tuple[int, int]], default_seed: int,
                 baseline: str = "local") -> dict:
    """Arms trained at several seeds: per bucket, the mean and standard deviation (ddof 1) over
    seeds of each arm's loss, and of its difference from ``baseline`` (an arm name without its
    seed) at the same seeds (paired: the seed also sets the data order, which moves every arm
    alike). An arm "beats the baseline by more than the seed spread" in a bucket when its mean
    difference is below minus its std."""
    by_arm: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        arm, seed = seed_of(r["arm"], default_seed)
        by_arm.setdefault(arm, {})[seed] = [mean_loss(r, lo, hi)[0] for lo, hi in groups]
    names = [bucket_name(EDGES[lo], EDGES[hi]) for lo, hi in groups]
    out = {}
    for arm, seeds in by_arm.items():
        if len(seeds) < 2:
            continue
        loss = np.array([seeds[k] for k in sorted(seeds)])  # (seeds, buckets)
        entry = dict(seeds=sorted(seeds), buckets=names, mean=np.nanmean(loss, 0).tolist(),
                     std=np.nanstd(loss, 0, ddof=1).tolist())
        shared = sorted(set(seeds) & set(by_arm.get(baseline, {})))
        if arm != baseline and len(shared) >= 2:
            diff = np.array([np.subtract(seeds[k], by_arm[baseline][k]) for k in shared])
            mean, std = np.nanmean(diff, 0), np.nanstd(diff, 0, ddof=1)
            entry.update(baseline=baseline, vs_base_seeds=shared, vs_base_mean=mean.tolist(),
                         vs_base_std=std.tolist(), below_base_beyond_spread=[bool(m < -s) for m, s in zip(mean, std)])
        out[arm] = entry
    return out


def seed_table(summary: dict, groups: list[tuple[int, int]], seq_len: int) -> str:
    """Markdown of :func:`seed_summary`: mean ± std over seeds, then the paired difference from its
    baseline."""
    names = headers(groups, seq_len)
    head = "| arm | seeds | " + " | ".join(names) + " |"
    base = next((e["baseline"] for e in summary.values() if "baseline" in e), "local")
    lines = [f"Over seeds (mean ± std of the loss; then the paired difference from `{base}`, **bold** where it "
             "is below zero by more than its std):", "", head, "|---" * (len(names) + 2) + "|"]
    cell = lambda m, s: "-" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"  # noqa: E731
    for arm, e in summary.items():
        lines.append(f"| {arm} | {len(e['seeds'])} | " + " | ".join(map(cell, e["mean"], e["std"])) + " |")
    for arm, e in summary.items():
        if "vs_base_mean" in e:
            cells = [("**{}**" if b else "{}").format(cell(m, s)) if not math.isnan(m) else "-"
                     for m, s, b in zip(e["vs_base_mean"], e["vs_base_std"], e["below_base_beyond_spread"])]
            lines.append(f"| {arm} - {e['baseline']} | {len(e['vs_base_seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, seq_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    colours = plt.cm.tab20.colors
    for i, r in enumerate(rows):
        pts = [(math.sqrt(EDGES[j] * EDGES[j + 1]), mean_loss(r, j, j + 1)[0])
               for j in range(len(EDGES) - 1) if r["counts"][j]]
        ax.plot(*zip(*pts), marker="o", label=r["arm"], color=colours[(2 * i) % 20 + (2 * i) // 20 % 2])
    ax.axvline(seq_len, color="grey", linestyle=":", label="training length")
    ax.set_xscale("log", base=2)
    save_plot(fig, ax, path, xlabel="position in the document (tokens, bucket midpoint)",
              ylabel="held-out loss (nats per token)", title=title, fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: seq_len 256, 4 steps, short documents")
    ap.add_argument("--arms", default="local,sdpa,fma-m2m",
                    help="comma-separated arms: a base (" + ", ".join(BASE_ARMS) + ") and optional "
                         "+section.field=value overrides")
    ap.add_argument("--jobs", type=int, default=1, help="arms trained at once (each gets cpus/jobs threads)")
    ap.add_argument("--seq-len", type=int, default=2048, help="training length")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps (600 x 2 x 2048: 2.4M tokens)")
    ap.add_argument("--eval-batches", type=int, default=8, help="the trainer's own held-out evaluation")
    ap.add_argument("--log-interval", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="a trainer override for every arm (repeatable)")
    ap.add_argument("--config", default="configs/tiny-gpt.toml")
    ap.add_argument("--eval-len", type=int, default=65536, help="tokens read from each held-out document")
    ap.add_argument("--sdpa-eval-len", type=int, default=8192, help="the same for sdpa (quadratic)")
    ap.add_argument("--conv-eval-len", type=int, default=8192, help="the same for conv (sets its max_seq_len)")
    ap.add_argument("--min-doc-len", type=int, default=8192,
                    help="documents shorter than this are left out, so that every bucket below it "
                         "averages over the same documents")
    ap.add_argument("--eval-docs", choices=("heldout", "packages"), default="heldout",
                    help="heldout: the run's held-out documents; packages: the installed torch and numpy "
                         "sources grouped by directory (long documents on every machine, never trained on)")
    ap.add_argument("--max-docs", type=int, default=16, help="documents read with --eval-docs packages")
    ap.add_argument("--launcher", default=f"{shlex.quote(sys.executable)} -m")
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-long-context"))
    ap.add_argument("--past-training", action="store_true",
                    help="multipole arms read past --seq-len as `python -m fmtrain.eval --past-training` does: the "
                         "coarse levels trained, and for refined arms (model.refine > 0) a flat top level and the "
                         "far field's selection and attention clamped at the training length (README, Adaptive "
                         "refinement); the other arms are read as they are")
    ap.add_argument("--retrain", action="store_true", help="train every arm again")
    ap.add_argument("--rows-from", action="append", default=[], metavar="FILE.json",
                    help="the rows of arms measured by an earlier run of the same study (its JSON): those arms are "
                         "not trained again")
    ap.add_argument("--baseline", default="local", help="the arm (without its seed) others are paired with "
                                                        "over seeds, e.g. fma-m2m")
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.steps, args.batch_size, args.eval_batches, args.log_interval = 256, 4, 2, 2, 2
        args.eval_len, args.sdpa_eval_len, args.conv_eval_len, args.min_doc_len = 1024, 1024, 1024, 1024
        args.set = ["train.warmup_steps=2", *args.set]
    for spec in args.arms.split(","):
        parse_arm(spec)
    return args


# What must agree for rows of two runs to stand in one table: how the arms trained and were read.
SAME_STUDY = ("seq_len", "batch_size", "steps", "seed", "set", "config", "eval_len", "sdpa_eval_len",
              "conv_eval_len", "min_doc_len", "eval_docs", "max_docs", "past_training", "quick")


def earlier_rows(args) -> dict:
    """``--rows-from``: arm -> its row, from earlier runs of this study (an error names what differs)."""
    found = {}
    for path in args.rows_from:
        saved = json.loads(Path(path).read_text())
        theirs = saved["meta"]["args"]
        differ = [f"{k}: {theirs.get(k)!r} there, {getattr(args, k)!r} here" for k in SAME_STUDY
                  if theirs.get(k) != getattr(args, k)]
        if differ:
            raise SystemExit(f"--rows-from {path}: not the same study ({'; '.join(differ)}); run with the same "
                             "options, or train those arms here")
        for row in saved["rows"]:
            found.setdefault(row["arm"], row)
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    arms = args.arms.split(",")
    earlier = earlier_rows(args)
    to_train = [a for a in arms if a not in earlier]
    with ThreadPoolExecutor(args.jobs) as pool:
        run_dirs = dict(zip(to_train, pool.map(lambda s: train(args, s), to_train)))
    rows = []
    for spec in arms:
        if spec in earlier:
            rows.append(earlier[spec])
            print(f"{spec}: measured earlier ({earlier[spec]['run_dir']})", flush=True)
            continue
        rows.append(evaluate(args, spec, run_dirs[spec]))
        print(f"{spec}: evaluated {rows[-1]['n_docs']} documents up to {rows[-1]['eval_len']:,} tokens in "
              f"{rows[-1]['eval_wall_s']:.0f} s", flush=True)
    groups = buckets(rows)
    seeds = seed_summary(rows, groups, args.seed, args.baseline)
    md = table(rows, groups, args.seq_len) + ("\n\n" + seed_table(seeds, groups, args.seq_len) if seeds else "")
    import torch

    stem = result_stem("long_context", args, device="cuda" if torch.cuda.is_available() else "cpu")
    tokens = rows[0]["train_tokens"]
    write_results(stem, dict(meta=meta(args), edges=EDGES, rows=rows, seeds=seeds, table=md), md)
    plot(rows, beside(stem, ".png"), f"trained at {args.seq_len:,} tokens, {tokens:,} tokens per arm, seed "
         f"{args.seed} unless the arm sets train.seed; {rows[0]['n_docs']} documents", args.seq_len)
    print(md)
    print(f"wrote {beside(stem, '.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
