"""Export of the encoder-decoder to transformers' MarianMTModel: key and d_model-permutation round trip, parameter
parity, and a trained model that translates the same sentences in transformers (its tokenizer and generate alone)
as with our decoding."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llm.export import marian
from llm.export.layout import AdapterError
from llm.models.encoder_decoder import build_translation_model, translation_preset
from llm.translate import DecodeConfig, SpecialIds, translate
from tests.test_translate import as_text, random_sequences, reversal_tokenizer, trained_reverser

IDS = SpecialIds(bos=1, eos=2, pad=3)


def random_model(**overrides):
    torch.manual_seed(0)
    cfg = translation_preset("tiny", vocab_size=24, dropout=0.0, max_seq_len=64, attention="eager", **overrides)
    return build_translation_model(cfg).eval()


@pytest.mark.parametrize("share", [True, False])
def test_state_dict_round_trip(share):
    model = random_model(share_embeddings=share)
    sd = model.state_dict()
    back = marian.from_marian_state_dict(marian.to_marian_state_dict(sd, model.cfg), model.cfg)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_permutation_maps_our_sinusoids_to_marians():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from llm.models.encoder_decoder import sinusoids

    d = 64
    table = MarianSinusoidalPositionalEmbedding(100, d).create_weight()  # (100, d) sines, then cosines
    ours = sinusoids(torch.arange(100), d)  # (100, d) interleaved
    assert torch.equal(ours[:, marian.marian_permutation(d)], table)


@pytest.mark.parametrize("share", [True, False])
def test_marian_has_our_parameters(share):
    from transformers import MarianConfig, MarianMTModel

    model = random_model(share_embeddings=share)
    with torch.device("meta"):
        hf = MarianMTModel(MarianConfig(**marian.to_marian_config(model.cfg, IDS)))
    positions = sum(p.numel() for n, p in hf.named_parameters() if "embed_positions" in n)
    assert hf.num_parameters() - positions == model.num_params()


def test_trained_model_translates_identically_in_transformers(tmp_path):
    model, tok, _ = trained_reverser()
    texts = [as_text(s) for s in random_sequences(16, seed=21, lo=1, hi=12)]
    out = tmp_path / "marian"
    report = marian.export_marian(model, tok, out, sources=texts[:6], decode=DecodeConfig(beam_size=4))
    assert report["ok"] and report["tokenizer_equal"]
    assert report["max_abs_logit_diff"] <= marian.LOGITS_TOL
    assert all(s["greedy_equal"] for s in report["sentences"])
    assert json.loads((out / "llm_export.json").read_text())["verification"]["ok"]
    assert not list(tmp_path.glob(".tmp-*"))

    # Only transformers from here on: the folder's tokenizer, model and generation config.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    hf = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "MarianMTModel"
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        generated = hf.generate(**batch, num_beams=1, max_new_tokens=20)
    theirs = hf_tok.batch_decode(generated, skip_special_tokens=True)
    ours = translate(model, tok, texts, DecodeConfig(beam_size=1))
    assert theirs == ours
    # ... and they are right (the held-out exact match of this reverser is tested in tests/test_translate.py; here
    # a sentence the small model gets wrong must only be wrong identically in both).
    right = sum(o == " ".join(reversed(t.split())) for o, t in zip(ours, texts, strict=True))
    assert right >= 14, list(zip(texts, ours, strict=True))
    # The folder's generation config is beam search with our settings (4 beams here); on this model it agrees too.
    with torch.no_grad():
        beams = hf_tok.batch_decode(hf.generate(**batch), skip_special_tokens=True)
    assert beams == translate(model, tok, texts, DecodeConfig(beam_size=4)) == ours


def test_untied_embeddings_and_bf16_export_verify(tmp_path):
    model = random_model(share_embeddings=False)
    report = marian.export_marian(model, reversal_tokenizer(), tmp_path / "untied", sources=["a b c", "d e"])
    assert report["ok"]
    report = marian.export_marian(random_model(), reversal_tokenizer(), tmp_path / "bf16", dtype="bf16",
                                  sources=["a b c"])
    assert report["ok"]
    from safetensors.torch import load_file

    assert load_file(tmp_path / "bf16" / "model.safetensors")["model.shared.weight"].dtype == torch.bfloat16


def test_models_marian_cannot_represent_are_refused(tmp_path):
    with pytest.raises(AdapterError, match="post-norm only"):
        marian.export_marian(random_model(norm="pre"), reversal_tokenizer(), tmp_path / "pre")
    with pytest.raises(AdapterError, match="eps"):
        marian.to_marian_config(dataclasses.replace(random_model().cfg, norm_eps=1e-6), IDS)
    assert not (tmp_path / "pre").exists()
    # The modern variant: no stock class fits it; the message names every field that rules Marian out.
    modern = random_model(norm="pre", norm_type="rmsnorm", positions="rope", activation="swiglu", bias=False,
                          n_kv_heads=2)
    with pytest.raises(AdapterError) as refused:
        marian.export_marian(modern, reversal_tokenizer(), tmp_path / "modern")
    message = str(refused.value)
    for field in ("model.norm_type = 'rmsnorm'", "model.positions = 'rope'", "model.activation = 'swiglu'",
                  "model.bias = False", "model.n_kv_heads = 2", "no stock transformers class fits this model",
                  "`llm translate RUN` is its runtime"):
        assert field in message, (field, message)
    assert not (tmp_path / "modern").exists()
    with pytest.raises(AdapterError, match="model.n_kv_heads = 2: no stock"):  # one difference: only it is named
        marian.to_marian_config(dataclasses.replace(random_model().cfg, n_kv_heads=2), IDS)


def test_a_wrong_conversion_fails_verification_and_writes_nothing(tmp_path, monkeypatch):
    convert = marian.to_marian_state_dict

    def without_permutation(sd, cfg):  # the classic mistake: ignoring Marian's position-encoding layout
        out = convert(sd, cfg)
        out["model.shared.weight"] = sd["src_embeddings.weight"]
        return out

    monkeypatch.setattr(marian, "to_marian_state_dict", without_permutation)
    with pytest.raises(marian.ExportVerificationError, match="does not reproduce ours"):
        marian.export_marian(random_model(), reversal_tokenizer(), tmp_path / "bad", sources=["a b"])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-*"))
