"""`llm train` end to end on real processes: ZeRO 0-3 over gloo, exact resume, preemption, crash safety, NaN guard.

Tolerances: runs with the same world size are compared for exact equality (fp32 on CPU is deterministic and the
gloo reductions have a fixed order). Runs with a different world size sum the same gradients in a different
order, so their losses agree to a relative 1e-4 over 12 steps, not bit for bit.
"""

import json
import signal
import subprocess

import pytest

from llm.engine.signals import PREEMPTED_EXIT_CODE
from tests.helpers import ROOT, env, kill_tree, losses, run_train, start_train, train_command, wait_for, write_config


@pytest.fixture(scope="module")
def one_process_reference(packed_data, tmp_path_factory):
    """One process, micro-batch 8: the same global batch as two processes with micro-batch 4."""
    tmp = tmp_path_factory.mktemp("ref")
    config = write_config(tmp, packed_data, micro_batch_size=8, zero_stage=0, eval_every=6, eval_batches=2)
    result = run_train(config, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "llm train: 1 process(es)" in result.stdout
    return losses(tmp / "run"), losses(tmp / "run", split="val")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_on_two_processes_matches_one_process(packed_data, tmp_path, one_process_reference, stage):
    config = write_config(tmp_path, packed_data, zero_stage=stage, eval_every=6, eval_batches=2)
    result = run_train(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    # The world size Accelerate reports is the launcher's, not 1 (the trap on hosts without a GPU).
    assert f"llm train: 2 process(es), ZeRO-{stage}" in result.stdout
    got = losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 13))
    assert got[12] < got[1] - 0.5, got  # it learns
    # Data sharding and loss reduction: each rank took its half of every global batch, and the logged loss is
    # their mean. Duplicated data, a summed reduction or a wrong world size would all break this equality.
    train_ref, val_ref = one_process_reference
    for step, loss in train_ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), (step, got[step], loss)
    # Validation (collective under ZeRO-3): the same batches as one process, reduced to the same mean.
    val = losses(tmp_path / "run", split="val")
    assert sorted(val) == [6, 12]
    for step, loss in val_ref.items():
        assert val[step] == pytest.approx(loss, rel=1e-4), (step, val[step], loss)
    state = json.loads((tmp_path / "run/checkpoints/step-00000012/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["loader"]["consumed"] == 12 * 2 * 4 * 2
    ran = json.loads((tmp_path / "run/deepspeed_config.json").read_text())  # what DeepSpeed ran with
    assert ran["zero_optimization"]["stage"] == stage and ran["train_batch_size"] == 16
    assert (tmp_path / "run/loss.png").stat().st_size > 0


def test_resume_after_kill_reproduces_the_uninterrupted_run(packed_data, tmp_path):
    full = write_config(tmp_path / "full", packed_data, save_every=4)
    assert run_train(full, 2).returncode == 0
    expected = losses(tmp_path / "full/run")

    config = write_config(tmp_path / "killed", packed_data, save_every=4)
    proc = start_train(config)
    wait_for(proc, "saved checkpoint")  # step 4 is on disk
    wait_for(proc, "step 6/12")  # and training has gone on past it
    kill_tree(proc)  # kill -9, launcher and both ranks
    result = run_train(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step-00000004 at step 4" in result.stdout
    assert losses(tmp_path / "killed/run") == expected  # exact, every step
    # The steps the killed attempt logged past its checkpoint are gone: each step appears once.
    records = [json.loads(line) for line in (tmp_path / "killed/run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 13))


def test_sigterm_to_one_rank_saves_the_current_step_on_all_ranks(packed_data, tmp_path):
    config = write_config(tmp_path, packed_data, steps=100000)
    proc = start_train(config)
    wait_for(proc, "step 3/")
    rank1 = _rank_pid(proc.pid, 1)
    import os

    os.kill(rank1, signal.SIGTERM)  # only rank 1: the flag is all-reduced, so rank 0 saves the same step
    out, _ = proc.communicate(timeout=120)
    assert f"exiting with code {PREEMPTED_EXIT_CODE}" in out
    assert proc.returncode != 0  # the launcher reports its workers' non-zero exit
    marker = json.loads((tmp_path / "run/PREEMPTED").read_text())
    assert marker["exit_code"] == PREEMPTED_EXIT_CODE
    latest = (tmp_path / "run/checkpoints/latest").read_text()
    assert latest == f"step-{marker['step']:08d}" and marker["step"] >= 3
    ckpt = tmp_path / "run/checkpoints" / latest
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    assert sorted(p.name for p in (ckpt / "deepspeed").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_sigterm_exit_code_of_a_single_process_run(packed_data, tmp_path):
    config = write_config(tmp_path, packed_data, steps=100000)
    proc = subprocess.Popen(train_command(config, 1), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(proc, "step 2/")
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE


def test_kill_during_save_resumes_from_the_previous_checkpoint(packed_data, tmp_path):
    config = write_config(tmp_path, packed_data, save_every=2, steps=6)
    # Rank 0 dies (SIGKILL) after every shard of step 4 is written but before the folder is renamed into place.
    result = run_train(config, 2, LLM_FAULT="before_rename:step-00000004")
    assert result.returncode != 0
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000002"
    assert (ckpts / ".tmp-step-00000004").is_dir() and not (ckpts / "step-00000004").exists()
    result = run_train(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000002 at step 2" in result.stdout
    assert not (ckpts / ".tmp-step-00000004").exists()
    assert (ckpts / "latest").read_text() == "step-00000006"


def test_resaving_a_step_is_atomic(packed_data, tmp_path):
    config = write_config(tmp_path, packed_data, save_every=2, steps=4)
    assert run_train(config, 2).returncode == 0
    ckpts = tmp_path / "run/checkpoints"
    # As after a kill between renaming step 4 into place and updating `latest`: the run resumes from step 2 and
    # saves step 4 again. Kill it between moving the old step 4 aside and renaming the new one into place.
    (ckpts / "latest").write_text("step-00000002")
    result = run_train(config, 2, LLM_FAULT="resave_between_renames:step-00000004")
    assert result.returncode != 0
    assert not (ckpts / "step-00000004").exists()
    assert (ckpts / ".old-step-00000004/trainer_state.json").is_file()  # nothing was deleted yet
    assert (ckpts / ".tmp-step-00000004/trainer_state.json").is_file()
    result = run_train(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (ckpts / "latest").read_text() == "step-00000004"
    assert not list(ckpts.glob(".old-*")) and not list(ckpts.glob(".tmp-*"))
    assert json.loads((ckpts / "step-00000004/trainer_state.json").read_text())["step"] == 4


def test_a_stopped_rank_ends_the_job_within_the_collective_timeout(packed_data, tmp_path):
    import os
    import time

    import psutil

    timeout = 30
    config = write_config(tmp_path, packed_data, steps=100000, collective_timeout_s=timeout)
    proc = start_train(config)
    wait_for(proc, "step 3/")
    rank0, rank1 = (psutil.Process(_rank_pid(proc.pid, r)) for r in (0, 1))
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.kill(rank1.pid, signal.SIGSTOP)  # rank 1 stops answering in the middle of the run
    stopped = time.time()
    try:
        gone, _ = psutil.wait_procs([rank0], timeout=timeout + 30)
        assert gone, f"rank 0 still running {timeout + 30} s after rank 1 stopped"
        waited = time.time() - stopped
        out, _ = proc.communicate(timeout=120)  # the launcher then takes rank 1 down and exits
    finally:
        for p in tree:
            if p.is_running():
                p.kill()
    assert waited <= timeout + 30, waited
    assert "llm train: a collective operation timed out after train.collective_timeout_s = 30 s" in out, out[-3000:]
    assert proc.returncode != 0
    alive = [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {alive}"


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["at_start", "when_read"])
def test_a_flipped_byte_stops_the_run_naming_the_shard(packed_data, tmp_path, keep_mtime):
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(packed_data, data)
    shard = data / "train_00000.bin"
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    if keep_mtime:  # as bit rot: the stat the start-up check compares is unchanged
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = run_train(write_config(tmp_path, data, steps=12), 1)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llm train: DataError: ") and str(shard) in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_an_out_of_range_token_id_stops_the_run_naming_the_shard(packed_data, tmp_path):
    """A shard that is consistent with its manifest (checksums included) but holds an id the model has no embedding
    for: only the per-batch vocabulary check can catch it."""
    import hashlib
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(packed_data, data)
    shutil.rmtree(data / "verified")
    shard = data / "train_00000.bin"
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = np.memmap(shard, dtype=np.uint16, mode="r+", offset=32)
    tokens[::50] = 5000  # past the model's 4096, in every window the first batch can read
    tokens.flush()
    del tokens
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["bin"] == shard.name:
            entry["bin_sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    result = run_train(write_config(tmp_path, data, steps=12), 1)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("llm train: DataError: ") and "token id 5000 >= vocab_size 4096" in last, last
    assert str(shard) in last and "token offset" in last


def test_changed_model_shape_on_resume_is_a_clear_error(packed_data, tmp_path):
    config = write_config(tmp_path, packed_data, steps=2)
    assert run_train(config, 1).returncode == 0
    result = run_train(config, 1, ["model.n_layers=2", "train.steps=4"])
    assert result.returncode != 0
    assert "model.n_layers: checkpoint has 4, config has 2" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("llm train: cannot resume")


def test_nonfinite_loss_stops_before_the_optimizer_step(packed_data, tmp_path):
    # An init std beyond fp32's range makes the weights inf and RMSNorm turns them into NaN: a real non-finite
    # loss from the forward. (A huge learning rate does not do it: DeepSpeed already skips steps whose gradients
    # overflow, and RMSNorm keeps the loss finite.)
    config = write_config(tmp_path, packed_data, steps=50, save_every=0)
    result = run_train(config, 2, ["model.init_std=1e39"])
    assert result.returncode != 0
    assert "step 1: non-finite loss on rank(s) [0, 1]" in result.stderr
    assert "stopped before the optimizer step" in result.stderr
    assert not (tmp_path / "run/checkpoints").exists() or not any((tmp_path / "run/checkpoints").glob("step-*"))


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of the worker with RANK=rank among the launcher's descendants."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "llm.cli" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def test_activation_checkpointing_gives_the_same_losses(packed_data, tmp_path):
    runs = {}
    for flag in (False, True):
        config = write_config(tmp_path / str(flag), packed_data, steps=4, zero_stage=0,
                              activation_checkpointing=flag)
        result = run_train(config, 1)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[flag] = losses(tmp_path / str(flag) / "run")
    assert runs[True] == pytest.approx(runs[False], rel=1e-6)


def test_activation_checkpointing_recomputes_each_block_in_the_backward(tiny_cfg):
    import torch

    from llm.engine.trainer import apply_activation_checkpointing
    from llm.models import build_model

    model = build_model(tiny_cfg)
    apply_activation_checkpointing(model)
    calls = []
    # (Hook the attention: PyTorch stops the recomputation inside the block's last op once every saved tensor is
    # back, so the feed-forward, which ends the block, never returns a second time.)
    model.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randint(0, tiny_cfg.vocab_size, (2, 16))).sum().backward()
    assert len(calls) == 2  # once in the forward, once again when the backward needs its activations
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in build_model(tiny_cfg).named_parameters()]
