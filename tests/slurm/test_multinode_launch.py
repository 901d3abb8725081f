"""Without Slurm: two `accelerate launch` "machines" on localhost (machine rank 0 and 1, one process each) with
configs/accelerate/multinode.yaml train as one world of two, exactly like two processes on one machine."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.helpers import ROOT, env, losses, run_train, write_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_localhost_train_together(packed_data, tmp_path):
    port = str(free_port())
    two_machines = write_config(tmp_path / "machines", packed_data)

    def machine(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "configs/accelerate/multinode.yaml"), "--num_machines", "2", "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
             "-m", "llm.cli", "train", str(two_machines)],
            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [machine(0), machine(1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "llm train: 2 process(es), ZeRO-2" in outputs[0]  # rank 0 lives on machine 0

    # The same run as two processes of one machine: the same world, the same data shards, the same losses.
    one_machine = write_config(tmp_path / "one", packed_data)
    result = run_train(one_machine, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    got, reference = losses(tmp_path / "machines/run"), losses(tmp_path / "one/run")
    assert sorted(got) == list(range(1, 13))
    assert got == reference
