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


@pytest.mark.parametrize("preset, count", PUBLISHED.items())
def test_preset_parameter_count(preset, count):
    model = build_model(load_model_config(preset), device="meta")
    assert model.num_params() == count


def test_tiny_preset_builds_for_real():
    cfg = load_model_config("tiny")
    model = build_model(cfg)
    assert next(model.parameters()).device.type == "cpu"
    assert model.output.weight is model.tok_embeddings.weight  # tied
