"""Llama-style decoder-only Transformer.

Pre-norm blocks (RMSNorm), rotary position embeddings (optionally scaled), grouped-query attention on a pluggable
backend, SwiGLU feed-forward, optionally tied input/output embeddings. Config fields add what other families have:
q/k/v biases (`attention_bias`), RMSNorm on each head's queries and keys (`qk_norm`), a head size apart from
d_model / n_heads (`d_head`); a `sliding_window` bounds the sequence length.

Initialisation (`init_rules`, applied by `init_weights`): embeddings and every linear layer N(0, init_std); the two
projections that write into the residual stream (attention `wo`, feed-forward `w2`) N(0, init_std / sqrt(2 * n_layers)),
as GPT-2 and Megatron do, so the residual stream's variance does not grow with depth; norm weights 1, biases 0. A tied
output projection is the embedding, initialised once. The values are a function of (seed, parameter name) only, drawn in
chunks (`llm.models.init`), so that a partitioned build can initialise each partition alone and get the same weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from llm.attention import DocumentMask, get_attention
from llm.config import ModelConfig

from .init import ONES, ZEROS, InitRule, init_deferred, init_parameters, no_init, normal, sized
from .kv_cache import KVCache
from .layers import RMSNorm, SwiGLU, apply_rope, rope_rotations
from .loss import OutputHead, Reduction


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # One fused projection for q, k and v: rows [q (n_heads * hd) | k (n_kv * hd) | v (n_kv * hd)].
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:  # one weight per head dimension, shared by the heads (Qwen3)
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm
        self.attend = get_attention(cfg.attention)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, docs: DocumentMask | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q, k = q.view(B, T, self.n_heads, hd), k.view(B, T, self.n_kv_heads, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, rope)  # (B, T, n_heads, hd)
        k = apply_rope(k, rope)  # (B, T, n_kv_heads, hd)
        v = v.view(B, T, self.n_kv_heads, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, cached + T, n_kv_heads, hd)
        out = self.attend(q, k, v, causal=True, docs=docs)  # (B, T, n_heads, hd), queries aligned to the end
        return self.wo(out.reshape(B, T, self.n_heads * hd))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, docs: DocumentMask | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, docs, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        initialise = not init_deferred()  # inside no_init() the caller initialises (e.g. partition by partition)
        with no_init():  # torch's per-layer init would be overwritten by init_weights: skip it
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.output = OutputHead(cfg.d_model, cfg.vocab_size)  # an nn.Linear that can also return the loss
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if initialise:
            self.init_weights()

    def init_rules(self) -> dict[str, InitRule]:
        """Each distinct parameter's initialisation, by name, as the module docstring says."""
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        rules = {}
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                rules[f"{name}.weight"] = ONES
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                rules[f"{name}.weight"] = normal(std)
                if getattr(module, "bias", None) is not None:
                    rules[f"{name}.bias"] = ZEROS
        for i in range(self.cfg.n_layers):
            rules[f"layers.{i}.attention.wo.weight"] = rules[f"layers.{i}.feed_forward.w2.weight"] = normal(out_std)
        if self.cfg.tie_embeddings:
            del rules["output.weight"]  # the embedding's, already there
        return rules

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, threads: int | None = None) -> None:
        """(Re)initialise every parameter by `init_rules`; also after `to_empty` from meta. Without a `seed`, one is
        drawn from torch's global generator."""
        init_parameters(self, self.init_rules(), seed, threads)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                cache: KVCache | None = None, labels: torch.Tensor | None = None,
                label_smoothing: float = 0.0, reduction: Reduction = "mean", offset: int = 0) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab_size); with `labels` (B, T), the mean (or summed: `reduction`)
        cross-entropy instead (fp32 scalar; labels of -100 ignored), computed chunk by chunk without the full logits
        (`llm.models.loss`).

        `position_ids` (B, T) that restart at 0 mark packed document boundaries: tokens then attend only within
        their own document (`cu_seqlens`/`max_seqlen` may be passed along when the loader already has them).
        With a `cache`, input_ids continue the cached positions (incremental decoding) and the cache advances.

        A slice of longer sequences (sequence parallelism, `llm.engine.sequence`): input_ids and labels are positions
        [offset, offset + T) of them, and `position_ids`, when given, cover the whole sequences, so that the document
        boundaries are known for every position (attention, wrapped to see the whole sequences, needs them).
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else offset
        length = start + T if position_ids is None else max(start + T, position_ids.shape[1])
        if length > self.cfg.context:
            limit = "max_seq_len" if self.cfg.context == self.cfg.max_seq_len else "sliding_window (attention " \
                    "beyond the window is not implemented)"
            raise ValueError(f"sequence length {length} exceeds model.{limit} = {self.cfg.context}")
        docs = None
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device)[None]  # (1, T)
        elif cache is not None:
            raise ValueError("document boundaries (position_ids) are for training; decoding with a cache takes none")
        else:
            docs = DocumentMask.from_position_ids(position_ids, cu_seqlens, max_seqlen)  # of the whole sequences
            position_ids = position_ids[:, offset:offset + T]  # this slice's (all of them without an offset)
        # (B or 1, T, head_dim / 2) complex
        rope = rope_rotations(self.cfg.head_dim, self.cfg.rope_theta, position_ids, self.cfg.rope_scaling)
        x = self.tok_embeddings(input_ids)  # (B, T, d_model)
        for i, block in enumerate(self.layers):
            x = block(x, rope, docs, cache, i)
        if cache is not None:
            cache.advance(T)
        # logits (B, T, vocab_size), or with labels the loss (); inside the head's forward for ZeRO-3 (loss.py)
        return self.output(self.norm(x), labels, label_smoothing=label_smoothing, reduction=reduction)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.cfg.n_layers, batch, max_len or self.cfg.context, self.cfg.kv_heads,
                       self.cfg.head_dim, p.dtype, p.device)

    # ---- sizing ----------------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Distinct parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in sized(self).parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context length `seq_len`.

        6 FLOPs per matmul weight (2 forward, 4 backward), counting the output projection even when it is tied to
        the embedding (the lookup itself is free), plus `attention_flops_per_token`.
        """
        matmul = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Attention's two score matmuls (QK^T and PV): 2 * 2 * head_dim FLOPs per head per attended key, times 3
        with the backward. Under a causal mask a query attends to (seq_len + 1) / 2 keys on average, so that is
        what we count; PaLM's and torchtitan's 12 * n_layers * n_heads * head_dim * seq_len counts the full
        square, and reports an MFU higher by that share.
        """
        return 12 * self.cfg.n_layers * self.cfg.n_heads * self.cfg.head_dim * (seq_len + 1) / 2

    def largest_layer_params(self) -> int:
        """Parameters of the largest single module (what ZeRO-3 gathers at once in the worst case)."""
        return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in sized(self).modules())
