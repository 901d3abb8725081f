"""The decoder: backends agree end to end, causality, packed documents, GQA vs MHA, sizing."""

import dataclasses
import math

import pytest
import torch

from llm.config import RopeScaling
from llm.models import build_model
from tests.conftest import devices


def model_for(cfg, attention, device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(cfg, attention=attention)).to(device=device, dtype=dtype)
    return model.eval()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_model_matches_eager_model(tiny_cfg, device, dtype):
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 40), device=device)
    with torch.no_grad():
        ref = model_for(tiny_cfg, "eager", device, dtype)(x).float()
        out = model_for(tiny_cfg, "sdpa", device, dtype)(x).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2 * max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= tol


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(tiny_cfg, attention):
    model = model_for(tiny_cfg, attention)
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 32))
    y = x.clone()
    y[0, 20] = (x[0, 20] + 1) % tiny_cfg.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.equal(a[:, :20], b[:, :20])
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3  # and the change is seen from position 20 on


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_documents_equal_each_document_alone(tiny_cfg, attention):
    model = model_for(tiny_cfg, attention)
    lengths = [7, 30, 11]
    docs = [torch.randint(0, tiny_cfg.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)  # (1, 48)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        out = model(packed, position_ids=position_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
        unmasked = model(packed)
    assert (out - alone).abs().max().item() <= 1e-5
    assert (unmasked - alone).abs().max().item() > 1e-3  # without boundaries, documents do leak into each other


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_cfg):
    gqa = model_for(tiny_cfg, "sdpa")
    mha_cfg = dataclasses.replace(tiny_cfg, n_kv_heads=tiny_cfg.n_heads, attention="sdpa")
    mha = build_model(mha_cfg).eval()
    H, Hkv, hd = tiny_cfg.n_heads, tiny_cfg.kv_heads, tiny_cfg.head_dim
    sd = gqa.state_dict()
    for i in range(tiny_cfg.n_layers):
        key = f"layers.{i}.attention.wqkv.weight"
        q, k, v = sd[key].split([H * hd, Hkv * hd, Hkv * hd])
        # kv head j serves query heads [j * H/Hkv, (j + 1) * H/Hkv): repeat each head's rows in place.
        rep = lambda w: w.view(Hkv, hd, -1).repeat_interleave(H // Hkv, dim=0).reshape(H * hd, -1)  # noqa: E731
        sd[key] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (gqa(x) - mha(x)).abs().max().item() <= 1e-5


def test_init_scales_residual_projections(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, d_model=256, n_heads=4, d_ff=512, n_layers=8, init_std=0.02)
    model = build_model(cfg)
    assert model.layers[0].attention.wqkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(256))


def test_sizing_formulas(tiny_cfg):
    model = build_model(tiny_cfg, device="meta")
    d, V, L, ff = tiny_cfg.d_model, tiny_cfg.vocab_size, tiny_cfg.n_layers, tiny_cfg.ffn_hidden
    kv = tiny_cfg.kv_heads * tiny_cfg.head_dim
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * ff + 2 * d
    assert model.num_params() == 2 * V * d + L * per_layer + d  # untied
    T = 100
    matmul = L * (d * (d + 2 * kv) + d * d + 3 * d * ff) + V * d
    assert model.flops_per_token(T) == 6 * matmul + 12 * L * d * (T + 1) / 2
    tied = build_model(dataclasses.replace(tiny_cfg, tie_embeddings=True), device="meta")
    assert tied.num_params() == model.num_params() - V * d
    assert tied.flops_per_token(T) == model.flops_per_token(T)  # the head matmul still costs FLOPs when tied


def test_too_long_input_is_a_clear_error(tiny_cfg):
    model = model_for(tiny_cfg, "sdpa")
    with pytest.raises(ValueError, match="exceeds model.max_seq_len = 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_backward_runs_with_document_mask(tiny_cfg):
    model = model_for(tiny_cfg, "sdpa").train()
    x = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None].repeat(2, 1)
    model(x, position_ids=pos).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- features of other families: q/k/v biases, q/k norms, a decoupled head size, RoPE scaling, a window ----

FEATURES = {
    "bias+yarn": dict(attention_bias=True, rope_scaling=RopeScaling("yarn", 4.0, 32)),
    "qk_norm+d_head": dict(qk_norm=True, d_head=32, rope_scaling=RopeScaling("llama3", 8.0, 32)),
    "linear": dict(rope_scaling=RopeScaling("linear", 2.0), d_head=8),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("features", FEATURES)
def test_family_features_run_on_every_backend(tiny_cfg, device, features):
    """Each backend that runs here against eager, plain and with packed documents, forward and backward."""
    from tests.attention.cases import TOL, half, runnable

    cfg = dataclasses.replace(tiny_cfg, **FEATURES[features])
    dtype = half(device)
    x = torch.randint(0, cfg.vocab_size, (2, 48), device=device)
    position_ids = torch.cat([torch.arange(n) for n in (10, 25, 13)])[None].expand(2, -1).to(device)
    for backend in runnable(device):
        for pos in (None, position_ids):
            outs = []
            for attention in ("eager", backend):
                model = model_for(cfg, attention, device, dtype, seed=5)
                logits = model(x, position_ids=pos)
                logits.float().square().mean().backward()
                outs.append((logits.float(), model.layers[0].attention.wqkv.weight.grad.float()))
            (ref, ref_grad), (out, grad) = outs
            tol, grad_tol = TOL[dtype]
            assert (out - ref).abs().max() <= tol * max(1.0, ref.abs().max()), (backend, pos is not None)
            assert (grad - ref_grad).abs().max() <= grad_tol * max(1.0, ref_grad.abs().max()), backend


def test_family_features_have_parameters_and_initialisation(tiny_cfg):
    model = build_model(dataclasses.replace(tiny_cfg, attention_bias=True, qk_norm=True, d_head=24))
    attn = model.layers[0].attention
    assert attn.wqkv.weight.shape == ((4 + 2 * 2) * 24, 64) and attn.wo.weight.shape == (64, 4 * 24)
    assert torch.equal(attn.wqkv.bias, torch.zeros(8 * 24)) and attn.wo.bias is None
    assert torch.equal(attn.q_norm.weight, torch.ones(24)) and torch.equal(attn.k_norm.weight, torch.ones(24))


def test_sliding_window_runs_up_to_the_window_and_refuses_beyond(tiny_cfg, tmp_path):
    from llm.config import ConfigError, load_config

    windowed = model_for(dataclasses.replace(tiny_cfg, sliding_window=32), "sdpa")
    full = model_for(tiny_cfg, "sdpa")
    x = torch.randint(0, tiny_cfg.vocab_size, (1, 33))
    with torch.no_grad():
        assert torch.equal(windowed(x[:, :32]), full(x[:, :32]))  # within the window, attention is full
        with pytest.raises(ValueError, match=r"sequence length 33 exceeds model.sliding_window .* = 32"):
            windowed(x)
    (tmp_path / "run.yaml").write_text("model: {vocab_size: 97, d_model: 64, n_layers: 1, n_heads: 4, "
                                       "sliding_window: 32, max_seq_len: 128}\ndata: {seq_len: 64}\n")
    with pytest.raises(ConfigError, match=r"data.seq_len = 64: exceeds model.sliding_window = 32"):
        load_config(tmp_path / "run.yaml")
