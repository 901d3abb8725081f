"""Export of real two-process checkpoints, loaded back with transformers; verification that cannot pass wrongly."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from llm.export import layout as adapter
from llm.export.hf import ExportVerificationError, export
from llm.generate import load_model
from tests.export.hf_models import FAMILIES as FAMILY_CASES
from tests.export.hf_models import random_model, save_folder
from tests.helpers import ROOT, env, losses, run_train, write_config

PROMPT = "from email import"


def llm_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm.cli", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(packed_data, tmp_path_factory):
    """Two-process checkpoints: ZeRO-3 untied, ZeRO-0 untied, ZeRO-2 with tied embeddings."""
    runs = {}
    for stage, tied in ((3, False), (0, False), (2, True)):
        tmp = tmp_path_factory.mktemp(f"zero{stage}")
        config = write_config(tmp, packed_data, zero_stage=stage, steps=16)
        result = run_train(config, 2, [f"model.tie_embeddings={str(tied).lower()}"])
        assert result.returncode == 0, result.stderr[-3000:]
        runs[(stage, tied)] = tmp / "run"
    return runs


@pytest.mark.parametrize("stage, tied", [(3, False), (0, False), (2, True)])
def test_export_loads_in_transformers_and_generates_the_same_text(trained, tmp_path, stage, tied):
    run = trained[(stage, tied)]
    out = tmp_path / "hf"
    result = llm_cli("export", str(run), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "greedy continuations identical" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == 2
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-5
    assert config["eos_token_id"] == 2 and config["max_position_embeddings"] == 512
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, dtype=torch.float32)
    assert any(p.abs().sum() > 0 for p in model.parameters())  # not the empty weights of a bad ZeRO-3 export
    tokenizer = AutoTokenizer.from_pretrained(out)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    hf_text = generator(PROMPT, max_new_tokens=24, do_sample=False, return_full_text=True)[0]["generated_text"]

    ours = llm_cli("generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "24")
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert ours.stdout.rstrip("\n") == hf_text
    assert len(hf_text) > len(PROMPT)


def test_bf16_export_and_sharding(trained, tmp_path):
    out = tmp_path / "hf"
    export(trained[(3, False)], out, dtype="bf16", max_shard_size="1MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.dtype == torch.bfloat16


def test_verification_catches_a_broken_adapter_and_writes_nothing(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "interleaved_to_half", lambda w, n_heads, head_dim: w)  # RoPE permutation skipped
    monkeypatch.setattr("llm.export.hf.to_hf_state_dict", adapter.to_hf_state_dict)
    out = tmp_path / "hf"
    with pytest.raises(ExportVerificationError, match=r"(?s)does not reproduce.*first diverging at layers\.0 output"):
        export(trained[(0, False)], out)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary


def test_export_refuses_to_overwrite_and_names_missing_checkpoint(trained, tmp_path):
    (tmp_path / "hf").mkdir()
    result = llm_cli("export", str(trained[(0, False)]), str(tmp_path / "hf"))
    assert result.returncode == 1 and "exists; pass --overwrite" in result.stderr
    result = llm_cli("export", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 1 and "not a checkpoint" in result.stderr


def test_continue_pretraining_from_an_export(trained, packed_data, tmp_path):
    out = tmp_path / "hf"
    export(trained[(0, False)], out)
    config = write_config(tmp_path, packed_data, steps=2, zero_stage=0, init_from=str(out))
    result = run_train(config, 1, ["model.tie_embeddings=false", "optim.lr=1e-9"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised from {out}" in result.stdout
    first, scratch = losses(tmp_path / "run")[1], losses(trained[(0, False)])[1]
    assert first < scratch - 1.0  # starts where the exported model was, not from scratch
    bad = run_train(config, 1, ["model.tie_embeddings=false", "model.n_layers=2"])
    assert bad.returncode == 1 and "model.n_layers: " in bad.stderr
    # A longer context than the folder's is a continuation at long context, not a different model.
    longer = run_train(config, 1, ["model.tie_embeddings=false", "model.max_seq_len=1024", "data.seq_len=128",
                                   f"train.output_dir={tmp_path / 'long'}"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert losses(tmp_path / "long")[1] < scratch - 1.0


# ---- continued pretraining of each family: import -> 20 steps on two processes (ZeRO-2) -> export ----------------


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_continue_pretraining_each_family_and_export_it_as_its_own_class(family, packed_data, tmp_path):
    from safetensors.torch import load_file

    source = save_folder(random_model(family), tmp_path / "source", tokenizer_dir=packed_data)
    GenerationConfig(do_sample=True, temperature=0.7, eos_token_id=2).save_pretrained(source)  # the model's own
    config = write_config(tmp_path, packed_data, zero_stage=2, steps=20, init_from=str(source), save_every=0)
    data = yaml.safe_load(config.read_text())
    data["model"] = "init_from"  # the model section is the source folder's
    config.write_text(yaml.safe_dump(data))
    result = run_train(config, 2, ["optim.lr=1e-4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"initialised from {source}" in result.stdout

    out = tmp_path / "hf"
    report = export(tmp_path / "run", out)
    assert report["ok"] and all(s["greedy_equal"] for s in report["sequences"])
    hf = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, dtype=torch.float32).eval()
    assert type(hf).__name__ == FAMILY_CASES[family][1] and hf.config.model_type == family
    assert GenerationConfig.from_pretrained(out).temperature == 0.7  # the source's, as it trained with its tokenizer
    ours, _ = load_model(tmp_path / "run")
    reloaded, tokenizer = load_model(out)  # what `llm generate EXPORT` runs
    assert reloaded.cfg.family == family and len(tokenizer) == 512
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5
        assert (reloaded(x) - hf(x).logits).abs().max().item() <= 1e-5
    # Continued from the source, not from scratch: every tensor moved, and by little (an independent random
    # initialisation is ~1.4 times the source's norm away).
    before, after = load_file(source / "model.safetensors"), hf.state_dict()
    for key, value in before.items():
        moved = (after[key] - value).norm() / value.norm()
        assert 0 < moved < 0.2, (key, moved.item())
