"""The encoder-decoder's layers: attention (self and cross), feed-forward, and the two kinds of layer.

The paper's layer (`norm: post`, LayerNorm, sinusoidal positions added to the embeddings, ReLU or GELU, biased
projections) and the modern one, chosen by config fields, not by a model name: `norm: pre` with `norm_type: rmsnorm`,
`positions: rope` (rotary embeddings on the queries and keys of self-attention, none in cross-attention: source and
target positions are not comparable), `activation: swiglu` (the decoder-only model's feed-forward, no biases),
`bias: false`, and grouped-query attention with `n_kv_heads`. Every attention backend serves both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.attention import KeyMask, get_attention
from llm.config import TranslationModelConfig

from .kv_cache import KVCache
from .layers import RMSNorm, SwiGLU, apply_rope


def sinusoids(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Position encodings (..., T) -> (..., T, dim): PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same).

    The paper's interleaved layout. Computed per forward (a few microseconds; nothing to shard or to rebuild after
    `to_empty`) in float64 and then rounded, so that it equals, to the last bit, tables precomputed in float64 (as
    `transformers`' Marian does; the exporter permutes d_model into Marian's [sines | cosines] layout).
    """
    two_i = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)  # (dim / 2,)
    angles = positions.double()[..., None] / 10000.0 ** (two_i / dim)  # (..., T, dim / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).float()  # (..., T, dim) interleaved


class Attention(nn.Module):
    """Multi-head attention; keys and values come from `wkv` applied to the key side (with `n_kv_heads` fewer key
    and value heads than query heads: grouped-query attention). With `rope`, rotations (1, T, head_dim / 2) of the
    query positions and of the key positions rotate queries and keys (self-attention only)."""

    def __init__(self, cfg: TranslationModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        # rows [k (n_kv_heads * head_dim) | v (n_kv_heads * head_dim)]
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.attend = get_attention(cfg.attention)

    def keys_values(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Tk, d_model) -> k, v (B, Tk, n_kv_heads, head_dim) each; k rotated by `rope` if given."""
        B, Tk, _ = x.shape
        k, v = self.wkv(x).view(B, Tk, 2, self.n_kv_heads, self.head_dim).unbind(dim=2)
        return (k if rope is None else apply_rope(k, rope)), v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], causal: bool,
                key_mask: KeyMask | None, rope: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, n_heads, head_dim)
        if rope is not None:
            q = apply_rope(q, rope)
        out = self.attend(q, *kv, causal=causal, key_mask=key_mask)  # (B, T, n_heads, head_dim)
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: TranslationModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.act = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


def feed_forward(cfg: TranslationModelConfig) -> nn.Module:
    return SwiGLU(cfg.d_model, cfg.d_ff) if cfg.activation == "swiglu" else FeedForward(cfg)


def norm_layer(cfg: TranslationModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm_type == "rmsnorm" else nn.LayerNorm(cfg.d_model,
                                                                                               eps=cfg.norm_eps)


class _Layer(nn.Module):
    def __init__(self, cfg: TranslationModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.dropout = nn.Dropout(cfg.dropout)

    def residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


class EncoderLayer(_Layer):
    def __init__(self, cfg: TranslationModelConfig):
        super().__init__(cfg)
        self.self_attn = Attention(cfg)
        self.self_attn_norm = norm_layer(cfg)
        self.ffn = feed_forward(cfg)
        self.ffn_norm = norm_layer(cfg)

    def forward(self, x: torch.Tensor, src_mask: KeyMask | None, rope: torch.Tensor | None = None) -> torch.Tensor:
        def self_attention(h):
            return self.self_attn(h, self.self_attn.keys_values(h, rope), causal=False, key_mask=src_mask, rope=rope)

        x = self.residual(x, self.self_attn_norm, self_attention)
        return self.residual(x, self.ffn_norm, self.ffn)


class DecoderLayer(_Layer):
    def __init__(self, cfg: TranslationModelConfig):
        super().__init__(cfg)
        self.self_attn = Attention(cfg)
        self.self_attn_norm = norm_layer(cfg)
        self.cross_attn = Attention(cfg)
        self.cross_attn_norm = norm_layer(cfg)
        self.ffn = feed_forward(cfg)
        self.ffn_norm = norm_layer(cfg)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                src_mask: KeyMask | None, tgt_mask: KeyMask | None, cache: KVCache | None = None,
                layer: int = 0, rope: torch.Tensor | None = None) -> torch.Tensor:
        """`memory` is the encoder output (B, S, d_model), or this layer's cross-attention (k, v) already made.
        `rope`: the rotations of these target positions (rotary positions), for self-attention only."""
        def self_attention(h):
            k, v = self.self_attn.keys_values(h, rope)  # keys rotated before they are cached
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, cached + T, n_kv_heads, head_dim)
            return self.self_attn(h, (k, v), causal=True, key_mask=tgt_mask, rope=rope)

        def cross_attention(h):
            kv = self.cross_attn.keys_values(memory) if isinstance(memory, torch.Tensor) else memory
            return self.cross_attn(h, kv, causal=False, key_mask=src_mask)

        x = self.residual(x, self.self_attn_norm, self_attention)
        x = self.residual(x, self.cross_attn_norm, cross_attention)
        return self.residual(x, self.ffn_norm, self.ffn)
