"""Export the encoder-decoder to a `transformers` MarianMTModel folder, verified before it is written.

MarianMTModel has the paper's layout: post-norm LayerNorm (eps 1e-5) layers with biased projections, fixed
sinusoidal positions, embeddings scaled by sqrt(d_model) (`scale_embedding`), and the encoder, decoder and output
embeddings shared. This is the only place its key names appear. What differs from our model:

1. Position encodings. Ours interleave sines and cosines (PE[p, 2i] = sin, PE[p, 2i+1] = cos, as the paper);
   Marian puts all sines first and all cosines after. Both use the same frequencies, so Marian's dimension m is
   our dimension PERM[m] with PERM = [0, 2, 4, ..., 1, 3, 5, ...]. Permuting d_model that way in every weight that
   reads or writes the residual stream (embeddings, the input side of q/k/v and fc1, the output side of the
   attention output and fc2, LayerNorm weights and biases) gives the same function; the positions table itself is
   not saved (Marian rebuilds it when loading).
2. We fuse k and v (`wkv`); Marian keeps k_proj and v_proj.
3. Marian adds `final_logits_bias`: our `output.bias` where the model has one (`output_bias`, as imported Marian
   models do), zeros otherwise.

Pre-norm models and a LayerNorm eps other than 1e-5 have no Marian equivalent and are refused.

The folder (config.json, model.safetensors, generation_config.json, the tokenizer with a post-processor that appends
EOS to every source, as our data does) is assembled under a temporary name, loaded back with `transformers` alone
and compared with our model: logits within LOGITS_TOL on padded batches, the same tokenisation, and identical greedy
translations, EOS forced at the same maximum length. Only then is it renamed to OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from llm.checkpoint.staging import staged_folder
from llm.export.layout import AdapterError
from llm.models.encoder_decoder import EncoderDecoder, TranslationModelConfig
from llm.translate import DecodeConfig, SpecialIds, encode_sources, greedy_search, max_lengths, pad_batch

LOGITS_TOL = 1e-4  # max abs logit difference, both sides in fp32 on the exported weights
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SOURCES = ["The quick brown fox jumps over the lazy dog.", "Hello, world!", "a", "1 2 3 4 5 6 7 8 9 10"]


class ExportVerificationError(RuntimeError):
    pass


def marian_permutation(d_model: int) -> torch.Tensor:
    """Marian's d_model index m -> ours: [0, 2, 4, ..., d - 2, 1, 3, ..., d - 1] (sines, then cosines)."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


NO_STOCK_CLASS = ("no stock transformers class fits this model (MarianMTModel, the encoder-decoder it could be, is "
                  "post-norm LayerNorm with sinusoidal positions, ReLU/GELU/swish feed-forwards and biased full-head "
                  "attention); `llm translate RUN` is its runtime")


def check_exportable(cfg: TranslationModelConfig) -> None:
    marian_has = {"norm_type": cfg.norm_type == "layernorm", "positions": cfg.positions == "sinusoidal",
                  "activation": cfg.activation in ("relu", "gelu", "swish"), "bias": cfg.bias,
                  "n_kv_heads": cfg.kv_heads == cfg.n_heads}
    modern = [f"model.{key} = {getattr(cfg, key)!r}" for key, fits in marian_has.items() if not fits]
    if modern:
        raise AdapterError(", ".join(modern) + ": " + NO_STOCK_CLASS)
    if cfg.norm != "post":
        raise AdapterError(f"model.norm = {cfg.norm!r}: MarianMTModel is post-norm only")
    if cfg.norm_eps != 1e-5:
        raise AdapterError(f"model.norm_eps = {cfg.norm_eps}: MarianMTModel's LayerNorm eps is fixed at 1e-5")


def _layer_map(prefix_ours: str, prefix_hf: str, cross: bool) -> list[tuple[str, str, str]]:
    """(our key, Marian key, which side of the matrix touches the residual stream: 'in', 'out' or 'norm')."""
    attns = [("self_attn", "self_attn", "self_attn_norm", "self_attn_layer_norm")]
    if cross:
        attns.append(("cross_attn", "encoder_attn", "cross_attn_norm", "encoder_attn_layer_norm"))
    rows = []
    for ours, hf, ours_norm, hf_norm in attns:
        a, h = f"{prefix_ours}{ours}.", f"{prefix_hf}{hf}."
        rows += [(a + "wq", h + "q_proj", "in"), (a + "wk", h + "k_proj", "in"), (a + "wv", h + "v_proj", "in"),
                 (a + "wo", h + "out_proj", "out"), (prefix_ours + ours_norm, prefix_hf + hf_norm, "norm")]
    rows += [(prefix_ours + "ffn.w1", prefix_hf + "fc1", "in"), (prefix_ours + "ffn.w2", prefix_hf + "fc2", "out"),
             (prefix_ours + "ffn_norm", prefix_hf + "final_layer_norm", "norm")]
    return rows


def _key_map(cfg: TranslationModelConfig) -> list[tuple[str, str, str]]:
    rows = []
    for i in range(cfg.n_encoder_layers):
        rows += _layer_map(f"encoder_layers.{i}.", f"model.encoder.layers.{i}.", cross=False)
    for i in range(cfg.n_decoder_layers):
        rows += _layer_map(f"decoder_layers.{i}.", f"model.decoder.layers.{i}.", cross=True)
    return rows


def _split_kv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fused `wkv` -> separate `wk` and `wv` entries (rows [k | v])."""
    out = {}
    for key, value in sd.items():
        if ".wkv." in key:
            k, v = value.chunk(2, dim=0)
            out[key.replace(".wkv.", ".wk.")], out[key.replace(".wkv.", ".wv.")] = k, v
        else:
            out[key] = value
    return out


def to_marian_state_dict(sd: dict[str, torch.Tensor], cfg: TranslationModelConfig) -> dict[str, torch.Tensor]:
    """Our EncoderDecoder state dict -> MarianMTModel state dict (tied embeddings under `model.shared` only)."""
    check_exportable(cfg)
    sd, perm = _split_kv(sd), marian_permutation(cfg.d_model)
    out = {}
    for ours, hf, side in _key_map(cfg):
        w, b = sd[ours + ".weight"], sd[ours + ".bias"]
        if side == "in":  # reads the residual stream: permute the input columns; the bias is per output unit
            out[hf + ".weight"], out[hf + ".bias"] = w[:, perm], b
        else:  # writes the residual stream, or normalises it: permute the d_model side
            out[hf + ".weight"] = w[perm] if side == "norm" else w[perm, :]
            out[hf + ".bias"] = b[perm]
    if cfg.share_embeddings:
        out["model.shared.weight"] = sd["src_embeddings.weight"][:, perm]
    else:
        out["model.encoder.embed_tokens.weight"] = sd["src_embeddings.weight"][:, perm]
        out["model.decoder.embed_tokens.weight"] = sd["tgt_embeddings.weight"][:, perm]
        out["lm_head.weight"] = sd["output.weight"][:, perm]
    out["final_logits_bias"] = (sd["output.bias"][None] if cfg.output_bias else
                                torch.zeros(1, cfg.vocab_size, dtype=sd["src_embeddings.weight"].dtype))
    return {k: v.contiguous() for k, v in out.items()}


def from_marian_state_dict(hf: dict[str, torch.Tensor], cfg: TranslationModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_marian_state_dict` (a non-zero `final_logits_bias` needs `cfg.output_bias`)."""
    check_exportable(cfg)
    inv = torch.argsort(marian_permutation(cfg.d_model))  # ours -> Marian's index
    bias = hf.get("final_logits_bias")
    out = {}
    if cfg.output_bias:
        out["output.bias"] = bias.reshape(-1) if bias is not None else torch.zeros(cfg.vocab_size)
    elif bias is not None and bias.abs().max() > 0:
        raise AdapterError("final_logits_bias is not zero; the model has no output bias (model.output_bias)")
    for ours, name, side in _key_map(cfg):
        w, b = hf[name + ".weight"], hf[name + ".bias"]
        if side == "in":
            out[ours + ".weight"], out[ours + ".bias"] = w[:, inv], b
        else:
            out[ours + ".weight"] = w[inv] if side == "norm" else w[inv, :]
            out[ours + ".bias"] = b[inv]
    for key in [k for k in out if ".wk." in k]:
        out[key.replace(".wk.", ".wkv.")] = torch.cat([out.pop(key), out.pop(key.replace(".wk.", ".wv."))])
    if cfg.share_embeddings:
        shared = hf["model.shared.weight"][:, inv]
        out |= {"src_embeddings.weight": shared, "tgt_embeddings.weight": shared, "output.weight": shared}
    else:
        out["src_embeddings.weight"] = hf["model.encoder.embed_tokens.weight"][:, inv]
        out["tgt_embeddings.weight"] = hf["model.decoder.embed_tokens.weight"][:, inv]
        out["output.weight"] = hf["lm_head.weight"][:, inv]
    return out


def to_marian_config(cfg: TranslationModelConfig, ids: SpecialIds) -> dict:
    """Keyword arguments for `transformers.MarianConfig`."""
    check_exportable(cfg)
    return dict(
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=cfg.activation,
        max_position_embeddings=cfg.max_seq_len, dropout=cfg.dropout, attention_dropout=0.0,
        activation_dropout=0.0, scale_embedding=True, share_encoder_decoder_embeddings=cfg.share_embeddings,
        tie_word_embeddings=cfg.share_embeddings, pad_token_id=ids.pad, eos_token_id=ids.eos,
        bos_token_id=ids.bos, decoder_start_token_id=ids.bos, forced_eos_token_id=ids.eos)


def _generation_config(cfg: TranslationModelConfig, ids: SpecialIds, decode: DecodeConfig) -> dict:
    # forced_eos ends a translation with EOS at max_length, as our decoding does; padding and the start token are
    # never generated (suppress_tokens), as in ours. early_stopping="never" is the exact stopping bound our beam
    # search uses too (its search still differs in details: on untrained models ours can find better hypotheses).
    return dict(decoder_start_token_id=ids.bos, bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad,
                forced_eos_token_id=ids.eos, suppress_tokens=ids.never_generated,
                max_length=cfg.max_seq_len, num_beams=decode.beam_size, length_penalty=decode.length_penalty,
                early_stopping="never", do_sample=False)


def _export_tokenizer(tokenizer, folder: Path) -> None:
    """Save `tokenizer` so that `AutoTokenizer` on the folder encodes a source as our data does: text, then EOS.
    A Marian tokenizer (an imported OPUS-MT model's) is saved as it is: MarianTokenizer appends EOS itself."""
    from tokenizers import Tokenizer, processors

    from llm.data.tokenizer import LoadedTokenizer

    if not isinstance(tokenizer, LoadedTokenizer):
        tokenizer.save(folder)
        return

    tok = Tokenizer.from_str(tokenizer.to_json())
    eos = tokenizer.special_tokens["eos"]
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A $B {eos}",
                                                       special_tokens=[(eos, tokenizer.token_id("eos"))])
    LoadedTokenizer(tok, dict(tokenizer.special_tokens), tokenizer.source).save(folder)


@torch.no_grad()
def verify(ours: EncoderDecoder, folder: Path, tokenizer, sources: Sequence[str],
           decode: DecodeConfig | None = None) -> dict:
    """Load `folder` with `transformers` and compare it with `ours`; return a report with `ok`."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    decode = decode or DecodeConfig()
    hf = AutoModelForSeq2SeqLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=False,
                                               dtype=torch.float32, attn_implementation="eager").eval()
    with warnings.catch_warnings():  # MarianTokenizer's "Recommended: pip install sacremoses" (unused here)
        warnings.simplefilter("ignore")
        hf_tok = AutoTokenizer.from_pretrained(str(folder))
    ours = ours.float().eval()
    ids = SpecialIds.from_tokenizer(tokenizer)
    report = {"logits_tol": LOGITS_TOL, "sentences": [], "ok": True}

    encoded = encode_sources(tokenizer, sources, ours.cfg.max_seq_len)
    same_tokens = [hf_tok(s)["input_ids"] == e for s, e in zip(sources, encoded, strict=True)]
    report["tokenizer_equal"] = all(same_tokens)
    report["ok"] &= report["tokenizer_equal"]

    # Logits on a padded batch: the sources against random target prefixes (and each other's lengths).
    g = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, ours.cfg.vocab_size, (1 + (3 * i) % 11,), generator=g).tolist() for i in
               range(len(encoded))]
    src, src_pad = pad_batch(encoded, ids.pad)
    tgt, tgt_pad = pad_batch([[ids.bos] + t for t in targets], ids.pad)
    logits = ours(src, src_pad, tgt, tgt_pad)
    hf_logits = hf(input_ids=src, attention_mask=(~src_pad).long(), decoder_input_ids=tgt,
                   decoder_attention_mask=(~tgt_pad).long()).logits
    diff = (logits - hf_logits).abs().masked_fill(tgt_pad[..., None], 0.0).amax(dim=(1, 2))  # (B,) real positions
    report["max_abs_logit_diff"] = diff.max().item()
    report["ok"] &= report["max_abs_logit_diff"] <= LOGITS_TOL

    # Greedy translations one sentence at a time, with the same maximum length (EOS forced there by both).
    for text, enc, d in zip(sources, encoded, diff.tolist(), strict=True):
        x = torch.tensor([enc])
        limit = max_lengths(ours, x, None, decode.max_len_a, decode.max_len_b)[0]
        mine = greedy_search(ours, x, None, ids, decode.max_len_a, decode.max_len_b)[0].tokens
        theirs = hf.generate(x, attention_mask=torch.ones_like(x), num_beams=1, do_sample=False,
                             max_length=limit + 2)[0, 1:].tolist()  # start token, limit tokens, EOS
        theirs = theirs[:theirs.index(ids.eos)] if ids.eos in theirs else theirs
        same = mine == theirs
        report["sentences"].append({"source": text, "max_abs_logit_diff": d, "greedy_equal": same,
                                    "ours": tokenizer.decode([mine])[0],
                                    "transformers": hf_tok.decode(theirs, skip_special_tokens=True)})
        report["ok"] &= same
    return report


def export_marian(model: EncoderDecoder, tokenizer, out_dir: str | Path, *, sources: Sequence[str] | None = None,
                  decode: DecodeConfig | None = None, dtype: str = "fp32", check: bool = True,
                  overwrite: bool = False) -> dict | None:
    """Write `model` and `tokenizer` (a LoadedTokenizer or MarianSentencePiece) as a verified MarianMTModel folder;
    return the report.

    `sources` are the sentences the verification translates (default: a few generic ones; give some of the
    validation data for a real check). `decode` sets the generation config's defaults (beam size, length penalty).
    """
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    cfg, decode = model.cfg, decode or DecodeConfig()
    check_exportable(cfg)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise AdapterError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}")
    ids = SpecialIds.from_tokenizer(tokenizer)
    # What is written is rounded to `dtype`: compare against our model holding exactly those values.
    ours = EncoderDecoder(dataclasses.replace(cfg, attention="eager")).eval()
    ours.load_state_dict({k: v.to(DTYPES[dtype]).float() for k, v in model.state_dict().items()})

    with staged_folder(out_dir) as tmp:
        hf = MarianMTModel(MarianConfig(**to_marian_config(cfg, ids)))
        missing, unexpected = hf.load_state_dict(to_marian_state_dict(ours.state_dict(), cfg), strict=False)
        allowed = {"model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"}
        if cfg.share_embeddings:
            allowed |= {"lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"}
        if unexpected or set(missing) - allowed:
            raise AdapterError(f"export state dict mismatch: missing {sorted(set(missing) - allowed)}, "
                               f"unexpected {unexpected}")
        hf.tie_weights()
        hf.to(DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        _export_tokenizer(tokenizer, tmp)
        GenerationConfig(**_generation_config(cfg, ids, decode)).save_pretrained(tmp)
        report = verify(ours, tmp, tokenizer, list(sources or DEFAULT_SOURCES), decode) if check else None
        if report is not None and not report["ok"]:
            lines = [f"  {s['source']!r}: max |logit diff| {s['max_abs_logit_diff']:.2e}, greedy equal "
                     f"{s['greedy_equal']} (ours {s['ours']!r}, transformers {s['transformers']!r})"
                     for s in report["sentences"]]
            raise ExportVerificationError(
                f"the exported model does not reproduce ours (tolerance {LOGITS_TOL}, tokenizer equal "
                f"{report['tokenizer_equal']}); nothing was written:\n" + "\n".join(lines))
        (tmp / "llm_export.json").write_text(json.dumps({"dtype": dtype, "verification": report}, indent=2))
    return report


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, dtype: str = "fp32", check: bool = True,
                      overwrite: bool = False, n_sources: int = 8) -> dict | None:
    """Export a translation run's checkpoint (or a weights-only one from `llm average`): verified on the first
    `n_sources` source sentences of its validation split, with the run's `decode` settings as generation defaults."""
    from llm.data.translation import ParallelSplit
    from llm.translate import load_translation_model

    model, tokenizer, cfg = load_translation_model(checkpoint)
    val = ParallelSplit(cfg.data.path, "val")
    n = min(n_sources, val.num_pairs)
    sources = tokenizer.decode([val.pair(k)[0][:-1].tolist() for k in range(n)], "src")
    return export_marian(model, tokenizer, out_dir, sources=sources or None, decode=cfg.decode, dtype=dtype,
                         check=check, overwrite=overwrite)
