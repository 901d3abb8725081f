"""PyTorch's scaled_dot_product_attention. On CUDA with a plain causal mask it runs the FlashAttention-2 kernel;
with a document (block-diagonal) mask it falls back to the memory-efficient kernel, which accepts a mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import DocumentMask, causal_mask, dense_mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   docs: DocumentMask | None = None, scale: float | None = None,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) with H a multiple of Hkv -> (B, Tq, H, D).

    `key_mask` (B, Tk) is False at padding keys; with it SDPA takes a boolean mask (the memory-efficient kernel on
    CUDA instead of the flash one).
    """
    Tq, H = q.shape[1], q.shape[2]
    Tk, Hkv = k.shape[1], k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
    mask, is_causal = None, False
    if docs is not None or key_mask is not None:
        mask = dense_mask(Tq, Tk, q.device, causal=causal, docs=docs, key_mask=key_mask)  # (B, 1, Tq, Tk)
    elif causal and Tq == Tk:
        is_causal = True  # the fast path: no mask tensor, the flash kernel on CUDA
    elif causal and Tq > 1:
        mask = causal_mask(Tq, Tk, q.device)  # SDPA's is_causal is top-left aligned; we need bottom-right
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=Hkv != H)
    return out.transpose(1, 2)  # (B, Tq, H, D)
