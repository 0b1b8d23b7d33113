"""A needle test on a run's own model and tokenizer: does it retrieve a fact from far back?

A key-value pair ("The secret number for KEY is 48213.") is hidden in held-out text at a
chosen depth (0: the start, 1: just before the question) of a prompt of a chosen length,
and the prompt ends by asking for it ("... The secret number for KEY is"). ``keys > 1`` is
RULER's multi-key needle: that many pairs with distinct keys, one asked for, so attending
to "the" needle is not enough. A sample is correct when the model's greedy continuation
is the value (every answer token is the argmax, read teacher-forced in one forward pass);
the mean log-likelihood of the answer is reported too, a softer signal for small models.
Used by ``python -m fmtrain.eval RUN --needle``.
"""
from __future__ import annotations

import numpy as np
import torch

KEYS = ("apple", "river", "violet", "copper", "falcon", "meadow", "harbor", "lantern", "glacier", "orchid",
        "saddle", "thimble", "walnut", "quartz", "pepper", "marble")


def _phrase(tok, text: str) -> list[int]:
    return list(tok.encode(text))


def build_prompt(tok, haystack: np.ndarray, length: int, depth: float, pairs: list[tuple[str, str]],
                 asked: int) -> tuple[list[int], list[int], list[int]]:
    """``(prompt ids, answer ids, needle starts)``: ``length`` prompt tokens of ``haystack`` holding
    the needles of ``pairs`` (key, value) around ``depth`` of the filler, ending in the question
    for pair ``asked``; the answer is `` VALUE``."""
    needles = [_phrase(tok, f"\nThe secret number for {k} is {v}.\n") for k, v in pairs]
    question = _phrase(tok, f"\nWhat is the secret number for {pairs[asked][0]}? The secret number for "
                            f"{pairs[asked][0]} is")
    answer = _phrase(tok, f" {pairs[asked][1]}")
    filler = length - sum(map(len, needles)) - len(question)
    if filler < 0:
        raise ValueError(f"a prompt of {length} tokens cannot hold {len(pairs)} needle(s) and the question "
                         f"({length - filler} tokens); use longer lengths")
    if len(haystack) < filler:
        reps = -(-filler // max(len(haystack), 1))
        haystack = np.tile(haystack, reps)
    hay = haystack[:filler].tolist()
    # Needles side by side around the depth (several keys: spread by a few tokens of filler each).
    at = round(depth * filler)
    ids, starts, cut = [], [], 0
    for i, needle in enumerate(needles):
        pos = min(filler, max(0, at + i * 8 - 4 * (len(needles) - 1)))
        pos = max(pos, cut)
        ids += hay[cut:pos]
        starts.append(len(ids))
        ids += needle
        cut = pos
    ids += hay[cut:] + question
    return ids, answer, starts


@torch.no_grad()
def score(model, prompt: list[int], answer: list[int]) -> tuple[bool, float]:
    """Whether greedy decoding after ``prompt`` gives ``answer``, and the answer's log-likelihood."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + answer], device=device)
    where = torch.zeros(ids[:, :-1].shape, dtype=torch.bool, device=device)
    where[0, len(prompt) - 1:] = True  # the positions that predict the answer
    logits = model.logits_at(ids[:, :-1], where).double()
    target = torch.tensor(answer, device=device)
    logp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
    return bool((logits.argmax(-1) == target).all()), logp


def needle_test(model, tok, docs: list[np.ndarray], lengths: list[int], depths: list[float], samples: int,
                keys: int = 1, seed: int = 0, progress=None) -> list[dict]:
    """One row per (length, depth): accuracy over ``samples`` prompts, the mean answer log-likelihood."""
    if not 1 <= keys <= len(KEYS):
        raise ValueError(f"keys={keys}: choose 1 to {len(KEYS)}")
    if samples < 1:
        raise ValueError(f"samples={samples}: give a whole number >= 1")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths={lengths}: give prompt lengths in tokens, each >= 1")
    if not depths or not all(0 <= d <= 1 for d in depths):
        raise ValueError(f"depths={depths}: give depths within [0, 1] (0: the prompt's start, 1: just before the "
                         "question)")
    rng = np.random.default_rng(seed)
    haystack = np.concatenate(docs)
    rows, done, total = [], 0, len(lengths) * len(depths) * samples
    for length in lengths:
        for depth in depths:
            correct, lls = 0, []
            for _ in range(samples):
                names = rng.choice(len(KEYS), size=keys, replace=False)
                pairs = [(KEYS[k], str(rng.integers(10000, 100000))) for k in names]
                start = int(rng.integers(0, max(1, len(haystack) - length)))
                prompt, answer, _ = build_prompt(tok, haystack[start:], length, depth, pairs,
                                                 int(rng.integers(0, keys)))
                ok, ll = score(model, prompt, answer)
                correct += ok
                lls.append(ll)
                done += 1
                if progress is not None:
                    progress(done, total)
            rows.append(dict(length=length, depth=depth, keys=keys, samples=samples, accuracy=correct / samples,
                             answer_loglik=float(np.mean(lls))))
    return rows


def table(rows: list[dict]) -> str:
    """Accuracy (answer log-likelihood) by length (rows) and depth (columns)."""
    depths = sorted({r["depth"] for r in rows})
    cell = {(r["length"], r["depth"]): r for r in rows}
    lines = ["| length | " + " | ".join(f"depth {d:g}" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
    for length in sorted({r["length"] for r in rows}):
        cells = [f"{cell[length, d]['accuracy']:.2f} ({cell[length, d]['answer_loglik']:.1f})" for d in depths]
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    keys = rows[0]["keys"] if rows else 1
    return "\n".join(lines) + (f"\n\nNeedle accuracy (greedy answer exact), in brackets the answer's mean "
                               f"log-likelihood; {keys} key(s), {rows[0]['samples'] if rows else 0} samples a cell; "
                               "depth 0 is the prompt's start, 1 just before the question.")


__all__ = ["build_prompt", "score", "needle_test", "table", "KEYS"]
