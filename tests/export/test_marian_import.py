"""Importing OPUS-MT (MarianMTModel) folders: a tiny random MarianMTModel with a SentencePiece tokenizer, built with
`transformers` and `sentencepiece` (no download), gives its logits and translations in our model; `llm translate`
takes the folder; `llm train` fine-tunes it (one process, and ZeRO-3 on two) and `llm export` writes it back, verified;
what our model cannot hold is refused naming the field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llm.data.tokenizer import load_tokenizer
from llm.export.layout import AdapterError
from llm.export.marian_import import from_marian_config, load_marian_folder
from llm.translate import DecodeConfig, SpecialIds, beam_search, encode_sources, greedy_search, max_lengths, pad_batch
from tests.data_prep.test_pack_translation import make_pairs
from tests.export.hf_models import marian_folder
from tests.helpers import env, losses, run_train

ROOT = Path(__file__).resolve().parents[2]
PAIRS = make_pairs(2000, seed=7)
SOURCES = [s for s, _ in make_pairs(12, seed=3)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return marian_folder(tmp_path_factory.mktemp("opus-mt") / "opus-mt-de-en", PAIRS)


def hf_model(folder):
    from transformers import MarianMTModel

    return MarianMTModel.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


@torch.no_grad()
def test_imported_model_gives_marians_logits_and_translations(folder):
    model, cfg = load_marian_folder(folder)
    hf, tok = hf_model(folder), load_tokenizer(folder)
    ids = SpecialIds.from_tokenizer(tok)
    assert (ids.bos, ids.eos, ids.pad) == (hf.config.decoder_start_token_id, 0, hf.config.pad_token_id)
    assert cfg.model.activation == "swish" and cfg.model.output_bias and cfg.decode.beam_size == 4
    assert tok.encode(SOURCES, "src") == _hf_tokens(folder, SOURCES)

    encoded = encode_sources(tok, SOURCES, cfg.model.max_seq_len)
    src, src_pad = pad_batch(encoded, ids.pad)
    targets = tok.encode([t for _, t in make_pairs(12, seed=3)], "tgt")
    tgt, tgt_pad = pad_batch([[ids.bos] + t for t in targets], ids.pad)
    ours = model(src, src_pad, tgt, tgt_pad)
    theirs = hf(input_ids=src, attention_mask=(~src_pad).long(), decoder_input_ids=tgt,
                decoder_attention_mask=(~tgt_pad).long()).logits
    assert (ours - theirs).abs().masked_fill(tgt_pad[..., None], 0).max().item() < 1e-5

    for beams in (1, 4):
        for enc in encoded:
            x = torch.tensor([enc])
            limit = max_lengths(model, x, None, 1.2, 10)[0]
            if beams == 1:
                mine = greedy_search(model, x, None, ids, 1.2, 10)[0].tokens
            else:
                mine = beam_search(model, x, None, ids, beams, 1.0, 1.2, 10)[0][0].tokens
            out = hf.generate(x, attention_mask=torch.ones_like(x), num_beams=beams, do_sample=False,
                              max_length=limit + 2, early_stopping="never", length_penalty=1.0)[0, 1:].tolist()
            assert mine == (out[:out.index(ids.eos)] if ids.eos in out else out), (beams, enc)


def _hf_tokens(folder, texts):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    return [hf_tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_llm_translate_takes_a_marian_folder(folder, tmp_path):
    (tmp_path / "in.txt").write_text("".join(s + "\n" for s in SOURCES))
    out = _cli("llm.cli", "translate", str(folder), "--input", str(tmp_path / "in.txt"), "--beam", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    hf, tok = hf_model(folder), load_tokenizer(folder)
    model, _ = load_marian_folder(folder)
    expected = []
    for enc in encode_sources(tok, SOURCES, 128):
        x = torch.tensor([enc])
        limit = max_lengths(model, x, None, 1.2, 10)[0]
        expected.append(hf.generate(x, attention_mask=torch.ones_like(x), num_beams=1, max_length=limit + 2)[0])
    assert out.stdout.splitlines() == tok.hf.batch_decode(expected, skip_special_tokens=True)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, env=env(),
                          timeout=timeout)


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft")
    (out / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS))
    result = _cli("data_prep.pack_translation", "--tsv", str(out / "pairs.tsv"), "--tokenizer", str(folder),
                  "--val-fraction", "0.05", "--output", str(out / "packed"))
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "packed"


def finetune_config(tmp_path: Path, data: Path, folder: Path, **train) -> Path:
    cfg = {"task": "translation", "model": "init_from",
           "data": {"path": str(data), "max_tokens": 384, "bleu_sentences": 16},
           "optim": {"lr": 2e-3, "warmup_steps": 2, "schedule": "inverse_sqrt", "weight_decay": 0.0},
           "train": {"init_from": str(folder), "output_dir": str(tmp_path / "run"), "steps": 12, "log_every": 1,
                     "eval_every": 12, "save_every": 12, "zero_stage": 0, **train},
           "decode": {"beam_size": 2}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "run.yaml"


@torch.no_grad()
def first_step_loss(folder: Path, data: Path, batches: int) -> float:
    """The label-smoothed loss per target token of the first `batches` training batches, by the imported model
    (no dropout)."""
    from llm.config import TranslationDataConfig
    from llm.data.translation import TranslationLoader

    model, _ = load_marian_folder(folder)
    loader = TranslationLoader(TranslationDataConfig(path=str(data), max_tokens=384), 0, 1)
    summed = tokens = 0
    for batch in (next(loader) for _ in range(batches)):
        summed += model(batch["src_ids"], batch["src_pad_mask"], batch["tgt_in_ids"], None, labels=batch["labels"],
                        pad_id=model.cfg.vocab_size - 1, label_smoothing=0.1, reduction="sum").item()
        tokens += batch["num_tokens"]
    return summed / tokens


def test_finetune_on_one_and_on_two_processes_under_zero3_then_export_back(folder, packed, tmp_path):
    # One process with two micro-batches computes what two processes do in a step (tests/engine/test_tasks.py).
    one = finetune_config(tmp_path / "one", packed, folder, grad_accum=2, eval_batches=2)
    result = run_train(one, 1, ["model.dropout=0.0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised from {folder}" in result.stdout
    first = losses(tmp_path / "one" / "run")
    assert abs(first[1] - first_step_loss(folder, packed, 2)) < 1e-5 * first[1]  # the run started from the import
    assert first[12] < 0.9 * first[1]  # it learns

    two = finetune_config(tmp_path / "two", packed, folder, zero_stage=3, eval_batches=1)
    result = run_train(two, 2, ["model.dropout=0.0"])
    assert result.returncode == 0, result.stderr[-3000:]
    second = losses(tmp_path / "two" / "run")
    assert second.keys() == first.keys()
    for step in first:
        assert abs(second[step] - first[step]) <= 1e-5 * first[step], step
    val = [[json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "val"] for name in ("one", "two")]
    assert [r["step"] for r in val[0]] == [r["step"] for r in val[1]] == [12]
    assert val[0][0]["loss"] == pytest.approx(val[1][0]["loss"], rel=1e-5)
    assert val[0][0]["bleu"] == val[1][0]["bleu"] and val[0][0]["chrf"] == val[1][0]["chrf"]

    out = tmp_path / "export"
    result = _cli("llm.cli", "export", str(tmp_path / "two" / "run"), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"source.spm", "target.spm", "vocab.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "llm_export.json").read_text())["verification"]
    assert report["ok"] and report["tokenizer_equal"] and report["max_abs_logit_diff"] < 1e-4
    original, tuned = hf_model(folder), hf_model(out)
    assert tuned.config.activation_function == "swish"
    assert not torch.equal(original.final_logits_bias, tuned.final_logits_bias)  # the bias was fine-tuned too


def test_data_packed_with_another_tokenizer_is_refused(folder, packed_pairs, tmp_path):
    config = finetune_config(tmp_path, packed_pairs, folder)
    result = run_train(config, 1)
    assert result.returncode != 0
    assert "re-pack it with `python -m data_prep.pack_translation --tokenizer" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("change, named", [
    ({"decoder_vocab_size": 500}, "decoder_vocab_size=500"),
    ({"activation_function": "tanh"}, "activation_function='tanh'"),
    ({"scale_embedding": False}, "scale_embedding=false"),
    ({"decoder_ffn_dim": 128}, "decoder_ffn_dim=128"),
    ({"decoder_start_token_id": 0}, "decoder_start_token_id=0"),
])
def test_what_our_model_lacks_is_refused_by_name(change, named):
    config = {"model_type": "marian", "vocab_size": 100, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 64,
              "decoder_ffn_dim": 64, "activation_function": "swish", "scale_embedding": True, "pad_token_id": 99,
              "decoder_start_token_id": 99}
    assert from_marian_config(config).output_bias
    with pytest.raises(AdapterError, match=named.replace("(", r"\(")):
        from_marian_config(config | change)


def test_decode_defaults_follow_the_generation_config(folder):
    _, cfg = load_marian_folder(folder)
    assert cfg.decode == DecodeConfig(beam_size=4, length_penalty=1.0)


def test_a_translation_run_starts_only_from_a_marian_folder(folder, tmp_path):
    from llm.config import ConfigError, load_config
    from llm.export.families import model_section

    config = finetune_config(tmp_path, tmp_path / "data", folder)
    cfg = load_config(config, model_of=model_section)  # `model: init_from` reads the Marian folder's config
    assert cfg.model.n_encoder_layers == 2 and cfg.model.activation == "swish" and cfg.model.output_bias
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({"task": "translation", "model": "transformer-tiny",
                                                        "train": {"init_from": str(llama)}}))
    with pytest.raises(ConfigError, match="train.init_from.*holds a 'llama' model; task 'translation' starts from a "
                                          "MarianMTModel folder"):
        load_config(tmp_path / "tiny.yaml")
