"""The state-dict layout of `transformers`' Llama-derived causal LMs (Llama, Mistral, Qwen2, Qwen3) and ours.

These families share one key layout (`model.layers.N.self_attn.q_proj.weight`, ...); the optional parts follow our
config: q/k/v biases (`attention_bias`), q/k norms (`qk_norm`), `lm_head.weight` (untied). With `families.py`, the
only place Hugging Face key names appear. Three things differ between the two layouts:

1. We fuse q/k/v into `wqkv` and gate/up into `w13`; Hugging Face keeps them apart.
2. RoPE pairing: we rotate interleaved pairs (dims 2i, 2i+1), Meta's original layout; Hugging Face rotates
   halves (dims i, i + head_dim/2). Converting permutes the output rows of the q and k projections within each
   head, exactly as `transformers`' own Llama conversion script does; the q/k biases and the q/k norm weights
   (one value per head dimension) are permuted the same way.
3. Tied embeddings: we hold one tensor; Hugging Face state dicts may list `lm_head.weight` as well.

Missing or unexpected keys and mismatched shapes are errors, never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from llm.config import ModelConfig


class AdapterError(ValueError):
    """A state dict or config does not fit the model it is converted for."""


def interleaved_to_half(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection from our RoPE pairing to Hugging Face's: HF row (h, j, i) = our row (h, i, j)."""
    d_in = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, d_in).transpose(1, 2).reshape(n_heads * head_dim, d_in)


def half_to_interleaved(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of `interleaved_to_half`."""
    d_in = w.shape[1]
    return w.view(n_heads, 2, head_dim // 2, d_in).transpose(1, 2).reshape(n_heads * head_dim, d_in)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key a model of `cfg` has in the HF layout, with its shape."""
    hd, H, Hkv, d, ff = cfg.head_dim, cfg.n_heads, cfg.kv_heads, cfg.d_model, cfg.ffn_hidden
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (H * hd, d), p + "self_attn.k_proj.weight": (Hkv * hd, d),
                   p + "self_attn.v_proj.weight": (Hkv * hd, d), p + "self_attn.o_proj.weight": (d, H * hd),
                   p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                   p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)}
        if cfg.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (H * hd,), p + "self_attn.k_proj.bias": (Hkv * hd,),
                       p + "self_attn.v_proj.bias": (Hkv * hd,)}
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _rows(fn, v: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Apply a row permutation made for (rows, d_in) matrices to a vector of rows (a bias, a norm weight)."""
    return fn(v[:, None], n_heads, head_dim)[:, 0]


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our Decoder state dict -> the HF layout (tied: no `lm_head.weight`, as HF saves it)."""
    hd, H, Hkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    sizes = [H * hd, Hkv * hd, Hkv * hd]
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attention.wqkv.weight"].split(sizes, dim=0)
        out[dst + "self_attn.q_proj.weight"] = interleaved_to_half(q, H, hd)
        out[dst + "self_attn.k_proj.weight"] = interleaved_to_half(k, Hkv, hd)
        out[dst + "self_attn.v_proj.weight"] = v
        if cfg.attention_bias:
            qb, kb, vb = sd[src + "attention.wqkv.bias"].split(sizes, dim=0)
            out[dst + "self_attn.q_proj.bias"] = _rows(interleaved_to_half, qb, H, hd)
            out[dst + "self_attn.k_proj.bias"] = _rows(interleaved_to_half, kb, Hkv, hd)
            out[dst + "self_attn.v_proj.bias"] = vb
        if cfg.qk_norm:
            for n in "qk":  # one weight per head dimension, shared by the heads: permuted as one head
                norm = sd[src + f"attention.{n}_norm.weight"]
                out[dst + f"self_attn.{n}_norm.weight"] = _rows(interleaved_to_half, norm, 1, hd)
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attention.wo.weight"]
        gate, up = sd[src + "feed_forward.w13.weight"].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate
        out[dst + "mlp.up_proj.weight"] = up
        out[dst + "mlp.down_proj.weight"] = sd[src + "feed_forward.w2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "attention_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def check_hf_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    """Every key a model of `cfg` needs is there with its shape, and nothing else (a tied `lm_head.weight` may be)."""
    expected = _hf_shapes(cfg)
    extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted(set(shapes) - set(expected) - extra)
    if missing or unexpected:
        raise AdapterError(f"state dict does not match the config: missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise AdapterError(f"{key}: shape {tuple(shapes[key])}, the config needs {shape}")


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def hf_recipe(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]:
    """How each of our parameters is made from HF tensors: our name -> (the HF keys it reads, a function of them).

    One parameter at a time, so that a loader can read and convert tensor by tensor (`train.init_from` of a large
    model holds one converted parameter at a time, not a second copy of the model)."""
    hd, H, Hkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads

    def qkv(q, k, v):
        return torch.cat([half_to_interleaved(q, H, hd), half_to_interleaved(k, Hkv, hd), v])

    def qkv_bias(q, k, v):
        return torch.cat([_rows(half_to_interleaved, q, H, hd), _rows(half_to_interleaved, k, Hkv, hd), v])

    def head_norm(w):
        return _rows(half_to_interleaved, w, 1, hd)

    def cat(*parts):
        return torch.cat(parts)

    out = {"tok_embeddings.weight": (("model.embed_tokens.weight",), _same),
           "norm.weight": (("model.norm.weight",), _same),
           "output.weight": (("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight",), _same)}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        out[dst + "attention.wqkv.weight"] = (tuple(attn + f"{n}_proj.weight" for n in "qkv"), qkv)
        if cfg.attention_bias:
            out[dst + "attention.wqkv.bias"] = (tuple(attn + f"{n}_proj.bias" for n in "qkv"), qkv_bias)
        if cfg.qk_norm:
            for n in "qk":
                out[dst + f"attention.{n}_norm.weight"] = ((attn + f"{n}_norm.weight",), head_norm)
        out[dst + "attention.wo.weight"] = ((attn + "o_proj.weight",), _same)
        out[dst + "feed_forward.w13.weight"] = ((src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"), cat)
        out[dst + "feed_forward.w2.weight"] = ((src + "mlp.down_proj.weight",), _same)
        out[dst + "attention_norm.weight"] = ((src + "input_layernorm.weight",), _same)
        out[dst + "ffn_norm.weight"] = ((src + "post_attention_layernorm.weight",), _same)
    return out


def from_hf_state_dict(hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF-layout state dict -> our Decoder state dict, checking every key and shape against `cfg`."""
    check_hf_shapes({k: tuple(v.shape) for k, v in hf.items()}, cfg)
    if cfg.tie_embeddings and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"],
                                                                         hf["model.embed_tokens.weight"]):
        raise AdapterError("tie_embeddings is set but lm_head.weight differs from model.embed_tokens.weight")
    return {name: fn(*(hf[k] for k in keys)) for name, (keys, fn) in hf_recipe(cfg).items()}
