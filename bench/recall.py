"""Long-range recall probe: what the coarse levels of multipole attention carry, and how far.

    python bench/recall.py                 # CPU: train at 512 tokens, evaluate at 4k-128k, ~30 min (estimate)
    python bench/recall.py --quick         # CI smoke, ~1 min
    python bench/recall.py --train-len 4096 --curriculum 512,1024,2048 --keys 4 --tag cpu-4k-multikey
    python bench/recall.py --device cuda --train-len 16384 --steps 2000 --eval-lens 16384,131072,1048576

The task is a passkey in filler: a sequence of random filler tokens holds one
needle, a marker token followed by a value token (one of 16), and query tokens
at several later positions; at each query the model must predict the value.
``--keys K`` is the harder multi-key variant (RULER's): K needles (marker, key, value)
with distinct keys, and each query (query token, key) asks for one of them, so
attending to "the" needle is not enough: the model must match the key.
Nothing near a query says what the value is, so the only way to answer is to
attend back to the needle, ``distance`` tokens away. Loss is on query positions
only. No answer token ever follows a query, but with several queries after one needle
(``--train chained``, the default, as every result before ``--train`` existed was trained) a
later query can still read the answer from an earlier query's hidden state (the layer
above the first holds it there once a query near the needle found it): a model can fit
the training loss by that copy and not retrieve at all (measured: `recall-cpu-4k-single`'s
rank-2 fma-m2m, training loss 0.01, one-query accuracy at chance). ``--train documents``
rules it out: each training row is packed with documents that end in their one query,
and attention is masked to each document (the product's document masking).

Design (a short training run of each variant, CPU-sized):
- The model is the product's :class:`fmtrain.model.CausalLM` (2 layers, dim 128,
  4 heads, block 32, rank 2) on a 256-token synthetic vocabulary; only
  ``model.attention`` / ``model.summary`` differ between variants. A dedicated
  loop instead of the trainer: the data is synthetic and the loss sits on query
  positions only.
- Every variant trains at ``--train-len`` tokens (needle anywhere, queries at
  log-uniform distances, so that short and long distances are trained alike; with
  ``--train documents`` each document's distance is log-uniform and the filler before its
  needle uniform, about two documents a 4096-token row) for
  the same steps, seed and batches, then is evaluated, without further training,
  at ``--eval-lens`` (4k to 128k).
- Evaluation (``--eval single``, the default): one query per sequence, its last
  token, ``d`` tokens after the value, for each ``d`` of ``--single-distances`` that
  fits, ``--single-seqs`` sequences each. The length is then the context before the
  query, so "accuracy at a fixed distance against the length" is a clean question.
  ``--eval chained`` is how results before 2026-12-06 were made (needle in the first
  eighth, ``--eval-queries`` queries per sequence): there a query can also copy the
  value from an earlier query that found it (its upper layer holds it), so far
  distances read higher than recall over them alone (a single-query probe of the
  same refined model, trained at 4k, scored 0.00-0.25 at 16k where chained scored
  0.96-1.00). m2m summaries have no
  length-dependent parameters (the parent map is shared by all levels), so one
  model runs at every length; distances beyond ``--train-len`` are extrapolation
  for every variant alike. RoPE uses base 500000 (the config's advice for long
  contexts) so that its slowest dimensions do not wrap within 128k tokens.
- Controls past the training length, each changing evaluation only: ``--eval-max-level``
  (the coarse levels kept), ``--eval-flat-top`` (the top kept level's lists hold every
  earlier window, so nothing is out of reach) and ``--eval-rope-scaling llama3:F``
  (Llama 3.1's RoPE scaling, original length ``--train-len``), ``--eval-select-reach N``
  (refinement's selection scores windows farther than N as if N away: ``model.select_reach``),
  ``--eval-attend-reach`` (its far field's attention too: ``model.attend_reach``).
- ``sdpa`` (full attention) is evaluated only up to ``--sdpa-max-len`` (on CPU its
  O(n^2) forward at 128k would take far longer than the rest of the probe).
- Accuracy is counted per distance bucket ``[2^k, 2^(k+1))``, pooled over the
  evaluation lengths and per length; chance is 1/16. The fine level reaches
  back ``block_size`` to ``2*block_size - 1`` tokens (own and previous block), so
  ``local`` is at chance from ``2*block_size`` on, and anything ``fma`` gets
  right there came through its coarse summaries.

Writes ``<--out>/recall-<tag>.{json,md,png}`` (accuracy against distance; bench/_results.py:
``$OUT``, else ``bench/results/``; the tag ``cpu``, ``quick``, or the CUDA card and the date).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from _results import add_result_arguments, beside, meta, result_stem, save_plot, write_results
from _harness import logits_at
from fmtrain.config import ModelConfig
from fmtrain.attention.rope import parse_scaling
from fmtrain.model import IGNORE_INDEX, build_model, cap_levels, scale_rope, set_select_reach
from fmtrain.schedule import warmup_cosine

# Vocabulary: filler ids [0, N_FILLER), values [N_FILLER, N_FILLER + N_VALUES), the multi-key
# variant's keys [KEY0, KEY0 + N_KEYS), marker, query.
N_FILLER, N_VALUES = 192, 16
KEY0, N_KEYS = N_FILLER + N_VALUES, 16
MARKER, QUERY, VOCAB = 254, 255, 256
VALUE_IDS = torch.arange(N_FILLER, N_FILLER + N_VALUES)

VARIANTS = {  # name -> [model] fields
    "fma-m2m": dict(attention="fma", summary="m2m"),
    "fma-mean": dict(attention="fma", summary="mean"),
    "fma-m2m-unweighted": dict(attention="fma", summary="m2m", weighted=False),  # no log(w/p) prior
    # Adaptive refinement: each query opens its K best-scoring far blocks (fmtrain/attention/refine.py).
    "fma-m2m-refine2": dict(attention="fma", summary="m2m", refine=2),
    "fma-m2m-refine4": dict(attention="fma", summary="m2m", refine=4),
    "fma-m2m-refine8": dict(attention="fma", summary="m2m", refine=8),
    "sdpa": dict(attention="sdpa"),
    "local": dict(attention="local"),
}

NOISE_NOTE = ("accuracies are deterministic given the seed; train_s and eval_s were measured on "
              "a shared machine (other jobs ran beside this one) and are noisy.")


# --------------------------------------------------------------------------- data
def passkey_batch(gen: torch.Generator, batch: int, n: int, queries: int, needle_max: int | None = None):
    """A batch of passkey sequences.

    Returns ids (B, n), targets (B, n) (the value at query positions, -100
    elsewhere) and distances (B, n) (query position minus value position, 0
    elsewhere). The needle (marker, value) starts uniformly in ``[0, needle_max)``
    (default: anywhere it fits); query distances are log-uniform in
    ``[1, n - 1 - value position]``, duplicates dropped.
    """
    ids = torch.randint(0, N_FILLER, (batch, n), generator=gen)
    targets = torch.full((batch, n), IGNORE_INDEX)
    dist = torch.zeros((batch, n), dtype=torch.long)
    for b in range(batch):
        start = int(torch.randint(0, min(needle_max or n, n - 2), (1,), generator=gen))
        value = N_FILLER + int(torch.randint(0, N_VALUES, (1,), generator=gen))
        ids[b, start], ids[b, start + 1] = MARKER, value
        far = n - 2 - start  # the farthest query is the last position
        d = torch.exp(torch.rand(queries, generator=gen) * math.log(far)).round().long().clamp(1, far).unique()
        pos = start + 1 + d
        ids[b, pos], targets[b, pos], dist[b, pos] = QUERY, value, d
    return ids, targets, dist


def _place_needle(gen: torch.Generator, row: torch.Tensor, used: torch.Tensor, limit: int, key: int):
    """A needle (marker, key, random value) at a free start in ``[0, limit)`` of ``row`` (needles do not
    overlap: ``used`` marks the taken positions). Returns the value's position and the value."""
    for _ in range(100):
        start = int(torch.randint(0, limit, (1,), generator=gen))
        if not used[start:start + 3].any():
            break
    value = N_FILLER + int(torch.randint(0, N_VALUES, (1,), generator=gen))
    row[start:start + 3] = torch.tensor([MARKER, key, value])
    used[start:start + 3] = True
    return start + 2, value


def multikey_batch(gen: torch.Generator, batch: int, n: int, queries: int, keys: int,
                   needle_max: int | None = None):
    """RULER's multi-key needle: ``keys`` needles (marker, key, value) with distinct keys, one of
    them asked for by each query (query token, key; the value is the target at the key).

    Returns ids, targets, distances as :func:`passkey_batch`; a query's distance is from the
    value of the needle it asks for. Needles start uniformly in ``[0, needle_max)``; each query
    picks a needle and a log-uniform distance after it; queries that would land on a needle
    or another query are dropped.
    """
    ids = torch.randint(0, N_FILLER, (batch, n), generator=gen)
    targets = torch.full((batch, n), IGNORE_INDEX)
    dist = torch.zeros((batch, n), dtype=torch.long)
    limit = min(needle_max or n, n - 4)
    for b in range(batch):
        used = torch.zeros(n, dtype=torch.bool)
        key_ids = KEY0 + torch.randperm(N_KEYS, generator=gen)[:keys]
        needles = [(*_place_needle(gen, ids[b], used, limit, key), key) for key in key_ids.tolist()]
        for _ in range(queries):
            vpos, value, key = needles[int(torch.randint(0, len(needles), (1,), generator=gen))]
            far = n - 1 - vpos
            if far < 2:
                continue
            d = int(torch.exp(torch.rand(1, generator=gen) * math.log(far)).round().clamp(2, far))
            pos = vpos + d  # the key token; the query token before it
            if used[pos - 1:pos + 1].any():
                continue
            ids[b, pos - 1], ids[b, pos], targets[b, pos], dist[b, pos] = QUERY, key, value, d
            used[pos - 1:pos + 1] = True
    return ids, targets, dist


def single_query_batch(gen: torch.Generator, batch: int, n: int, distance: int, keys: int = 1):
    """Sequences of length ``n`` with one query, at the end, ``distance`` tokens after the value it
    asks for: ``keys`` needles (one: marker, value; more: marker, key, value, the other ``keys - 1``
    anywhere free), the query last (multi-key: query token, key).

    Returns ids (B, n), targets (B, n) (the value at the last position, -100 elsewhere) and
    distances (B, n). With one query per sequence no query can copy another's answer.
    """
    ids = torch.randint(0, N_FILLER, (batch, n), generator=gen)
    targets = torch.full((batch, n), IGNORE_INDEX)
    dist = torch.zeros((batch, n), dtype=torch.long)
    vpos, last = n - 1 - distance, n - 1
    if vpos < (1 if keys == 1 else 2) or distance < (1 if keys == 1 else 2):
        raise ValueError(f"distance {distance} does not fit a sequence of {n} tokens")
    for b in range(batch):
        value = N_FILLER + int(torch.randint(0, N_VALUES, (1,), generator=gen))
        if keys == 1:
            ids[b, vpos - 1], ids[b, vpos], ids[b, last] = MARKER, value, QUERY
        else:
            key_ids = (KEY0 + torch.randperm(N_KEYS, generator=gen)[:keys]).tolist()
            used = torch.zeros(n, dtype=torch.bool)
            used[vpos - 2:vpos + 1] = True
            used[last - 1:] = True
            ids[b, vpos - 2:vpos + 1] = torch.tensor([MARKER, key_ids[0], value])
            for key in key_ids[1:]:  # the other needles: distinct keys, anywhere free
                _place_needle(gen, ids[b], used, n - 4, key)
            ids[b, last - 1], ids[b, last] = QUERY, key_ids[0]
        targets[b, last], dist[b, last] = value, distance
    return ids, targets, dist


def document_batch(gen: torch.Generator, batch: int, n: int, keys: int = 1, prefix: str = "uniform"):
    """Rows of ``n`` tokens packed with documents that each end in one query (``--train documents``):
    every document is a :func:`single_query_batch` sequence, its query-to-value distance ``d``
    log-uniform in ``[1, n)`` and the filler before its needle uniform in ``[0, n - d)`` (``prefix
    = "uniform"``, so a query has up to the whole length before it, as in evaluation) or log-uniform
    in ``[0, n)`` (``"log"``: more documents a row, but a short distance then rarely has far
    windows to tell its needle's window from); the row's last document is cut to what is left (a
    remainder too short for a needle is filler with no query).

    Returns ids, targets, distances (as :func:`passkey_batch`) and doc_positions (B, n), each
    token's position in its document, for document masking: attention stays within a document,
    so no query can read another query's answer, which chained training allows.
    """
    lead = 1 if keys == 1 else 3 * keys + 2  # tokens a needle (and the other needles) need before the value
    nearest = 1 if keys == 1 else 2  # the shortest query-to-value distance (multi-key: query token, key)
    shortest = lead + 1 + nearest  # the shortest document
    ids = torch.randint(0, N_FILLER, (batch, n), generator=gen)
    targets = torch.full((batch, n), IGNORE_INDEX)
    dist = torch.zeros((batch, n), dtype=torch.long)
    doc_positions = torch.empty((batch, n), dtype=torch.long)
    log_uniform = lambda hi: int(torch.exp(torch.rand(1, generator=gen) * math.log(hi)).round().clamp(1, hi))
    for b in range(batch):
        at = 0
        while at < n:
            left = n - at
            if left < shortest:
                doc_positions[b, at:] = torch.arange(left)  # filler with no query
                break
            d = max(nearest, log_uniform(n - 1))
            pre = log_uniform(n) - 1 if prefix == "log" else \
                int(torch.randint(0, max(1, n - d - lead), (1,), generator=gen))
            d = min(d, left - lead - 1)
            length = min(left, lead + pre + d + 1)
            length = left if left - length < shortest else length  # no stub after the last one
            seq = single_query_batch(gen, 1, length, d, keys)
            for out, part in zip((ids, targets, dist), seq):
                out[b, at:at + length] = part[0]
            doc_positions[b, at:at + length] = torch.arange(length)
            at += length
    return ids, targets, dist, doc_positions


def make_batch(args, gen, batch: int, n: int, queries: int, needle_max: int | None = None):
    if args.keys == 1:
        return passkey_batch(gen, batch, n, queries, needle_max)
    return multikey_batch(gen, batch, n, queries, args.keys, needle_max)


def train_length(args, step: int) -> int:
    """The training length at ``step``: ``--curriculum`` lengths in equal shares of the steps, each
    ending at ``--train-len``; without one, ``--train-len`` throughout."""
    lens = [int(x) for x in args.curriculum.split(",")] + [args.train_len] if args.curriculum else [args.train_len]
    return lens[min(len(lens) - 1, step * len(lens) // args.steps)]


# --------------------------------------------------------------------------- model
def model_config(args, variant: str) -> ModelConfig:
    return ModelConfig(kind="causal", vocab_size=VOCAB, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       block_size=args.block_size, rank=args.rank, rope_theta=args.rope_theta,
                       loss_chunk=4096, **VARIANTS[variant])


def lr_at(args, step: int) -> float:
    """The trainer's schedule: linear warmup, cosine decay to a tenth."""
    return warmup_cosine(step, steps=args.steps, warmup_steps=args.warmup, lr=args.lr, min_lr=0.1 * args.lr)


def train(args, variant: str, device: torch.device) -> tuple[torch.nn.Module, list[dict]]:
    """Train one variant at ``--train-len``; same init seed and batches for every variant."""
    torch.manual_seed(args.seed)
    model = build_model(model_config(args, variant)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step)
        n = train_length(args, step)  # the same tokens per step at every length of a curriculum
        rows, doc_positions = max(1, args.batch_size * args.train_len // n), None
        if args.train == "documents":
            ids, targets, _, doc_positions = document_batch(gen, rows, n, args.keys, args.doc_prefix)
        else:
            ids, targets, _ = make_batch(args, gen, rows, n, args.queries)
        with autocast(device):
            loss_sum, count = model(ids.to(device), targets.to(device), doc_positions=doc_positions)
        loss = loss_sum / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_interval == 0 or step + 1 == args.steps:
            log.append(dict(step=step + 1, loss=loss.item()))
            print(f"  {variant} step {step + 1}/{args.steps} | query loss {loss.item():.3f}", flush=True)
    return model, log


def trained(args, variant: str, device: torch.device) -> tuple[torch.nn.Module, list[dict]]:
    """:func:`train`, or the weights ``--models`` holds from a run with the same training arguments."""
    if not args.models:
        return train(args, variant, device)
    keys = ("train_len", "curriculum", "keys", "steps", "batch_size", "queries", "lr", "warmup", "dim", "layers",
            "heads", "block_size", "rank", "rope_theta", "seed")
    setup = {k: getattr(args, k) for k in keys}
    if args.train != "chained":  # weights saved before --train existed were trained chained
        setup["train"], setup["doc_prefix"] = args.train, args.doc_prefix
    if "refine" in variant:  # refined weights saved before it selected by key boxes selected by summaries
        setup["selection"] = "boxes"
    path = Path(args.models) / f"{variant}.pt"
    if path.exists():
        saved = torch.load(path, map_location=device)
        if saved["setup"] == setup:
            model = build_model(model_config(args, variant)).to(device)
            model.load_state_dict(saved["state"])
            print(f"  {variant}: weights from {path}", flush=True)
            return model, saved["log"]
        print(f"  {variant}: {path} was trained with other arguments; training again", flush=True)
    model, log = train(args, variant, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(setup=setup, state=model.state_dict(), log=log), path)
    return model, log


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def eval_distances(args, n: int) -> list[int]:
    """``--eval single``: the distances asked for at length ``n`` (those that fit)."""
    return [d for d in (int(x) for x in args.single_distances.split(",")) if d <= n - 4]


@torch.no_grad()
def evaluate(model, args, n: int, device: torch.device) -> list[tuple[int, bool]]:
    """(distance, correct) for the queries of length ``n``: :func:`evaluate_single` or
    :func:`evaluate_chained` (``--eval``)."""
    model.eval()
    try:
        return (evaluate_single if args.eval == "single" else evaluate_chained)(model, args, n, device)
    finally:
        model.train()


def _predict(model, ids, targets, device) -> list[bool]:
    sel = targets >= 0
    # (queries, 16): the 16 values' logits at the query positions
    logits = logits_at(model, ids.to(device), sel.to(device), VALUE_IDS.to(device), autocast(device))
    return (VALUE_IDS[logits.argmax(-1).cpu()] == targets[sel]).tolist()


def evaluate_single(model, args, n: int, device: torch.device) -> list[tuple[int, bool]]:
    """``--single-seqs`` sequences of length ``n`` for each distance of ``--single-distances``, each
    with one query, its last token: the length is the context before the query, and only the
    needle can answer it."""
    gen = torch.Generator().manual_seed(args.seed + 1000 + n)
    per_batch = max(1, 131072 // n)
    out = []
    for d in eval_distances(args, n):
        for first in range(0, args.single_seqs, per_batch):
            ids, targets, _ = single_query_batch(gen, min(per_batch, args.single_seqs - first), n, d, args.keys)
            out += [(d, ok) for ok in _predict(model, ids, targets, device)]
    return out


def evaluate_chained(model, args, n: int, device: torch.device) -> list[tuple[int, bool]]:
    """(distance, correct) for every query of ``--eval-tokens // n`` fresh sequences of length ``n``.

    Many queries share a sequence and its needle, so a query can also read the value from an
    earlier query that found it (a layer above the first holds it there): a later query's
    accuracy measures that chain as well as recall over its distance. ``--eval single`` is the
    clean measure; this one is kept to compare with results made before it.

    The same number of tokens at every length, so short lengths get many
    sequences: within one sequence every query asks for the same value, so the
    number of sequences, not of queries, is what makes a bucket's accuracy
    trustworthy. The prediction is the most likely of the 16 values at the query
    position; the sequences depend on the seed and ``n`` only, so every variant
    sees the same ones.
    """
    gen = torch.Generator().manual_seed(args.seed + 1000 + n)
    seqs, per_batch = max(1, args.eval_tokens // n), max(1, 131072 // n)
    # --needle-at start: every needle at the sequence's start, so a distance is one query position at
    # every length (a causal model's output there cannot depend on the tokens after it).
    needle_max = 1 if args.needle_at == "start" else max(1, n // 8)
    out = []
    for first in range(0, seqs, per_batch):
        ids, targets, dist = make_batch(args, gen, min(per_batch, seqs - first), n, args.eval_queries,
                                        needle_max=needle_max)
        out += list(zip(dist[targets >= 0].tolist(), _predict(model, ids, targets, device)))
    return out


# --------------------------------------------------------------------------- report
def bucket(d: int) -> int:
    """Lower edge of the power-of-two distance bucket holding ``d``."""
    return 1 << (d.bit_length() - 1)


def accuracy_by_bucket(pairs: list[tuple[int, bool]]) -> dict[int, dict]:
    acc: dict[int, list[bool]] = {}
    for d, ok in pairs:
        acc.setdefault(bucket(d), []).append(ok)
    return {b: dict(accuracy=sum(v) / len(v), count=len(v)) for b, v in sorted(acc.items())}


def floor_check(rows: dict, reach: int) -> dict:
    """The issue's floor: fma (m2m) recall above local's at every distance bucket at or
    beyond ``2*block_size`` (the fine level's reach)."""
    if "fma-m2m" not in rows or "local" not in rows:
        return {}
    fma, loc = rows["fma-m2m"]["pooled"], rows["local"]["pooled"]
    per = {b: dict(fma_m2m=fma[b]["accuracy"], local=loc[b]["accuracy"], above=fma[b]["accuracy"] > loc[b]["accuracy"])
           for b in fma if b >= reach and b in loc}
    return dict(reach=reach, buckets=per, met=all(v["above"] for v in per.values()),
                missed_at=[b for b, v in per.items() if not v["above"]])


def span_accuracy(pooled: dict, lo: int, hi: int) -> float | None:
    """Accuracy over the distance buckets in ``[lo, hi)``, weighted by their query counts."""
    sel = [v for b, v in pooled.items() if lo <= int(b) < hi]
    n = sum(v["count"] for v in sel)
    return sum(v["accuracy"] * v["count"] for v in sel) / n if n else None


def long_floor(rows: dict, lo: int = 1024, hi: int = 4096) -> dict:
    """Trained at long context: fma (m2m) accuracy >= 0.5 at distances [lo, hi), where local
    (the fine level alone) can only guess."""
    if "fma-m2m" not in rows:
        return {}
    acc = {v: span_accuracy(r["pooled"], lo, hi) for v, r in rows.items()}
    fma = acc["fma-m2m"]
    return dict(span=[lo, hi], accuracy=acc, met=fma is not None and fma >= 0.5)


def table(rows: dict, chance: float) -> str:
    buckets = sorted({b for r in rows.values() for b in r["pooled"]})
    lines = ["| variant | " + " | ".join(f"{b}-{2 * b - 1}" if b > 1 else "1" for b in buckets) + " |",
             "|---|" + "---|" * len(buckets)]
    for name, r in rows.items():
        cells = [f"{r['pooled'][b]['accuracy']:.2f}" if b in r["pooled"] else "-" for b in buckets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nAccuracy by query-to-needle distance (tokens), pooled over evaluation lengths; chance {chance:.3f}."


def length_table(rows: dict) -> str:
    """Accuracy by distance at each evaluation length. The needle sits in the first eighth (by
    default), so at a longer length a query at the same distance sits later, above more coarse
    levels; what the pooled table averages over shows here."""
    buckets = sorted({int(b) for r in rows.values() for v in r["by_len"].values() for b in v})
    lines = ["| variant | length | " + " | ".join(f"{b}-{2 * b - 1}" if b > 1 else "1" for b in buckets) + " |",
             "|---|---|" + "---|" * len(buckets)]
    for name, r in rows.items():
        for n, acc in r["by_len"].items():
            acc = {int(b): v for b, v in acc.items()}
            cells = [f"{acc[b]['accuracy']:.2f}" if b in acc else "-" for b in buckets]
            lines.append(f"| {name} | {int(n):,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nThe same, per evaluation length (queries per cell: the JSON's counts)."


def plot(rows: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, r in rows.items():
        bs = sorted(r["pooled"])
        ax.plot([b * 1.41 for b in bs], [r["pooled"][b]["accuracy"] for b in bs], marker="o", label=name)
    ax.axhline(1 / N_VALUES, color="gray", ls=":", label="chance")
    ax.axvline(2 * args.block_size, color="gray", ls="--", lw=0.8)
    ax.text(2 * args.block_size, 1.02, " fine reach", fontsize=8, color="gray")
    ax.axvline(args.train_len, color="gray", ls="-.", lw=0.8)
    ax.text(args.train_len, 1.02, " train length", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.08)
    save_plot(fig, ax, path, xlabel="query-to-needle distance (tokens, bucket centre)", ylabel="passkey accuracy",
              title=f"passkey recall: trained at {args.train_len}, evaluated at {args.eval_lens}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: train at 256 for 20 steps, evaluate at 1k and 4k")
    ap.add_argument("--variants", default="fma-m2m,fma-mean,sdpa,local",
                    help=f"comma-separated among {', '.join(VARIANTS)}")
    ap.add_argument("--train-len", type=int, default=512)
    ap.add_argument("--curriculum", default="", help="shorter lengths trained first, e.g. 512,1024,2048 "
                                                     "(equal shares of the steps, then --train-len)")
    ap.add_argument("--keys", type=int, default=1, help="needles per sequence: 1 is the passkey, more is "
                                                        f"RULER's multi-key needle (at most {N_KEYS})")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--queries", type=int, default=32, help="--train chained: queries per training sequence")
    ap.add_argument("--train", default="chained", choices=("chained", "documents"),
                    help="chained: one needle and --queries queries per training sequence (a query can "
                         "learn to copy an earlier query's answer instead of retrieving it); documents: "
                         "rows packed with documents that each end in their one query, attention masked "
                         "to each document (data.document_masking), so only retrieval answers")
    ap.add_argument("--doc-prefix", default="uniform", choices=("uniform", "log"),
                    help="--train documents: the filler before each document's needle, uniform up to the "
                         "length (about two documents a row) or log-uniform (about five; short distances "
                         "then rarely see far windows)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--eval-lens", default="4096,16384,65536,131072")
    ap.add_argument("--eval", default="single", choices=("single", "chained"),
                    help="single: one query per sequence, at its end (the clean measure); chained: many "
                         "queries per sequence, as the results before 2026-12-06 were made (a later query "
                         "can copy the answer from an earlier one)")
    ap.add_argument("--single-distances", default="16,100,300,700,1500,3000,6000,12000,24000,48000,96000",
                    help="--eval single: the query-to-value distances asked for at each length (those that fit)")
    ap.add_argument("--single-seqs", type=int, default=12, help="--eval single: sequences per distance and length")
    ap.add_argument("--eval-tokens", type=int, default=524288,
                    help="--eval chained: tokens per evaluation length (sequences = eval_tokens // length)")
    ap.add_argument("--eval-queries", type=int, default=128, help="--eval chained: queries per evaluation sequence")
    ap.add_argument("--eval-max-level", type=int, default=None,
                    help="fma: drop the coarse levels above this one at evaluation (a control: a model trained "
                         "at 4096 tokens with block 32 has seen levels 1-6 only)")
    ap.add_argument("--eval-rope-scaling", default=None, metavar="KIND:FACTOR",
                    help="evaluate with RoPE's frequencies scaled, as transformers' rope_parameters define them: "
                         "'llama3:F' (Llama 3.1's: low frequencies divided by F, high ones kept; original length "
                         "--train-len, low/high frequency factors 1 and 4) or 'linear:F' (position interpolation)")
    ap.add_argument("--eval-select-reach", type=int, default=None, metavar="N",
                    help="refined fma variants: selection scores summaries farther than N tokens as if N away "
                         "(model.select_reach), e.g. --train-len")
    ap.add_argument("--eval-attend-reach", action="store_true",
                    help="with --eval-select-reach: the far field's attention too reads windows beyond it as at "
                         "it (model.attend_reach, ReRoPE-like)")
    ap.add_argument("--eval-flat-top", action="store_true",
                    help="refined fma variants, with --eval-max-level: the top kept level's lists hold every "
                         "earlier window of it (model.flat_top), so every distance stays within reach")
    ap.add_argument("--sdpa-max-len", type=int, default=16384, help="longest evaluation length for sdpa")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--needle-at", default="eighth", choices=("eighth", "start"),
                    help="--eval chained: where evaluation needles sit: anywhere in the first eighth (default), or at the "
                         "start, so that a distance is also a query position (a control)")
    ap.add_argument("--models", default="", help="a folder: save each trained variant's weights there, and "
                                                 "load them instead of training when present (same arguments)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-interval", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_result_arguments(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_len, args.steps, args.batch_size, args.warmup, args.log_interval = 256, 20, 4, 5, 10
        args.eval_lens, args.eval_tokens, args.eval_queries, args.sdpa_max_len = "1024,4096", 8192, 64, 4096
        args.single_distances, args.single_seqs = "16,100,300,700,1500,3000", 4
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose among {', '.join(VARIANTS)}")
    if args.eval_rope_scaling:
        try:
            rope_scaling(args)
        except ValueError as exc:
            ap.error(f"--eval-rope-scaling {exc}")
    if args.eval_flat_top and args.eval_max_level is None:
        ap.error("--eval-flat-top flattens the top level --eval-max-level keeps: give --eval-max-level")
    if args.eval_attend_reach and args.eval_select_reach is None:
        ap.error("--eval-attend-reach reads the far field as at --eval-select-reach: give --eval-select-reach")
    if not 1 <= args.keys <= N_KEYS:
        ap.error(f"--keys {args.keys}: choose 1 (the passkey) to {N_KEYS}")
    return args


def rope_scaling(args) -> dict:
    """``--eval-rope-scaling KIND:FACTOR`` as a ``model.rope_scaling`` dict (original length: ``--train-len``)."""
    return parse_scaling(args.eval_rope_scaling, args.train_len)


def save(args, rows: dict, stem: Path, wall: float, device) -> dict:
    """``recall-<tag>.json``, ``.md`` and ``.png`` of the variants so far."""
    result = dict(
        meta=meta(args, device=str(device), wall_s=wall, chance=1 / N_VALUES, fine_reach=2 * args.block_size,
                  note=NOISE_NOTE),
        rows=rows, floor=floor_check(rows, 2 * args.block_size), floor_1k_4k=long_floor(rows),
        table=table(rows, 1 / N_VALUES) + "\n\n" + length_table(rows))
    write_results(stem, result, markdown=result["table"])
    plot(rows, args, beside(stem, ".png"))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    eval_lens = [int(x) for x in args.eval_lens.split(",")]
    stem = result_stem("recall", args, device)
    rows, t_start = {}, time.perf_counter()
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        model, log = trained(args, variant, device)
        if args.eval_max_level is not None:
            cap_levels(model, args.eval_max_level, args.eval_flat_top and "refine" in variant)
        if args.eval_rope_scaling:
            scale_rope(model, rope_scaling(args))
        if args.eval_select_reach is not None and "refine" in variant:
            set_select_reach(model, args.eval_select_reach, args.eval_attend_reach)
        train_s = time.perf_counter() - t0
        per_len, pairs = {}, []
        for n in eval_lens:
            if variant == "sdpa" and n > args.sdpa_max_len:
                continue
            res = evaluate(model, args, n, device)
            per_len[n] = accuracy_by_bucket(res)
            pairs += res
        rows[variant] = dict(model=VARIANTS[variant], train_log=log, train_s=train_s,
                             eval_s=time.perf_counter() - t0 - train_s, eval_lens=list(per_len),
                             pooled=accuracy_by_bucket(pairs), by_len=per_len)
        accs = " ".join(f"{b}:{v['accuracy']:.2f}" for b, v in rows[variant]["pooled"].items())
        print(f"{variant:9s} | train {train_s:.0f} s | eval {rows[variant]['eval_s']:.0f} s | {accs}", flush=True)
        # After every variant, so that partial results survive; the last write is the whole result.
        result = save(args, rows, stem, time.perf_counter() - t_start, device)
    wall = time.perf_counter() - t_start
    print(result["table"])
    floor = result["floor"]
    if floor:
        print(f"floor (fma-m2m above local at every distance >= {floor['reach']}): "
              f"{'met' if floor['met'] else 'MISSED at ' + ', '.join(map(str, floor['missed_at']))}")
    lf = result["floor_1k_4k"]
    if lf:
        accs = ", ".join(f"{v} {a:.2f}" for v, a in lf["accuracy"].items() if a is not None)
        print(f"floor (fma-m2m >= 0.5 at distances 1k-4k): {'met' if lf['met'] else 'MISSED'} ({accs})")
    print(f"wrote {stem}.json, .md, .png in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
