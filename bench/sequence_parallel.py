"""Activation memory per rank of one forward + backward under Ulysses sequence parallelism: SP=2 on two processes
against SP=1 on one, the same sequences, side by side in one run.

Each case runs in fresh processes (two under gloo, the all-to-alls included, for SP=2): every rank builds the model
(`llm.models.decoder.Decoder`, fp32, attention `sdpa`, the trainer's model), makes the batch, takes its resident
memory as the baseline, then runs one forward + backward of its slice of the sequences as `llm train` does
(`llm.engine.sequence`, the loss summed over the slice). Reported per rank:

- peak: `ru_maxrss` after the backward minus the resident memory before the forward, the weights' gradients
  already allocated (the kernel's true high-water mark: activations, their gradients, the all-to-all buffers,
  allocator slack);
- saved: the bytes of the storages autograd kept for the backward (saved-tensor hooks), what the formula models
  (plus a copy of the output head's weight, which does not grow with the tokens);
- formula: `llm.engine.memory.activation_memory` for the same shape (what `llm info --sp` prints).

    python bench/sequence_parallel.py                      # seq 4096, the tiny-but-wide shape, 3 rounds
    python bench/sequence_parallel.py --seq-len 8192 --checkpointing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.memory import current_bytes, peak_bytes  # noqa: E402

MB = 1e6


def model_config(args: argparse.Namespace):
    from llm.config import ModelConfig

    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                       n_kv_heads=args.n_kv_heads, d_ff=args.d_ff, max_seq_len=args.seq_len, attention="sdpa")


def worker(rank: int, args: argparse.Namespace, sp: int, store: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    group = None
    if sp > 1:
        import deepspeed

        deepspeed.init_distributed("gloo", auto_mpi_discovery=False, init_method=f"file://{store}", rank=rank,
                                   world_size=sp)
        group = torch.distributed.new_group(list(range(sp)))
    from llm.engine.memory import activation_memory
    from llm.models.decoder import Decoder

    cfg = model_config(args)
    torch.manual_seed(0)
    model = Decoder(cfg)
    if args.checkpointing:
        from llm.engine.trainer import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=g),
             "labels": torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), generator=g), "offset": 0}
    if group is not None:
        from llm.engine.sequence import SequenceParallel

        sequence = SequenceParallel(group)
        sequence.apply(model)
        batch = sequence.local(batch)
    ids, labels, offset = batch["input_ids"].contiguous(), batch["labels"].contiguous(), batch["offset"]
    if group is not None:
        torch.distributed.barrier(group)
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for p in model.parameters():  # the weights' gradients exist before the baseline: they do not scale with tokens
        p.grad = torch.zeros_like(p)
    baseline = current_bytes()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels, reduction="sum", offset=offset)
    loss.backward()
    seconds = time.perf_counter() - start
    result = {"rank": rank, "peak": peak_bytes() - baseline, "saved": sum(saved.values()), "seconds": seconds,
              "loss": loss.item(), "formula": activation_memory(cfg, args.seq_len, args.micro_batch, sp, "fp32",
                                                                args.checkpointing)}
    Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    if group is not None:
        torch.distributed.barrier(group)
        torch.distributed.destroy_process_group()


def run_case(args: argparse.Namespace, sp: int) -> list[dict]:
    """One case in fresh processes (a subprocess that spawns the ranks); each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", str(sp), "--out", f"{tmp}/result",
               *sys.argv[1:]]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode != 0:
            raise SystemExit(f"SP={sp} failed:\n{result.stderr[-4000:]}")
        return [json.loads(Path(f"{tmp}/result.rank{r}.json").read_text()) for r in range(sp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=16)
    parser.add_argument("--n-kv-heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--checkpointing", action="store_true", help="train.activation_checkpointing on")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, alternating the order of the two cases")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        if args.case == 1:
            worker(0, args, 1, "", args.out)
        else:
            import torch.multiprocessing as mp

            store = f"{args.out}.store"
            mp.start_processes(worker, args=(args, args.case, store, args.out), nprocs=args.case,
                               start_method="spawn")
        return

    runs: dict[int, list[list[dict]]] = {1: [], 2: []}
    for r in range(args.repeats):
        for sp in (1, 2) if r % 2 == 0 else (2, 1):
            runs[sp].append(run_case(args, sp))
    cfg = model_config(args)
    print(f"decoder: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads ({cfg.kv_heads} kv), ffn "
          f"{cfg.ffn_hidden}, vocab {cfg.vocab_size}; {args.micro_batch} x {args.seq_len:,} tokens, fp32 on CPU, "
          f"attention sdpa, {'with' if args.checkpointing else 'without'} activation checkpointing; one forward + "
          f"backward per rank, {args.repeats} rounds of fresh processes")
    print(f"{'case':<14}{'tokens/rank':>12}{'peak MB':>10}{'saved MB':>10}{'formula MB':>12}{'time s':>8}   "
          "peak of each round (worst rank)")
    summary = {}
    for sp, rounds in runs.items():
        worst = [max(rank["peak"] for rank in ranks) for ranks in rounds]
        saved = max(rank["saved"] for ranks in rounds for rank in ranks)
        summary[sp] = {"peak": statistics.median(worst), "saved": saved, "formula": rounds[0][0]["formula"],
                       "seconds": statistics.median(max(rank["seconds"] for rank in ranks) for ranks in rounds),
                       "loss": sum(rank["loss"] for rank in rounds[0])}
        s = summary[sp]
        print(f"{f'SP={sp} ({sp} proc)':<14}{args.micro_batch * args.seq_len // sp:>12,}{s['peak'] / MB:>10,.0f}"
              f"{s['saved'] / MB:>10,.0f}{s['formula'] / MB:>12,.0f}{s['seconds']:>8.1f}   "
              + " ".join(f"{x / MB:,.0f}" for x in worst))
    print(f"SP=2 / SP=1 per rank: peak {summary[2]['peak'] / summary[1]['peak']:.2f}x, saved "
          f"{summary[2]['saved'] / summary[1]['saved']:.2f}x, formula "
          f"{summary[2]['formula'] / summary[1]['formula']:.2f}x;"
          f" summed loss {summary[2]['loss']:.4f} vs {summary[1]['loss']:.4f}")


if __name__ == "__main__":
    main()
