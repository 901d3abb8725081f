"""State-dict and config adapters between our Decoder and `transformers`' LlamaForCausalLM.

This is the only place Hugging Face key names appear. Three things differ between the two layouts:

1. We fuse q/k/v into `wqkv` and gate/up into `w13`; Hugging Face keeps them apart.
2. RoPE pairing: we rotate interleaved pairs (dims 2i, 2i+1), Meta's original layout; Hugging Face rotates
   halves (dims i, i + head_dim/2). Converting permutes the output rows of the q and k projections within each
   head, exactly as `transformers`' own Llama conversion script does.
3. Tied embeddings: we hold one tensor; Hugging Face state dicts may list `lm_head.weight` as well.

Missing or unexpected keys and mismatched shapes are errors, never skipped.
"""

from __future__ import annotations

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


def _expected_keys(cfg: ModelConfig) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        keys += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    if not cfg.tie_embeddings:
        keys.append("lm_head.weight")
    return keys


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our Decoder state dict -> LlamaForCausalLM state dict (tied: no `lm_head.weight`, as HF saves it)."""
    hd, H, Hkv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attention.wqkv.weight"].split([H * hd, Hkv * hd, Hkv * hd], dim=0)
        out[dst + "self_attn.q_proj.weight"] = interleaved_to_half(q, H, hd)
        out[dst + "self_attn.k_proj.weight"] = interleaved_to_half(k, Hkv, hd)
        out[dst + "self_attn.v_proj.weight"] = v
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


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM state dict -> our Decoder state dict, checking every key and shape against `cfg`."""
    hf = dict(hf)
    if cfg.tie_embeddings and "lm_head.weight" in hf:
        lm_head = hf.pop("lm_head.weight")
        if not torch.equal(lm_head, hf.get("model.embed_tokens.weight", lm_head)):
            raise AdapterError("tie_embeddings is set but lm_head.weight differs from model.embed_tokens.weight")
    expected = _expected_keys(cfg)
    missing = [k for k in expected if k not in hf]
    unexpected = sorted(set(hf) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"state dict does not match the config: missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{' ...' if len(unexpected) > 5 else ''}")
    hd, H, Hkv, d, ff = cfg.head_dim, cfg.n_heads, cfg.kv_heads, cfg.d_model, cfg.ffn_hidden
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (H * hd, d), p + "self_attn.k_proj.weight": (Hkv * hd, d),
                   p + "self_attn.v_proj.weight": (Hkv * hd, d), p + "self_attn.o_proj.weight": (d, H * hd),
                   p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                   p + "mlp.down_proj.weight": (d, ff), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)}
    for key in expected:
        if tuple(hf[key].shape) != shapes[key]:
            raise AdapterError(f"{key}: shape {tuple(hf[key].shape)}, the config needs {shapes[key]}")

    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        q = half_to_interleaved(hf[src + "self_attn.q_proj.weight"], H, hd)
        k = half_to_interleaved(hf[src + "self_attn.k_proj.weight"], Hkv, hd)
        out[dst + "attention.wqkv.weight"] = torch.cat([q, k, hf[src + "self_attn.v_proj.weight"]], dim=0)
        out[dst + "attention.wo.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "feed_forward.w13.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0)
        out[dst + "feed_forward.w2.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + "attention_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
    out["output.weight"] = out["tok_embeddings.weight"] if cfg.tie_embeddings else hf["lm_head.weight"]
    return out


def to_hf_config(cfg: ModelConfig, **token_ids: int | None) -> dict:
    """Keyword arguments for `transformers.LlamaConfig` (token ids such as bos_token_id pass through)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        initializer_range=cfg.init_std, **token_ids)


def from_hf_config(hf: dict) -> ModelConfig:
    """A `LlamaConfig` (as a dict) -> ModelConfig. Features we do not implement are errors, not approximations."""
    if hf.get("model_type", "llama") != "llama":
        raise AdapterError(f"model_type {hf.get('model_type')!r} is not supported; only 'llama' is")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise AdapterError(f"RoPE scaling {rope_type!r} is not supported; only unscaled ('default') RoPE is")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise AdapterError(f"{flag}=true is not supported (the decoder has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise AdapterError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU) is")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise AdapterError(f"head_dim {head_dim} x {n_heads} heads != hidden_size {hf['hidden_size']}; "
                           "a decoupled head_dim is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=bool(hf.get("tie_word_embeddings")),
        init_std=hf.get("initializer_range", 0.02))
