"""The `transformers` families we import and export, one adapter each, behind one registry.

Llama (Llama 2, 3, 3.1, 3.2, SmolLM2), Mistral, Qwen2 (Qwen2.5) and Qwen3 are one architecture in `transformers`
with a few options each; they share the state-dict layout (`layout.py`) and differ in their config: which
features a family can express (Qwen2 always has q/k/v biases, Qwen3 always has q/k norms, only Mistral has a
plain sliding window) and how it spells them. `from_hf_config` reads a family's config.json into our
`ModelConfig` (features as fields) and refuses, naming the field, anything the decoder does not implement (MoE,
other architectures, partial rotary, sliding-window layers, biases on the output projection, ...);
`to_hf_config` writes the family's config for an export. `open_hf_folder` reads a folder's config and gives its
weights one parameter at a time; `load_hf_folder` all at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from llm.config import ModelConfig, RopeScaling

from .layout import AdapterError, check_hf_shapes, hf_recipe

ROPE_FIELDS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
               "linear": ("factor",),
               "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                        "truncate")}


class Family:
    """One `transformers` family: its names and the config fields it has beyond the shared ones."""

    name = model_type = config_class = model_class = ""
    lacks: tuple[str, ...] = ()  # features (ModelConfig flags) its config cannot express
    always: str | None = None  # a feature every model of the family has

    def problems(self, cfg: ModelConfig) -> list[str]:
        """What in `cfg` this family's config cannot express (empty: it can hold the model)."""
        out = [f"model.{f}" for f in self.lacks if getattr(cfg, f)]
        if self.always and not getattr(cfg, self.always):
            out.append(f"model.{self.always}=false ({self.model_class} always has it)")
        return out

    def read(self, hf: dict) -> dict:
        """ModelConfig fields from the family-specific part of a config.json; refuse what we lack."""
        return {}

    def write(self, cfg: ModelConfig) -> dict:
        """The family-specific config.json fields for `cfg`."""
        return {}


def _no(flag: str, hf: dict, why: str) -> None:
    if hf.get(flag):
        raise AdapterError(f"{flag}={json.dumps(hf[flag])} is not supported: {why}")


def _no_sliding_layers(hf: dict) -> None:
    """Qwen's per-layer sliding windows (use_sliding_window / layer_types) are refused: every layer is full."""
    _no("use_sliding_window", hf, "sliding-window layers are not implemented (every layer attends fully)")
    other = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
    if other:
        raise AdapterError(f"layer_types {other} is not supported: every layer must be full_attention")


class Llama(Family):
    name, model_type, config_class, model_class = "llama", "llama", "LlamaConfig", "LlamaForCausalLM"
    lacks = ("attention_bias", "qk_norm", "sliding_window")

    def read(self, hf):
        _no("attention_bias", hf, "Llama's attention_bias adds a bias to o_proj too, which the decoder lacks")
        return {}

    def write(self, cfg):
        return {"attention_bias": False, "mlp_bias": False, "head_dim": cfg.head_dim}


class Mistral(Family):
    name, model_type, config_class, model_class = "mistral", "mistral", "MistralConfig", "MistralForCausalLM"
    lacks = ("attention_bias", "qk_norm")

    def read(self, hf):
        return {"sliding_window": hf.get("sliding_window")}

    def write(self, cfg):
        return {"head_dim": cfg.head_dim, "sliding_window": cfg.sliding_window}


class Qwen2(Family):
    name, model_type, config_class, model_class = "qwen2", "qwen2", "Qwen2Config", "Qwen2ForCausalLM"
    lacks, always = ("qk_norm", "sliding_window"), "attention_bias"

    def problems(self, cfg):
        decoupled = cfg.head_dim * cfg.n_heads != cfg.d_model
        return super().problems(cfg) + (
            ["model.d_head (Qwen2's head size is hidden_size / num_attention_heads)"] if decoupled else [])

    def read(self, hf):
        _no_sliding_layers(hf)
        if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
            raise AdapterError(f"head_dim={hf['head_dim']} is not supported for qwen2 (hidden_size / heads)")
        return {"attention_bias": True}

    def write(self, cfg):
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}


class Qwen3(Family):
    name, model_type, config_class, model_class = "qwen3", "qwen3", "Qwen3Config", "Qwen3ForCausalLM"
    lacks, always = ("attention_bias", "sliding_window"), "qk_norm"

    def read(self, hf):
        _no("attention_bias", hf, "Qwen3's attention_bias adds a bias to o_proj too, which the decoder lacks")
        _no_sliding_layers(hf)
        return {"qk_norm": True}

    def write(self, cfg):
        return {"head_dim": cfg.head_dim, "attention_bias": False, "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": cfg.n_layers}


FAMILIES: dict[str, Family] = {f.name: f for f in (Llama(), Mistral(), Qwen2(), Qwen3())}


def family_of(cfg: ModelConfig) -> Family:
    """The family an export of `cfg` writes (`model.family`, auto resolved); AdapterError if it cannot hold it."""
    family = FAMILIES[cfg.export_family]
    problems = family.problems(cfg)
    if problems:
        raise AdapterError(f"model.family={family.name} ({family.model_class}) cannot express "
                           f"{', '.join(problems)}; choose another model.family or change the model")
    return family


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise AdapterError("partial_rotary_factor != 1 is not supported: RoPE rotates the whole head")
    if kind == "default":
        return theta, None
    if kind not in ROPE_FIELDS:
        raise AdapterError(f"rope_parameters.rope_type={kind!r} is not supported; supported: default, "
                           f"{', '.join(ROPE_FIELDS)}")
    for extra in ("mscale", "mscale_all_dim", "long_factor", "short_factor"):
        if rope.get(extra) not in (None, 0):
            raise AdapterError(f"rope_parameters.{extra} is not supported")
    if kind in ("llama3", "yarn") and rope.get("original_max_position_embeddings") is None:
        rope["original_max_position_embeddings"] = hf.get("original_max_position_embeddings")
    if rope.get("factor") is None:
        raise AdapterError(f"rope_parameters.factor is missing ({kind} scaling needs it)")
    given = {k: rope[k] for k in ROPE_FIELDS[kind] if rope.get(k) is not None}
    for k in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor"):
        if k in given:
            given[k] = float(given[k])
    return theta, RopeScaling(type=kind, **given)


def from_hf_config(hf: dict) -> ModelConfig:
    """A family's config.json (as a dict) -> ModelConfig. Features we do not implement are errors naming the field."""
    model_type = hf.get("model_type", "llama")
    if model_type not in {f.model_type for f in FAMILIES.values()}:
        raise AdapterError(f"model_type {model_type!r} is not supported; supported: "
                           f"{', '.join(f.model_type for f in FAMILIES.values())}")
    family = next(f for f in FAMILIES.values() if f.model_type == model_type)
    for moe in ("num_experts", "num_local_experts", "n_routed_experts"):
        _no(moe, hf, "mixture-of-experts layers are not implemented")
    _no("mlp_bias", hf, "the feed-forward has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise AdapterError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU) is")
    theta, scaling = _rope(hf)
    extra = family.read(hf)
    n_heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or d_model // n_heads
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d_model, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_head=None if head_dim * n_heads == d_model else head_dim,
        d_ff=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=bool(hf.get("tie_word_embeddings")),
        init_std=hf.get("initializer_range", 0.02), family=family.name, **extra)
    cfg.check(f"{model_type} config")
    return cfg


def to_hf_config(cfg: ModelConfig, **token_ids: int | None) -> tuple[Family, dict]:
    """The family an export writes and the keyword arguments of its config class (token ids pass through)."""
    family = family_of(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.type, "rope_theta": cfg.rope_theta,
                **{k: getattr(s, k) for k in ROPE_FIELDS[s.type] if getattr(s, k) is not None}}
    return family, dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        **family.write(cfg), **token_ids)


class HFWeights(Mapping):
    """A folder's safetensors weights by key, read one tensor at a time on access (memory-mapped files)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            "model.safetensors"]
        self.files, self.where = {}, {}
        for name in files:
            if not (folder / name).is_file():
                raise AdapterError(f"{folder / name}: missing (only safetensors weights are read; *.bin is refused)")
            handle = self.files[name] = safe_open(str(folder / name), framework="pt")
            self.where |= dict.fromkeys(handle.keys(), name)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get_tensor(key)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self.files[f].get_slice(k).get_shape()) for k, f in self.where.items()}


def read_hf_config(folder: str | Path) -> ModelConfig:
    """A family's folder's config.json as our ModelConfig; errors name the file."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise AdapterError(f"{folder}: no config.json (expected a transformers model folder)")
    try:
        return from_hf_config(json.loads(config.read_text()))
    except AdapterError as e:
        raise AdapterError(f"{config}: {e}") from None


def open_hf_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, Callable[[], torch.Tensor]]]:
    """A family's folder: its config, and each of our parameters as a function that reads and converts it (fp32),
    one at a time. Keys and shapes are checked against the config first."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    weights = HFWeights(folder)
    try:
        check_hf_shapes(weights.shapes(), cfg)
    except AdapterError as e:
        raise AdapterError(f"{folder}: {e}") from None
    if cfg.tie_embeddings and "lm_head.weight" in weights and not torch.equal(weights["lm_head.weight"],
                                                                              weights["model.embed_tokens.weight"]):
        raise AdapterError(f"{folder / 'config.json'}: tie_word_embeddings is true but lm_head.weight differs from "
                           "model.embed_tokens.weight")

    def reader(keys, fn):
        return lambda: fn(*(weights[k] for k in keys)).float()

    return cfg, {name: reader(keys, fn) for name, (keys, fn) in hf_recipe(cfg).items()}


def load_hf_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A family's folder: its config and all weights in our layout (fp32), read from safetensors only."""
    cfg, readers = open_hf_folder(folder)
    state = {name: read() for name, read in readers.items() if name != "output.weight" or not cfg.tie_embeddings}
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return cfg, state


def model_section(folder: str | Path) -> dict:
    """The model section (a mapping of `ModelConfig` keys) of a family's folder, for `model: init_from`; of a
    MarianMTModel folder, a translation model section."""
    import dataclasses

    from llm.export.marian_import import is_marian_folder
    from llm.export.marian_import import model_section as marian_section

    if is_marian_folder(folder):
        return marian_section(folder)
    return dataclasses.asdict(read_hf_config(folder))
