"""Typed configuration: one dataclass per component, loaded from YAML, overridden from the command line.

A run config is a YAML file with one mapping per section (`model`, `data`, `optim`, `train`). Each section is
checked against its dataclass: unknown keys, wrong types and impossible values raise `ConfigError` with the key,
the value and the file named, before any work starts. `section.key=value` overrides from the command line are
parsed as YAML scalars and checked the same way.

The `model` section may also be a string: the name of a preset in `configs/model/` (e.g. `tiny`) or a path to a
model YAML file, relative to the run config. A model preset file holds the `ModelConfig` fields at top level.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "eager")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible. The message names key, value and file."""


def _fail(source: str, key: str, value: Any, reason: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key} = {value!r}: {reason}")


# --------------------------------------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder. Defaults are the Llama-2-7B shape."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads); 1: multi-query attention
    d_ff: int | None = None  # SwiGLU hidden size; None: Llama's rule, 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention: Literal["auto", "flash", "sdpa", "eager"] = "auto"
    init_std: float = 0.02

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        hidden = int(2 * 4 * self.d_model / 3)
        return self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)

    def check(self, source: str, prefix: str = "model") -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_multiple_of", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        if self.d_model % self.n_heads:
            _fail(source, f"{prefix}.n_heads", self.n_heads, f"must divide {prefix}.d_model = {self.d_model}")
        if self.head_dim % 2:
            _fail(source, f"{prefix}.n_heads", self.n_heads,
                  f"gives head_dim = {self.head_dim}; RoPE needs an even head_dim")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            _fail(source, f"{prefix}.n_kv_heads", self.n_kv_heads,
                  f"must be a positive divisor of {prefix}.n_heads = {self.n_heads}")
        if self.d_ff is not None and self.d_ff <= 0:
            _fail(source, f"{prefix}.d_ff", self.d_ff, "must be positive (or null for Llama's rule)")


@dataclass
class DatasetEntry:
    """One packed dataset (a folder written by `data_prep.pack_lm`) and its weight in a mixture."""

    path: str = ""
    weight: float = 1.0

    def check(self, source: str, prefix: str) -> None:
        if not self.path:
            _fail(source, f"{prefix}.path", self.path, "must name a packed dataset folder")
        if self.weight <= 0:
            _fail(source, f"{prefix}.weight", self.weight, "must be positive")


@dataclass
class DataConfig:
    """Where the packed token shards are and how training windows are drawn from them."""

    datasets: list[DatasetEntry] = field(default_factory=list)  # one entry, or several blended by weight
    seq_len: int = 2048  # tokens per training window (the loader yields seq_len + 1 to shift targets)
    seed: int = 1234  # data order is a function of (seed, epoch, global sample index) only
    document_masking: bool = False  # position ids restart per document; attention stays within a document
    verify_checksums: bool = False  # sha256 every shard at start (sizes are always checked)

    def check(self, source: str, prefix: str = "data") -> None:
        if self.seq_len <= 0:
            _fail(source, f"{prefix}.seq_len", self.seq_len, "must be positive")
        for i, entry in enumerate(self.datasets):
            entry.check(source, f"{prefix}.datasets[{i}]")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms and biases
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd: fraction of the run spent decaying

    def check(self, source: str, prefix: str = "optim") -> None:
        if self.lr <= 0:
            _fail(source, f"{prefix}.lr", self.lr, "must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(source, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            _fail(source, f"{prefix}.betas", self.betas, "must be two numbers in [0, 1)")
        for name in ("eps", "weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must not be negative")
        if not 0 < self.decay_fraction <= 1:
            _fail(source, f"{prefix}.decay_fraction", self.decay_fraction, "must be in (0, 1]")


@dataclass
class TrainConfig:
    """Length, batch shape, precision and bookkeeping of a run."""

    output_dir: str = "runs/default"
    steps: int = 1000
    micro_batch_size: int = 8  # sequences per process per forward
    grad_accum: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False  # ZeRO-3 optimizer and parameter offload to CPU
    deepspeed_config: str | None = None  # a custom sharding JSON; default configs/deepspeed/zero<stage>[_offload]
    init_from: str | None = None  # a Hugging Face LlamaForCausalLM folder to start from (continued pretraining)
    seed: int = 1234
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic validation
    eval_batches: int = 20
    save_every: int = 0  # 0: save only at the end and on a signal
    keep_last: int = 3
    peak_tflops: float | None = None  # per-device peak for MFU; None: from the known-GPU table

    def check(self, source: str, prefix: str = "train") -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every", "eval_batches", "keep_last"):
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must not be negative (0 disables)")
        if self.offload and self.zero_stage != 3:
            _fail(source, f"{prefix}.offload", self.offload, "CPU offload needs train.zero_stage = 3")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            _fail(source, f"{prefix}.peak_tflops", self.peak_tflops, "must be positive")


@dataclass
class RunConfig:
    """A whole run: every component's config. `source` is the file it was read from (for error messages)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, source: str) -> None:
        self.model.check(source)
        self.data.check(source)
        self.optim.check(source)
        self.train.check(source)
        if self.data.seq_len > self.model.max_seq_len:
            _fail(source, "data.seq_len", self.data.seq_len,
                  f"exceeds model.max_seq_len = {self.model.max_seq_len}")


# --------------------------------------------------------------------------------------------------------------------
# Typed construction from plain YAML data
# --------------------------------------------------------------------------------------------------------------------

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError. Only lossless conversions are made."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError:
                pass
        _fail(source, key, value, f"expected {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        _fail(source, key, value, f"expected {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            _fail(source, key, value, f"expected {_type_name(tp)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(source, key, value, "expected a mapping")
        return build(tp, value, source=source, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(source, key, value, "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(source, key, value, "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept any string that is a plain number.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        _fail(source, key, value, "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(source, key, value, "expected a string")
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def build(cls: type, data: dict, *, source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type. Missing keys keep their defaults."""
    if not isinstance(data, dict):
        _fail(source, prefix or "<top level>", data, "expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{source}: unknown key {dotted!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, source)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Files and overrides
# --------------------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_preset(name: str, relative_to: Path | None = None) -> Path:
    """Find a model preset: a path (absolute, or relative to the referring file or the cwd) or a preset name."""
    candidates = []
    p = Path(name)
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to.parent / p)
    candidates += [p, PRESET_DIR / f"{name}.yaml", PRESET_DIR / name]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"model preset {name!r} not found (a file path, or one of: {', '.join(known)})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=10` -> (["train", "steps"], 10). The value is parsed as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"command line: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: {'.'.join(parts)}: {part!r} is not a section")
    node[parts[-1]] = value


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """Load a model preset file (ModelConfig fields at top level), with `key=value` overrides."""
    path = resolve_preset(str(path))
    data = _read_yaml(path)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "model":
            parts = parts[1:]
        _apply_override(data, parts, value)
    cfg = build(ModelConfig, data, source=str(path), prefix="model")
    cfg.check(str(path))
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a run config YAML, apply `section.key=value` overrides, check everything, return a RunConfig.

    A file without a `model`, `data`, `optim` or `train` section but with model keys is read as a model preset,
    so `llm info configs/model/7b.yaml` and `llm info configs/train/tiny.yaml` both work.
    """
    path = Path(path)
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        path = resolve_preset(str(path))  # a bare preset name, e.g. `7b`
    data = _read_yaml(path)
    source = str(path)
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    if data and not (set(data) & sections):
        # A model preset: train windows default to the model's full context.
        data = {"model": data, "data": {"seq_len": data.get("max_seq_len", ModelConfig.max_seq_len)}}
    if isinstance(data.get("model"), str):
        preset = resolve_preset(data["model"], relative_to=path)
        data["model"] = _read_yaml(preset)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "model" and len(parts) == 2 and parts[1] == "preset":
            data["model"] = _read_yaml(resolve_preset(str(value)))
            continue
        _apply_override(data, parts, value)
    cfg = build(RunConfig, data, source=source)
    cfg.check(source + (" (with command-line overrides)" if overrides else ""))
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, e.g. next to a checkpoint or export."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
