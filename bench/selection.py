"""Where does refinement's selection rank the needle? A probe of a model trained by ``bench/recall.py``.

    python bench/selection.py --train documents --train-len 4096 --curriculum 512,1024,2048 --batch-size 1 \
        --steps 400 --variants fma-m2m-refine4 --models runs/recall-docs2-s0 --seed 0 --tag cpu-4k-docs2-s0

For one-query sequences (``recall.single_query_batch``) at each distance, the last query of
each layer scores every window that lies wholly before its near field, level by level, three ways:

- ``summary``: the best of the window's ``p`` summaries, ``max_j q . K_j`` (the selection rule
  before 2026-12-06);
- ``box``: the bound ``q . centre + |q| . radius`` on its keys' box (:func:`fmtrain.attention.refine.window_boxes`,
  the rule since);
- ``exact``: its best key's score at full resolution (what an ideal rule would find; O(n) a query).

and the table gives the needle's window's rank among its level's windows (0: first), averaged
over the query heads and the sequences. Rank 0 by ``exact`` says the layer's query does point at
the needle (the layer that retrieves: in the recall models it is the first); then a rank far from
0 by a rule is that rule's failure, not the model's. ``opened`` is the share of key/value heads
whose selection (the layer's own: ``refine``, ``max_level``, ``flat_top``, ``select_reach``)
opens the needle's fine block at that query: a box rank below ``refine`` at level 1 with the
block left unopened is the descent's miss, not the bound's. The ``--eval-*`` options that change
the layers (``--eval-select-reach``, ``--eval-max-level``, ``--eval-flat-top``) apply. The
weights are ``recall.py``'s (``--models``, same training arguments), trained if absent.

Writes ``<--out>/selection-<tag>.{json,md}``.
"""
from __future__ import annotations

import sys
import time

import torch

import recall
from _results import meta, result_stem, write_results
from fmtrain.attention.hierarchy import call_hierarchy, hierarchy
from fmtrain.attention.refine import select, window_boxes

RULES = ("summary", "box", "exact")


def _layer_inputs(model, layers, ids: torch.Tensor) -> list[tuple]:
    """Each of ``layers``' rotated q (B, H, n, d), k and v (B, Hkv, n, d) on ``ids``, from one forward."""
    seen = {}

    def grab(layer, inner):
        def attend(q, k, v, cu_seqlens=None):
            seen[layer] = (q, k, v)
            return inner(q, k, v, cu_seqlens=cu_seqlens)
        return attend

    for layer in layers:
        layer.attend = grab(layer, layer.attend)
    try:
        with torch.no_grad():
            last = torch.zeros_like(ids, dtype=torch.bool)
            last[:, -1] = True
            model.logits_at(ids, last)
    finally:
        for layer in layers:
            del layer.attend  # the bound method again
    return [seen[layer] for layer in layers]


def needle_ranks(layer, q, k, v, value_pos: int) -> dict:
    """{(level, rule): rank of the window holding ``value_pos`` among its level's windows before the
    last query's near field, averaged over heads; "opened": the share of key/value heads whose
    selection opens its block} for one sequence at ``layer``, from its q, k, v (:func:`_layer_inputs`)."""
    n, G = q.shape[2], q.shape[1] // k.shape[1]
    h = hierarchy(n, layer.block_size, layer.rank, True)
    ks, _ = layer.summarise(k, v, h)  # (1, Hkv, T, d)
    boxes = window_boxes(k.double(), h)
    qi = q[0, :, -1].double()  # (H, d)
    kh, ksh = (x[0].double().repeat_interleave(G, 0) for x in (k, ks))  # per query head: (H, n, d), (H, T, d)
    near = ((n - 1) // h.block_size - 1) * h.block_size  # the first position of the near field
    out = {}
    for level in range(1, h.n_levels + 1):
        size = h.window_size(level)
        nw, hit = near // size, value_pos // size
        if nw < 2 or hit >= nw:
            continue
        keys = kh[:, :nw * size].view(-1, nw, size, k.shape[-1])  # (H, nw, w, d)
        first = h.offsets[level - 1]
        summ = ksh[:, first:first + nw * h.rank].view(-1, nw, h.rank, k.shape[-1])  # (H, nw, p, d)
        row = sum(h.windows[:level - 1])
        centre, radius = (x[0, :, row:row + nw].double().repeat_interleave(G, 0) for x in boxes)  # (H, nw, d)
        scores = dict(
            summary=torch.einsum("hd,hwpd->hwp", qi, summ).amax(-1),
            box=torch.einsum("hd,hwd->hw", qi, centre) + torch.einsum("hd,hwd->hw", qi.abs(), radius),
            exact=torch.einsum("hd,hwtd->hwt", qi, keys).amax(-1))
        for rule, s in scores.items():
            out[level, rule] = float((s > s[:, hit:hit + 1]).sum(-1).double().mean())
        out[level, "windows"] = nw
    if layer.refine:  # the layer's own selection: its hierarchy (max_level, flat_top) and reach
        hl = call_hierarchy(n, layer.block_size, layer.rank, True, layer.max_level, None, layer.flat_top)
        own = boxes if layer.max_level is None else window_boxes(k.double(), hl)
        opened, _, _ = select(q[:, :, -1:].double(), own, hl, layer.refine,
                              q.shape[-1] ** -0.5, n - 1, layer._reach())  # (1, Hkv, 1, refine)
        out["opened"] = float((opened == value_pos // hl.block_size).any(-1).double().mean())
    return out


def main(argv=None) -> int:
    args = recall.parse_args(argv)
    device = torch.device("cpu")
    variant = args.variants.split(",")[0]
    model, _ = recall.trained(args, variant, device)
    model.eval()
    if args.eval_select_reach is not None:
        recall.set_select_reach(model, args.eval_select_reach, args.eval_attend_reach)
    if args.eval_max_level is not None:
        recall.cap_levels(model, args.eval_max_level, args.eval_flat_top)
    layers = [m for m in model.modules() if hasattr(m, "summarise")]
    n = int(args.eval_lens.split(",")[0])
    gen = torch.Generator().manual_seed(args.seed + 2000 + n)
    t0 = time.perf_counter()
    rows = {}
    for d in recall.eval_distances(args, n):
        acc = {}
        for _ in range(args.single_seqs):
            ids, _, _ = recall.single_query_batch(gen, 1, n, d, args.keys)
            for i, (layer, qkv) in enumerate(zip(layers, _layer_inputs(model, layers, ids.to(device))), 1):
                for key, r in needle_ranks(layer, *qkv, n - 1 - d).items():
                    acc.setdefault(f"layer {i}", {}).setdefault(key, []).append(r)
        if not any(any(isinstance(k, tuple) for k in a) for a in acc.values()):  # the needle in the near field
            continue
        rows[d] = {layer: {k if isinstance(k, str) else f"L{k[0]} {k[1]}": sum(x) / len(x) for k, x in a.items()}
                   for layer, a in acc.items()}
        for layer, r in rows[d].items():
            print(f"distance {d}, {layer}: " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    head = ("| distance | layer | level | windows | " + " | ".join(RULES) + " | opened |\n|---|---|---|---|"
            + "---|" * (len(RULES) + 1))
    lines = [head]
    for d, per_layer in rows.items():
        for layer, r in per_layer.items():
            for level in range(1, 64):
                if f"L{level} windows" in r:
                    opened = f"{r['opened']:.2f}" if level == 1 and "opened" in r else ""
                    lines.append(f"| {d} | {layer.split()[1]} | {level} | {r[f'L{level} windows']:.0f} | "
                                 + " | ".join(f"{r[f'L{level} {rule}']:.1f}" for rule in RULES) + f" | {opened} |")
    table = "\n".join(lines) + ("\n\nThe needle's window's rank among its level's windows before the last query's "
                                "near field (0: first), per layer, mean over heads and sequences; opened (level 1): "
                                "the share of key/value heads whose selection opens the needle's block.")
    print(table)
    stem = result_stem("selection", args, device)
    write_results(stem, dict(meta=meta(args, variant=variant, length=n, wall_s=time.perf_counter() - t0),
                             rows=rows, table=table), markdown=table)
    print(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
