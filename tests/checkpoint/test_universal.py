"""Resuming on another number of processes: 2 -> 1 and 1 -> 2 processes under ZeRO-2 and ZeRO-3, real DeepSpeed over
gloo, the same global batch (micro-batch 4 on two processes, 8 on one).

After loading, the fp32 weights, both Adam moments and the optimizer step equal the saved ones exactly (both
sides compared in DeepSpeed's universal layout: one file per parameter, whatever the world size); the next 10
losses match the uninterrupted two-process run to a relative 1e-4 (a different world size sums the same gradients
in another order, so not bit for bit).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.checkpoint import universal
from tests.helpers import ROOT, env, losses, run_train, write_config

STEPS, SAVED = 14, 4
MICRO = {1: 8, 2: 4}  # micro-batch per process: the same global batch of 8 sequences


def _config(tmp: Path, data: Path, stage: int, processes: int) -> Path:
    return write_config(tmp, data, zero_stage=stage, steps=STEPS, save_every=SAVED, keep_last=5,
                        micro_batch_size=MICRO[processes])


def _cut_back_to(run_dir: Path, step: int) -> None:
    """Make `run_dir` look as if the run had died right after saving `step` (later checkpoints never written)."""
    checkpoints = run_dir / "checkpoints"
    for p in checkpoints.glob("step-*"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)
    (checkpoints / "latest").write_text(f"step-{step:08d}")


def _universal_states(folder: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weights, moments and step from a universal checkpoint folder, by `name/kind`."""
    out = {}
    for f in sorted((folder / "zero").glob("*/*.pt")):
        value = torch.load(f, weights_only=True, map_location="cpu")
        out[f"{f.parent.name}/{f.stem}"] = value["param"] if isinstance(value, dict) else value
    return out


def _resave(config: Path, processes: int, out: Path) -> None:
    script = str(ROOT / "tests/checkpoint/resave.py")
    override = [f"train.micro_batch_size={MICRO[processes]}"]
    if processes == 1:
        cmd = [sys.executable, script, str(config), str(out), *override]
    else:
        from tests.helpers import train_command

        launch = train_command(config, processes)
        cmd = [*launch[:launch.index("-m", 3)], script, str(config), str(out), *override]
    result = subprocess.run(cmd, cwd=ROOT, env=env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def two_process_run(request, packed_data, tmp_path_factory):
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"uninterrupted{stage}")
    result = run_train(_config(tmp, packed_data, stage, 2), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return stage, tmp / "run"


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes(packed_data, tmp_path, two_process_run, before, after):
    stage, reference = two_process_run
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    if before == 2:
        shutil.copytree(reference, tmp_path / "run")
        config = _config(tmp_path, packed_data, stage, after)
    else:  # a one-process run of the same global batch, to step 14 like the reference (same LR schedule)
        config = _config(tmp_path, packed_data, stage, before)
        assert run_train(config, 1).returncode == 0
    _cut_back_to(tmp_path / "run", SAVED)
    saved = tmp_path / "run/checkpoints" / f"step-{SAVED:08d}"

    # Load on the new world size and save again untouched: weights, moments and step come back exactly.
    _resave(config, after, tmp_path / "resaved")
    assert (saved / universal.UNIVERSAL).is_dir()  # converted once, next to the checkpoint
    universal.convert(tmp_path / "resaved")
    before_state = _universal_states(saved / universal.UNIVERSAL)
    after_state = _universal_states(tmp_path / "resaved" / universal.UNIVERSAL)
    assert before_state.keys() == after_state.keys()
    kinds = {k.split("/")[1] for k in before_state}
    assert {"fp32", "exp_avg", "exp_avg_sq"} <= kinds, kinds
    for key, value in before_state.items():
        assert torch.equal(value, after_state[key]), key
    assert all(float(v) == SAVED for k, v in before_state.items() if k.endswith("/step"))

    # Train on: the next 10 losses are the uninterrupted two-process run's.
    result = run_train(config, after, [f"train.micro_batch_size={MICRO[after]}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {saved} at step {SAVED} through its universal checkpoint" in result.stdout
    assert f"saved with {before} process(es) at ZeRO-{stage}; now {after} at ZeRO-{stage}" in result.stdout
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, STEPS + 1))  # each step once, no repeats after the resume
    for step in range(SAVED + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got[step], expected[step])


def test_zero0_checkpoint_resumes_on_another_number_of_processes(packed_data, tmp_path):
    """ZeRO-0 (fp32) saves the whole model and optimizer once: it loads on any world size without conversion."""
    config = write_config(tmp_path, packed_data, zero_stage=0, steps=6, save_every=3, micro_batch_size=4)
    assert run_train(config, 2).returncode == 0
    expected = losses(tmp_path / "run")
    _cut_back_to(tmp_path / "run", 3)
    result = run_train(config, 1, ["train.micro_batch_size=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 3 (saved with 2 process(es))" in result.stdout
    got = losses(tmp_path / "run")
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-4)


def test_zero0_to_zero2_is_a_one_line_error(packed_data, tmp_path):
    config = write_config(tmp_path, packed_data, zero_stage=0, steps=2)
    assert run_train(config, 1).returncode == 0
    result = run_train(config, 1, ["train.zero_stage=2", "train.steps=4"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("llm train: cannot resume") and "ZeRO-0" in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
