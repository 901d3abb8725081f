"""Running `llm train` for real in tests: one process directly, two processes under `accelerate launch` (gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, data: Path, **train) -> Path:
    cfg = {
        "model": "tiny",
        "data": {"datasets": [{"path": str(data)}], "seq_len": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "schedule": "cosine"},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 12, "micro_batch_size": 4, "grad_accum": 2,
                  "log_every": 1, "eval_every": 0, "zero_stage": 2, **train},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(config: Path, processes: int, overrides: list[str] = ()) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "llm.cli", "train", str(config), *overrides]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(_free_port()), "-m", "llm.cli", "train", str(config), *overrides]


def env(**extra) -> dict:
    # One thread per process: two processes share two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_train(config: Path, processes: int, overrides: list[str] = (), timeout: int = 300,
              **env_extra) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(config, processes, overrides), cwd=ROOT, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    """Loss per step from metrics.jsonl; the last record of a step wins (a resumed run rewrites steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == split:
            out[record["step"]] = record["loss"]
    return out
