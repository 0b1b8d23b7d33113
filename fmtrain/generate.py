"""Generate text with a causal LM from a checkpoint.

    python -m fmtrain.generate RUN_DIR_OR_CHECKPOINT --prompt "def main(" --max-new-tokens 200
    python -m fmtrain.generate RUN_DIR --prompt-file long_prompt.py --greedy

The prompt goes through the model once (``model.prefill``); each new token then
costs one step of the layers' decoding caches (``model.decode``): for multipole
attention ``O(m + p log n)`` keys per layer and a cache of that size, for the
``sdpa`` baseline a standard key/value cache. ``--no-cache`` re-runs the whole
context for every token instead (the reference the cache is tested against).

Prompts may be longer than the training ``seq_len`` for ``m2m`` and ``mean``
summaries (their parameters do not depend on the length); ``conv`` summaries
stop at the ``max_seq_len`` they were built for. Text is printed as it is
produced; the prefill and decode speeds go to stderr. Ctrl-C stops generation with
the text printed so far kept (exit status 130); a reader that closes the pipe
(``| head``) stops it quietly (exit status 141, as a shell reports ``yes | head``).
"""
from __future__ import annotations

import argparse
import math
import numbers
import sys
import time
from dataclasses import dataclass

import torch

from .errors import UserError, run_command

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


# --------------------------------------------------------------------------- sampling
def _whole(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sampling(*, max_new_tokens: int = 0, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, flags: bool = False) -> None:
    """Raise ValueError naming the first sampling argument out of range, what was given and what
    is accepted; ``flags``: name the command's options (``--top-k -1``), else the parameters (``top_k=-1``)."""
    def refuse(name: str, value, accepted: str):
        given = f"--{name.replace('_', '-')} {value!r}" if flags else f"{name}={value!r}"
        raise ValueError(f"{given}: {accepted}")

    if not _whole(max_new_tokens) or max_new_tokens < 0:
        refuse("max_new_tokens", max_new_tokens, "give a whole number >= 0 (0: no new tokens, the prompt alone)")
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        refuse("temperature", temperature, "give a finite number >= 0 (0: greedy)")
    if top_k is not None and (not _whole(top_k) or top_k < 0):
        refuse("top_k", top_k, "give a whole number >= 0 (0: no cut, sample among all tokens)")
    if top_p is not None and (not _real(top_p) or not 0 < top_p <= 1):
        refuse("top_p", top_p, "give a number in (0, 1] (1: off)")


def next_token(logits: torch.Tensor, *, temperature: float = 0.8, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row of ``logits`` (B, V); greedy when ``temperature == 0``. Returns (B,).

    ``top_k`` None or 0 and ``top_p`` None or 1: no cut. Out-of-range values raise ValueError; any
    temperature > 0 samples (see :func:`_sample`); logits with nan or +inf raise :class:`NonFiniteLogits`.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


class NonFiniteLogits(FloatingPointError):
    """The model's next-token logits hold nan or +inf (or only -inf): there is nothing to sample from."""


def _sample(logits, temperature, top_k, top_p, generator) -> torch.Tensor:
    """:func:`next_token` on checked arguments (generate checks them once, not at every token).

    In float64 with each row's largest logit subtracted before dividing by the temperature: every
    temperature > 0 (1e-300 included) gives scaled logits <= 0 with a 0 at the most likely token
    (the others may underflow to -inf), so softmax always has something to sample from; a huge
    temperature flattens them towards uniform. Top-k and top-p always keep the most likely token.
    """
    top = logits.max(dim=-1, keepdim=True).values  # nan if any logit is (max propagates nan)
    if not bool(torch.isfinite(top).all()):
        raise NonFiniteLogits("the model's next-token logits are not finite (nan or inf)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    device = logits.device
    x = (logits.double() - top.double()) / temperature
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=True)
        p = sorted_x.softmax(dim=-1)
        drop = p.cumsum(dim=-1) - p >= top_p  # keep the smallest set reaching top_p (its first always)
        x = x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(x, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)


@dataclass
class Generation:
    """Generated ids per sequence (without the prompt) and where the time went."""

    ids: list[list[int]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decoded: int = 0  # decode steps taken
    cache_bytes: int = 0
    store_bytes: int = 0  # of cache_bytes: refined layers' fine key/value store (``store_device``)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
             temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             on_token=None, store_device=None) -> Generation:
    """Continue ``prompt`` (B, n) token ids, all prompts of one length, by up to
    ``max_new_tokens`` tokens each; a sequence stops at ``eos_id`` (kept in its ids).

    ``use_cache=False`` runs the full forward over the context for every token (the
    oracle). ``on_token(step, tokens (B,))`` is called after every new token.
    ``store_device``: where refined layers (``model.refine > 0``) keep the context's fine keys
    and values (default the model's device; ``"cpu"``: host memory, K blocks fetched per token).
    Prompts of different lengths: call once per length (a batch shares its position
    in the hierarchy, and left padding would move every position).
    ``max_new_tokens=0`` returns no tokens without running the model; arguments out of
    range (see :func:`check_sampling`) raise ValueError before anything runs.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt of shape {tuple(prompt.shape)}: give token ids of shape (B, n), n >= 1")
    device = next(model.parameters()).device
    ids = prompt.to(device)
    B = ids.shape[0]
    out = Generation(ids=[[] for _ in range(B)])
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return out
    t0 = time.perf_counter()
    if use_cache:
        logits, cache = model.prefill(ids, store_device)
    else:
        logits = model.logits(ids)[:, -1]
    _sync(device)
    out.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        tok = _sample(logits, temperature, top_k, top_p, generator)
        for b in range(B):
            if not done[b]:
                out.ids[b].append(int(tok[b]))
        if on_token is not None:
            on_token(step, tok)
        if eos_id is not None:
            done |= tok == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits, cache = model.decode(tok, cache)
        else:
            ids = torch.cat([ids, tok[:, None]], dim=1)
            logits = model.logits(ids)[:, -1]
        out.decoded += 1
    _sync(device)
    out.decode_s = time.perf_counter() - t0
    if use_cache:
        out.cache_bytes, out.store_bytes = cache.nbytes(), cache.cold_nbytes()
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- text out
class TextStream:
    """Prints decoded text as tokens arrive. Pieces of one character can straddle tokens
    (byte fallback), so text is printed up to the last complete character."""

    def __init__(self, tokenizer, file=sys.stdout):
        self.tok, self.file, self.ids, self.printed = tokenizer, file, [], ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        stable = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence decodes to U+FFFD
        if stable.startswith(self.printed) and len(stable) > len(self.printed):
            self.file.write(stable[len(self.printed):])
            self.file.flush()
            self.printed = stable

    def close(self) -> None:
        text = self.tok.decode(self.ids)
        if text.startswith(self.printed):
            self.file.write(text[len(self.printed):])
        self.file.write("\n")
        self.file.flush()


# --------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    from .eval import add_max_level_argument

    ap = argparse.ArgumentParser(prog="python -m fmtrain.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="text to continue (default: the start of a document)")
    src.add_argument("--prompt-file", default=None, help="a file whose text is the prompt")
    ap.add_argument("--max-new-tokens", "--tokens", type=int, default=200, dest="max_new_tokens",
                    help="tokens to generate at most; 0: the prompt alone (default 200)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy (default 0.8)")
    ap.add_argument("--greedy", action="store_true", help="the most likely token every step (= --temperature 0)")
    ap.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0: all (default 50)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with this "
                                                              "probability (default 1.0: off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, 0 to 2**64 - 1 (default 0)")
    ap.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    ap.add_argument("--no-cache", action="store_true",
                    help="re-run the whole context for every token (slow; the reference the cache matches)")
    add_max_level_argument(ap)
    ap.add_argument("--refine-store", choices=("device", "host"), default="device",
                    help="models with model.refine > 0: where the cache keeps the context's fine keys and values, "
                         "from which each token fetches the blocks it opens (host: main memory; default device)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="weights and activations (default: bf16 on CUDA, fp32 on CPU)")
    return ap


def main(argv=None) -> int:
    from .attention.hierarchy import num_levels
    from .checkpoint import resolve
    from .eval import (apply_length_options, attend_reach_of, max_level_of, past_training, rope_scaling_of,
                       select_reach_of)
    from .export import load_config_of, load_trained
    from .data import load_tokenizer
    from .model import trained_levels

    args = _parser().parse_args(argv)
    try:  # every number up front: nothing is loaded for a request that cannot run
        check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, flags=True)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"--seed {args.seed}: give a whole number from 0 to {SEED_MAX}")
    ckpt = resolve(args.checkpoint)
    cfg = load_config_of(ckpt)
    past_training(args, cfg)
    max_level = max_level_of(args.max_level, cfg, args.flat_top)
    rope_scaling = rope_scaling_of(args.rope_scaling, cfg)
    select_reach = select_reach_of(args.select_reach, cfg)
    attend_reach = attend_reach_of(args.attend_reach, select_reach, cfg)
    if cfg.model.kind != "causal":
        raise UserError(f"{ckpt} holds a masked LM (model.kind={cfg.model.kind!r}): it fills in masked tokens "
                        "and does not generate; use a causal LM's run")
    if args.prompt_file is not None:
        try:
            prompt_text = open(args.prompt_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {args.prompt_file}: {e}") from None
    else:
        prompt_text = args.prompt or ""
    tok = load_tokenizer(ckpt / "tokenizer.model", vocab_size=cfg.model.vocab_size)
    prompt = tok.encode(prompt_text) if prompt_text else [tok.eos_id]  # EOS: "a document starts here"
    total = len(prompt) + args.max_new_tokens
    m = cfg.model
    if m.attention == "fma" and m.summary == "conv" and num_levels(total, m.block_size) > \
            num_levels(m.max_seq_len, m.block_size):
        raise UserError(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens ({args.max_new_tokens}) exceed "
                        f"what the model's conv summaries were built for (max_seq_len={m.max_seq_len}); shorten "
                        "them (summary='m2m' models run at any length)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    model, _ = load_trained(ckpt)
    model.to(device=device, dtype=dtype)
    apply_length_options(model, cfg, max_level, args.flat_top, rope_scaling, select_reach, attend_reach)
    if len(prompt) > cfg.data.seq_len:
        levels, trained = "", trained_levels(m, cfg.data.seq_len)
        if m.attention == "fma" and max_level is None and num_levels(total, m.block_size) > trained:
            levels = f"; its coarse levels above {trained} were never trained (--past-training keeps to those" + \
                (", keeps every block within reach and reads them as within the training length)"
                 if m.refine else ")")
        reached = (attend_reach or m.attend_reach) and (select_reach or m.select_reach) <= cfg.data.seq_len
        rope = "" if rope_scaling is not None or m.rope_scaling or reached else \
            f"; RoPE meets distances it never trained on (--rope-scaling llama3:{-(-len(prompt) // cfg.data.seq_len)} " \
            "scales them back)"
        print(f"note: the prompt has {len(prompt)} tokens, more than the {cfg.data.seq_len} the model was trained "
              f"on; it is used whole{levels}{rope}", file=sys.stderr)
    stream = TextStream(tok)
    sys.stdout.write(prompt_text)
    temperature = 0.0 if args.greedy else args.temperature
    try:
        result = generate(model, torch.tensor([prompt]), args.max_new_tokens, use_cache=not args.no_cache,
                          temperature=temperature, top_k=args.top_k or None, top_p=args.top_p,
                          eos_id=None if args.ignore_eos else tok.eos_id,
                          generator=torch.Generator().manual_seed(args.seed),
                          on_token=lambda step, t: stream.add(int(t[0])),
                          store_device="cpu" if args.refine_store == "host" else None)
    except KeyboardInterrupt:  # Ctrl-C: the text so far, ended as a finished one is (run_command: exit 130)
        stream.close()
        raise
    except NonFiniteLogits as exc:  # the text so far kept, then one line
        stream.close()
        fix = "; run it with --dtype fp32" if dtype != torch.float32 else ""
        raise UserError(f"{exc} after {len(stream.ids)} new token(s): the model of {ckpt} overflowed or its "
                        f"weights are not finite{fix}") from None
    stream.close()
    print(_speed_report(result, len(prompt), args.max_new_tokens, args.no_cache), file=sys.stderr)
    return 0


def _speed_report(result: Generation, prompt_tokens: int, max_new_tokens: int, no_cache: bool) -> str:
    """The stderr line after a generation: prefill and decode speeds and the cache's size."""
    if max_new_tokens == 0:
        return f"no new tokens asked for (--max-new-tokens 0): the prompt ({prompt_tokens} tokens) as given, " \
               "the model not run"

    def rate(tokens: int, seconds: float) -> str:
        return f"{tokens / seconds:,.1f} tok/s" if seconds > 0 else "- tok/s"

    how = "recompute (no cache)" if no_cache else f"cache {result.cache_bytes / 2**20:.2f} MiB"
    if result.store_bytes and not no_cache:
        how += f" ({result.store_bytes / 2**20:.2f} MiB of it the refined layers' key/value store)"
    decode = f"decode {result.decoded} tokens" + (f" at {rate(result.decoded, result.decode_s)}" if result.decoded
                                                  else " (the first token comes from the prefill)")
    return f"prefill {prompt_tokens} tokens in {result.prefill_s:.2f} s ({rate(prompt_tokens, result.prefill_s)}); " \
           f"{decode}; {how}"


# --------------------------------------------------------------------------- stopping
if __name__ == "__main__":
    sys.exit(run_command(main))
