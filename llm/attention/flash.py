"""The flash-attn package (FlashAttention-2/3 kernels, CUDA and fp16/bf16 only), imported lazily.

Packed documents go through `flash_attn_varlen_func` with `cu_seqlens`, so no mask tensor is ever built and no
FLOPs are spent across document boundaries.
"""

from __future__ import annotations

import functools
import importlib

import torch

from .masks import DocumentMask


class AttentionUnavailable(RuntimeError):
    """An attention backend was asked for explicitly but cannot run here."""


@functools.cache
def flash_module():
    """The `flash_attn` module, or None when it is not installed (or fails to import, e.g. a CUDA mismatch)."""
    try:
        return importlib.import_module("flash_attn")
    except Exception:  # an ABI mismatch raises OSError/RuntimeError, not only ImportError
        return None


def require_flash():
    fa = flash_module()
    if fa is None:
        raise AttentionUnavailable(
            "attention backend 'flash' needs the flash-attn package, which is not importable here. Install it "
            "on a CUDA machine with `pip install -e '.[flash]'`, or set model.attention=auto (flash when "
            "available, else PyTorch SDPA) or model.attention=sdpa.")
    return fa


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    docs: DocumentMask | None = None, scale: float | None = None) -> torch.Tensor:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) with H a multiple of Hkv -> (B, Tq, H, D). GQA is native."""
    fa = require_flash()
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionUnavailable(
            f"attention backend 'flash' runs on CUDA tensors in fp16/bf16, got {q.device} {q.dtype}; use "
            "model.attention=auto to fall back to SDPA elsewhere")
    if docs is None:
        # Causal masking in flash-attn is bottom-right aligned, as incremental decoding needs.
        return fa.flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)
    B, T, H, D = q.shape
    out = fa.flash_attn_varlen_func(
        q.reshape(B * T, H, D), k.reshape(B * T, k.shape[2], D), v.reshape(B * T, v.shape[2], D),
        cu_seqlens_q=docs.cu_seqlens, cu_seqlens_k=docs.cu_seqlens,
        max_seqlen_q=docs.max_seqlen, max_seqlen_k=docs.max_seqlen,
        causal=causal, softmax_scale=scale)  # (B * T, H, D)
    return out.view(B, T, H, D)
