"""The encoder-decoder: padding masks on every backend, causality, cached decoding, the paper's embeddings, loss."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from llm.attention import eager_attention, get_attention
from llm.attention.flash import flash_module
from llm.config import ConfigError, load_config
from llm.models.encoder_decoder import (
    TranslationModelConfig,
    build_translation_model,
    label_smoothed_loss,
    sinusoids,
    translation_preset,
)
from tests.conftest import devices

PAD = 3


def backends(device: str) -> list[str]:
    return ["sdpa", "auto"] + (["flash"] if device == "cuda" and flash_module() is not None else [])


def tiny(**overrides) -> TranslationModelConfig:
    fields = dict(vocab_size=50, dropout=0.0, attention="eager", max_seq_len=64) | overrides
    return translation_preset("tiny", **fields)


# The modern variant, by config fields: pre-norm RMSNorm, rotary positions, SwiGLU, no biases, grouped-query attention.
MODERN = dict(norm="pre", norm_type="rmsnorm", positions="rope", activation="swiglu", bias=False, n_kv_heads=2)
VARIANTS = {"post": dict(norm="post"), "pre": dict(norm="pre"), "modern": MODERN}


def model_for(cfg, attention="eager", device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return build_translation_model(dataclasses.replace(cfg, attention=attention)).to(device, dtype).eval()


def padded_batch(src_lens, tgt_lens, vocab=50, seed=0, device="cpu"):
    """Random right-padded sources and decoder inputs with their pad masks (True at padding)."""
    g = torch.Generator().manual_seed(seed)
    S, T = max(src_lens), max(tgt_lens)
    src = torch.randint(4, vocab, (len(src_lens), S), generator=g)
    tgt = torch.randint(4, vocab, (len(tgt_lens), T), generator=g)
    src_pad = torch.arange(S)[None] >= torch.tensor(src_lens)[:, None]
    tgt_pad = torch.arange(T)[None] >= torch.tensor(tgt_lens)[:, None]
    src, tgt = src.masked_fill(src_pad, PAD), tgt.masked_fill(tgt_pad, PAD)
    return [t.to(device) for t in (src, src_pad, tgt, tgt_pad)]


# ---- attention backends with a key padding mask ----------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_equals_attending_to_the_real_keys_only(device, causal):
    B, T, H, D = 3, 12, 4, 16
    lens = [12, 7, 1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device) for _ in range(3))
    key_mask = (torch.arange(T)[None] < torch.tensor(lens)[:, None]).to(device)  # (B, T), right padding
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for name in ["eager"] + backends(device):
        if name == "flash" and dtype == torch.float32:
            continue
        out = get_attention(name)(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal, key_mask=key_mask).float()
        for b, n in enumerate(lens):
            # With right padding, a real query (causal: at position < n) sees exactly the real keys it may see.
            rows = slice(0, n) if causal else slice(0, T)
            alone = eager_attention(q[b:b + 1, rows], k[b:b + 1, :n], v[b:b + 1, :n], causal=causal)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert (out[b:b + 1, rows] - alone).abs().max().item() <= tol, (name, b)


def test_a_query_with_no_key_left_gets_zero_not_nan():
    q, k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    key_mask = torch.ones(2, 5, dtype=torch.bool)
    key_mask[1] = False
    for name in ("eager", "sdpa"):
        out = get_attention(name)(q, k, v, causal=False, key_mask=key_mask)
        assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1])), name


# ---- the model ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_backend_agrees_with_eager_on_a_padded_batch(device, variant):
    cfg = tiny(**VARIANTS[variant])
    src, src_pad, tgt, tgt_pad = padded_batch([9, 4, 13], [5, 11, 2], device=device)
    real = ~tgt_pad[..., None]
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        with torch.no_grad():
            ref = model_for(cfg, "eager", device, dtype)(src, src_pad, tgt, tgt_pad).float()
            for name in backends(device):
                if name == "flash" and dtype == torch.float32:
                    continue
                model = model_for(cfg, name, device, dtype)
                tol = 1e-5 if dtype == torch.float32 else 2e-2 * max(1.0, ref.abs().max().item())
                for tgt_mask in (tgt_pad, None):  # right-padded targets need no target mask (module docstring)
                    out = model(src, src_pad, tgt, tgt_mask).float()
                    assert ((out - ref) * real).abs().max().item() <= tol, (name, dtype, tgt_mask is None)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", ["post", "modern"])
def test_a_sentence_translates_the_same_alone_and_in_a_padded_batch(attention, variant):
    model = model_for(tiny(**VARIANTS[variant]), attention)
    src, src_pad, tgt, tgt_pad = padded_batch([6, 14, 3], [8, 2, 10])
    with torch.no_grad():
        batched = model(src, src_pad, tgt, tgt_pad)
        for b in range(3):
            s, t = int((~src_pad[b]).sum()), int((~tgt_pad[b]).sum())
            alone = model(src[b:b + 1, :s], None, tgt[b:b + 1, :t])
            assert (batched[b:b + 1, :t] - alone).abs().max().item() <= 1e-5
        # Without the source mask the padding is attended to and changes the result: the mask does the work.
        unmasked = model(src, None, tgt, tgt_pad)
        assert (unmasked[2, :10] - batched[2, :10]).abs().max().item() > 1e-3


def test_decoder_is_causal_and_every_position_reads_the_whole_source():
    model = model_for(tiny(), "sdpa")
    src, _, tgt, _ = padded_batch([10], [12])
    with torch.no_grad():
        base = model(src, None, tgt)
        tgt2 = tgt.clone()
        tgt2[0, 7] = (tgt[0, 7] + 1 - 4) % 46 + 4
        later = model(src, None, tgt2)
        src2 = src.clone()
        src2[0, -1] = (src[0, -1] + 1 - 4) % 46 + 4
        other_source = model(src2, None, tgt)
    assert torch.equal(base[:, :7], later[:, :7])
    assert (base[:, 7:] - later[:, 7:]).abs().max() > 1e-3
    assert (base[:, 0] - other_source[:, 0]).abs().max() > 1e-3  # the first target position sees the last source token


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_step_by_step_decoding_equals_teacher_forcing(variant):
    model = model_for(tiny(**VARIANTS[variant]), "sdpa")
    src, src_pad, tgt, _ = padded_batch([9, 5], [7, 7])
    with torch.no_grad():
        full = model(src, src_pad, tgt)
        state = model.start_decoding(model.encode(src, src_pad), src_pad, max_len=7, expand=2)
        # Rows are (sentence, copy): feed copy 1 of each sentence the same tokens, then keep only those rows.
        steps = [model.decode_step(tgt.repeat_interleave(2, 0)[:, t:t + 1], state) for t in range(3)]
        state.select(torch.tensor([1, 3]))
        steps += [model.decode_step(tgt[:, t:t + 1], state) for t in range(3, 7)]
    stepwise = torch.cat([s if s.shape[0] == 2 else s[1::2] for s in steps], dim=1)
    assert (stepwise - full).abs().max().item() <= 1e-5


def test_embeddings_are_scaled_and_positions_are_the_papers_sinusoids():
    d = 64
    pe = sinusoids(torch.arange(50), d)  # (50, d)
    p, i = 37, 5
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / d)), abs=1e-7)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / d)), abs=1e-7)
    model = model_for(tiny())
    ids = torch.tensor([[5, 9, 11]])
    expected = model.src_embeddings(ids) * math.sqrt(model.cfg.d_model) + sinusoids(torch.arange(3), 64)
    assert torch.allclose(model._embed(model.src_embeddings, ids), expected)


def test_shared_embeddings_are_one_matrix_and_init_is_fairseqs():
    shared, separate = build_translation_model(tiny()), build_translation_model(tiny(share_embeddings=False))
    assert shared.src_embeddings.weight is shared.tgt_embeddings.weight is shared.output.weight
    V, d = 50, 64
    assert separate.num_params() - shared.num_params() == 2 * V * d
    big = build_translation_model(translation_preset("tiny", vocab_size=4000, d_model=256, n_heads=4))
    assert big.src_embeddings.weight.std().item() == pytest.approx(256 ** -0.5, rel=0.05)
    assert torch.equal(big.encoder_layers[0].ffn.w1.bias, torch.zeros(128))
    assert torch.equal(big.decoder_layers[1].cross_attn_norm.weight, torch.ones(256))


@pytest.mark.parametrize("preset, paper_millions", [("transformer-base", 65), ("transformer-big", 213)])
def test_preset_shapes_and_parameter_counts(preset, paper_millions):
    cfg = translation_preset(preset)
    model = build_translation_model(cfg, device="meta")
    d, ff, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_encoder_layers
    attn, ffn, norm = 4 * (d * d + d), 2 * d * ff + ff + d, 2 * d
    expected = V * d + L * (attn + ffn + 2 * norm) + L * (2 * attn + ffn + 3 * norm)
    assert model.num_params() == expected
    assert model.num_params() / 1e6 == pytest.approx(paper_millions, rel=0.04)  # the paper's Table 3 (rounded)
    assert cfg.n_encoder_layers == cfg.n_decoder_layers == 6
    assert load_config(preset).task == "translation"  # a preset file is recognised as a translation model


def test_modern_variant_is_config_fields_of_the_same_model():
    from llm.models.layers import RMSNorm, SwiGLU

    model = model_for(tiny(**MODERN))
    layer = model.decoder_layers[0]
    assert isinstance(layer.self_attn_norm, RMSNorm) and isinstance(model.decoder_norm, RMSNorm)
    assert isinstance(layer.ffn, SwiGLU) and layer.self_attn.wq.bias is None
    assert layer.self_attn.wkv.out_features == 2 * 2 * 16  # 2 key/value heads of 16 for 4 query heads
    ids = torch.tensor([[5, 9, 11]])
    assert torch.equal(model._embed(model.src_embeddings, ids), model.src_embeddings(ids) * 8.0)  # no sinusoids
    # Rotary positions are relative: a source shifted by padding on the left would change the sinusoids' model,
    # but attention scores between two tokens depend only on their distance. Shown on self-attention directly:
    attn, rope = layer.self_attn, model._rope(0, 6, torch.device("cpu"))
    x = torch.randn(1, 6, 64)
    q = attn.wq(x).view(1, 6, 4, 16)
    k, _ = attn.keys_values(x, rope)
    from llm.models.layers import apply_rope

    scores = torch.einsum("bqhd,bkhd->bhqk", apply_rope(q, rope), k.repeat_interleave(2, dim=2))
    shifted = model._rope(3, 6, torch.device("cpu"))
    k2, _ = attn.keys_values(x, shifted)
    scores2 = torch.einsum("bqhd,bkhd->bhqk", apply_rope(q, shifted), k2.repeat_interleave(2, dim=2))
    assert torch.allclose(scores, scores2, atol=1e-4)


@pytest.mark.parametrize("preset", ["transformer-modern-base", "transformer-modern-big"])
def test_modern_presets(preset):
    cfg = translation_preset(preset)
    model = build_translation_model(cfg, device="meta")
    d, ff, V, L, kv = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_encoder_layers, cfg.kv_heads * cfg.head_dim
    attn, ffn = 2 * d * d + 2 * d * kv, 3 * d * ff  # q and o, k and v; gate, up and down
    expected = V * d + L * (attn + ffn + 2 * d) + L * (2 * attn + ffn + 3 * d) + 2 * d  # + the two final norms
    assert model.num_params() == expected
    base = build_translation_model(translation_preset(preset.replace("modern-", "")), device="meta")
    assert 0.9 < model.num_params() / base.num_params() < 1.0  # the paper model's size less GQA's smaller k/v
    assert load_config(preset).task == "translation"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.n_heads = 5: must divide model.d_model = 64"):
        translation_preset("tiny", n_heads=5)
    with pytest.raises(ConfigError, match="model.n_kv_heads = 3: must divide model.n_heads = 4"):
        translation_preset("tiny", n_kv_heads=3)
    with pytest.raises(ConfigError, match="model.positions = 'rope': rotary positions need an even head size"):
        translation_preset("tiny", d_model=60, n_heads=4, positions="rope")
    with pytest.raises(ConfigError, match="not found"):
        translation_preset("transformer-huge")


def test_backward_through_padding_is_finite_and_reaches_every_parameter():
    model = model_for(tiny(dropout=0.1), "sdpa").train()
    src, src_pad, tgt, tgt_pad = padded_batch([9, 2], [3, 8])
    label_smoothed_loss(model(src, src_pad, tgt, tgt_pad), tgt, PAD).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- label smoothing -------------------------------------------------------------------------------------------


def test_label_smoothed_loss_is_cross_entropy_against_the_smoothed_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(4, 11, (2, 5), generator=g)
    targets[1, 3:] = PAD
    keep = targets != PAD
    # eps = 0: plain cross-entropy over the non-padding targets
    assert label_smoothed_loss(logits, targets, PAD, 0.0).item() == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD).item(), rel=1e-6)
    # eps = 0.1: 1 - eps on the reference, eps / (V - 1) on every other token
    eps, V = 0.1, 11
    q = torch.full((2, 5, V), eps / (V - 1)).scatter(-1, targets[..., None], 1 - eps)
    expected = -(q * logits.log_softmax(-1)).sum(-1)[keep].mean()
    assert label_smoothed_loss(logits, targets, PAD, eps).item() == pytest.approx(expected.item(), rel=1e-6)
    total = label_smoothed_loss(logits, targets, PAD, eps, reduction="sum")
    assert total.item() == pytest.approx(expected.item() * keep.sum().item(), rel=1e-6)
    # what the model predicts at padding positions does not matter
    changed = logits.clone()
    changed[1, 3:] = 100.0
    assert label_smoothed_loss(changed, targets, PAD, eps).item() == pytest.approx(expected.item(), rel=1e-6)
