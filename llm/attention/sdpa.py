"""PyTorch's scaled_dot_product_attention.

Without a mask tensor (plain causal, or no masking) SDPA picks a fused kernel on CUDA (FlashAttention-2 or cuDNN
in half precision). With a mask tensor (document boundaries, key padding) the flash kernel cannot run and SDPA
takes the memory-efficient or, in the worst case, the math kernel, so the selection (`select.py`) sends masked
batches here only on CPU, in float32, or when `sdpa` is asked for by name.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .masks import DocumentMask, KeyMask, causal_mask, dense_mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   docs: DocumentMask | None = None, scale: float | None = None,
                   key_mask: torch.Tensor | KeyMask | None = None) -> torch.Tensor:
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


@functools.cache
def route_flash_path(impl: str) -> str | None:
    """Route SDPA's (and torch varlen_attn's) flash kernel to the FA3 or FA4 package: None when done, else why not.

    `torch.nn.attention.activate_flash_attention_impl` swaps the kernel behind aten's flash ops for the whole
    process; the selection calls it only for a GPU the package supports, and only once.
    """
    try:
        from torch.nn.attention import activate_flash_attention_impl, current_flash_attention_impl
    except ImportError:
        return "this torch cannot route SDPA's flash kernel"
    if current_flash_attention_impl() == impl:
        return None
    try:
        activate_flash_attention_impl(impl)
    except Exception as e:  # a package built without the ops torch expects raises RuntimeError; keep torch's FA2
        return f"routing SDPA's flash kernel to {impl} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None
