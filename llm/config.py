"""Typed configuration: one dataclass per component, loaded from YAML, overridden from the command line.

A run config is a YAML file with one mapping per section (`model`, `data`, `optim`, `train`). Each section is
checked against its dataclass: unknown keys, wrong types and impossible values raise `ConfigError` with the key,
the value and the file named, before any work starts. `section.key=value` overrides from the command line are
parsed as YAML scalars and checked the same way.

The `model` section may also be a string: the name of a preset in `configs/model/` (e.g. `tiny`) or a path to a
model YAML file, relative to the run config. A model preset file holds the `ModelConfig` fields at top level.
`model: init_from` takes the model of the `train.init_from` folder (resolved by the CLI, see `load_config`).

`task` (top level) selects what is trained: `lm` (the decoder, `ModelConfig` and `DataConfig`) or `translation`
(the encoder-decoder, `TranslationModelConfig` and `TranslationDataConfig`, plus the `decode` section for BLEU).
The other sections are shared. A preset with encoder and decoder layer counts is a translation preset.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "eager", "varlen")  # llm.attention.NAMES; see selection.py


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible. The message names key, value and file."""


def _fail(source: str, key: str, value: Any, reason: str) -> typing.NoReturn:
    raise ConfigError(f"{source}: {key} = {value!r}: {reason}")


# --------------------------------------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RopeScaling:
    """RoPE frequency scaling, as `transformers` computes it (`rope_parameters`): how a model pretrained at one
    context length runs at a longer one. `llama3`: Llama 3.1/3.2's per-band rescaling (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings); `linear`: every frequency divided by factor; `yarn`: YaRN
    (factor, original_max_position_embeddings, beta_fast, beta_slow; attention_factor scales cos and sin)."""

    type: Literal["llama3", "linear", "yarn"] = "llama3"
    factor: float = 8.0
    original_max_position_embeddings: int | None = None  # llama3, yarn: the context length pretrained at
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; null: 0.1 * ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dimensions

    def check(self, source: str, prefix: str) -> None:
        if self.factor < 1:
            _fail(source, f"{prefix}.factor", self.factor, "must be at least 1")
        if self.type in ("llama3", "yarn") and not (self.original_max_position_embeddings or 0) > 0:
            _fail(source, f"{prefix}.original_max_position_embeddings", self.original_max_position_embeddings,
                  f"{self.type} scaling needs the pretraining context length (a positive integer)")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            _fail(source, f"{prefix}.high_freq_factor", self.high_freq_factor,
                  f"must be larger than low_freq_factor = {self.low_freq_factor} (both positive)")
        if self.attention_factor is not None and self.attention_factor <= 0:
            _fail(source, f"{prefix}.attention_factor", self.attention_factor, "must be positive (or null)")


@dataclass
class ModelConfig:
    """Shape of a Llama-style decoder. Defaults are the Llama-2-7B shape.

    The features of other families are fields, never implied by a name: q/k/v biases (Qwen2), RMSNorm on queries
    and keys (Qwen3), RoPE scaling (Llama 3.1+), a head size apart from d_model / n_heads, a sliding window.
    `family` only says which `transformers` class an export writes.
    """

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads); 1: multi-query attention
    d_head: int | None = None  # size of one attention head; None: d_model // n_heads
    d_ff: int | None = None  # SwiGLU hidden size; None: Llama's rule, 8/3 * d_model rounded up to ffn_multiple_of
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: RoPE as pretrained (no scaling)
    attention_bias: bool = False  # biases on the q, k and v projections (Qwen2); the output projection has none
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    # Attention looks back at most this many tokens (Mistral 7B v0.1). Up to the window that is full causal
    # attention, which is what runs; longer sequences are refused. None: no window.
    sliding_window: int | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention: Literal["auto", "flash", "sdpa", "eager", "varlen"] = "auto"
    init_std: float = 0.02
    # The transformers class `llm export` writes: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or
    # Qwen3ForCausalLM. auto: qwen3 with qk_norm, qwen2 with attention_bias, mistral with a sliding window, else llama.
    family: Literal["auto", "llama", "mistral", "qwen2", "qwen3"] = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        hidden = int(2 * 4 * self.d_model / 3)
        return self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)

    @property
    def context(self) -> int:
        """The longest sequence the model runs: max_seq_len, or the sliding window if shorter."""
        return min(self.max_seq_len, self.sliding_window or self.max_seq_len)

    @property
    def export_family(self) -> str:
        """`family`, with auto resolved from the features."""
        if self.family != "auto":
            return self.family
        return "qwen3" if self.qk_norm else "qwen2" if self.attention_bias else (
            "mistral" if self.sliding_window else "llama")

    def check(self, source: str, prefix: str = "model") -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_multiple_of", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        if self.d_head is None and self.d_model % self.n_heads:
            _fail(source, f"{prefix}.n_heads", self.n_heads, f"must divide {prefix}.d_model = {self.d_model} "
                                                             f"(or set {prefix}.d_head)")
        if self.d_head is not None and self.d_head <= 0:
            _fail(source, f"{prefix}.d_head", self.d_head, "must be positive (or null: d_model / n_heads)")
        if self.head_dim % 2:
            _fail(source, f"{prefix}.{'n_heads' if self.d_head is None else 'd_head'}",
                  self.n_heads if self.d_head is None else self.d_head,
                  f"gives head_dim = {self.head_dim}; RoPE needs an even head_dim")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            _fail(source, f"{prefix}.n_kv_heads", self.n_kv_heads,
                  f"must be a positive divisor of {prefix}.n_heads = {self.n_heads}")
        if self.d_ff is not None and self.d_ff <= 0:
            _fail(source, f"{prefix}.d_ff", self.d_ff, "must be positive (or null for Llama's rule)")
        if self.sliding_window is not None and self.sliding_window <= 0:
            _fail(source, f"{prefix}.sliding_window", self.sliding_window, "must be positive (or null: no window)")
        if self.rope_scaling is not None:
            self.rope_scaling.check(source, f"{prefix}.rope_scaling")


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
    # sha256 of every shard once per dataset (recorded next to its manifest), a stat check at every start and a
    # block checksum on first read; false: sizes and headers only
    verify_checksums: bool = True

    def check(self, source: str, prefix: str = "data") -> None:
        if self.seq_len <= 0:
            _fail(source, f"{prefix}.seq_len", self.seq_len, "must be positive")
        for i, entry in enumerate(self.datasets):
            entry.check(source, f"{prefix}.datasets[{i}]")


@dataclass
class TranslationModelConfig:
    """Shape of an encoder-decoder translation model. Defaults are transformer-base."""

    vocab_size: int = 37000  # joint source/target vocabulary (the paper's shared BPE vocabulary for WMT14 en-de)
    d_model: int = 512
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1  # residual dropout: each sub-layer's output and the embedding + position sums
    # swiglu: silu(x W_gate) * (x W_up), then W_down (d_ff is the hidden size; no biases), as the decoder's;
    # swish: silu(x W1) W2 (OPUS-MT's Marian models)
    activation: Literal["relu", "gelu", "swish", "swiglu"] = "relu"
    norm: Literal["post", "pre"] = "post"
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    # sinusoidal: the paper's encodings added to the embeddings; rope: rotary embeddings of queries and keys in
    # self-attention (none in cross-attention)
    positions: Literal["sinusoidal", "rope"] = "sinusoidal"
    rope_theta: float = 10000.0
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads)
    bias: bool = True  # biases in the attention projections and the relu/gelu feed-forward
    max_seq_len: int = 1024  # longest source or target (with EOS / BOS)
    share_embeddings: bool = True
    output_bias: bool = False  # a bias on the output logits (Marian's final_logits_bias)
    attention: Literal["auto", "flash", "sdpa", "eager", "varlen"] = "auto"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def check(self, source: str, prefix: str = "model") -> None:
        for name in ("vocab_size", "d_model", "n_encoder_layers", "n_decoder_layers", "n_heads", "d_ff",
                     "max_seq_len", "norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        if self.d_model % self.n_heads:
            _fail(source, f"{prefix}.n_heads", self.n_heads, f"must divide {prefix}.d_model = {self.d_model}")
        if self.d_model % 2:
            _fail(source, f"{prefix}.d_model", self.d_model, "must be even (sine and cosine encodings come in pairs)")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            _fail(source, f"{prefix}.n_kv_heads", self.n_kv_heads, "must be positive (or null: n_heads)")
        if self.n_heads % self.kv_heads:
            _fail(source, f"{prefix}.n_kv_heads", self.n_kv_heads, f"must divide {prefix}.n_heads = {self.n_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            _fail(source, f"{prefix}.positions", self.positions, f"rotary positions need an even head size "
                                                                   f"(d_model / n_heads = {self.head_dim})")
        if not 0 <= self.dropout < 1:
            _fail(source, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class TranslationDataConfig:
    """Where the packed sentence pairs are, how batches are made, and what BLEU is measured on."""

    path: str = ""  # a folder written by data_prep.pack_translation
    max_tokens: int = 4096  # per process per micro-batch: batch size * longest side, padding included
    max_sentences: int | None = None  # optional cap on pairs per batch
    seed: int = 1234
    verify_checksums: bool = True  # as DataConfig.verify_checksums
    # BLEU during training (every train.eval_every): these files (one sentence per line, aligned), or else the
    # first bleu_sentences pairs of the packed validation split, decoded back to text. 0 sentences: no BLEU.
    bleu_source: str | None = None
    bleu_reference: str | None = None
    bleu_sentences: int = 200

    def check(self, source: str, prefix: str = "data") -> None:
        if self.max_tokens <= 0:
            _fail(source, f"{prefix}.max_tokens", self.max_tokens, "must be positive")
        if self.max_sentences is not None and self.max_sentences <= 0:
            _fail(source, f"{prefix}.max_sentences", self.max_sentences, "must be positive (or null: no cap)")
        if self.bleu_sentences < 0:
            _fail(source, f"{prefix}.bleu_sentences", self.bleu_sentences, "must not be negative (0 disables)")
        if (self.bleu_source is None) != (self.bleu_reference is None):
            _fail(source, f"{prefix}.bleu_reference", self.bleu_reference,
                  "bleu_source and bleu_reference go together (both files, or neither)")


@dataclass
class DecodeConfig:
    """Beam search for translation (training-time BLEU, `llm translate`, the exported generation config)."""

    beam_size: int = 5  # 1: greedy
    length_penalty: float = 1.0  # 0: raw log-probability; > 0 favours longer translations
    max_len_a: float = 1.2  # a target has at most max_len_a * source length + max_len_b tokens
    max_len_b: int = 10
    batch_size: int = 64  # sentences decoded at once
    bleu_tokenize: str = "13a"  # sacreBLEU's tokenizer (13a: its default; zh, ja-mecab, intl, ...)

    def check(self, source: str, prefix: str = "decode") -> None:
        for name in ("beam_size", "batch_size"):
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        for name in ("length_penalty", "max_len_a", "max_len_b"):
            if getattr(self, name) < 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must not be negative")


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
    # inverse_sqrt: fairseq's (the standard one for translation): linear warmup, then lr * sqrt(warmup / step)
    schedule: Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt"] = "cosine"
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
        if self.schedule == "inverse_sqrt" and self.warmup_steps == 0:
            _fail(source, f"{prefix}.warmup_steps", self.warmup_steps,
                  "inverse_sqrt decays as sqrt(warmup_steps / step): it needs warmup_steps > 0")


@dataclass
class TrainConfig:
    """Length, batch shape, precision and bookkeeping of a run."""

    output_dir: str = "runs/default"
    steps: int = 1000
    micro_batch_size: int = 8  # sequences per process per forward
    grad_accum: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # bf16 runs: gradients are accumulated over micro-batches in fp32 either way; this is the dtype they are
    # reduced across processes in. fp32 (default) is exact; bf16 halves the traffic on bandwidth-bound clusters.
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: bool = False  # ZeRO-3 optimizer and parameter offload to CPU
    deepspeed_config: str | None = None  # a custom sharding JSON; default configs/deepspeed/zero<stage>[_offload]
    # a transformers folder to start from: Llama, Mistral, Qwen2, Qwen3 (task lm) or MarianMTModel (translation)
    init_from: str | None = None
    seed: int = 1234
    activation_checkpointing: bool = False
    # Ulysses sequence parallelism: each sequence is split over this many consecutive ranks (attention all-to-alls
    # heads for sequence); data parallelism runs over processes / sequence_parallel groups. 1: off.
    sequence_parallel: int = 1
    compile: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic validation
    # lm: validation windows per dataset, a seeded sample spread over the whole validation split (all of it when it
    # has fewer), the same on any number of processes
    eval_windows: int = 512
    eval_batches: int = 20  # translation: validation batches per process
    # lm: lm-evaluation-harness tasks (names, or paths of task YAML files) scored every eval_every steps
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | None = None  # at most this many examples of each of eval_tasks (None: all)
    save_every: int = 0  # 0: save only at the end and on a signal
    save_at_end: bool = True  # false: no checkpoint at the last step (throwaway runs, benchmarks); signals still save
    keep_last: int = 3
    peak_tflops: float | None = None  # per-device peak for MFU; None: from the known-GPU table
    label_smoothing: float | None = None  # None: 0.1 for translation (as the paper), 0 for lm
    # A collective (all-reduce, all-gather, barrier) that has not completed after this many seconds means a rank
    # stopped answering: every rank then exits non-zero instead of hanging. Long enough for the slowest legitimate
    # wait between two collectives (a checkpoint save or an evaluation on one rank), short enough to notice a hang.
    collective_timeout_s: float = 1800.0

    def check(self, source: str, prefix: str = "train") -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every", "eval_windows", "eval_batches",
                     "keep_last", "sequence_parallel"):
            if getattr(self, name) <= 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must be positive")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                _fail(source, f"{prefix}.{name}", getattr(self, name), "must not be negative (0 disables)")
        if self.offload and self.zero_stage != 3:
            _fail(source, f"{prefix}.offload", self.offload, "CPU offload needs train.zero_stage = 3")
        if self.eval_tasks and not self.eval_every:
            _fail(source, f"{prefix}.eval_tasks", self.eval_tasks, "needs train.eval_every > 0 (when to score them)")
        if self.eval_limit is not None and self.eval_limit <= 0:
            _fail(source, f"{prefix}.eval_limit", self.eval_limit, "must be positive (or null: every example)")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            _fail(source, f"{prefix}.peak_tflops", self.peak_tflops, "must be positive")
        if self.collective_timeout_s <= 0:
            _fail(source, f"{prefix}.collective_timeout_s", self.collective_timeout_s, "must be positive")
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            _fail(source, f"{prefix}.label_smoothing", self.label_smoothing, "must be in [0, 1)")


TASKS = ("lm", "translation")
# The model and data sections of each task; the other sections are shared.
TASK_SECTIONS: dict[str, dict[str, type]] = {
    "lm": {"model": ModelConfig, "data": DataConfig},
    "translation": {"model": TranslationModelConfig, "data": TranslationDataConfig},
}


@dataclass
class RunConfig:
    """A whole run: every component's config. `source` is the file it was read from (for error messages)."""

    task: Literal["lm", "translation"] = "lm"
    model: ModelConfig | TranslationModelConfig = field(default_factory=ModelConfig)
    data: DataConfig | TranslationDataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # translation only

    @property
    def label_smoothing(self) -> float:
        if self.train.label_smoothing is not None:
            return self.train.label_smoothing
        return 0.1 if self.task == "translation" else 0.0

    def check(self, source: str) -> None:
        for name, cls in TASK_SECTIONS[self.task].items():
            if not isinstance(getattr(self, name), cls):
                _fail(source, name, type(getattr(self, name)).__name__,
                      f"task {self.task!r} needs a {cls.__name__} section")
        self.model.check(source)
        self.data.check(source)
        self.optim.check(source)
        self.train.check(source)
        self.decode.check(source)
        if self.task == "translation" and self.train.eval_tasks:
            _fail(source, "train.eval_tasks", self.train.eval_tasks,
                  "scores language models; translation runs report BLEU and chrF (data.bleu_sentences)")
        if self.train.sequence_parallel > 1:
            self._check_sequence_parallel(source)
        if self.train.init_from:
            self._check_init_from(source)
        if self.task == "lm" and self.data.seq_len > self.model.max_seq_len:
            _fail(source, "data.seq_len", self.data.seq_len,
                  f"exceeds model.max_seq_len = {self.model.max_seq_len}")
        if self.task == "lm" and self.data.seq_len > self.model.context:
            _fail(source, "data.seq_len", self.data.seq_len,
                  f"exceeds model.sliding_window = {self.model.sliding_window}: attention beyond the window is not "
                  "implemented (sequences up to the window are exact)")

    def _check_init_from(self, source: str) -> None:
        """A translation run starts from a MarianMTModel folder, a language model from a decoder family's."""
        import json

        try:
            model_type = json.loads((Path(self.train.init_from) / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return  # read, and refused naming the file, when the model is built
        if (model_type == "marian") != (self.task == "translation"):
            wanted = ("a MarianMTModel folder" if self.task == "translation" else
                      "a Llama, Mistral, Qwen2 or Qwen3 folder")
            _fail(source, "train.init_from", self.train.init_from,
                  f"holds a {model_type!r} model; task {self.task!r} starts from {wanted}")

    def _check_sequence_parallel(self, source: str) -> None:
        """What can be split N ways: the sequence (into equal slices) and the heads (each rank attends with 1/N of
        the query heads; key/value heads are split too, or repeated when there are fewer than N)."""
        n, key = self.train.sequence_parallel, "train.sequence_parallel"
        if self.task != "lm":
            _fail(source, key, n, "splits the sequences of language models; translation batches are sentences")
        if self.data.seq_len % n:
            _fail(source, key, n, f"must divide data.seq_len = {self.data.seq_len} (equal slices per rank)")
        if self.model.n_heads % n:
            _fail(source, key, n, f"must divide model.n_heads = {self.model.n_heads} (each rank attends with "
                                  "n_heads / sequence_parallel heads)")
        kv = self.model.kv_heads
        if kv % n and n % kv:
            _fail(source, key, n, f"and model.n_kv_heads = {kv}: one must divide the other (key/value heads are "
                                  "split over the ranks, or repeated when there are fewer)")


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
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _coerce(value, arg, key, source)  # a mapping for a section: its own error names the key
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads `3e-4` (no dot) as a string; accept any string that is a plain number.
        elif isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            number = float(value)
        if number is None:
            _fail(source, key, value, "expected a number")
        if not math.isfinite(number):  # YAML's .nan / .inf: no setting of ours means anything with them
            _fail(source, key, value, "expected a finite number (not NaN or infinity)")
        return number
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


def model_config_class(data: dict) -> type:
    """The config class a model mapping describes: encoder and decoder layer counts make a translation model."""
    if {"n_encoder_layers", "n_decoder_layers"} & set(data):
        return TranslationModelConfig
    return ModelConfig


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig | TranslationModelConfig:
    """Load a model preset file (the model config's fields at top level), with `key=value` overrides."""
    path = resolve_preset(str(path))
    data = _read_yaml(path)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "model":
            parts = parts[1:]
        _apply_override(data, parts, value)
    cfg = build(model_config_class(data), data, source=str(path), prefix="model")
    cfg.check(str(path))
    return cfg


FROM_INIT = "init_from"  # `model: init_from`: the model section is the `train.init_from` folder's model


def _model_from_init(data: dict, overrides: list[str], model_of, source: str) -> dict:
    train = data.get("train")
    init_from = train.get("init_from") if isinstance(train, dict) else None
    for text in overrides:  # a command-line train.init_from wins
        parts, value = parse_override(text)
        if parts == ["train", "init_from"]:
            init_from = value
    if not isinstance(init_from, str) or not init_from:
        _fail(source, "model", FROM_INIT, "takes the model of train.init_from, which is not set")
    if model_of is None:
        _fail(source, "model", FROM_INIT, "is resolved by `llm train` and `llm info`, not here")
    try:
        return model_of(init_from)
    except (ValueError, OSError) as e:  # an unreadable or unsupported folder: one line naming it
        _fail(source, "model", FROM_INIT, f"train.init_from: {e}")


def load_config(path: str | Path, overrides: list[str] = (),
                model_of: typing.Callable[[str], dict] | None = None) -> RunConfig:
    """Load a run config YAML, apply `section.key=value` overrides, check everything, return a RunConfig.

    A file without a `model`, `data`, `optim` or `train` section but with model keys is read as a model preset,
    so `llm info configs/model/7b.yaml` and `llm info configs/train/tiny.yaml` both work.

    `model: init_from` takes the model section from the `train.init_from` folder: `model_of(folder)` gives it as
    a mapping of model keys (the CLI passes `llm.export.families.model_section`); `model.key=value` overrides then
    apply to it as to a preset.
    """
    path = Path(path)
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        path = resolve_preset(str(path))  # a bare preset name, e.g. `7b`
    data = _read_yaml(path)
    source = str(path)
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    if data and not (set(data) & sections):
        if model_config_class(data) is TranslationModelConfig:
            data = {"task": "translation", "model": data}
        else:  # train windows default to the model's full context, one per micro-batch (what `llm info` sizes)
            data = {"model": data, "data": {"seq_len": data.get("max_seq_len", ModelConfig.max_seq_len)},
                    "train": {"micro_batch_size": 1}}
    if data.get("model") == FROM_INIT:
        data["model"] = _model_from_init(data, overrides, model_of, str(path))
    elif isinstance(data.get("model"), str):
        preset = resolve_preset(data["model"], relative_to=path)
        data["model"] = _read_yaml(preset)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "model" and len(parts) == 2 and parts[1] == "preset":
            data["model"] = _read_yaml(resolve_preset(str(value)))
            continue
        _apply_override(data, parts, value)
    if overrides:
        source += " (with command-line overrides)"
    task = _coerce(data.get("task", "lm"), Literal["lm", "translation"], "task", source)
    for name, cls in TASK_SECTIONS[task].items():
        section = data.get(name, {})
        if name == "model" and isinstance(section, dict) and model_config_class(section) is not cls:
            _fail(source, "task", task, f"the model section describes a {model_config_class(section).__name__}; "
                                        f"set task: {'translation' if cls is ModelConfig else 'lm'}")
        data[name] = build(cls, section, source=source, prefix=name)
    cfg = build(RunConfig, data, source=source)
    cfg.check(source)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, e.g. next to a checkpoint or export."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
