"""Attention layers: projections and RoPE (:class:`ProjectedAttention`), and on them the
layers a transformer block uses: :class:`MultipoleAttention` (``fma``, and ``local``, its fine
level only) and :class:`FullAttention` (``sdpa``, the dense baseline). :func:`make_attention`
builds the one an :class:`AttentionSpec` names.

Layers are built for one device; sequence parallelism is applied to a built model from
outside (:func:`fmtrain.parallel.apply_sequence_parallel` sets ``sp_group``).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, MultipoleCache, RefinedCache
from .cpu import adapt_torch_threads
from .documents import as_documents
from .multipole import fma
from .refine import SelectionReach
from .rope import apply_rope, inverse_frequencies, rope_angles
from .summaries import WindowRotated, build_summaries

# How RoPE reaches the coarse summaries: "keys" summarises rotated keys; "window" summarises
# un-rotated keys and rotates each summary at its sub-window's mean position.
SUMMARY_ROPES = ("keys", "window")

MAX_LEVELS = 32  # coarse levels a learned level offset covers: 2**33 fine blocks


class ProjectedAttention(nn.Module):
    """Query/key/value projections with RoPE; subclasses implement :meth:`attend`.

    ``x`` (B, n, dim) -> (B, n, dim). ``positions`` (n,) or (B, n) are global token
    positions (a sequence-parallel rank passes its slice's); default ``arange(n)``.
    ``cu_seqlens``: document masking for packed rows, as ``fma`` takes it (0, then each
    document's end in the batch flattened to ``B * n`` tokens); None: one sequence per row.
    Every attention kind shares these parameter names (``wq``, ``wkv``, ``wo``), so
    they initialise alike and their checkpoints line up.
    """

    # The sequence-parallel group whose ranks hold the sequence's slices; x is then this rank's
    # slice and ``positions`` its global positions. Set by apply_sequence_parallel; None: local.
    sp_group = None

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, causal: bool = True,
                 rope: bool = True, rope_theta: float = 10000.0, qkv_bias: bool = False,
                 out_bias: bool = False, rope_scaling: dict | None = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.causal, self.rope, self.rope_theta = causal, rope, rope_theta
        self.rope_scaling = rope_scaling or None  # e.g. Llama 3.1's {"rope_type": "llama3", ...}
        # Biases: off in fmtrain's own models; Qwen2 has q/k/v biases, Llama's attention_bias all four.
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=qkv_bias)
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=out_bias)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor | None):
        """Rotated q (B, H, n, d) and k, v (B, Hkv, n, d)."""
        B, n, _ = x.shape
        q = self.wq(x).view(B, n, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(B, n, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            if positions is None:
                positions = torch.arange(n, device=x.device)
            cos, sin = rope_angles(positions, self.head_dim, self.rope_theta, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
        raise NotImplementedError  # (B, H, n, d)

    def new_cache(self, store_device=None):
        """An empty decoding cache for this layer (:mod:`.cache`): ``prefill(q, k, v)``, ``step(q, k, v)``.
        ``store_device``: where a cache that keeps every fine key (refinement's) keeps them."""
        raise NotImplementedError

    def _project_out(self, y: torch.Tensor) -> torch.Tensor:
        B, _, n, _ = y.shape  # (B, H, n, d) -> (B, n, dim)
        return self.wo(y.transpose(1, 2).reshape(B, n, -1))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cu_seqlens=None) -> torch.Tensor:
        return self._project_out(self.attend(*self.qkv(x, positions), cu_seqlens=cu_seqlens))

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, store_device=None):
        """The forward over a prompt ``x`` (B, n, dim) at positions ``0..n-1``, and the decoding
        cache it leaves: ``(y (B, n, dim), cache)``; ``store_device`` as :meth:`new_cache`'s."""
        if not self.causal:
            raise ValueError("decoding needs causal attention; this layer is bidirectional (a masked LM)")
        if self.sp_group is not None:
            raise ValueError("decoding runs on one device; build the model without a sequence-parallel group")
        if x.device.type == "cpu":
            adapt_torch_threads()  # decoding is many small operations: no threads beside a busy process
        q, k, v = self.qkv(x, None)
        return self._project_out(self.attend(q, k, v)), self.new_cache(store_device).prefill(q, k, v)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cache) -> torch.Tensor:
        """One new token per sequence, ``x`` (B, 1, dim) at position ``cache.length`` -> (B, 1, dim);
        ``cache`` takes the token."""
        if x.device.type == "cpu":
            adapt_torch_threads()
        q, k, v = self.qkv(x, torch.tensor([cache.length], device=x.device))
        return self._project_out(cache.step(q, k, v))


class MultipoleAttention(ProjectedAttention):
    """Projections, RoPE, learned summaries and multipole attention.

    RoPE rotates queries and keys before the keys are summarised, so summaries
    carry positions like the keys they stand for. ``max_level=0`` keeps only the
    fine level (local block attention, a baseline; it needs no summaries).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *,
                 block_size: int = 64, rank: int = 2, causal: bool = True, variant: str = "nlogn",
                 summary: str = "m2m", weighted: bool = True, rope: bool = True,
                 rope_theta: float = 10000.0, max_seq_len: int | None = None, impl: str = "auto",
                 max_level: int | None = None, qkv_bias: bool = False, out_bias: bool = False,
                 rope_scaling: dict | None = None, level_offset: bool = False,
                 summary_rope: str = "keys", refine: int = 0, flat_top: bool = False,
                 select_reach: int | None = None, attend_reach: bool = False):
        super().__init__(dim, n_heads, n_kv_heads, causal=causal, rope=rope, rope_theta=rope_theta,
                         qkv_bias=qkv_bias, out_bias=out_bias, rope_scaling=rope_scaling)
        self.block_size, self.rank, self.variant = block_size, rank, variant
        self.weighted, self.impl, self.max_level = weighted, impl, max_level
        # Adaptive refinement: far fine blocks each query opens (fma's ``refine``); none without coarse levels.
        self.refine = refine if max_level != 0 else 0
        # With max_level below a sequence's levels: the top kept level's lists cover the rest (fma's flat_top).
        self.flat_top = flat_top and max_level != 0
        if self.flat_top and not self.refine:
            raise ValueError("flat_top=True needs refine > 0: the flat top level's lists are read by adaptive "
                             "refinement's far field only")
        # Refinement's selection scores summaries farther than this many tokens as if they were that far.
        self.select_reach = select_reach if self.refine else None
        if select_reach is not None and (not self.refine or select_reach < 1):
            raise ValueError(f"select_reach={select_reach} needs refine > 0 and a distance >= 1 (it changes "
                             "refinement's far field only)")
        # ... and its far field's attention too (ReRoPE-like): fma's SelectionReach(attend=True).
        self.attend_reach = attend_reach
        if attend_reach and select_reach is None:
            raise ValueError("attend_reach=True reads the far field as at select_reach: set select_reach too")
        if max_level == 0:
            summary = "mean"  # no coarse level: nothing to learn
        # A learned score offset per query head and coarse level, on top of the log-weights
        # (zero at init: the fixed prior). MAX_LEVELS covers 2**MAX_LEVELS blocks; levels a
        # training length never reaches keep their zero.
        self.level_offset = nn.Parameter(torch.zeros(n_heads, MAX_LEVELS)) if level_offset and max_level != 0 \
            else None
        self.summaries = build_summaries(summary, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                                         block_size=block_size, rank=rank, max_seq_len=max_seq_len)
        if summary_rope not in SUMMARY_ROPES:
            raise ValueError(f"summary_rope={summary_rope!r} is not one of {SUMMARY_ROPES}")
        # summary_rope="window": a wrapper rotating the summaries at their windows (a plain object,
        # not a submodule: the parameters stay ``summaries.*``).
        self.window_rope = WindowRotated(self.summaries, self.head_dim, rope_theta, self.rope_scaling) \
            if summary_rope == "window" and rope and max_level != 0 else None

    @property
    def summarise(self):
        """What fma forms the summaries with."""
        return self.window_rope or self.summaries

    def attend(self, q, k, v, cu_seqlens=None):
        return fma(q, k, v, block_size=self.block_size, rank=self.rank, causal=self.causal,
                   weighted=self.weighted, impl=self.impl, variant=self.variant, summaries=self.summarise,
                   max_level=self.max_level, group=self.sp_group, level_offset=self.level_offset,
                   refine=self.refine, cu_seqlens=cu_seqlens, flat_top=self.flat_top, select_reach=self._reach())

    def _reach(self) -> SelectionReach | None:
        """``select_reach`` as fma takes it: the distance and this layer's RoPE frequencies (None
        without RoPE: nothing to clamp)."""
        if self.select_reach is None or not self.rope:
            return None
        # scale_rope may change the frequencies, set_select_reach the distance and scope
        key = (self.select_reach, self.attend_reach, self.rope_theta, repr(self.rope_scaling))
        if getattr(self, "_reach_of", (None,))[0] != key:
            inv = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling, self.wq.weight.device)
            self._reach_of = (key, SelectionReach(self.select_reach, inv, self.attend_reach))
        return self._reach_of[1]

    def new_cache(self, store_device=None) -> MultipoleCache:
        kw = dict(block_size=self.block_size, rank=self.rank, weighted=self.weighted, variant=self.variant,
                  max_level=self.max_level,
                  level_offset=None if self.level_offset is None else self.level_offset.detach())
        if self.refine:
            return RefinedCache(self.summarise, refine=self.refine, store_device=store_device,
                                flat_top=self.flat_top, select_reach=self._reach(), **kw)
        return MultipoleCache(self.summarise, **kw)


class FullAttention(ProjectedAttention):
    """Full softmax attention by ``scaled_dot_product_attention`` (the dense baseline).

    With ``cu_seqlens`` it passes SDPA a block-diagonal mask (and causal within each block):
    an (n, n) mask per row, so SDPA's fused kernels that take no mask are off there; a
    baseline, not a fast path."""

    def attend(self, q, k, v, cu_seqlens=None):
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:  # grouped-query: each kv head serves `groups` query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if cu_seqlens is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        mask = document_mask(cu_seqlens, q.shape[0], q.shape[2], self.causal, q.device)  # (B, 1, n, n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def new_cache(self, store_device=None) -> KVCache:
        return KVCache()


def document_mask(cu_seqlens, batch: int, n: int, causal: bool, device) -> torch.Tensor:
    """SDPA's boolean mask for packed documents: a query sees the keys of its own document
    (those up to itself when ``causal``). ``cu_seqlens`` as ``fma`` takes it. (B, 1, n, n)."""
    docs = as_documents(cu_seqlens, batch, n)
    lengths = torch.tensor(docs.lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths).view(batch, n).to(device)  # (B, n)
    mask = doc[:, :, None] == doc[:, None, :]  # (B, n, n)
    if causal:
        mask &= torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask[:, None]  # one mask for every head


KINDS = ("fma", "local", "sdpa")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """One attention layer, as a value: what a model passes down to each block.

    ``kind``: ``"fma"`` multipole attention, ``"local"`` its fine level only, ``"sdpa"`` full
    attention. The fields from ``block_size`` on are multipole attention's (see
    :class:`MultipoleAttention`); ``sdpa`` ignores them.
    """
    kind: str
    dim: int
    n_heads: int
    n_kv_heads: int | None = None
    causal: bool = True
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    block_size: int = 64
    rank: int = 2
    variant: str = "nlogn"
    summary: str = "m2m"
    weighted: bool = True
    max_seq_len: int | None = None
    impl: str = "auto"
    level_offset: bool = False
    summary_rope: str = "keys"
    refine: int = 0
    max_level: int | None = None
    flat_top: bool = False
    select_reach: int | None = None
    attend_reach: bool = False


def make_attention(spec: AttentionSpec) -> ProjectedAttention:
    """The layer ``spec`` describes: ``forward(x (B, n, dim), positions, cu_seqlens) -> (B, n, dim)``."""
    common = dict(causal=spec.causal, rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling,
                  qkv_bias=spec.qkv_bias, out_bias=spec.out_bias)
    if spec.kind == "sdpa":
        return FullAttention(spec.dim, spec.n_heads, spec.n_kv_heads, **common)
    if spec.kind not in KINDS:
        raise ValueError(f"attention {spec.kind!r} is not one of {KINDS}")
    multipole = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
                 if f.name not in common and f.name not in ("kind", "dim", "n_heads", "n_kv_heads", "max_level")}
    return MultipoleAttention(spec.dim, spec.n_heads, spec.n_kv_heads, **common, **multipole,
                              max_level=0 if spec.kind == "local" else spec.max_level)


__all__ = ["ProjectedAttention", "MultipoleAttention", "FullAttention", "AttentionSpec", "make_attention",
           "document_mask",
           "SUMMARY_ROPES", "KINDS"]
