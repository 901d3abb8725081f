"""Layers shared by the models: RMSNorm, rotary position embeddings, the SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def rope_rotations(head_dim: int, theta: float, positions: torch.Tensor) -> torch.Tensor:
    """Unit complex numbers e^(i * position * freq) for integer `positions` (..., T) -> (..., T, head_dim // 2).

    Computed per forward from the positions rather than cached in a buffer: it is a few microseconds, it works on
    the meta device and under ZeRO-3 without special cases, and it handles position ids that restart per document.
    The frequencies and the fp32 cos/sin match `transformers` bit for bit, so exported models give equal logits.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))  # (head_dim // 2,)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim // 2)
    return torch.complex(angles.cos(), angles.sin())


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
