"""slurm/pretrain.sbatch and slurm/export.sbatch submitted to a real two-node Slurm (tests/slurm/cluster.py).

The template runs unchanged; what a CPU test cluster needs is passed the way a user would pass it: `--gpus-per-node=0`
on the sbatch line (the template asks for 8 GPUs per node), PROCS_PER_NODE=1, the environment hook LLM_ENV_SETUP
and RUN_ROOT in the environment. The time limit must exceed the template's signal lead (600 s), or Slurm sends the
warning signal at every start. Both "nodes" are slurmds on this host, so each job really is two srun tasks, two
`accelerate launch` instances with machine ranks 0 and 1, and one training process per node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, losses, write_config

STEPS = 100  # ~70 ms each on two CPU processes: long enough to signal the job mid-run
PRETRAIN = ROOT / "slurm" / "pretrain.sbatch"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} was not written)"


def submit(slurm, tmp: Path, config: Path, env_setup: Path, overrides=(), sbatch_args=(), **env) -> str:
    return slurm.sbatch(PRETRAIN, [config, *overrides],
                        ["--gpus-per-node=0", "--time=30", f"--output={tmp}/%x-%j.out", *sbatch_args], cwd=ROOT,
                        LLM_ENV_SETUP=env_setup, PROCS_PER_NODE=1, RUN_ROOT=tmp / "runs", **env)


def wait_for_steps(slurm, job: str, metrics: Path, n: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and sum('"split": "train"' in line for line in metrics.read_text().splitlines()) >= n:
            return
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before step {n}"
        time.sleep(0.2)
    raise TimeoutError(f"job {job}: fewer than {n} steps in {metrics} after {timeout}s")


@pytest.fixture(scope="module")
def config(packed_data, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("config"), packed_data, steps=STEPS)


@pytest.fixture(scope="module")
def uninterrupted(slurm, config, env_setup, tmp_path_factory):
    """One job run to the end: the reference for the others."""
    tmp = tmp_path_factory.mktemp("pretrain")
    job = submit(slurm, tmp, config, env_setup)
    info = slurm.wait_job(job, timeout=300)
    return job, info, tmp / "runs" / f"llm-pretrain-{job}", tmp / f"llm-pretrain-{job}.out"


def test_two_nodes_one_process_each_train_as_world_of_two(uninterrupted):
    job, info, run, log_path = uninterrupted
    log = read(log_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["NodeList"] == "n[1-2]" and info["Restarts"] == "0"
    # SLURM_NODEID expanded inside the step, on each node: two distinct machine ranks, not the first node's twice.
    assert "node n1: machine rank 0 of 2, 1 process(es)" in log
    assert "node n2: machine rank 1 of 2, 1 process(es)" in log
    assert "rendezvous n1:" in log  # MASTER_ADDR: the first host of `scontrol show hostnames`
    assert "llm train: 2 process(es), ZeRO-2" in log
    assert "training finished" in log
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1] - 2.0, got  # it learns
    state = json.loads((run / f"checkpoints/step-{STEPS:08d}/trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (run / f"slurm-{job}.out").resolve() == log_path.resolve()  # the log is found from the run folder


def test_usr1_saves_requeues_and_resumes_with_a_continuous_loss_curve(slurm, config, env_setup, uninterrupted,
                                                                     tmp_path):
    job = submit(slurm, tmp_path, config, env_setup)
    run, log_path = tmp_path / "runs" / f"llm-pretrain-{job}", tmp_path / f"llm-pretrain-{job}.out"
    wait_for_steps(slurm, job, run / "metrics.jsonl", 3)
    # What `--signal=B:USR1@600` makes Slurm do near the time limit: USR1 to the batch shell only.
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_job(job, timeout=300)
    log = read(log_path)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-6000:]
    assert info["Restarts"] == "1", log[-6000:]
    assert "got USR1" in log
    saved = [int(line.split("checkpoint saved at step ")[1].split(";")[0])
             for line in log.splitlines() if "stop signal received: checkpoint saved at step" in line]
    assert len(saved) == 1 and 3 <= saved[0] < STEPS, log[-6000:]
    step = saved[0]
    assert f"requeueing job {job}" in log
    assert f"job {job} (start 2)" in log  # --open-mode=append: both starts in one log
    assert f"resumed from {run}/checkpoints/step-{step:08d} at step {step}" in log
    assert not (run / "PREEMPTED").exists()  # the resumed run cleared it
    # Continuous: every step's loss equals the uninterrupted run's (same world size: exact), before and after.
    reference = losses(uninterrupted[2])
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == reference, {s: (got[s], reference[s]) for s in got if got[s] != reference.get(s)}


def test_signal_at_the_time_limit_saves_before_slurm_kills(slurm, config, env_setup, tmp_path):
    """The real thing: Slurm itself sends USR1 ahead of a 1-minute limit. MAX_REQUEUES=0 stops it after the save.

    Slurm checks time limits every ~30 s, so the signal can come while the workers are still starting (no handler
    yet); the script then sends it again every STOP_RESEND seconds until the trainer has saved.
    """
    job = submit(slurm, tmp_path, config, env_setup, overrides=["train.steps=100000"],
                 sbatch_args=["--time=1", "--signal=B:USR1@45"], STOP_RESEND=5, MAX_REQUEUES=0)
    run, log_path = tmp_path / "runs" / f"llm-pretrain-{job}", tmp_path / f"llm-pretrain-{job}.out"
    info = slurm.wait_job(job, timeout=180)
    log = read(log_path)
    # Stopped by the script with the "preempted" code, not killed at the limit (TIMEOUT).
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", (info, log[-6000:])
    assert "got USR1" in log and "not requeueing" in log
    marker = json.loads((run / "PREEMPTED").read_text())
    assert marker["exit_code"] == 75 and 0 < marker["step"] < 100000
    assert (run / "checkpoints/latest").read_text().strip().endswith(f"step-{marker['step']:08d}")
    assert info["Restarts"] == "0"


def test_export_sbatch_exports_the_latest_checkpoint(slurm, env_setup, uninterrupted, tmp_path):
    run = uninterrupted[2]
    job = slurm.sbatch(ROOT / "slurm" / "export.sbatch", [run, tmp_path / "hf"],
                       ["--cpus-per-task=1", f"--output={tmp_path}/%x-%j.out"], cwd=ROOT, LLM_ENV_SETUP=env_setup)
    info = slurm.wait_job(job, timeout=300)
    log = read(tmp_path / f"llm-export-{job}.out")
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "verified with transformers" in log
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert list((tmp_path / "hf").glob("*.safetensors"))
