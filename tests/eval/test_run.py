"""`llm eval` from the command line: a ZeRO-3 checkpoint and its transformers export give the same scores."""

import json
import subprocess
import sys

import pytest

from llm.data.shards import PackedSplit
from tests.helpers import ROOT, env


def llm(*args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm.cli", *map(str, args)], cwd=ROOT, env=env(**extra_env),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def export(eval_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    result = llm("export", eval_runs[2], out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def scored(result: subprocess.CompletedProcess, path) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(path.read_text())


def test_checkpoint_and_its_export_score_the_same(eval_runs, export, eval_tasks, packed_data, tmp_path):
    text = tmp_path / "page.txt"
    text.write_text("def parse(message):\n    \"\"\"Return the header's value, decoded.\"\"\"\n" * 40)
    data = (["--data", packed_data], ["--data", text])
    ours = [scored(llm("eval", eval_runs[2], "--tasks", *eval_tasks, "--log-samples", *d, "--output",
                       tmp_path / f"ours{i}.json"), tmp_path / f"ours{i}.json") for i, d in enumerate(data)]
    hf = [scored(llm("eval", export, "--tasks", *eval_tasks, "--log-samples", *d, "--output",
                     tmp_path / f"hf{i}.json"), tmp_path / f"hf{i}.json") for i, d in enumerate(data)]
    assert ours[0]["backend"] == "ours" and hf[0]["backend"] == "hf"  # our model; lm-eval's transformers model

    # Multiple choice: every choice's loglikelihood of every example equal within 1e-4.
    a, b = ours[0]["samples"]["cloze"], hf[0]["samples"]["cloze"]
    assert len(a) == len(b) == 24
    for x, y in zip(a, b, strict=True):
        assert x["doc_id"] == y["doc_id"] and len(x["resps"]) == 4
        for rx, ry in zip(x["resps"], y["resps"], strict=True):
            assert float(rx[0][0]) == pytest.approx(float(ry[0][0]), abs=1e-4)
    assert ours[0]["results"]["cloze"]["acc,none"] == hf[0]["results"]["cloze"]["acc,none"]
    # Generation: our KV-cache greedy decoding writes what transformers' generate writes.
    gen_a, gen_b = ours[0]["samples"]["complete_line"], hf[0]["samples"]["complete_line"]
    assert [s["filtered_resps"] for s in gen_a] == [s["filtered_resps"] for s in gen_b]
    assert any(s["filtered_resps"][0] for s in gen_a)  # something was generated
    # Perplexity of packed documents and of a text file tokenised on the fly.
    for o, h in zip(ours, hf, strict=True):
        p, q = o["perplexity"], h["perplexity"]
        assert p["tokens"] == q["tokens"] > 0 and p["bytes"] == q["bytes"] > 0
        assert p["loglikelihood"] == pytest.approx(q["loglikelihood"], rel=1e-5)
        assert p["bits_per_byte"] == pytest.approx(p["loss"] * p["tokens"] / (p["bytes"] * 0.6931471805599453))
    assert ours[1]["perplexity"]["documents"] == 1
    assert ours[0]["perplexity"]["documents"] == PackedSplit(packed_data, "val").num_docs


def test_a_task_whose_data_is_on_the_hub_fails_with_how_to_go_local(eval_runs):
    result = llm("eval", eval_runs[1], "--tasks", "hellaswag", "--limit", 2)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert "Rowan/hellaswag" in message and "dataset_path: json" in message and "data_files" in message
    assert "Traceback" not in result.stderr


def test_bad_input_is_one_line(eval_runs, tmp_path):
    cases = [(["--tasks", "no_such_task_anywhere"], "unknown lm-eval task 'no_such_task_anywhere'"),
             (["--tasks", tmp_path / "missing.yaml"], "missing.yaml does not exist"),
             ([], "nothing to evaluate")]
    for args, expected in cases:
        result = llm("eval", eval_runs[1], *args)
        assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr
    result = llm("eval", eval_runs[1], "--backend", "hf", "--data", tmp_path)
    assert result.returncode == 1 and "--backend hf takes a transformers folder" in result.stderr
