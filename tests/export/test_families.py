"""Every family we import, from a tiny random model of its own `transformers` class: logits and greedy
continuations equal ours, configs round-trip, unsupported features are refused naming the field."""

import dataclasses
import json

import pytest
import torch
import transformers

from llm.config import ModelConfig, RopeScaling
from llm.export import layout
from llm.export.families import FAMILIES, family_of, from_hf_config, load_hf_folder, to_hf_config
from llm.export.layout import AdapterError
from llm.generate import Sampling, generate
from llm.models import build_model
from tests.export.hf_models import FAMILIES as CASES
from tests.export.hf_models import hf_config, random_model, save_folder

TOL = 1e-5


def ours_from(folder):
    cfg, state = load_hf_folder(folder)
    model = build_model(dataclasses.replace(cfg, attention="eager")).eval()
    model.load_state_dict(state, strict=True)
    return model


def max_diff(ours, hf, x) -> float:
    with torch.no_grad():
        return (ours(x) - hf(x).logits).abs().max().item()


def tokens(n=2, length=100, seed=1):
    return torch.randint(0, 640, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (the HF model, its saved folder)."""
    out = {}
    for family in CASES:
        hf = random_model(family)
        out[family] = hf, save_folder(hf, tmp_path_factory.mktemp(family))
    return out


@pytest.mark.parametrize("family", list(CASES))
def test_import_gives_the_same_logits_and_greedy_continuations(folders, family):
    hf, folder = folders[family]
    ours = ours_from(folder)
    assert ours.cfg.family == family
    assert max_diff(ours, hf, tokens()) <= TOL
    for prompt in ([5, 17, 300, 2], tokens(1, 30, seed=4)[0].tolist()):
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=20, pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(ours, prompt, Sampling(max_new_tokens=20)) == expected


@pytest.mark.parametrize("family", list(CASES))
def test_config_round_trips_through_the_family_class(family):
    cfg = from_hf_config(hf_config(family).to_dict())
    written, kwargs = to_hf_config(cfg, eos_token_id=2)
    assert written is family_of(cfg) and written.model_type == family
    again = getattr(transformers, written.config_class)(**kwargs)
    assert again.model_type == family and from_hf_config(again.to_dict()) == cfg


def test_the_features_are_what_makes_parity(folders):
    """The parity above cannot pass by accident: RoPE scaling, and the permutation of biases and q/k norms, each
    change the logits when left out."""
    for family in ("llama", "qwen2"):  # llama3 and YaRN scaling
        hf, folder = folders[family]
        ours = ours_from(folder)
        assert ours.cfg.rope_scaling is not None
        unscaled = build_model(dataclasses.replace(ours.cfg, rope_scaling=None, attention="eager")).eval()
        unscaled.load_state_dict(ours.state_dict())
        assert max_diff(unscaled, hf, tokens()) > 100 * TOL
    original = layout._rows
    layout._rows = lambda fn, v, n_heads, head_dim: v  # biases and q/k norm weights left unpermuted
    try:
        for family in ("qwen2", "qwen3"):
            hf, folder = folders[family]
            assert max_diff(ours_from(folder), hf, tokens()) > 100 * TOL
    finally:
        layout._rows = original


@pytest.mark.parametrize("family, overrides, message", [
    ("llama", dict(attention_bias=True), "attention_bias=true is not supported: Llama's attention_bias adds a bias "
                                         "to o_proj"),
    ("qwen3", dict(attention_bias=True), "attention_bias=true is not supported"),
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
    ("llama", dict(mlp_bias=True), "mlp_bias=true is not supported"),
    ("mistral", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
     "rope_parameters.rope_type='dynamic' is not supported"),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
])
def test_unsupported_features_are_refused_naming_the_field(family, overrides, message):
    with pytest.raises(AdapterError, match=message):
        from_hf_config(hf_config(family, **overrides).to_dict())


def test_other_architectures_and_moe_are_refused(tmp_path):
    with pytest.raises(AdapterError, match="model_type 'mixtral' is not supported; supported: llama, mistral"):
        from_hf_config(transformers.MixtralConfig().to_dict())
    moe = hf_config("qwen3").to_dict() | {"num_experts": 8}
    with pytest.raises(AdapterError, match="num_experts=8 is not supported: mixture-of-experts"):
        from_hf_config(moe)
    # A folder: the error names the file.
    (tmp_path / "config.json").write_text(json.dumps(transformers.GPT2Config().to_dict()))
    with pytest.raises(AdapterError, match=rf"{tmp_path / 'config.json'}: model_type 'gpt2' is not supported"):
        load_hf_folder(tmp_path)


def test_an_export_family_that_cannot_hold_the_model_is_refused():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, qk_norm=True, family="llama")
    with pytest.raises(AdapterError, match="model.family=llama .* cannot express model.qk_norm"):
        family_of(cfg)
    assert family_of(dataclasses.replace(cfg, family="auto")) is FAMILIES["qwen3"]
    with pytest.raises(AdapterError, match="cannot express model.sliding_window"):
        family_of(dataclasses.replace(cfg, qk_norm=False, sliding_window=16))
    assert family_of(dataclasses.replace(cfg, qk_norm=False, sliding_window=16, family="auto")) is FAMILIES["mistral"]
    qwen2 = dataclasses.replace(cfg, qk_norm=False, family="qwen2")
    with pytest.raises(AdapterError, match="attention_bias=false"):
        family_of(qwen2)
    scaled = dataclasses.replace(cfg, qk_norm=False, rope_scaling=RopeScaling("linear", 2.0))
    assert to_hf_config(scaled)[1]["rope_parameters"] == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}


# config.json as the published checkpoints ship it (written by transformers 4.x: `rope_scaling` and a top-level
# `rope_theta`, Qwen's unused sliding-window keys, SmolLM2's extra keys), shrunk to a tiny shape.
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 640, "hidden_act": "silu", "initializer_range": 0.02,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "use_cache": True}
PUBLISHED_STYLE = {
    "llama-3.2": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "head_dim": 16,
                  "max_position_embeddings": 131072, "mlp_bias": False, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
                  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  "rope_theta": 500000.0, "tie_word_embeddings": True, "transformers_version": "4.45.0.dev0"},
    "qwen2.5": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 32768,
                "max_window_layers": 1, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
                "tie_word_embeddings": True, "transformers_version": "4.40.1", "use_sliding_window": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 32,
              "max_position_embeddings": 40960, "max_window_layers": 2, "rms_norm_eps": 1e-06, "rope_scaling": None,
              "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
              "transformers_version": "4.51.0", "use_sliding_window": False},
    "mistral-v0.3": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "max_position_embeddings": 32768,
                     "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                     "tie_word_embeddings": False, "transformers_version": "4.42.0.dev0"},
    "smollm2": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "is_llama_config": True,
                "max_position_embeddings": 8192, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False,
                "rope_scaling": None, "rope_theta": 100000, "tie_word_embeddings": True,
                "transformers_version": "4.40.1"},
}


@pytest.mark.parametrize("name", list(PUBLISHED_STYLE))
def test_config_json_as_published_imports_as_transformers_reads_it(name, tmp_path):
    config = TINY | PUBLISHED_STYLE[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf_config_read = transformers.AutoConfig.from_pretrained(tmp_path)
    hf_config_read._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config_read, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1) if p.ndim == 2 else p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))  # the published file, not transformers 5's rewrite
    ours = ours_from(tmp_path)
    assert type(hf).__name__ == FAMILIES[ours.cfg.family].model_class == config["architectures"][0]
    assert max_diff(ours, hf, tokens()) <= TOL
