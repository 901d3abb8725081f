"""The `llm` console script, run as a user runs it."""

import json
import subprocess

import pytest

from llm.engine.memory import model_state_memory


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
