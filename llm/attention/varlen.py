"""Varlen attention: packed documents and padded batches as segments of one flattened sequence (`cu_seqlens`).

No mask tensor is built and no FLOPs are spent across a document boundary or on padding keys. `attend_varlen`
turns our batch layout into a varlen call for any kernel with the flash-attn varlen contract (the flash-attn
packages in `flash.py`, and PyTorch's own `torch.nn.attention.varlen.varlen_attn` here, which runs the flash
kernel PyTorch ships: CUDA, fp16/bf16, compute capability 8.0 or newer; it has no CPU implementation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .masks import DocumentMask, KeyMask
from .sdpa import sdpa_attention

HALF = (torch.float16, torch.bfloat16)

# kernel(q (Nq, H, D), k, v (Nk, Hkv, D), cu_q, cu_k, max_q, max_k, causal, scale) -> (Nq, H, D); causal is
# aligned to the bottom right of each segment (flash-attn's convention; segments here are square when causal).
VarlenKernel = Callable[..., torch.Tensor]


def attend_varlen(kernel: VarlenKernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                  docs: DocumentMask | None, scale: float | None,
                  key_mask: torch.Tensor | KeyMask | None) -> torch.Tensor:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) -> (B, Tq, H, D) through a varlen `kernel`, for a batch with
    document boundaries or a key mask (not both).

    Causal attention with a key mask is self-attention (Tq == Tk, queries padded like the keys): its padding
    queries are dropped too and get a zero output. Without causality every query row is kept (one segment per row).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    keys = KeyMask.of(key_mask)
    if (docs is None) == (keys is None):
        raise ValueError("varlen attention takes document boundaries or a key mask (exactly one)")
    if docs is not None:
        if Tq != Tk:
            raise ValueError(f"document masks apply to whole sequences (no KV cache): q_len={Tq}, k_len={Tk}")
        out = kernel(q.reshape(B * Tq, H, D), k.reshape(B * Tk, Hkv, D), v.reshape(B * Tk, Hkv, D),
                     docs.cu_seqlens, docs.cu_seqlens, docs.max_seqlen, docs.max_seqlen, causal, scale)
        return out.view(B, Tq, H, D)  # (B * Tq, H, D) -> (B, Tq, H, D)
    keep, cu_k, max_k = keys.unpadded  # once per batch, shared by every layer
    k = k.reshape(B * Tk, Hkv, D)[keep]  # (real keys, Hkv, D)
    v = v.reshape(B * Tk, Hkv, D)[keep]
    if causal:
        # Causal alignment is per segment, so the queries must be unpadded like the keys.
        if Tq != Tk:
            raise ValueError(f"causal attention with a key mask needs as many queries as keys (self-attention), "
                             f"got {Tq} and {Tk}")
        out = kernel(q.reshape(B * Tq, H, D)[keep], k, v, cu_k, cu_k, max_k, max_k, True, scale)  # (real, H, D)
        full = out.new_zeros(B * Tq, H, D).index_copy(0, keep, out)  # padding queries stay zero
        return full.view(B, Tq, H, D)
    cu_q = torch.arange(0, (B + 1) * Tq, Tq, dtype=torch.int32, device=q.device)  # every query row, whole
    out = kernel(q.reshape(B * Tq, H, D), k, v, cu_q, cu_k, Tq, max_k, False, scale)  # (B * Tq, H, D)
    return out.view(B, Tq, H, D)


# ---- PyTorch's varlen_attn --------------------------------------------------------------------------------------


@functools.cache
def torch_varlen():
    """`torch.nn.attention.varlen.varlen_attn`, or None in a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of `device` (its current device when it has no index)."""
    return torch.cuda.get_device_capability(device)


def varlen_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's varlen_attn cannot run on `device` in `dtype`, or None when it can."""
    if device.type != "cuda":
        return f"torch varlen_attn runs on CUDA only, not {device.type}"
    if dtype not in HALF:
        return f"torch varlen_attn needs bf16/fp16, not {str(dtype).removeprefix('torch.')}"
    if torch_varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    major, minor = capability(device)
    if major < 8:
        return f"torch varlen_attn needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


def _torch_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    # varlen_attn has no `causal` flag: a (-1, 0) window is causal (bottom-right, as flash-attn's).
    return torch_varlen()(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, 0) if causal else (-1, -1),
                          enable_gqa=k.shape[1] != q.shape[1])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                     docs: DocumentMask | None = None, scale: float | None = None,
                     key_mask: torch.Tensor | KeyMask | None = None) -> torch.Tensor:
    """q (B, Tq, H, D), k and v (B, Tk, Hkv, D) -> (B, Tq, H, D) on torch's varlen_attn. GQA is native.

    A batch without document boundaries or padding has nothing to skip: it goes to SDPA, whose flash kernel is
    the same one, with no mask tensor.
    """
    if docs is None and key_mask is None:
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    return attend_varlen(_torch_kernel, q, k, v, causal=causal, docs=docs, scale=scale, key_mask=key_mask)
