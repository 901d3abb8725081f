"""Reference attention: the textbook math in fp32. Every other backend is tested against this one."""

from __future__ import annotations

import torch

from .masks import DocumentMask, KeyMask, dense_mask


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    docs: DocumentMask | None = None, scale: float | None = None,
                    key_mask: torch.Tensor | KeyMask | None = None) -> torch.Tensor:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) with H a multiple of Hkv -> (B, Tq, H, D).

    `key_mask` (B, Tk) is False at padding keys, which no query attends to. A query left with no key at all gets a
    zero output (PyTorch SDPA's convention), never NaN, so padding rows cannot poison later layers.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    out_dtype = q.dtype
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, heads, T, D)
    if Hkv != H:
        # Query head h reads kv head h // (H // Hkv): each kv head serves a contiguous group of query heads.
        k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, Tk, D)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    mask = dense_mask(Tq, Tk, q.device, causal=causal, docs=docs, key_mask=key_mask)  # (Tq, Tk) or (B, 1, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if key_mask is not None:
        probs = probs.nan_to_num(0.0)  # rows with every key masked: softmax of all -inf
    return (probs @ v).transpose(1, 2).to(out_dtype)  # (B, Tq, H, D)
