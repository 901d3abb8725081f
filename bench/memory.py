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

`head`: one forward + backward of the output head and its loss at the `1b` shape (d_model 2048, vocab 128,256) on
2 x 2048 tokens in fp32, unfused (`F.cross_entropy(F.linear(h, W).float(), y)`, full logits) against the chunked
`llm.models.loss.linear_cross_entropy`. Each in a fresh process: its peak RSS above the baseline taken after the
inputs and the weight are allocated, and its time; the median over `--repeats` rounds that alternate the order.

    python bench/memory.py head                     # the 1b head; --chunk-bytes to try another chunk size

`import`: the host memory of `train.init_from` (ZeRO-0/1/2: the whole model on the process) for a random model of
`--preset` (default qwen2.5-0.5b) saved as a transformers folder in bf16: `llm`'s loader (one parameter read and
converted at a time into the built model) against reading the whole state dict first and then loading it (what the
loader did before), and `transformers`' own `AutoModelForCausalLM.from_pretrained` in fp32 for reference. Each in a
fresh process: its peak RSS above the baseline after imports, and its time.

    python bench/memory.py import --preset qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
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


def head_worker(args: argparse.Namespace) -> None:
    """One forward + backward of one head variant in this fresh process: print its peak above the baseline, its
    time and its loss."""
    import torch
    import torch.nn.functional as F

    from llm.models.loss import chunk_tokens, linear_cross_entropy

    torch.manual_seed(0)
    # In place, no temporaries: the baseline high-water mark is then what stays resident.
    h = torch.randn(args.tokens, args.d_model).requires_grad_()  # (N, d) final hidden states
    weight = torch.randn(args.vocab, args.d_model).mul_(0.02).requires_grad_()  # (V, d)
    labels = torch.randint(0, args.vocab, (args.tokens,))
    baseline = peak_bytes()
    chunk = chunk_tokens(args.vocab, args.chunk_bytes)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if args.head_worker == "unfused":
        loss = F.cross_entropy(F.linear(h, weight).float(), labels)
    else:
        loss = linear_cross_entropy(h, weight, labels, chunk_size=chunk, impl="torch")
    loss.backward()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    print(json.dumps({"peak": peak_bytes() - baseline, "seconds": seconds, "cpu": cpu, "loss": loss.item(),
                      "chunk": chunk, "threads": torch.get_num_threads()}))


def import_worker(args: argparse.Namespace) -> None:
    """Load the folder one way in this fresh process; print the peak above the post-import baseline."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm.export.families import load_hf_folder, open_hf_folder
    from llm.models import build_model
    from llm.models.init import no_init

    baseline, start = current_bytes(), time.perf_counter()
    with torch.no_grad():
        if args.import_worker == "transformers":
            AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
        else:
            cfg, readers = open_hf_folder(args.folder)
            with no_init():
                model = build_model(cfg)
            if args.import_worker == "llm":
                for name, p in model.named_parameters():
                    p.copy_(readers[name]())
            else:
                model.load_state_dict(load_hf_folder(args.folder)[1])
    print(json.dumps({"peak": peak_bytes() - baseline, "seconds": time.perf_counter() - start}))


def run_import(args: argparse.Namespace) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    from llm.config import load_model_config
    from llm.export.families import to_hf_config
    from llm.export.layout import to_hf_state_dict
    from llm.models import build_model

    folder = Path(tempfile.mkdtemp(prefix="bench-import-"))
    cfg = load_model_config(args.preset)
    model = build_model(cfg, seed=0)
    params = model.num_params()
    family, kwargs = to_hf_config(cfg)
    getattr(transformers, family.config_class)(**kwargs).save_pretrained(folder)
    save_file({k: v.to(torch.bfloat16) for k, v in to_hf_state_dict(model.state_dict(), cfg).items()},
              folder / "model.safetensors")
    del model
    runs = {"llm": [], "whole state dict": [], "transformers": []}
    for r in range(args.repeats):
        for how in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "import", "--folder", str(folder),
                                     "--import-worker", how.split()[0]], cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"import {how} failed:\n{result.stderr[-4000:]}")
            runs[how].append(json.loads(result.stdout.strip().splitlines()[-1]))
    fp32 = 4 * params
    print(f"train.init_from of {args.preset} ({params:,} parameters, {fp32 / GB:.2f} GB in fp32) from a "
          f"{family.model_class} folder in bf16; peak RSS above the post-import baseline (worst of {args.repeats} "
          "fresh processes), median time")
    print(f"{'loader':<18}{'peak GB':>9}{'x fp32 model':>14}{'time s':>8}")
    for how, v in runs.items():
        peak = max(x["peak"] for x in v)
        print(f"{how:<18}{peak / GB:>9.2f}{peak / fp32:>14.2f}{statistics.median(x['seconds'] for x in v):>8.1f}")
    ours, whole = (max(x["peak"] for x in runs[k]) for k in ("llm", "whole state dict"))
    print(f"llm / whole state dict: peak {ours / whole:.2f}x")
    shutil.rmtree(folder)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time to other jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_head(args: argparse.Namespace) -> None:
    """`--repeats` rounds, each variant once per round in a fresh process, the order alternating from round to
    round, so that both variants see the same share of whatever else the machine is doing."""
    base = [sys.executable, str(Path(__file__).resolve()), "head", "--tokens", str(args.tokens), "--d-model",
            str(args.d_model), "--vocab", str(args.vocab), "--chunk-bytes", str(args.chunk_bytes)]
    runs = {"unfused": [], "chunked": []}
    for r in range(args.repeats):
        for variant in ("unfused", "chunked") if r % 2 == 0 else ("chunked", "unfused"):
            result = subprocess.run([*base, "--head-worker", variant], cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"head {variant} failed:\n{result.stderr[-4000:]}")
            runs[variant].append(json.loads(result.stdout.strip().splitlines()[-1]))
    peak = {k: max(x["peak"] for x in v) for k, v in runs.items()}
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    cpu = {k: statistics.median(x["cpu"] for x in v) for k, v in runs.items()}
    per_round = [c["seconds"] / u["seconds"] for u, c in zip(runs["unfused"], runs["chunked"], strict=True)]
    u, c = runs["unfused"][0], runs["chunked"][0]
    print(f"loss head: d_model {args.d_model}, vocab {args.vocab:,}, {args.tokens:,} tokens, fp32 on CPU, "
          f"{u['threads']} threads; chunked: {c['chunk']} tokens per chunk ({args.chunk_bytes / 2**20:.0f} MiB of "
          f"fp32 logits); peak RSS above the inputs and weight (worst run); forward + backward, median of "
          f"{args.repeats} fresh processes each")
    print(f"{'head':<10}{'peak MB':>10}{'time ms':>10}{'CPU ms':>10}   time of each run, ms")
    for name, v in runs.items():
        print(f"{name:<10}{peak[name] / 1e6:>10,.0f}{med[name] * 1e3:>10,.0f}{cpu[name] * 1e3:>10,.0f}   "
              + " ".join(f"{x['seconds'] * 1e3:,.0f}" for x in v))
    ratio = {k: d["chunked"] / d["unfused"] for k, d in (("peak", peak), ("time", med), ("cpu", cpu))}
    print(f"chunked / unfused: peak {ratio['peak']:.2f}x, time {ratio['time']:.3f}x (per round: "
          f"{' '.join(f'{x:.3f}' for x in per_round)}), CPU time {ratio['cpu']:.3f}x;"
          f" loss {c['loss']:.6f} vs {u['loss']:.6f}")


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
    parser.add_argument("mode", nargs="?", choices=["build", "head", "import"], default="build")
    parser.add_argument("--preset", default=None, help="build: default 350m; import: default qwen2.5-0.5b")
    parser.add_argument("--zero-config", help="a ZeRO-3 JSON instead of configs/deepspeed/zero3.json")
    parser.add_argument("--unpartitioned", action="store_true", help="also measure the unpartitioned build")
    parser.add_argument("--tokens", type=int, default=2 * 2048, help="head: tokens (micro-batch x seq_len)")
    parser.add_argument("--d-model", type=int, default=2048, help="head: hidden size")
    parser.add_argument("--vocab", type=int, default=128_256, help="head: vocabulary size")
    parser.add_argument("--repeats", type=int, default=5, help="head: rounds (a fresh process per variant each)")
    parser.add_argument("--chunk-bytes", type=int, default=None, help="head: fp32 logits per chunk (bytes)")
    parser.add_argument("--head-worker", choices=["unfused", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--import-worker", choices=["llm", "whole", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "head":
        if args.chunk_bytes is None:
            from llm.models.loss import CHUNK_BYTES

            args.chunk_bytes = CHUNK_BYTES["cpu"]
        if args.head_worker:
            head_worker(args)
        else:
            run_head(args)
        return
    if args.mode == "import":
        args.preset = args.preset or "qwen2.5-0.5b"
        import_worker(args) if args.import_worker else run_import(args)
        return
    args.preset = args.preset or "350m"
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
