"""Running `llm train` for real in tests: one process directly, two processes under `accelerate launch` (gloo)."""

import json
import os
import socket
import subprocess
import sys
import time
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


def write_translation_config(tmp_path: Path, data: Path, vocab_size: int, **train) -> Path:
    """A tiny translation run (no dropout, so that runs on any number of processes compute the same thing)."""
    cfg = {
        "task": "translation",
        "model": {"vocab_size": vocab_size, "d_model": 64, "n_encoder_layers": 2, "n_decoder_layers": 2,
                  "n_heads": 4, "d_ff": 128, "dropout": 0.0, "max_seq_len": 64},
        "data": {"path": str(data), "max_tokens": 384, "bleu_sentences": 24},
        "optim": {"lr": 5e-3, "warmup_steps": 6, "schedule": "linear", "betas": [0.9, 0.98], "weight_decay": 0.0},
        "train": {"output_dir": str(tmp_path / "run"), "steps": 24, "grad_accum": 1, "log_every": 1,
                  "eval_every": 12, "eval_batches": 2, "zero_stage": 2, **train},
        "decode": {"beam_size": 2},
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


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 240) -> str:
    """Read the process's stdout until `text` appears; return what was read."""
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if text in line:
            return seen
    proc.kill()
    raise AssertionError(f"{text!r} never appeared; output:\n{seen[-3000:]}")


def start_train(config, overrides=(), **env_extra) -> subprocess.Popen:
    return subprocess.Popen(train_command(config, 2, list(overrides)), cwd=ROOT, env=env(**env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every worker (torchrun starts workers in sessions of their own)."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=60)
    proc.wait(timeout=60)
