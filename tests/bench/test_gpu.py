"""bench/gpu.py is run once, on the first GPU a task is lent: its --cpu-smoke mode runs the same code here so that
the script cannot rot in between."""

import subprocess
import sys

from tests.helpers import ROOT, env


def test_gpu_check_runs_on_the_cpu():
    result = subprocess.run([sys.executable, "bench/gpu.py", "--cpu-smoke"], cwd=ROOT, env=env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| check | result |" in out
    for row in ("a. CUDA tests", "b. llm train, document masking on", "b. llm train, document masking off",
                "c. LlamaForCausalLM (SDPA), bare loop"):
        assert f"| {row}" in out, out
    assert "ours / theirs" in out and "tokens/s" in out
    assert "attention (not reported)" not in out  # the trainer names its attention backend
