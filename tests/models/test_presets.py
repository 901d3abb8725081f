"""Preset shapes against the parameter counts their published models report (built on the meta device)."""

import pytest

from llm.config import load_model_config
from llm.models import build_model

PUBLISHED = {
    "125m": 134_515_008,  # SmolLM-135M
    "350m": 361_821_120,  # SmolLM-360M
    "1b": 1_235_814_400,  # Llama-3.2-1B
    "3b": 3_212_749_824,  # Llama-3.2-3B
    "7b": 6_738_415_616,  # Llama-2-7B
    "13b": 13_015_864_320,  # Llama-2-13B
    "70b": 68_976_648_192,  # Llama-2-70B
}

# The published models' own presets: the parameter total of their safetensors files (as the Hugging Face Hub
# reports it), and whether those files store a tied output matrix a second time (Qwen3-0.6B and -1.7B do: their
# total counts the embedding twice, so it is one vocab x d_model above the distinct parameters).
PUBLISHED_MODELS = {
    "llama-3.2-1b": (1_235_814_400, False),
    "llama-3.2-3b": (3_212_749_824, False),
    "llama-3.1-8b": (8_030_261_248, False),
    "qwen2.5-0.5b": (494_032_768, False),
    "qwen2.5-1.5b": (1_543_714_304, False),
    "qwen2.5-7b": (7_615_616_512, False),
    "qwen3-0.6b": (751_632_384, True),
    "qwen3-1.7b": (2_031_739_904, True),
    "qwen3-8b": (8_190_735_360, False),
    "mistral-7b-v0.3": (7_248_023_552, False),
    "smollm2-135m": (134_515_008, False),
    "smollm2-360m": (361_821_120, False),
    "smollm2-1.7b": (1_711_376_384, False),
}

# The model cards' "Number of Parameters" and "Non-Embedding" figures, in billions, as printed (Qwen publishes
# both); ours must round to them at the printed precision.
CARDS = {
    "qwen2.5-0.5b": ("0.49", "0.36"), "qwen2.5-1.5b": ("1.54", "1.31"), "qwen2.5-7b": ("7.61", "6.53"),
    "qwen3-0.6b": ("0.6", "0.44"), "qwen3-1.7b": ("1.7", "1.4"), "qwen3-8b": ("8.2", "6.95"),
}


@pytest.mark.parametrize("preset, count", PUBLISHED.items())
def test_preset_parameter_count(preset, count):
    model = build_model(load_model_config(preset), device="meta")
    assert model.num_params() == count


@pytest.mark.parametrize("preset", PUBLISHED_MODELS)
def test_published_model_presets_have_the_published_parameter_count(preset):
    cfg = load_model_config(preset)
    total, stores_tied_head = PUBLISHED_MODELS[preset]
    assert stores_tied_head <= cfg.tie_embeddings
    stored = build_model(cfg, device="meta").num_params() + (cfg.vocab_size * cfg.d_model if stores_tied_head else 0)
    assert stored == total


@pytest.mark.parametrize("preset", CARDS)
def test_published_model_presets_match_the_model_card(preset):
    cfg = load_model_config(preset)
    params = build_model(cfg, device="meta").num_params()
    non_embedding = params - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    for printed, value in zip(CARDS[preset], (params, non_embedding), strict=True):
        unit = 10 ** -len(printed.split(".")[1])  # one unit of the last printed digit
        assert abs(value / 1e9 - float(printed)) < unit, (printed, value)


def test_tiny_preset_builds_for_real():
    cfg = load_model_config("tiny")
    model = build_model(cfg)
    assert next(model.parameters()).device.type == "cpu"
    assert model.output.weight is model.tok_embeddings.weight  # tied
