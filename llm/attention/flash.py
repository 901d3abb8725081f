"""The flash-attn package (FlashAttention-2/3 kernels, CUDA and fp16/bf16 only), imported lazily.

Packed documents go through `flash_attn_varlen_func` with `cu_seqlens`, so no mask tensor is ever built and no
FLOPs are spent across document boundaries. Padding (a key mask) goes the same way: padding keys are dropped
before the kernel ("unpadded"), and each sequence's real keys form one varlen segment.
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
                    docs: DocumentMask | None = None, scale: float | None = None,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) with H a multiple of Hkv -> (B, Tq, H, D). GQA is native.

    `key_mask` (B, Tk) is False at padding keys. Causal attention with a key mask is self-attention (Tq == Tk, the
    queries padded like the keys): its padding queries are dropped too and get a zero output.
    """
    fa = require_flash()
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise AttentionUnavailable(
            f"attention backend 'flash' runs on CUDA tensors in fp16/bf16, got {q.device} {q.dtype}; use "
            "model.attention=auto to fall back to SDPA elsewhere")
    if key_mask is not None:
        if docs is not None:
            raise AttentionUnavailable("attention backend 'flash' takes document boundaries or a key mask, not both")
        return _padded(fa, q, k, v, key_mask, causal, scale)
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


def _padded(fa, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, causal: bool,
            scale: float | None) -> torch.Tensor:
    """Attention with padding keys removed before the kernel: one varlen segment per sequence."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    keep_k = key_mask.reshape(-1).nonzero(as_tuple=True)[0]  # indices of real keys in the flattened (B * Tk)
    lens_k = key_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    cu_k = torch.nn.functional.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
    max_k = int(lens_k.max())
    k = k.reshape(B * Tk, Hkv, D)[keep_k]  # (real keys, Hkv, D)
    v = v.reshape(B * Tk, Hkv, D)[keep_k]
    if causal:
        # Bottom-right causal alignment is per varlen segment, so the queries must be unpadded like the keys.
        if Tq != Tk:
            raise AttentionUnavailable(f"attention backend 'flash': causal attention with a key mask needs as many "
                                       f"queries as keys (self-attention), got {Tq} and {Tk}")
        out = fa.flash_attn_varlen_func(q.reshape(B * Tq, H, D)[keep_k], k, v, cu_seqlens_q=cu_k, cu_seqlens_k=cu_k,
                                        max_seqlen_q=max_k, max_seqlen_k=max_k, causal=True, softmax_scale=scale)
        full = out.new_zeros(B * Tq, H, D)
        full[keep_k] = out  # padding queries stay zero
        return full.view(B, Tq, H, D)
    cu_q = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=q.device)  # every query row, whole
    out = fa.flash_attn_varlen_func(q.reshape(B * Tq, H, D), k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                    max_seqlen_q=Tq, max_seqlen_k=max_k, causal=False, softmax_scale=scale)
    return out.view(B, Tq, H, D)  # (B * Tq, H, D) -> (B, Tq, H, D)
