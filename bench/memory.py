"""Peak host memory per rank while building the model and preparing the DeepSpeed engine, 1 process against 2.

Each case is a real, separate run: one process directly, two under `accelerate launch` (configs/accelerate/
cpu_2proc.yaml, gloo, OMP_NUM_THREADS=1 as the tests do). Every rank imports torch, DeepSpeed, Accelerate and `llm`,
creates the Accelerator, builds the preset as `llm train` does under ZeRO-3 (`llm.engine.build.build_for_training`:
partitioned by deepspeed.zero.Init), then builds the optimizer and runs `accelerator.prepare`. Its peak resident
memory (`ru_maxrss`, the kernel's true high-water mark) is read after each phase, so "build" is the peak up to the end
of the build and "prepare" the peak of the whole start-up. With `--unpartitioned` the unpartitioned build is measured
too, for reference: the whole model built on every rank, then handed to ZeRO-3's prepare.

    python bench/memory.py                          # the 350m preset, partitioned, 1 and 2 processes
    python bench/memory.py --unpartitioned          # and the unpartitioned build, for reference
    python bench/memory.py --preset tiny --zero-config configs/deepspeed/zero3.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    """One rank: build and prepare, then write this rank's measurements to OUT/rank<r>.json."""
    import torch  # noqa: F401  (imported before the first reading, as in `llm train`)

    from llm.config import load_config
    from llm.engine.build import build_for_training
    from llm.engine.distributed import make_accelerator
    from llm.engine.optim import build_optimizer
    from llm.engine.tasks import make_task

    cfg = load_config(args.config)
    readings = {"imports": peak_bytes()}
    accelerator, _ = make_accelerator(cfg.train, cfg.optim.grad_clip)
    task = make_task(cfg)
    readings["accelerator"] = peak_bytes()
    start = time.perf_counter()
    if args.unpartitioned:
        model = task.build_model()  # the whole model on every rank
    else:
        model = build_for_training(task, cfg, accelerator)
    build_s = time.perf_counter() - start
    readings["build"], after_build = peak_bytes(), current_bytes()
    start = time.perf_counter()
    optimizer = build_optimizer(model, cfg.optim)
    engine, optimizer = accelerator.prepare(model, optimizer)
    prepare_s = time.perf_counter() - start
    readings["prepare"], after_prepare = peak_bytes(), current_bytes()
    local = sum(p.ds_tensor.numel() for p in engine.module.parameters())  # this rank's partitions
    out = Path(args.out) / f"rank{accelerator.process_index}.json"
    out.write_text(json.dumps({"rank": accelerator.process_index, "world": accelerator.num_processes,
                               "peak": readings, "rss_after_build": after_build, "rss_after_prepare": after_prepare,
                               "local_elements": local, "params": model.num_params(), "build_s": build_s,
                               "prepare_s": prepare_s}))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(workdir: Path, preset: str, zero_config: str | None) -> Path:
    import yaml

    train = {"output_dir": str(workdir / "run"), "zero_stage": 3, "micro_batch_size": 1, "grad_accum": 1,
             "precision": "fp32"}
    if zero_config:
        train["deepspeed_config"] = str(Path(zero_config).resolve())
    path = workdir / "run.yaml"
    data = {"datasets": [{"path": str(workdir / "unused")}], "seq_len": 256}  # never read: no batch is loaded
    path.write_text(yaml.safe_dump({"model": preset, "data": data, "train": train}))
    return path


def run_case(config: Path, processes: int, unpartitioned: bool, workdir: Path) -> list[dict]:
    out = Path(tempfile.mkdtemp(dir=workdir))
    worker_args = [str(Path(__file__).resolve()), "--worker", "--config", str(config), "--out", str(out)]
    worker_args += ["--unpartitioned"] if unpartitioned else []
    if processes == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(_free_port()), *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--zero-config", help="a ZeRO-3 JSON instead of configs/deepspeed/zero3.json")
    parser.add_argument("--unpartitioned", action="store_true", help="also measure the unpartitioned build")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        # Measured and written. Skip the interpreter's teardown, where a thread still alive now and then aborts a
        # rank ("terminate called without an active exception") and would fail the case after the fact.
        sys.stdout.flush()
        os._exit(0)

    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    config = write_config(workdir, args.preset, args.zero_config)
    builds = [False, True] if args.unpartitioned else [False]
    print(f"preset {args.preset}, ZeRO-3 ({args.zero_config or 'configs/deepspeed/zero3.json'}), fp32 on CPU, "
          "peak RSS per rank in GB (ru_maxrss)")
    print(f"{'build':<14}{'procs':>6}{'rank':>5}{'imports':>9}{'+accel.':>9}{'build':>8}{'prepare':>9}"
          f"{'elements held':>15}{'build s':>9}{'prep. s':>9}")
    for unpartitioned in builds:
        peaks = {}
        for processes in (1, 2):
            ranks = run_case(config, processes, unpartitioned, workdir)
            for r in ranks:
                p = r["peak"]
                print(f"{'whole' if unpartitioned else 'partitioned':<14}{processes:>6}{r['rank']:>5}"
                      f"{p['imports'] / GB:>9.2f}{p['accelerator'] / GB:>9.2f}{p['build'] / GB:>8.2f}"
                      f"{p['prepare'] / GB:>9.2f}{r['local_elements']:>15,}{r['build_s']:>9.1f}{r['prepare_s']:>9.1f}")
            peaks[processes] = {phase: max(r["peak"][phase] for r in ranks) for phase in ("build", "prepare")}
        print(f"  {'whole' if unpartitioned else 'partitioned'}: 2-process / 1-process peak per rank: build "
              f"{peaks[2]['build'] / peaks[1]['build']:.2f}x, build + prepare "
              f"{peaks[2]['prepare'] / peaks[1]['prepare']:.2f}x")


if __name__ == "__main__":
    main()
