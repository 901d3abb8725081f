"""Attention backends, and the one function that chooses between them (`select`, in selection.py).

Every backend takes q (B, Tq, H, D), k and v (B, Tk, Hkv, D), `causal`, optional document boundaries
(`DocumentMask`), a softmax scale and an optional key padding mask (B, Tk) (False at padding; a tensor or a
`KeyMask`, which computes the unpadding once per batch), and returns (B, Tq, H, D). `eager` is the reference;
`sdpa` is PyTorch's fused attention; `varlen` is PyTorch's varlen_attn; `flash` is a flash-attn package (FA2, FA3
or FA4); `auto` takes the fastest of those that can run the call (see selection.py for the order).
"""

from __future__ import annotations

from .eager import eager_attention
from .flash import flash_attention, flash_module
from .masks import DocumentMask, KeyMask
from .sdpa import sdpa_attention
from .selection import NAMES, AttentionFn, AttentionUnavailable, Backend, Selection, check_installed, describe, select
from .varlen import varlen_attention

BACKENDS = NAMES


def get_attention(name: str) -> Backend:
    """The attention a model calls for `model.attention = name`. An unknown name, or `flash`/`varlen` without
    their package, fails here, at build time; a device or dtype they cannot run on fails at the first call (the
    trainer's `describe` at start-up asks first)."""
    check_installed(name)
    return Backend(name)


__all__ = ["AttentionFn", "AttentionUnavailable", "BACKENDS", "Backend", "DocumentMask", "KeyMask", "NAMES",
           "Selection", "describe", "eager_attention", "flash_attention", "flash_module", "get_attention",
           "sdpa_attention", "select", "varlen_attention"]
