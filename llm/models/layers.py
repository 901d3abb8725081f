"""Layers shared by the models: RMSNorm, rotary position embeddings, the SwiGLU feed-forward."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.config import RopeScaling


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the input dtype (as Llama and `transformers` do)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (head_dim // 2,) fp32 and the factor cos and sin are scaled by (1.0 but for YaRN).

    The float operations are `transformers`' own (`modeling_rope_utils`), in the same order, so that an exported
    model's rotations are bitwise equal to ours for every scaling type.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv_freq, 1.0
    factor = scaling.factor
    if scaling.type == "linear":
        return inv_freq / factor, 1.0
    original = scaling.original_max_position_embeddings
    if scaling.type == "llama3":
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        low_freq_wavelen, high_freq_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp.to(device=device, dtype=torch.float)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).to(dtype=torch.float) / head_dim)
    inv_extrapolation, inv_interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    return inv_interpolation * (1 - extrapolation) + inv_extrapolation * extrapolation, float(attention_factor)


def rope_rotations(head_dim: int, theta: float, positions: torch.Tensor,
                   scaling: RopeScaling | None = None) -> torch.Tensor:
    """Complex numbers e^(i * position * freq) for integer `positions` (..., T) -> (..., T, head_dim // 2), of
    modulus 1 (YaRN: its attention factor).

    Computed per forward from the positions rather than cached in a buffer: it is a few microseconds, it works on
    the meta device and under ZeRO-3 without special cases, and it handles position ids that restart per document.
    The frequencies and the fp32 cos/sin match `transformers` bit for bit, so exported models give equal logits.
    """
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling, positions.device)  # (head_dim // 2,)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim // 2)
    if attention_factor == 1.0:
        return torch.complex(angles.cos(), angles.sin())
    return torch.complex(angles.cos() * attention_factor, angles.sin() * attention_factor)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by `rotations` (B or 1, T, D // 2), pairing dims (0, 1), (2, 3), ... as complex numbers.

    This interleaved layout is Meta's original Llama convention. `transformers` pairs dim i with i + D/2 instead;
    the export adapter permutes the q and k projection rows between the two. One complex multiply is also several
    times faster than rotating the even and odd halves as strided real tensors.
    """
    B, T, H, D = x.shape
    pairs = torch.view_as_complex(x.float().reshape(B, T, H, D // 2, 2))  # (B, T, H, D/2) complex
    rotated = pairs * rotations[:, :, None, :]  # (B, T, H, D/2)
    return torch.view_as_real(rotated).reshape(B, T, H, D).to(x.dtype)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), then W_down. Gate and up are one fused matmul (`w13`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # rows [0, hidden): gate; [hidden, 2 hidden): up
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.w2(F.silu(gate) * up)
