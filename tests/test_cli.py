"""The `llm` console script, run as a user runs it."""

import json
import subprocess

import pytest

from llm.engine.memory import build_host_memory, model_state_memory


def llm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["llm", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_subcommands():
    out = llm("--help")
    assert out.returncode == 0
    assert "info" in out.stdout


def test_info_7b_on_8_gpus():
    out = llm("info", "configs/model/7b.yaml", "--gpus", "8")
    assert out.returncode == 0, out.stderr
    assert "6,738,415,616 (6.74B)" in out.stdout
    zero3 = next(line for line in out.stdout.splitlines() if line.strip().startswith("ZeRO-3 "))
    gb = float(zero3.split()[1])
    largest_layer = 32000 * 4096  # the embedding (and the untied head) is the largest module
    assert gb == pytest.approx((16 * 6_738_415_616 / 8 + 4 * largest_layer) / 1e9, abs=0.01)


def test_info_json_matches_the_estimator():
    out = llm("info", "1b", "--gpus", "4", "--seq-len", "2048", "--json")
    data = json.loads(out.stdout)
    assert data["parameters"] == 1_235_814_400 and data["seq_len"] == 2048
    stages = model_state_memory(1_235_814_400, 2 * 8192 * 2048, 4)  # largest module: the fused gate/up matmul
    assert data["model_states_bytes_per_gpu"]["ZeRO-2"]["gpu"] == stages[2].gpu_bytes


def test_info_states_the_host_memory_to_build_the_model():
    """ZeRO-0/1/2 build the whole fp32 model on every process; ZeRO-3 a 1/N partition plus one whole parameter (the
    350m preset's largest is its embedding). docs/BENCHMARKS.md compares these with measured peaks."""
    out = llm("info", "350m", "--gpus", "2", "--precision", "fp32")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("Host memory per process to build the model (2 processes")[1].splitlines()
    whole = next(line for line in lines if line.strip().startswith("ZeRO-0/1/2"))
    partitioned = next(line for line in lines if line.strip().startswith("ZeRO-3"))
    assert float(whole.split()[1]) == pytest.approx(4 * 361_821_120 / 1e9, abs=0.01)
    assert float(partitioned.split()[1]) == pytest.approx(4 * (361_821_120 / 2 + 49152 * 960) / 1e9, abs=0.01)
    data = json.loads(llm("info", "7b", "--gpus", "8", "--json").stdout)
    assert data["largest_parameter"] == 32000 * 4096
    assert data["build_host_bytes_per_process"] == build_host_memory(6_738_415_616, 32000 * 4096, 8, "bf16")
    assert data["build_host_bytes_per_process"]["ZeRO-3"] == 2 * (6_738_415_616 / 8 + 32000 * 4096)  # bf16


def test_build_host_memory_shrinks_with_processes_only_under_zero3():
    one, eight = build_host_memory(10**9, 10**7, 1, "fp32"), build_host_memory(10**9, 10**7, 8, "fp32")
    assert one["ZeRO-0/1/2"] == eight["ZeRO-0/1/2"] == 4e9
    assert eight["ZeRO-3"] == 4 * (10**9 / 8 + 10**7) and one["ZeRO-3"] == 4 * (10**9 + 10**7)
    with pytest.raises(ValueError, match="processes = 0"):
        build_host_memory(10, 1, 0)


def test_info_config_error_names_key_and_file():
    out = llm("info", "tiny", "model.n_heads=3")
    assert out.returncode == 2
    assert "model.n_heads = 3" in out.stderr and "tiny.yaml" in out.stderr


def test_memory_stages_shrink_with_sharding():
    P, N = 1_000_000, 8
    s = {x.name: x for x in model_state_memory(P, 0, N)}
    assert s["ZeRO-0"].gpu_bytes == 16 * P
    assert s["ZeRO-1"].gpu_bytes == 4 * P + 12 * P / N
    assert s["ZeRO-2"].gpu_bytes == 2 * P + 14 * P / N
    assert s["ZeRO-3"].gpu_bytes == 16 * P / N
    fp32 = {x.name: x for x in model_state_memory(P, 0, N, "fp32")}
    assert fp32["ZeRO-0"].gpu_bytes == 16 * P and fp32["ZeRO-1"].gpu_bytes == 8 * P + 8 * P / N


def test_info_of_a_translation_preset():
    out = llm("info", "transformer-big", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["parameters"] / 1e6 == pytest.approx(213, rel=0.04)  # the paper's Table 3


def val_sentences(packed, n: int = 12) -> tuple[list[str], list[str]]:
    from llm.data.tokenizer import load_tokenizer
    from llm.data.translation import ParallelSplit

    tok, val = load_tokenizer(packed).tokenizer, ParallelSplit(packed, "val")
    pairs = [val.pair(k) for k in range(n)]
    return tok.decode_batch([s[:-1].tolist() for s, _ in pairs]), tok.decode_batch([t[:-1].tolist() for _, t in pairs])


def test_translate_average_and_export_of_a_translation_run(packed_pairs, translation_run, tmp_path):
    """`llm translate` scores BLEU; `llm average` writes a checkpoint every command takes; the Marian export
    translates the same sentences identically in transformers alone and in `llm translate`."""
    sources, references = val_sentences(packed_pairs)
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s in sources))
    (tmp_path / "ref.txt").write_text("".join(r + "\n" for r in references))
    src, ref = str(tmp_path / "src.txt"), str(tmp_path / "ref.txt")
    out = llm("translate", str(translation_run), "--input", src, "--ref", ref)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(sources)
    assert "BLEU" in out.stderr and "chrF" in out.stderr and "tok:13a" in out.stderr

    out = llm("average", str(translation_run), "--last", "3", "--output", str(tmp_path / "avg"))
    assert out.returncode == 0, out.stderr
    assert "step-00000008, step-00000016, step-00000024" in out.stdout
    assert llm("average", str(translation_run), "--last", "9", "--output", str(tmp_path / "x")).returncode == 1
    assert not (tmp_path / "x").exists()

    out = llm("export", str(tmp_path / "avg"), str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert "greedy translations identical" in out.stdout
    ours = llm("translate", str(tmp_path / "avg"), "--input", src, "--beam", "1")
    assert ours.returncode == 0, ours.stderr

    from transformers import AutoTokenizer, MarianMTModel

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    theirs = []
    for sentence in sources:  # the same length limit as ours: 1.2 * source tokens + 10 (the decode defaults)
        x = tok(sentence, return_tensors="pt")
        limit = int(1.2 * x["input_ids"].shape[1] + 10)
        ids = model.generate(**x, num_beams=1, do_sample=False, max_length=limit + 2)  # start token, EOS
        theirs.append(tok.decode(ids[0], skip_special_tokens=True))
    assert ours.stdout.splitlines() == theirs
    assert len(set(theirs)) > 1  # not one degenerate output for every sentence


@pytest.mark.parametrize("preset, shape", [
    ("llama-3.2-1b", "llama3 RoPE scaling x32, exports as llama"), ("llama-3.2-3b", "exports as llama"),
    ("llama-3.1-8b", "llama3 RoPE scaling x8"), ("qwen2.5-0.5b", "q/k/v biases, exports as qwen2"),
    ("qwen2.5-1.5b", "q/k/v biases"), ("qwen2.5-7b", "q/k/v biases"), ("qwen3-0.6b", "head_dim 128"),
    ("qwen3-1.7b", "q/k norms, exports as qwen3"), ("qwen3-8b", "q/k norms"), ("mistral-7b-v0.3", "exports as mistral"),
    ("smollm2-135m", "exports as llama"), ("smollm2-360m", "15 heads (5 kv)"), ("smollm2-1.7b", "vocab 49152"),
])
def test_info_on_the_published_model_presets(preset, shape, capsys):
    from llm.cli import main

    assert main(["info", preset, "--gpus", "8", "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert shape in out and "ZeRO-3" in out and "parameters" in out


def test_info_prints_activation_memory_for_a_sequence_parallel_size():
    out = llm("info", "1b", "--gpus", "8", "--seq-len", "131072", "--sp", "8", "--micro-batch", "1")
    assert out.returncode == 0, out.stderr
    assert "sequence parallel 8 (16,384 tokens per GPU)" in out.stdout
    data = json.loads(llm("info", "1b", "--gpus", "8", "--seq-len", "131072", "--sp", "8", "--micro-batch", "1",
                          "--json").stdout)["activation_bytes_per_gpu"]
    one = json.loads(llm("info", "1b", "--gpus", "8", "--seq-len", "131072", "--sp", "1", "--micro-batch", "1",
                         "--json").stdout)["activation_bytes_per_gpu"]
    assert data["without_checkpointing"] == pytest.approx(one["without_checkpointing"] / 8, rel=0.03)
    assert data["with_checkpointing"] < data["without_checkpointing"] / 4
    bad = llm("info", "1b", "--gpus", "6", "--sp", "4")
    assert bad.returncode == 2 and "--sp 4: must divide --gpus (6)" in bad.stderr
