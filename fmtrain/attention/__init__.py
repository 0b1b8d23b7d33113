"""Fast Multipole Attention.

``fma(q, k, v)`` is the SDPA-like op (:mod:`.multipole`); :class:`MultipoleAttention` and
:class:`FullAttention` are the layers a transformer block uses (:mod:`.layers`). See
``hierarchy.py`` for the definition every implementation shares.
"""
from .hierarchy import Hierarchy, hierarchy
from .layers import SUMMARY_ROPES, AttentionSpec, FullAttention, MultipoleAttention, make_attention
from .multipole import IMPLS, VARIANTS, fma
from .summaries import SUMMARY_KINDS, build_summaries

__all__ = ["fma", "MultipoleAttention", "FullAttention", "AttentionSpec", "make_attention", "SUMMARY_ROPES",
           "Hierarchy", "hierarchy", "build_summaries", "SUMMARY_KINDS", "IMPLS", "VARIANTS"]
