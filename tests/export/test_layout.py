"""Parity with `transformers` through the shared state-dict layout, both ways; permutations that cannot pass
wrongly (Llama here; every family in test_families.py)."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llm.config import ModelConfig
from llm.export import layout as adapter
from llm.export.families import from_hf_config, to_hf_config
from llm.export.layout import AdapterError, from_hf_state_dict, to_hf_state_dict
from llm.models import build_model

TOL = 1e-5


def make_cfg(tied: bool, n_kv_heads: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=211, d_model=128, n_layers=2, n_heads=8, n_kv_heads=n_kv_heads, d_ff=160,
                       rope_theta=500000.0, norm_eps=1e-6, max_seq_len=64, tie_embeddings=tied,
                       attention="eager", init_std=0.1)


def random_hf(cfg: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised HF Llama. A large init std makes attention sharp, so that RoPE mistakes show."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**to_hf_config(cfg)[1], attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms start at 1; perturb them so a swapped norm would show too
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokens(cfg, seed=1):
    return torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, hf, x) -> float:
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n_kv_heads", [2, 8])
def test_hf_to_ours_same_logits(tied, n_kv_heads):
    cfg = make_cfg(tied, n_kv_heads)
    hf = random_hf(cfg)
    ours = build_model(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    assert max_diff(ours, hf, tokens(cfg)) <= TOL


@pytest.mark.parametrize("tied", [False, True])
def test_ours_to_hf_same_logits_and_weights_round_trip(tied):
    cfg = make_cfg(tied)
    torch.manual_seed(3)
    ours = build_model(cfg).eval()
    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(cfg)[1], attn_implementation="eager")).eval()
    exported = to_hf_state_dict(ours.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(exported, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tied else [])  # tied: HF re-ties it
    if tied:
        hf.tie_weights()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert max_diff(ours, hf, tokens(cfg)) <= TOL
    back = from_hf_state_dict(exported, cfg)
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key


def test_skipping_the_rope_permutation_breaks_parity(monkeypatch):
    """The check above cannot pass by accident: a wrongly permuted q/k projection is caught."""
    cfg = make_cfg(tied=False)
    hf = random_hf(cfg)
    monkeypatch.setattr(adapter, "half_to_interleaved", lambda w, n_heads, head_dim: w)
    ours = build_model(cfg).eval()
    ours.load_state_dict(adapter.from_hf_state_dict(hf.state_dict(), cfg))
    assert max_diff(ours, hf, tokens(cfg)) > 100 * TOL


def test_one_wrongly_permuted_weight_breaks_parity():
    cfg = make_cfg(tied=False)
    hf = random_hf(cfg)
    sd = from_hf_state_dict(hf.state_dict(), cfg)
    key = "layers.1.attention.wqkv.weight"
    hd = cfg.head_dim
    w = sd[key].clone()
    w[:hd] = w[:hd].view(hd // 2, 2, -1).flip(1).reshape(hd, -1)  # swap the pairs of one query head only
    sd[key] = w
    ours = build_model(cfg).eval()
    ours.load_state_dict(sd)
    assert max_diff(ours, hf, tokens(cfg)) > 100 * TOL


def test_config_round_trip():
    cfg = make_cfg(tied=True)
    hf_cfg = LlamaConfig(**to_hf_config(cfg, bos_token_id=1, eos_token_id=2)[1])
    assert from_hf_config(hf_cfg.to_dict()) == dataclasses.replace(cfg, attention="auto", family="llama")
    assert hf_cfg.rope_parameters["rope_theta"] == 500000.0 and hf_cfg.num_key_value_heads == 2


def test_mismatches_are_errors_not_skipped():
    cfg = make_cfg(tied=False)
    sd = random_hf(cfg).state_dict()
    with pytest.raises(AdapterError, match="missing.*lm_head.weight"):
        from_hf_state_dict({k: v for k, v in sd.items() if k != "lm_head.weight"}, cfg)
    with pytest.raises(AdapterError, match="unexpected.*extra"):
        from_hf_state_dict(sd | {"extra": torch.zeros(1)}, cfg)
    with pytest.raises(AdapterError, match=r"k_proj.weight: shape \(32, 128\), the config needs \(64, 128\)"):
        from_hf_state_dict(sd, dataclasses.replace(cfg, n_kv_heads=4))
