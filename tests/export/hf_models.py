"""Tiny random models of each family we import, built from their own `transformers` classes (no download)."""

import shutil
from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

# Each family with the features its published models use: Llama 3.2 / SmolLM2 (tied, llama3 RoPE scaling),
# Mistral (sliding window, a head size apart from hidden / heads), Qwen2.5 (q/k/v biases, tied, YaRN),
# Qwen3 (q/k norms, decoupled head size, untied).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        head_dim=32, sliding_window=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=True, use_sliding_window=False, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}


def hf_config(family: str, **overrides):
    config_class, _, extra = FAMILIES[family]
    return getattr(transformers, config_class)(**(COMMON | extra | overrides))


def random_model(family: str, seed: int = 0, **overrides):
    """A random model of the family's class; norms and biases perturbed so that a misplaced one shows."""
    _, model_class, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif p.ndim == 2:
                p.normal_(0, 0.1)  # sharp attention, so RoPE and permutation mistakes show
    return model


def save_folder(model, folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """The folder a user downloads: config.json, model.safetensors, and the tokenizer files if given."""
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_dir is not None:
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder
