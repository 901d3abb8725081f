"""Initialisation as data: chunked fills that any slice reproduces, on any thread count, with the documented rules."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from llm.models import build_model
from llm.models import init as model_init
from llm.models.encoder_decoder import build_translation_model, translation_preset
from llm.models.init import ONES, ZEROS, Slice, fill_slices, init_parameters, no_init, normal, uniform


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1000 elements, so that small tensors cross many chunk boundaries."""
    monkeypatch.setattr(model_init, "CHUNK", 1000)


def full(rule, numel, seed=7, name="w", threads=1):
    out = torch.empty(numel)
    fill_slices([Slice(name, rule, numel, 0, out)], seed, threads)
    return out


@pytest.mark.parametrize("rule", [normal(0.02), uniform(0.3)])
def test_any_slice_equals_the_same_slice_of_the_full_fill(small_chunks, rule):
    numel = 4321
    whole = full(rule, numel)
    cuts = [(0, numel), (0, 1), (999, 1001), (1000, 2000), (1234, 3210), (4000, numel), (2500, 2500)]
    for start, end in cuts:
        part = torch.full((end - start,), float("nan"))
        fill_slices([Slice("w", rule, numel, start, part)], seed=7)
        assert torch.equal(part, whole[start:end]), (start, end)
    # Two ranks' partitions of ceil(numel / 2), the second one padded: together they are the whole parameter.
    size = math.ceil(numel / 2)
    parts = [torch.empty(min(size, numel - r * size)) for r in range(2)]
    fill_slices([Slice("w", rule, numel, r * size, p) for r, p in enumerate(parts)], seed=7, threads=2)
    assert torch.equal(torch.cat(parts), whole)


def test_values_depend_on_seed_and_name_not_on_threads_or_dtype(small_chunks):
    rule, numel = normal(1.0), 10_500
    one = full(rule, numel, threads=1)
    assert torch.equal(full(rule, numel, threads=4), one)
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(full(rule, numel, threads=3), one)
    finally:
        torch.set_num_threads(intra_op)
    assert not torch.equal(full(rule, numel, seed=8), one)
    assert not torch.equal(full(rule, numel, name="v"), one)
    # Neighbouring chunks are unrelated draws, not one stream restarted.
    assert not torch.equal(one[:1000], one[1000:2000])
    bf16 = torch.empty(numel, dtype=torch.bfloat16)
    fill_slices([Slice("w", rule, numel, 0, bf16)], seed=7)
    assert torch.equal(bf16, one.bfloat16())  # the fp32 values, rounded


def test_rule_statistics():
    n = 1 << 21  # two default-size chunks
    x = full(normal(0.02), n)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4) and x.std().item() == pytest.approx(0.02, rel=0.01)
    u = full(uniform(0.5), n)
    assert -0.5 <= u.min().item() and u.max().item() <= 0.5 and u.std().item() == pytest.approx(0.5 / 3**0.5, rel=0.01)
    assert torch.equal(full(ONES, 10), torch.ones(10)) and torch.equal(full(ZEROS, 10), torch.zeros(10))


def test_a_slice_outside_its_parameter_is_an_error():
    with pytest.raises(ValueError, match=r"slice \[5, 15\)"):
        fill_slices([Slice("w", ONES, 10, 5, torch.empty(10))], seed=0)


def test_decoder_rules_are_the_documented_ones(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, n_layers=8, init_std=0.02)
    rules = build_model(cfg, device="meta").init_rules()
    out_std = 0.02 / math.sqrt(16)
    for name, rule in rules.items():
        if name.endswith("norm.weight"):
            assert rule == ONES, name
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            assert rule == normal(out_std), name
        else:
            assert rule == normal(0.02), name
    assert "output.weight" in rules
    tied = build_model(dataclasses.replace(cfg, tie_embeddings=True), device="meta")
    assert set(tied.init_rules()) == set(rules) - {"output.weight"}  # the embedding is the output, once


def test_decoder_built_values_follow_the_rules(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, d_model=256, n_heads=4, d_ff=512, n_layers=8, init_std=0.02,
                              tie_embeddings=True)
    model = build_model(cfg, seed=3)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.layers[3].attention.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(model.layers[5].ffn_norm.weight, torch.ones(256))


def test_translation_rules_are_fairseqs():
    cfg = translation_preset("tiny", vocab_size=50, share_embeddings=False)
    rules = build_translation_model(cfg, device="meta").init_rules()
    d, ff = cfg.d_model, cfg.d_ff
    assert rules["encoder_layers.0.ffn.w1.weight"] == uniform(math.sqrt(6 / (d + ff)))  # Xavier-uniform
    assert rules["decoder_layers.0.self_attn.wkv.weight"] == uniform(math.sqrt(6 / (d + 2 * d)))
    assert rules["encoder_layers.0.ffn.w1.bias"] == ZEROS
    assert rules["decoder_layers.0.cross_attn_norm.weight"] == ONES
    assert rules["decoder_layers.0.cross_attn_norm.bias"] == ZEROS
    for name in ("src_embeddings.weight", "tgt_embeddings.weight", "output.weight"):
        assert rules[name] == normal(d ** -0.5)
    shared = build_translation_model(translation_preset("tiny", vocab_size=50), device="meta").init_rules()
    assert "src_embeddings.weight" in shared and "output.weight" not in shared and "tgt_embeddings.weight" not in shared


@pytest.mark.parametrize("threads", [1, 3])
def test_same_seed_same_weights_any_thread_count(tiny_cfg, threads):
    a, b = build_model(tiny_cfg, seed=11), build_model(tiny_cfg, seed=11)
    b.init_weights(seed=11, threads=threads)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = build_model(tiny_cfg, seed=12)
    assert not torch.equal(a.layers[0].attention.wqkv.weight, c.layers[0].attention.wqkv.weight)
    mt = translation_preset("tiny", vocab_size=50)
    x, y = build_translation_model(mt, seed=5), build_translation_model(mt, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters(), strict=True))


def test_unseeded_builds_follow_torch_manual_seed_and_meta_builds_leave_it_alone(tiny_cfg):
    torch.manual_seed(0)
    a = build_model(tiny_cfg)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    build_model(tiny_cfg, device="meta")
    assert torch.equal(torch.get_rng_state(), state)  # counting a model draws nothing
    b = build_model(tiny_cfg)
    assert torch.equal(a.tok_embeddings.weight, b.tok_embeddings.weight)
    assert not torch.equal(b.tok_embeddings.weight, build_model(tiny_cfg).tok_embeddings.weight)


def test_no_init_skips_every_init_and_restores_torchs(tiny_cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(model_init, "fill_slices", lambda *a, **k: calls.append(1))
    state = torch.get_rng_state()
    with no_init():
        build_model(tiny_cfg)
        build_translation_model(translation_preset("tiny", vocab_size=50))
        nn.Linear(4, 4)
    assert calls == []  # neither our models nor their layers initialised anything
    assert torch.equal(torch.get_rng_state(), state)  # and torch's per-layer init, which draws, did not run
    nn.Linear(4, 4)
    assert not torch.equal(torch.get_rng_state(), state)  # outside, torch's init is back


def test_init_parameters_checks_that_every_parameter_has_a_rule(tiny_cfg):
    model = build_model(tiny_cfg, seed=0)
    rules = model.init_rules()
    del rules["norm.weight"]
    with pytest.raises(ValueError, match=r"no rule for \['norm.weight'\]"):
        init_parameters(model, rules, seed=0)


@pytest.mark.parametrize("tied", [False, True])
def test_sizing_works_when_parameters_are_held_elsewhere(tiny_cfg, tied):
    """ZeRO-3 leaves each rank empty local tensors; counts and FLOPs must not read them."""
    cfg = dataclasses.replace(tiny_cfg, tie_embeddings=tied)
    model = build_model(cfg, seed=0)
    expected = (model.num_params(), model.flops_per_token(64), model.largest_layer_params())
    for p in model.parameters():
        p.data = torch.empty(0)
    assert (model.num_params(), model.flops_per_token(64), model.largest_layer_params()) == expected
    mt = build_translation_model(translation_preset("tiny", vocab_size=50), seed=0)
    expected = (mt.num_params(), mt.flops_per_token(20), mt.largest_layer_params())
    for p in mt.parameters():
        p.data = torch.empty(0)
    assert (mt.num_params(), mt.flops_per_token(20), mt.largest_layer_params()) == expected
