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


def marian_tokenizer_files(folder: Path, pairs: list[tuple[str, str]], vocab_size: int = 120) -> Path:
    """An OPUS-MT style tokenizer: SentencePiece unigram models trained on each side (source.spm, target.spm) and one
    vocab.json over both sides' pieces, "</s>" 0, "<unk>" 1, "<pad>" last (Marian's layout)."""
    import io
    import json

    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    pieces = []
    for side, name in ((0, "source.spm"), (1, "target.spm")):
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter([p[side] for p in pairs]), model_writer=buffer,
                                       vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
                                       hard_vocab_limit=False, minloglevel=2)
        (folder / name).write_bytes(buffer.getvalue())
        sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
        pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                   if not sp.is_control(i) and not sp.is_unknown(i)]
    vocab = ["</s>", "<unk>"] + list(dict.fromkeys(pieces)) + ["<pad>"]
    (folder / "vocab.json").write_text(json.dumps({piece: i for i, piece in enumerate(vocab)}, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer",
                                                              "model_max_length": 512}))
    return folder


def random_marian(vocab_size: int, seed: int = 0, perturb: bool = True, **overrides):
    """A random MarianMTModel as OPUS-MT's are built (swish, scaled shared embeddings, pad = decoder start = last id);
    `perturb`: with a non-zero final_logits_bias, perturbed LayerNorms and sharp attention, so that a misplaced one
    shows (otherwise `transformers`' own initialisation)."""
    torch.manual_seed(seed)
    config = transformers.MarianConfig(**(dict(
        vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function="swish",
        max_position_embeddings=128, scale_embedding=True, pad_token_id=vocab_size - 1, eos_token_id=0,
        decoder_start_token_id=vocab_size - 1, forced_eos_token_id=0, dropout=0.1, attention_dropout=0.0,
        activation_dropout=0.0) | overrides))
    config._attn_implementation = "eager"
    model = transformers.MarianMTModel(config).eval()
    if not perturb:
        return model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
            elif p.ndim == 2:
                p.normal_(0, 0.2)
        model.final_logits_bias.normal_(0, 0.5)
    return model


def marian_folder(folder: Path, pairs: list[tuple[str, str]], seed: int = 0, spm_vocab: int = 120,
                  perturb: bool = True, **overrides) -> Path:
    """What a user downloads from an OPUS-MT repository: config.json, model.safetensors, generation_config.json
    (4 beams), source.spm, target.spm, vocab.json, tokenizer_config.json."""
    import json

    marian_tokenizer_files(folder, pairs, spm_vocab)
    vocab_size = len(json.loads((folder / "vocab.json").read_text()))
    model = random_marian(vocab_size, seed, perturb, **overrides)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=vocab_size - 1, eos_token_id=0, pad_token_id=vocab_size - 1, forced_eos_token_id=0,
        bad_words_ids=[[vocab_size - 1]], num_beams=4, max_length=128)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
