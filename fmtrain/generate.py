"""Sample text from a checkpoint of a causal LM.

    python -m fmtrain.generate RUN_DIR_OR_CHECKPOINT --prompt "def main(" --tokens 200

Each new token re-runs the model over the whole context (no key/value cache):
multipole attention's cost per token is then O(n log n), fine for inspecting a run.
"""
from __future__ import annotations

import argparse
import sys

import torch


@torch.no_grad()
def sample(model, prompt_ids: list[int], n_tokens: int, *, temperature: float = 0.8, top_k: int | None = 50,
           generator: torch.Generator | None = None, max_context: int | None = None) -> list[int]:
    """Continue ``prompt_ids`` by ``n_tokens`` tokens (greedy when ``temperature == 0``)."""
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    for _ in range(n_tokens):
        ctx = ids[-max_context:] if max_context else ids
        logits = model.logits(torch.tensor([ctx], device=device))[0, -1].float()
        if temperature == 0:
            ids.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1).cpu()
        ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    return ids[len(prompt_ids):]


def main(argv=None) -> int:
    from .checkpoint import load_config_of, load_model_state, resolve
    from .data import load_tokenizer
    from .model import build_model

    ap = argparse.ArgumentParser(prog="python -m fmtrain.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint folder, a checkpoints folder or a run folder (newest)")
    ap.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ckpt = resolve(args.checkpoint)
    cfg = load_config_of(ckpt)
    if cfg.model.kind != "causal":
        print(f"error: {ckpt} holds a masked LM (model.kind={cfg.model.kind!r}); generation needs a causal LM",
              file=sys.stderr)
        return 2
    tok = load_tokenizer(ckpt / "tokenizer.model", vocab_size=cfg.model.vocab_size)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(ckpt))
    model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
    prompt = tok.encode(args.prompt) if args.prompt else [tok.eos_id]
    out = sample(model, prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                 generator=torch.Generator().manual_seed(args.seed), max_context=cfg.data.seq_len)
    print(args.prompt + tok.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
