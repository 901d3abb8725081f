"""Attention backends behind one registry, chosen by `model.attention`.

Every backend takes q (B, Tq, H, D), k and v (B, Tk, Hkv, D), `causal`, optional document boundaries, a
softmax scale and an optional key padding mask (B, Tk) (False at padding), and returns (B, Tq, H, D). `eager` is
the reference; `sdpa` is PyTorch's fused attention (the FlashAttention kernel on CUDA); `flash` is the flash-attn
package; `auto` takes `flash` when it is importable and the tensors are half precision on CUDA, `sdpa` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .eager import eager_attention
from .flash import AttentionUnavailable, flash_attention, flash_module, require_flash
from .masks import DocumentMask
from .sdpa import sdpa_attention

AttentionFn = Callable[..., torch.Tensor]


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_module() is not None:
        return flash_attention(q, k, v, **kwargs)
    return sdpa_attention(q, k, v, **kwargs)


BACKENDS: dict[str, AttentionFn] = {
    "auto": auto_attention,
    "flash": flash_attention,
    "sdpa": sdpa_attention,
    "eager": eager_attention,
}


def get_attention(name: str) -> AttentionFn:
    """The backend called `name`. Asking for `flash` where flash-attn is not importable fails here, at build time."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "flash":
        require_flash()
    return BACKENDS[name]


__all__ = ["AttentionUnavailable", "BACKENDS", "DocumentMask", "get_attention", "eager_attention",
           "sdpa_attention", "flash_attention", "auto_attention"]
