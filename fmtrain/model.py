"""Causal (GPT-style) and masked (BERT-style) language models on one transformer trunk.

    model = build_model(cfg.model)                      # CausalLM or MaskedLM
    loss_sum, n_tokens = model(input_ids, targets, positions)
    (loss_sum / n_tokens).backward()                    # the trainer reduces across ranks first

- Blocks are pre-norm: ``x = x + attn(norm1(x), positions); x = x + mlp(norm2(x))``
  with RMSNorm, SwiGLU and one of three attentions (``model.attention``):
  ``"fma"`` multipole attention (the product), ``"sdpa"`` full attention and
  ``"local"`` the fine level of fma only (the two baselines).
- ``positions`` are *global* token positions for RoPE, so a sequence-parallel
  rank passes its slice's and gets the same rotation the full sequence would.
- ``doc_positions`` (the loader's: each token's position in its packed document)
  turn on document masking: attention stays within each document, so each
  document's output is the model's on that document alone. With
  ``position_reset`` they are the RoPE positions too (the model is built with it).
- ``targets`` are aligned with ``input_ids`` (the token to predict at each
  position, ``-100`` to ignore): the data pipeline shifts for the causal LM and
  masks for the MLM, so that a sequence slice carries its own targets.
- The loss is computed ``model.loss_chunk`` tokens at a time; ``seq_len x vocab``
  logits never exist at once (at 131072 tokens and a 32k vocabulary that would be
  16 GiB in fp32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionSpec, make_attention
from .attention.documents import cu_seqlens_from_doc_positions
from .attention.sp_documents import global_cu_seqlens
from .attention.hierarchy import hierarchy, num_levels
from .config import ModelConfig
from .data.masking import IGNORE_INDEX  # the targets the data pipeline marks "no loss here"


# --------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """``w2(silu(x W_gate) * x W_up)``; gate and up share one matmul."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # residual projection (scaled init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, n, hidden) each
        return self.w2(F.silu(gate) * up)


def attention_spec(cfg: ModelConfig, causal: bool) -> AttentionSpec:
    """The attention layer ``cfg.attention`` names, with the [model] fields it reads."""
    return AttentionSpec(
        kind=cfg.attention, dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads, causal=causal,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias,
        block_size=cfg.block_size, rank=cfg.rank, variant=cfg.variant, summary=cfg.summary, weighted=cfg.weighted,
        max_seq_len=cfg.max_seq_len, impl=cfg.impl, level_offset=cfg.level_offset, summary_rope=cfg.summary_rope,
        refine=cfg.refine, max_level=cfg.max_level, flat_top=cfg.flat_top, select_reach=cfg.select_reach,
        attend_reach=cfg.attend_reach)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(attention_spec(cfg, causal))
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden, cfg.mlp_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None, cu_seqlens=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), positions, cu_seqlens)  # (B, n, dim)
        return x + self.mlp(self.norm2(x))

    def prefill(self, x: torch.Tensor, store_device=None):
        """The forward at positions ``0..n-1`` and the attention's decoding cache."""
        y, cache = self.attn.prefill(self.norm1(x), store_device)
        x = x + y
        return x + self.mlp(self.norm2(x)), cache

    def decode(self, x: torch.Tensor, cache) -> torch.Tensor:
        """One token per sequence, ``x`` (B, 1, dim), at position ``cache.length``."""
        x = x + self.attn.decode(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token embedding, blocks and the final norm: ids (B, n) -> hidden states (B, n, dim).

    ``doc_positions`` (B, n), each token's position in its packed document: attention stays
    within documents (their boundaries, ``cu_seqlens``, are found once per forward, on the
    host, for every layer); with ``position_reset`` they are also the RoPE positions.
    """

    # The sequence-parallel group whose ranks hold slices of the rows (set by
    # apply_sequence_parallel): document bounds are then gathered over it. None: local.
    sp_group = None

    def __init__(self, cfg: ModelConfig, causal: bool, position_reset: bool = False):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.activation_checkpointing = cfg.activation_checkpointing
        self.position_reset = position_reset

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                doc_positions: torch.Tensor | None = None) -> torch.Tensor:
        cu_seqlens = None
        if doc_positions is not None:
            if doc_positions.shape != input_ids.shape:
                raise ValueError(f"doc_positions {tuple(doc_positions.shape)} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)} (each token's position in its document)")
            # A CPU tensor (the loader's) costs no device sync here: fma builds its tables on the host.
            if self.sp_group is not None and dist.get_world_size(self.sp_group) > 1:  # this rank's slice
                cu_seqlens = global_cu_seqlens(doc_positions, self.sp_group)  # the global rows', every rank alike
            else:
                cu_seqlens = cu_seqlens_from_doc_positions(doc_positions)  # (documents + 1,) int64, CPU
            if self.position_reset:
                positions = doc_positions.to(input_ids.device)
        x = self.tok_emb(input_ids)  # (B, n, dim)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # Keep only each block's input; its activations are rebuilt in the backward.
            x = checkpoint(block, x, positions, cu_seqlens, use_reentrant=False) if recompute \
                else block(x, positions, cu_seqlens)
        return self.norm(x)


@dataclass
class DecodeCache:
    """A causal model's decoding state: one cache per block (:mod:`fmtrain.attention.cache`)
    and the number of tokens each sequence of the batch holds."""

    layers: list
    length: int

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)

    def cold_nbytes(self) -> int:
        """Bytes of the refined layers' fine key/value stores (which may live in host memory)."""
        return sum(c.cold_nbytes() for c in self.layers)


# --------------------------------------------------------------------------- loss
def _chunked_ce(h, weight, targets, chunk: int, want_dh: bool, want_dw: bool):
    """Cross-entropy sum of ``h @ weight.T`` and, if wanted, its gradients, ``chunk`` rows at a time.

    h (N, dim), weight (V, dim), targets (N,). Only one chunk's logits (chunk, V)
    exist at a time. Logits and softmax are float32 (float64 for float64 inputs).
    """
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    dh = torch.empty_like(h) if want_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dw else None
    total = torch.zeros((), dtype=acc, device=h.device)
    for s in range(0, h.shape[0], chunk):
        hc, tc = h[s:s + chunk], targets[s:s + chunk]
        logits = (hc @ weight.t()).to(acc)  # (c, V)
        valid = tc != IGNORE_INDEX
        safe = torch.where(valid, tc, 0)[:, None]  # any index; ignored rows are zeroed below
        lse = torch.logsumexp(logits, dim=-1)  # (c,)
        total += torch.where(valid, lse - logits.gather(1, safe).squeeze(1), 0).sum()
        if want_dh or want_dw:
            grad = torch.exp_(logits.sub_(lse[:, None]))  # softmax, in place of the logits
            grad.scatter_add_(1, safe, torch.full_like(grad[:, :1], -1.0))  # - one_hot(target)
            grad = grad.mul_(valid[:, None]).to(h.dtype)  # (c, V)
            if want_dh:
                dh[s:s + chunk] = grad @ weight
            if want_dw:
                dw += (grad.t() @ hc).to(acc)
    return total, dh, dw


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Autograd wrapper of :func:`_chunked_ce`.

    The gradients are formed in the forward, chunk by chunk, while each chunk's
    logits exist anyway; the backward only scales them by the incoming gradient.
    So logits are computed once and never stored, and the head costs the same
    three matmuls as a plain ``linear + cross_entropy`` (recomputing each chunk's
    logits in the backward would cost a fourth).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        total, dh, dw = _chunked_ce(h, weight, targets, chunk, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        dh, dw = ctx.saved_tensors
        dh = dh * grad_total.to(dh.dtype) if dh is not None else None
        dw = (dw * grad_total).to(ctx.weight_dtype) if dw is not None else None
        return dh, dw, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies, number of targets) over tokens with ``targets != -100``.

    ``h`` (..., dim) hidden states, ``weight`` (V, dim) output projection,
    ``targets`` (...) token ids. The sum is float32 (float64 for float64 ``h``).
    Without autograd (eval, ``no_grad``) no gradient work is done.
    """
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    count = (t != IGNORE_INDEX).sum()
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(h2, weight, t, chunk), count
    return _chunked_ce(h2, weight, t, chunk, False, False)[0], count


class LMHead(nn.Module):
    """Output projection; with targets it returns the chunked loss instead of logits.

    The loss lives inside this module's ``forward`` so that ZeRO-3 has gathered
    ``weight`` (its hooks gather a module's parameters around its forward).
    """

    def __init__(self, dim: int, vocab_size: int, chunk: int):
        super().__init__()
        self.chunk = chunk
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return h @ self.weight.t()  # (B, n, V): short inputs only
        return chunked_cross_entropy(h, self.weight, targets, self.chunk)


# --------------------------------------------------------------------------- models
class LanguageModel(nn.Module):
    """Trunk + head. Subclasses fix ``causal``; use :func:`build_model`.

    ``position_reset`` (``data.position_reset``): with ``doc_positions`` given, RoPE positions
    restart at 0 at each document. It changes no parameter: a checkpoint loads either way.
    """

    causal: bool = True

    def __init__(self, cfg: ModelConfig, position_reset: bool = False):
        super().__init__()
        self.cfg = cfg
        self.trunk = Transformer(cfg, causal=self.causal, position_reset=position_reset)
        self.head = LMHead(cfg.dim, cfg.vocab_size, cfg.loss_chunk)
        if cfg.tie_embeddings:
            self.head.weight = self.trunk.tok_emb.weight  # one Parameter, two users
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) for matrices, residual projections scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with
        depth. Multipole summaries keep their own init (averaging maps)."""
        std = self.cfg.init_std
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, mean=0.0, std=std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
        for block in self.trunk.blocks:
            for proj in (block.attn.wo, block.mlp.w2):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layers))
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, mean=0.0, std=std)

    def _check_ids(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer (batch, seq_len), got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)} (aligned: the token to predict at each position)")

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
                doc_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, number of targets): ``input_ids``, ``targets`` (B, n); ``positions``
        (n,) or (B, n) global positions, default ``arange(n)``. Targets of -100 are ignored.
        ``doc_positions`` (B, n): document masking (see :class:`Transformer`); None: none."""
        self._check_ids(input_ids, targets)
        return self.head(self.trunk(input_ids, positions, doc_positions), targets)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
               doc_positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, vocab) logits for every position, float32 (float64 for a float64 model);
        for generation and short inputs: the whole (n, vocab) matrix is formed."""
        self._check_ids(input_ids)
        logits = self.head(self.trunk(input_ids, positions, doc_positions))
        return logits if logits.dtype == torch.float64 else logits.float()

    @torch.no_grad()
    def logits_at(self, input_ids: torch.Tensor, where: torch.Tensor, vocab: torch.Tensor | None = None,
                  positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the positions ``where`` (a boolean mask shaped like ``input_ids``) over the token
        ids ``vocab`` (all when None): (selected positions, tokens). Only those rows are projected, so
        a long sequence never forms its (n, vocab) logits; the trunk follows any autocast around the
        call, the projection is float32 (float64 for a float64 model) whatever it says."""
        self._check_ids(input_ids)
        return self._project(self.trunk(input_ids, positions)[where], vocab)

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
                       chunk: int = 4096) -> torch.Tensor:
        """Per-token log-likelihood: ``log p(targets[b, i] | the model at position i)`` (B, n) in float64,
        ``targets`` valid token ids aligned with ``input_ids`` as in :meth:`forward` (for a causal LM,
        ``input_ids[:, 1:]`` continued). The logits are formed ``chunk`` positions at a time."""
        self._check_ids(input_ids, targets)
        h = self.trunk(input_ids, positions).flatten(0, 1)
        flat = targets.reshape(-1, 1)
        out = [torch.log_softmax(self._project(h[i:i + chunk]).double(), -1).gather(-1, flat[i:i + chunk])[:, 0]
               for i in range(0, h.shape[0], chunk)]
        return torch.cat(out).view(targets.shape)

    def _project(self, h: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """``h @ head.weight[vocab].T`` in float32 (float64 for a float64 model), outside any autocast."""
        weight = self.head.weight if vocab is None else self.head.weight[vocab]
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        with torch.autocast(h.device.type, enabled=False):
            return h.to(dtype) @ weight.to(dtype).t()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, store_device=None) -> tuple[torch.Tensor, DecodeCache]:
        """One pass over prompts ``input_ids`` (B, n), all of one length, from position 0:
        ``(logits of the next token (B, vocab), cache)``. Only the last position's logits are
        formed. Prompts of different lengths: prefill them separately (or group them by length);
        a batch shares one position in the hierarchy. ``store_device``: where refined layers
        (``refine > 0``) keep the fine keys and values they fetch opened blocks from (default:
        the model's device; ``"cpu"`` keeps them in host memory)."""
        self._check_decodable()
        self._check_ids(input_ids)
        x = self.trunk.tok_emb(input_ids)  # (B, n, dim)
        caches = []
        for block in self.trunk.blocks:
            x, cache = block.prefill(x, store_device)
            caches.append(cache)
        return self._next_logits(x[:, -1:]), DecodeCache(caches, input_ids.shape[1])

    @torch.no_grad()
    def decode(self, next_ids: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        """Append one token per sequence, ``next_ids`` (B,) or (B, 1), to ``cache`` (updated in
        place) and return the logits of the token after it, (B, vocab), and the cache."""
        ids = next_ids.reshape(-1, 1)
        x = self.trunk.tok_emb(ids)  # (B, 1, dim)
        for block, layer_cache in zip(self.trunk.blocks, cache.layers):
            x = block.decode(x, layer_cache)
        cache.length += 1
        return self._next_logits(x), cache

    def _next_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.trunk.norm(x))[:, 0]  # (B, vocab)
        return logits if logits.dtype == torch.float64 else logits.float()

    def _check_decodable(self) -> None:
        if not self.causal:
            raise ValueError("prefill/decode need a causal LM; a masked LM (model.kind='mlm') predicts "
                             "masked tokens in place and does not generate")

    def num_params(self, embedding: bool = True) -> int:
        """Parameters, shared ones once; without the input embedding if ``embedding=False``."""
        n = sum(p.numel() for p in self.parameters())
        if not embedding:
            n -= self.trunk.tok_emb.weight.numel()
            if self.cfg.tie_embeddings:  # the tied matrix is still used by the head
                n += self.head.weight.numel()
        return n


class CausalLM(LanguageModel):
    """GPT-style: each position predicts the next token and sees only the past."""

    causal = True


class MaskedLM(LanguageModel):
    """BERT-style: bidirectional; predicts the masked tokens."""

    causal = False


def build_model(cfg: ModelConfig, *, position_reset: bool = False) -> LanguageModel:
    """The model ``cfg.kind`` names, initialised (on the CPU, fp32), for one device. Sequence
    parallelism is applied to it afterwards (:func:`fmtrain.parallel.apply_sequence_parallel`):
    it then takes this rank's slice of each sequence with global ``positions``, and its loss is
    the slice's sum (the trainer divides by the global count). ``position_reset``: the run's
    ``data.position_reset`` (a data setting: the packing, not the architecture, asks for it)."""
    if cfg.kind == "causal":
        return CausalLM(cfg, position_reset)
    if cfg.kind == "mlm":
        return MaskedLM(cfg, position_reset)
    raise ValueError(f"model.kind={cfg.kind!r} is not one of 'causal', 'mlm'")


def trained_levels(cfg: ModelConfig, seq_len: int) -> int:
    """The coarse levels a multipole model trained at ``seq_len`` tokens has seen (no more than its
    ``model.max_level``)."""
    levels = num_levels(seq_len, cfg.block_size)
    return levels if cfg.max_level is None else min(levels, cfg.max_level)


def cap_levels(model: nn.Module, max_level: int | None, flat_top: bool | None = None) -> None:
    """Run ``model``'s multipole layers with the coarse levels 1..``max_level`` only, as
    ``model.max_level`` does (None: every level); e.g. a trained model past its training length.
    ``flat_top`` (``model.flat_top``; None: leave the layers'): the top kept level covers the rest
    of the sequence, for refined layers (others refuse it)."""
    from .attention.layers import MultipoleAttention

    if max_level is not None and max_level < 1:
        raise ValueError(f"max_level={max_level}: keep at least level 1 (attention='local' is the fine level alone)")
    layers = [m for m in model.modules() if isinstance(m, MultipoleAttention) and m.max_level != 0]  # 0: `local`
    if flat_top and any(not layer.refine for layer in layers):
        raise ValueError("flat_top needs a model with adaptive refinement (model.refine > 0): its far field is what "
                         "reads the flat top level's lists; leave flat_top off for this model")
    for layer in layers:
        layer.max_level = max_level
        if flat_top is not None:
            layer.flat_top = flat_top


def set_select_reach(model: nn.Module, distance: int | None, attend: bool = False) -> None:
    """Run ``model``'s refined layers with ``model.select_reach = distance`` (None: real distances)
    and ``model.attend_reach = attend`` (the far field's attention too), e.g. a trained model past
    its training length; models without refinement refuse it."""
    from .attention.layers import MultipoleAttention

    layers = [m for m in model.modules() if isinstance(m, MultipoleAttention) and m.max_level != 0]
    if distance is not None and (distance < 1 or not layers or any(not layer.refine for layer in layers)):
        raise ValueError(f"select_reach={distance}: needs a distance >= 1 and a model with adaptive refinement "
                         "(model.refine > 0), whose selection it changes")
    if attend and distance is None:
        raise ValueError("attend_reach reads the far field as at select_reach: give a select_reach distance too")
    for layer in layers:
        layer.select_reach, layer.attend_reach = distance, attend


def scale_rope(model: nn.Module, rope_scaling: dict | None) -> None:
    """Run ``model``'s attention layers with RoPE's frequencies scaled (``model.rope_scaling``:
    ``{"rope_type": "llama3" | "linear", ...}``, checked as the config checks it; None: plain
    RoPE), e.g. a trained model run past its training length without fine-tuning."""
    from .attention.layers import ProjectedAttention
    from .attention.rope import scale_frequencies

    if rope_scaling:
        scale_frequencies(torch.ones(2, dtype=torch.float64), rope_scaling)  # refuses an unknown kind, as the layer would
    for layer in model.modules():
        if isinstance(layer, ProjectedAttention):
            layer.rope_scaling = dict(rope_scaling) if rope_scaling else None


# --------------------------------------------------------------------------- FLOPs
def attention_scores_per_query(cfg: ModelConfig, seq_len: int, causal: bool) -> float:
    """Query-key scores the attention really computes per query, averaged over the sequence.

    fma: ``F*m`` fine keys plus ``F*p`` summaries per coarse level (``F`` = 2
    causal, 3 bidirectional; masked slots are computed too); the linear variant
    shares coarse scores per window instead. local: the fine part only. sdpa:
    every key, half of them when causal (what FlashAttention-style kernels skip).
    """
    n = seq_len
    if cfg.attention == "sdpa":
        return (n + 1) / 2 if causal else float(n)
    F_ = 2 if causal else 3
    fine = F_ * cfg.block_size
    if cfg.attention == "local":
        return float(fine)
    h = hierarchy(n, cfg.block_size, cfg.rank, causal)
    if cfg.variant == "linear":
        return fine + sum(h.windows) * h.slots_per_level / n
    return float(fine + h.coarse_slots)


def _summary_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool) -> float:
    """Multiply-add FLOPs of the learned key and value summaries, per token per layer."""
    if cfg.attention != "fma" or cfg.summary == "mean":
        return 0.0
    h = hierarchy(seq_len, cfg.block_size, cfg.rank, causal)
    if h.n_levels == 0:
        return 0.0
    d, p = cfg.head_dim, cfg.rank
    if cfg.summary == "m2m":  # leaf: m tokens -> p summaries; then 2p children -> p, per level
        flops = 2 * cfg.block_size * p * d * h.n_blocks + sum(4 * p * p * d * nw for nw in h.windows[1:])
    else:  # conv: every level reads its whole (padded) windows
        flops = sum(2 * h.window_size(l) * p * d * nw for l, nw in enumerate(h.windows, start=1))
    return 2 * cfg.kv_heads * flops / seq_len  # keys and values


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True) -> float:
    """FLOPs per token of one forward (+ backward if ``training``: x3) at ``seq_len``.

    Counts the matmuls (2 per multiply-add): projections, MLP, output head, the
    attention scores and weighted values the attention kind really computes
    (:func:`attention_scores_per_query`) and learned summaries. Recomputation by
    activation checkpointing is not counted (model FLOPs, as MFU is defined).
    """
    causal = cfg.kind == "causal"
    dim, kv_dim, L = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.n_layers
    per_layer = 2 * (dim * dim + dim * 2 * kv_dim + dim * dim + 3 * dim * cfg.hidden)
    # q.k and p.v: 2 multiply-adds of head_dim per (query head, key).
    per_layer += 4 * cfg.n_heads * cfg.head_dim * attention_scores_per_query(cfg, seq_len, causal)
    per_layer += _summary_flops_per_token(cfg, seq_len, causal)
    forward = L * per_layer + 2 * dim * cfg.vocab_size
    return 3 * forward if training else forward


__all__ = ["DecodeCache", "RMSNorm", "SwiGLU", "attention_spec",
           "Block", "Transformer", "LMHead", "LanguageModel", "CausalLM", "MaskedLM", "build_model",
           "trained_levels", "cap_levels", "chunked_cross_entropy", "attention_scores_per_query", "flops_per_token", "IGNORE_INDEX"]
