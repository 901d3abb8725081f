"""Encoder-decoder Transformer for translation, as in "Attention Is All You Need" (Vaswani et al., 2017).

The encoder reads the whole source: N layers of self-attention and a feed-forward network. The decoder writes the
target one token at a time: N layers of causal self-attention, cross-attention to the encoder output, and the
feed-forward network. Token embeddings are scaled by sqrt(d_model) and added to fixed sinusoidal position
encodings; projections carry biases; normalisation is LayerNorm; dropout is applied to every sub-layer output and to
the embedding sums. `norm="post"` is the paper's LayerNorm(x + sublayer(x)); `norm="pre"` is x + sublayer(LN(x))
with one more LayerNorm at the end of each stack, which trains deep or large models without a long warm-up.
Config fields make the modern variant of the same model (`encoder_decoder_layers`: RMSNorm, rotary positions in
self-attention instead of the sinusoids, SwiGLU, no biases, grouped-query attention; presets
`transformer-modern-base`/`-big`).

One joint source/target vocabulary. With `share_embeddings` the encoder input, decoder input and output
projection are one matrix (the paper's three-way tying); without, they are three.

Padding. `src_pad_mask` (B, S) is True at source padding: neither encoder self-attention nor cross-attention ever
attends to it. `tgt_pad_mask` (B, T) does the same for decoder self-attention. Right-padded targets (how the
translation loader pads) may leave it None: under the causal mask no real position can see a later padding position,
so the result is the same and SDPA keeps its fastest (mask-free) kernel. Outputs at padding positions are not
meaningful; the loss ignores them.

Initialisation as fairseq's transformer: embeddings and output projection N(0, d_model^-0.5) (scaled by sqrt(d_model)
the embeddings enter with unit variance, like the position encodings), Xavier-uniform linear weights (uniform within
+-sqrt(6 / (fan_in + fan_out))), zero biases, LayerNorm 1 and 0. As the decoder's, it is data (`init_rules`) whose
values depend on (seed, parameter name) only (`llm.models.init`), so ZeRO-3 builds it partitioned like the decoder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from llm.attention import KeyMask
from llm.config import ConfigError, TranslationModelConfig

from .encoder_decoder_layers import DecoderLayer, EncoderLayer, norm_layer, sinusoids
from .init import ONES, ZEROS, InitRule, construct, init_deferred, init_parameters, no_init, normal, sized, uniform
from .kv_cache import KVCache
from .layers import RMSNorm, rope_rotations
from .loss import OutputHead

__all__ = ["DecoderState", "EncoderDecoder", "TranslationModelConfig", "build_translation_model",
           "label_smoothed_loss", "sinusoids", "translation_preset"]


def translation_preset(name: str, **overrides) -> TranslationModelConfig:
    """A translation preset of configs/model/ (`transformer-tiny`, `-base`, `-big`; `tiny` for `transformer-tiny`)
    with `overrides` applied, checked."""
    from llm.config import PRESET_DIR, load_model_config

    path = PRESET_DIR / f"transformer-{name}.yaml"
    cfg = load_model_config(path if path.is_file() else name)
    if not isinstance(cfg, TranslationModelConfig):
        raise ConfigError(f"model preset {name!r} is not a translation model")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.check(f"preset {name}")
    return cfg


@dataclass
class DecoderState:
    """What incremental decoding keeps: the decoder self-attention cache, each decoder layer's cross-attention keys
    and values of the encoder output (made once per sentence, not once per step), and the source key mask."""

    cache: KVCache
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    src_mask: torch.Tensor | None  # (B, S), True at real source tokens

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder to) batch rows `rows` (beam search reorders beams and drops finished sentences)."""
        self.cache.k = self.cache.k.index_select(1, rows)  # (n_layers, B', max_len, n_heads, head_dim)
        self.cache.v = self.cache.v.index_select(1, rows)
        self.cross_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross_kv]
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, rows)


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: TranslationModelConfig):
        super().__init__()
        self.cfg = cfg
        initialise = not init_deferred()  # inside no_init() the caller initialises (e.g. partition by partition)
        with no_init():  # torch's per-layer init would be overwritten by init_weights: skip it
            self.src_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.tgt_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
            self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
            pre = cfg.norm == "pre"  # post-norm layers end in a norm already; pre-norm stacks need a last one
            self.encoder_norm = norm_layer(cfg) if pre else None
            self.decoder_norm = norm_layer(cfg) if pre else None
            # an nn.Linear that can also return the loss
            self.output = OutputHead(cfg.d_model, cfg.vocab_size, cfg.output_bias)
        if cfg.share_embeddings:
            self.tgt_embeddings.weight = self.src_embeddings.weight
            self.output.weight = self.src_embeddings.weight
        self.dropout = nn.Dropout(cfg.dropout)
        self.embed_scale = math.sqrt(cfg.d_model)
        if initialise:
            self.init_weights()

    @property
    def layers(self) -> list[nn.Module]:
        """Every block, encoder first: what the engine wraps for activation checkpointing or compiles."""
        return [*self.encoder_layers, *self.decoder_layers]

    def init_rules(self) -> dict[str, InitRule]:
        """Each distinct parameter's initialisation, by name, as the module docstring says."""
        rules = {}
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                rules[f"{name}.weight"] = uniform(math.sqrt(6.0 / (module.in_features + module.out_features)))
                if module.bias is not None:
                    rules[f"{name}.bias"] = ZEROS
            elif isinstance(module, nn.LayerNorm):
                rules[f"{name}.weight"], rules[f"{name}.bias"] = ONES, ZEROS
            elif isinstance(module, RMSNorm):
                rules[f"{name}.weight"] = ONES
            elif isinstance(module, nn.Embedding):
                rules[f"{name}.weight"] = normal(self.cfg.d_model ** -0.5)
        # Over the Xavier rule: the output projection, shared or not, is initialised like an embedding (as fairseq).
        rules["output.weight"] = normal(self.cfg.d_model ** -0.5)
        return {name: rules[name] for name, _ in self.named_parameters()}  # a shared matrix once, by its first name

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, threads: int | None = None) -> None:
        """(Re)initialise every parameter by `init_rules`; also after `to_empty` from meta. Without a `seed`, one is
        drawn from torch's global generator."""
        init_parameters(self, self.init_rules(), seed, threads)

    def _embed(self, embeddings: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        x = embeddings(ids) * self.embed_scale  # (B, T, d_model)
        if self.cfg.positions == "rope":  # positions enter self-attention instead (`_rope`)
            return self.dropout(x)
        pe = sinusoids(torch.arange(start, start + T, device=ids.device), self.cfg.d_model)  # (T, d_model)
        return self.dropout(x + pe.to(x.dtype))

    def _rope(self, start: int, T: int, device: torch.device) -> torch.Tensor | None:
        """Rotations (1, T, head_dim / 2) of positions start..start + T - 1 with rotary positions; else None."""
        if self.cfg.positions != "rope":
            return None
        positions = torch.arange(start, start + T, device=device)[None]
        return rope_rotations(self.cfg.head_dim, self.cfg.rope_theta, positions)

    def encode(self, src_ids: torch.Tensor, src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src_ids (B, S) -> encoder output (B, S, d_model). `src_pad_mask` (B, S) is True at padding (or is a
        `KeyMask` made from one, as `forward` passes it)."""
        src_mask = KeyMask.of_padding(src_pad_mask)
        x = self._embed(self.src_embeddings, src_ids)
        rope = self._rope(0, src_ids.shape[1], src_ids.device)
        for layer in self.encoder_layers:
            x = layer(x, src_mask, rope)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_pad_mask: torch.Tensor | None = None,
               tgt_pad_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, pad_id: int = -100,
               label_smoothing: float = 0.0, reduction: Literal["mean", "sum"] = "sum") -> torch.Tensor:
        """Teacher-forced decoder: tgt_ids (B, T) and the encoder output (B, S, d_model) -> logits (B, T, vocab);
        with `labels` (B, T) the loss instead, as `forward` says."""
        src_mask, tgt_mask = KeyMask.of_padding(src_pad_mask), KeyMask.of_padding(tgt_pad_mask)
        x = self._embed(self.tgt_embeddings, tgt_ids)
        rope = self._rope(0, tgt_ids.shape[1], tgt_ids.device)
        for layer in self.decoder_layers:
            x = layer(x, memory, src_mask, tgt_mask, rope=rope)
        x = x if self.decoder_norm is None else self.decoder_norm(x)
        if labels is None:
            return self.output(x)
        # fairseq's eps (eps / (V - 1) on every other token) is F.cross_entropy's eps * V / (V - 1).
        V = self.cfg.vocab_size
        return self.output(x, labels, pad_id, label_smoothing * V / (V - 1), reduction)

    def forward(self, src_ids: torch.Tensor, src_pad_mask: torch.Tensor | None, tgt_in_ids: torch.Tensor,
                tgt_pad_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, pad_id: int = -100,
                label_smoothing: float = 0.0, reduction: Literal["mean", "sum"] = "sum") -> torch.Tensor:
        """Source (B, S) and decoder input (B, T) (BOS, then the target shifted right) -> logits (B, T, vocab).

        Pad masks are True at padding; see the module docstring for when `tgt_pad_mask` may be None. With `labels`
        (B, T), the label-smoothed cross-entropy of `label_smoothed_loss` instead (fp32 scalar; labels equal to
        `pad_id` ignored; summed by default), computed by the output head chunk by chunk without the full logits
        (`llm.models.loss`).
        """
        src_pad_mask = KeyMask.of_padding(src_pad_mask)  # one unpadding for every encoder and cross-attention layer
        memory = self.encode(src_ids, src_pad_mask)
        return self.decode(tgt_in_ids, memory, src_pad_mask, tgt_pad_mask, labels, pad_id, label_smoothing,
                           reduction)

    # ---- incremental decoding --------------------------------------------------------------------------------

    def start_decoding(self, memory: torch.Tensor, src_pad_mask: torch.Tensor | None, max_len: int,
                       expand: int = 1) -> DecoderState:
        """Decoder state for up to `max_len` decoder inputs per row; each source row repeated `expand` times
        (rows b * expand + j, for the beams of beam search), its cross-attention keys and values made once."""
        B = memory.shape[0]
        cross_kv = []
        for layer in self.decoder_layers:
            k, v = layer.cross_attn.keys_values(memory)  # (B, S, n_kv_heads, head_dim)
            cross_kv.append((k.repeat_interleave(expand, dim=0), v.repeat_interleave(expand, dim=0)))
        src_mask = None if src_pad_mask is None else (~src_pad_mask).repeat_interleave(expand, dim=0)
        cfg = self.cfg
        cache = KVCache(cfg.n_decoder_layers, B * expand, min(max_len, cfg.max_seq_len), cfg.kv_heads, cfg.head_dim,
                        memory.dtype, memory.device)
        return DecoderState(cache, cross_kv, src_mask)

    def decode_step(self, tgt_ids: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """The next decoder inputs (B, T) after those in `state` -> logits (B, T, vocab); the state advances."""
        x = self._embed(self.tgt_embeddings, tgt_ids, start=state.cache.length)
        rope = self._rope(state.cache.length, tgt_ids.shape[1], tgt_ids.device)
        src_mask = KeyMask.of(state.src_mask)  # one per step, shared by the layers
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, state.cross_kv[i], src_mask, None, state.cache, i, rope)
        state.cache.advance(tgt_ids.shape[1])
        return self.output(x if self.decoder_norm is None else self.decoder_norm(x))

    # ---- sizing ----------------------------------------------------------------------------------------------

    def num_params(self) -> int:
        """Distinct parameters (a shared embedding counts once)."""
        return sum(p.numel() for p in sized(self).parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per target token, for sources and targets of `seq_len` tokens.

        6 FLOPs per matmul weight per token (2 forward, 4 backward): the encoder's weights run once per source
        token, which here is once per target token; the output projection counts even when shared. Plus
        `attention_flops_per_token`. With sources of another length than targets, scale accordingly: this is an
        estimate for MFU, as the decoder's figure is.
        """
        matmul = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Score matmuls (QK^T, PV: 2 * 2 * d_model FLOPs per attended key per layer, times 3 with the backward):
        encoder self-attention and decoder cross-attention see all `seq_len` keys, causal decoder self-attention
        (seq_len + 1) / 2 on average."""
        cfg = self.cfg
        keys = (cfg.n_encoder_layers + cfg.n_decoder_layers) * seq_len + cfg.n_decoder_layers * (seq_len + 1) / 2
        return 12 * cfg.d_model * keys

    def largest_layer_params(self) -> int:
        """Parameters of the largest single module (what ZeRO-3 gathers at once in the worst case)."""
        return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in sized(self).modules())


def build_translation_model(cfg: TranslationModelConfig, device: str | torch.device | None = None,
                            seed: int | None = None) -> EncoderDecoder:
    """Build the model for `cfg`; on `device="meta"` nothing is allocated (to count or size a model). The initial
    weights are a function of `seed` alone; without one, a seed is drawn from torch's global generator."""
    return construct(EncoderDecoder, cfg, device, seed)


def label_smoothed_loss(logits: torch.Tensor, targets: torch.Tensor, pad_id: int, eps: float = 0.1,
                        reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Label-smoothed cross-entropy in fp32, ignoring targets equal to `pad_id`. logits (..., V), targets (...).

    The smoothed target puts 1 - eps on the reference token and eps / (V - 1) on every other one (fairseq's
    `label_smoothed_cross_entropy`). "mean" divides by the number of non-padding targets; "sum" lets a trainer
    divide by the global count of a step instead, so that every target token weighs the same whatever its batch.
    Training computes the same in the output head without full logits (`EncoderDecoder.forward(..., labels=)`).
    """
    lprobs = logits.float().log_softmax(dim=-1).flatten(0, -2)  # (N, V)
    targets = targets.flatten()  # (N,)
    keep = targets != pad_id
    nll = -lprobs.gather(1, targets[:, None]).squeeze(1)  # (N,)
    smooth = -lprobs.sum(dim=-1)  # (N,) cross-entropy against the all-ones vector
    eps_i = eps / (lprobs.shape[-1] - 1)
    loss = ((1.0 - eps - eps_i) * nll + eps_i * smooth).masked_fill(~keep, 0.0).sum()
    if reduction == "sum":
        return loss
    return loss / keep.sum().clamp(min=1)
