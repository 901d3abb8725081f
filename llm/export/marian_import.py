"""Import a `transformers` MarianMTModel folder (OPUS-MT) into our encoder-decoder: config, weights, checks.

A Marian model is our paper-style encoder-decoder (post-norm LayerNorm with eps 1e-5, sinusoidal positions,
biased projections, embeddings scaled by sqrt(d_model)) with a bias on the output logits (`final_logits_bias`,
ours `model.output_bias`) and, in OPUS-MT, the swish feed-forward (`activation: swish`). `from_marian_config` maps
its config.json onto our model section and refuses, naming the field, what our model does not implement: separate
source and target vocabularies, unscaled embeddings, different encoder and decoder widths or head counts, other
activations, a decoder start other than the padding token. The weights are the inverse of the export's mapping
(`marian.from_marian_state_dict`), read from safetensors only. Training-only settings (attention and activation
dropout, layer drop) are not carried over; `dropout` is.

`open_marian_folder` is what `train.init_from` uses (a reader per parameter, as for the decoder families);
`load_marian_folder` builds the whole model (`llm translate FOLDER`) with decoding defaults from its
generation_config.json.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from llm.config import DecodeConfig, RunConfig, TranslationDataConfig, TranslationModelConfig
from llm.export.layout import AdapterError

MODEL_TYPE = "marian"
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: cannot read it as JSON: {e}") from None


def is_marian_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, json.JSONDecodeError):
        return False


def from_marian_config(hf: dict) -> TranslationModelConfig:
    """Our model section for a MarianMTModel config.json; AdapterError naming the field for what we lack."""
    def get(key, default=None):
        return hf.get(key, default)

    problems = []
    vocab, decoder_vocab = get("vocab_size", 58101), get("decoder_vocab_size") or get("vocab_size", 58101)
    if decoder_vocab != vocab:
        problems.append(f"decoder_vocab_size={decoder_vocab} differs from vocab_size={vocab} (separate source and "
                        "target vocabularies: our encoder-decoder has one id space)")
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if get(enc) != get(dec):
            problems.append(f"{enc}={get(enc)} differs from {dec}={get(dec)} (ours are equal)")
    act = get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        problems.append(f"activation_function={act!r} (supported: {', '.join(ACTIVATIONS)})")
    if not get("scale_embedding", False):
        problems.append("scale_embedding=false (our embeddings are scaled by sqrt(d_model))")
    if get("decoder_start_token_id") != get("pad_token_id"):
        problems.append(f"decoder_start_token_id={get('decoder_start_token_id')} is not pad_token_id="
                        f"{get('pad_token_id')} (Marian's tokenizer starts the decoder from padding)")
    for flag in ("normalize_before", "add_final_layer_norm", "normalize_embedding", "layernorm_embedding"):
        if get(flag):
            problems.append(f"{flag}=true (Marian's layers are post-norm without extra norms)")
    if get("d_model", 0) % max(1, get("encoder_attention_heads", 1) or 1) or get("d_model", 0) % 2:
        problems.append(f"d_model={get('d_model')} must be even and divisible by the heads")
    if problems:
        raise AdapterError("not supported: " + "; ".join(problems))
    share = bool(get("share_encoder_decoder_embeddings", True))
    return TranslationModelConfig(
        vocab_size=vocab, d_model=get("d_model"), n_encoder_layers=get("encoder_layers"),
        n_decoder_layers=get("decoder_layers"), n_heads=get("encoder_attention_heads"), d_ff=get("encoder_ffn_dim"),
        dropout=float(get("dropout", 0.1)), activation=ACTIVATIONS[act], norm="post", norm_type="layernorm",
        norm_eps=1e-5, positions="sinusoidal", bias=True, max_seq_len=get("max_position_embeddings", 512),
        share_embeddings=share, output_bias=True)


def read_marian_config(folder: str | Path) -> TranslationModelConfig:
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise AdapterError(f"{folder}: no config.json (expected a transformers MarianMTModel folder)")
    hf = _read_json(config)
    if hf.get("model_type") != MODEL_TYPE:
        raise AdapterError(f"{config}: model_type is {hf.get('model_type')!r}; a translation run starts from a "
                           f"MarianMTModel ({MODEL_TYPE!r})")
    try:
        return from_marian_config(hf)
    except AdapterError as e:
        raise AdapterError(f"{config}: {e}") from None


def model_section(folder: str | Path) -> dict:
    """`model: init_from` of a translation run: the folder's model as a mapping of our model keys."""
    return dataclasses.asdict(read_marian_config(folder))


def check_same_model(ours: TranslationModelConfig, theirs: TranslationModelConfig, where: str) -> None:
    """The run's model section must describe the folder's model (attention backend, dropout and the longest
    sentence may differ: sinusoidal positions extend to any length)."""
    diffs = [f"model.{f.name}: {where} has {getattr(theirs, f.name)!r}, the config {getattr(ours, f.name)!r}"
             for f in dataclasses.fields(TranslationModelConfig)
             if f.name not in ("attention", "dropout", "max_seq_len") and getattr(ours, f.name) != getattr(theirs,
                                                                                                         f.name)]
    if diffs:
        raise AdapterError(f"{where} does not match the run's model section (use `model: init_from`):\n  "
                           + "\n  ".join(diffs))


def check_tokenizer(folder: str | Path, cfg: TranslationModelConfig, tokenizer) -> None:
    """The folder's tokenizer must agree with its config on EOS, padding (= the decoder start) and vocabulary."""
    hf = _read_json(Path(folder) / "config.json")
    pairs = [("eos_token_id", hf.get("eos_token_id"), tokenizer.token_id("eos")),
             ("pad_token_id", hf.get("pad_token_id"), tokenizer.token_id("pad"))]
    wrong = [f"{key}={theirs} but the tokenizer's is {mine}" for key, theirs, mine in pairs if theirs != mine]
    if tokenizer.vocab_size > cfg.vocab_size:
        wrong.append(f"the tokenizer has {tokenizer.vocab_size} tokens, vocab_size is {cfg.vocab_size}")
    if wrong:
        raise AdapterError(f"{Path(folder) / 'config.json'}: " + "; ".join(wrong))


def open_marian_folder(folder: str | Path) -> tuple[TranslationModelConfig, dict[str, Callable[[], torch.Tensor]]]:
    """A MarianMTModel folder: its config as ours, and each of our parameters (every name of a tied one) as a
    function giving it in fp32. The conversion permutes whole matrices, so it is done once, on first use; a Marian
    model is small next to a process's memory (OPUS-MT big: 0.9 GB in fp32)."""
    from llm.export.families import HFWeights
    from llm.export.marian import from_marian_state_dict

    folder = Path(folder)
    cfg = read_marian_config(folder)
    weights = HFWeights(folder)
    converted: dict[str, torch.Tensor] = {}

    def convert() -> dict[str, torch.Tensor]:
        if not converted:
            hf = {k: weights[k] for k in weights}
            if cfg.share_embeddings and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"],
                                                                                   hf["model.shared.weight"]):
                raise AdapterError(f"{folder}: lm_head.weight differs from the shared embeddings (untied output "
                                   "with shared input embeddings is not supported)")
            try:
                converted.update(from_marian_state_dict(hf, cfg))
            except KeyError as e:
                raise AdapterError(f"{folder}: weight {e} is missing (not a MarianMTModel checkpoint?)") from None
        return converted

    names = [name for name, _ in _our_shapes(cfg)]
    return cfg, {name: (lambda n=name: convert()[n].float()) for name in names}


def _our_shapes(cfg: TranslationModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    from llm.models.encoder_decoder import build_translation_model

    return [(k, tuple(v.shape)) for k, v in build_translation_model(cfg, device="meta").state_dict().items()]


def decode_defaults(folder: str | Path) -> DecodeConfig:
    """Beam size and length penalty of the folder's generation_config.json (OPUS-MT: 4 or 6 beams, penalty 1)."""
    path = Path(folder) / "generation_config.json"
    gen = _read_json(path) if path.is_file() else {}
    return DecodeConfig(beam_size=int(gen.get("num_beams") or 1), length_penalty=float(gen.get("length_penalty", 1.0)))


def load_marian_folder(folder: str | Path):
    """(our model with the folder's weights, fp32, eval mode; a run config describing it) for `llm translate`."""
    from llm.models.encoder_decoder import build_translation_model

    cfg, readers = open_marian_folder(folder)
    model = build_translation_model(cfg)
    model.load_state_dict({name: read() for name, read in readers.items()}, strict=True)
    run = RunConfig(task="translation", model=cfg, data=TranslationDataConfig(), decode=decode_defaults(folder))
    return model.eval(), run
