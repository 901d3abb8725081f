"""Resuming on another number of processes (or another ZeRO stage): DeepSpeed's universal checkpoint.

A ZeRO-1/2/3 checkpoint holds each rank's slice of the fp32 master weights and Adam moments, cut for the world size
that saved it; DeepSpeed refuses to load it on another one. `deepspeed.checkpoint.ds_to_universal` rewrites the
slices as one file per parameter (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt` plus the step), which DeepSpeed then
loads on any number of processes and any ZeRO stage >= 1 (`"checkpoint": {"load_universal": true}`), re-slicing as
it goes: weights, moments and the optimizer step are kept exactly.

The conversion runs once, on global rank 0, in a subprocess (it forks workers and needs the checkpoint's memory
only while it runs), into a temporary folder inside the checkpoint that is renamed to `universal/` when complete.
The other ranks wait for that folder by polling the file system rather than in a collective, so a conversion that
takes longer than train.collective_timeout_s does not time them out. A failed conversion leaves `.universal-failed`
with the converter's last lines, which every rank reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

UNIVERSAL = "universal"
FAILED = ".universal-failed"
OPTIM_GLOB = "*zero_pp_rank_*_optim_states.pt"  # ZeRO-1/2/3 and the bf16 optimizer: one file per data-parallel rank


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed with this run's settings; the message says what differs."""


@dataclass
class Resume:
    path: Path  # the step-N checkpoint folder
    saved_world: int
    saved_stage: int
    universal: bool  # load through the universal checkpoint (converted on first use)

    def describe(self, world: int, stage: int) -> str:
        if not self.universal:
            return f" (saved with {self.saved_world} process(es))"
        return (f" through its universal checkpoint (saved with {self.saved_world} process(es) at ZeRO-"
                f"{self.saved_stage}; now {world} at ZeRO-{stage})")


def saved_partitions(ds_dir: Path) -> int:
    """How many data-parallel ranks the optimizer state is cut into (0: not partitioned, as ZeRO-0 fp32)."""
    return len(list(ds_dir.glob(OPTIM_GLOB)))


def plan(path: Path, saved_world: int, saved_stage: int, world: int, stage: int) -> Resume:
    """How to resume `path` (saved by `saved_world` processes at `saved_stage`) on `world` processes at `stage`."""
    partitions = saved_partitions(path / "deepspeed")
    if saved_stage == stage and saved_world == world:
        return Resume(path, saved_world, saved_stage, universal=False)
    if saved_stage == 0 and stage == 0 and partitions == 0:
        # ZeRO-0 in fp32 saves the whole model and optimizer once: every rank of any world loads the same file.
        return Resume(path, saved_world, saved_stage, universal=False)
    if saved_stage == 0 or stage == 0:
        raise ResumeError(f"cannot resume {path}: it was saved with ZeRO-{saved_stage} on {saved_world} process(es) "
                          f"and this run uses ZeRO-{stage} on {world}; a ZeRO-0 run resumes only at ZeRO-0 (set "
                          f"train.zero_stage={saved_stage}, or export it and start a new run with train.init_from)")
    if partitions == 0:
        raise ResumeError(f"cannot resume {path} on {world} process(es): it has no partitioned optimizer state "
                          f"({path / 'deepspeed'}/{OPTIM_GLOB}) to re-slice")
    return Resume(path, saved_world, saved_stage, universal=True)


def _workers() -> tuple[int, int]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // 2)), max(1, min(4, cpus // 4))


def convert(step_dir: Path) -> Path:
    """Write `step_dir/universal` from `step_dir/deepspeed` (rank 0 only); returns the universal folder."""
    from llm.checkpoint.safety import vet_deepspeed_folder

    final = step_dir / UNIVERSAL
    if final.is_dir():
        return final
    vet_deepspeed_folder(step_dir / "deepspeed")  # the converter unpickles with weights_only=False
    (step_dir / FAILED).unlink(missing_ok=True)
    staging = step_dir / f".tmp-{UNIVERSAL}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    extract, merge = _workers()
    log = staging / "convert.log"
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir / "deepspeed"),
           # The converter also writes `latest_universal` next to its output folder: inside the staging folder.
           "--output_folder", str(staging / UNIVERSAL), "--inject_missing_state",
           "--num_extract_workers", str(extract), "--num_merge_workers", str(merge)]
    started = time.perf_counter()
    with open(log, "w") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        message = (f"converting {step_dir / 'deepspeed'} to a universal checkpoint failed (exit {result.returncode}): "
                   f"{tail}")
        (step_dir / FAILED).write_text(message + "\n")
        shutil.rmtree(staging, ignore_errors=True)
        raise ResumeError(message)
    from llm.checkpoint.checkpointer import fsync_tree

    fsync_tree(staging / UNIVERSAL)
    os.replace(staging / UNIVERSAL, final)
    shutil.rmtree(staging, ignore_errors=True)
    print(f"converted {step_dir.name} to a universal checkpoint in {time.perf_counter() - started:.1f}s: {final}",
          flush=True)
    return final


def wait_for(step_dir: Path, poll_s: float = 1.0) -> Path:
    """Ranks other than 0: wait until rank 0's conversion is complete (or failed)."""
    final, failed = step_dir / UNIVERSAL, step_dir / FAILED
    while True:
        if final.is_dir():
            return final
        if failed.is_file():
            raise ResumeError(failed.read_text().strip())
        time.sleep(poll_s)
