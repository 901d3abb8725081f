"""One-shot GPU check: one command on one H100/H200 that prints one table.

    python bench/gpu.py                  # on a GPU machine, ~5-8 minutes
    python bench/gpu.py --cpu-smoke      # the same code on a tiny shape on the CPU, a minute (a test runs it)

It uses the torch the machine has (no reinstall) and needs DeepSpeed, Accelerate and transformers importable (a pure
Python DeepSpeed wheel: `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed`). Three parts:

  a. the CUDA tests of the attention backends and the chunked loss (`pytest -m cuda`), pass/skip counts;
  b. `llm train` of the `1b` preset (Llama-3.2-1B shape), seq 2048, bf16, ZeRO-2, one GPU, micro-batch 4, on
     synthetic packed data (random documents of 64-4096 tokens), with document masking on and off: tokens/s and MFU
     (median over the logged steps after warm-up), peak GPU memory, the attention backend the trainer chose;
  c. `transformers`' LlamaForCausalLM of the same shape (SDPA attention, fp32 weights under bf16 autocast, fused
     AdamW: the loop a user would write) on the same batches as (b) without document masking: tokens/s and
     ours / theirs.

Nothing is written outside a temporary folder. --cpu-smoke runs the `tiny` preset at seq 64 in fp32 for a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm.config import DataConfig, DatasetEntry, load_model_config  # noqa: E402
from llm.data.loader import build_train_loader  # noqa: E402
from llm.data.shards import FORMAT, FORMAT_VERSION, ShardWriter, dtype_name, token_dtype, write_manifest  # noqa: E402


def settings(smoke: bool) -> dict:
    if smoke:
        return dict(preset="tiny", seq_len=64, micro_batch=2, steps=6, warmup=2, log_every=1, precision="fp32")
    return dict(preset="1b", seq_len=2048, micro_batch=4, steps=40, warmup=10, log_every=5, precision="bf16")


def synthetic_data(folder: Path, vocab_size: int, tokens: int, seed: int = 0) -> Path:
    """A packed dataset of random documents (64-4096 tokens, EOS-terminated): throughput does not depend on text."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    splits = {}
    for split, n in (("train", tokens), ("val", 4096 * 4)):
        writer = ShardWriter(folder, split, dtype, shard_tokens=1 << 28)
        lens = []
        while sum(lens) < n:
            lens.append(int(rng.integers(64, 4097)))
        ids = rng.integers(1, vocab_size, size=sum(lens), dtype=np.int64)
        ids[np.cumsum(lens) - 1] = 0  # EOS (id 0) ends every document
        writer.add(ids, np.asarray(lens))
        splits[split] = writer.close()
    write_manifest(folder, {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype_name(dtype),
                            "tokenizer": {"sha256": "synthetic", "vocab_size": vocab_size, "special_tokens": {},
                                          "special_ids": {}},
                            "sources": [], "stats": {}, "splits": splits})
    return folder


def cuda_tests() -> str:
    """Run the CUDA-marked tests of the attention backends and the loss; their pytest summary line."""
    files = [str(p) for p in (ROOT / "tests/attention", ROOT / "tests/models/test_loss.py") if p.exists()]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files],
                            cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    summary = lines[-1] if lines else f"pytest exit {result.returncode}"
    if result.returncode not in (0, 5):  # 5: no test selected (no GPU)
        print(result.stdout[-4000:], file=sys.stderr)
    return summary.strip("= ")


def run_llm_train(workdir: Path, data: Path, s: dict, masking: bool) -> dict:
    out = workdir / f"run-{'docs' if masking else 'plain'}"
    cfg = {"model": s["preset"], "data": {"datasets": [{"path": str(data)}], "seq_len": s["seq_len"],
                                          "document_masking": masking},
           "optim": {"warmup_steps": 2},
           "train": {"output_dir": str(out), "steps": s["steps"], "micro_batch_size": s["micro_batch"],
                     "grad_accum": 1, "precision": s["precision"], "zero_stage": 2, "log_every": s["log_every"],
                     "eval_every": 0, "save_every": 0, "save_at_end": False}}
    path = workdir / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "llm.cli", "train", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llm train failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train" and r["step"] > s["warmup"]]
    backend = re.search(r"^attention: (.*)$", result.stdout, re.M)
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "mfu": statistics.median(r["mfu"] for r in train) if all("mfu" in r for r in train) else None,
        "memory_gb": max(r.get("cuda_max_alloc_gb", r.get("rss_gb", 0.0)) for r in train),
        "backend": backend.group(1) if backend else "(not reported)",
        "wall_s": time.perf_counter() - started,
    }


def hf_bare_loop(data: Path, s: dict, device: torch.device) -> dict:
    """transformers' LlamaForCausalLM on the batches `llm train` saw without document masking."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm.export.families import to_hf_config

    cfg = load_model_config(s["preset"])
    loader = iter(build_train_loader(DataConfig(datasets=[DatasetEntry(path=str(data))], seq_len=s["seq_len"]),
                                     s["micro_batch"], 0, 1, vocab_size=cfg.vocab_size))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**to_hf_config(cfg)[1], attn_implementation="sdpa")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    bf16 = s["precision"] == "bf16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for step in range(1, s["steps"] + 1):
        batch = next(loader)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > s["warmup"]:
            rates.append(ids.numel() / (time.perf_counter() - t))
    memory = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": statistics.median(rates), "memory_gb": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU, to check the script runs")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --cpu-smoke to run the same code on the CPU")
    s = settings(smoke)
    device = torch.device("cpu" if smoke else "cuda")
    gpu = "CPU (smoke)" if smoke else torch.cuda.get_device_name()
    print(f"bench/gpu.py: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda}), preset {s['preset']}, "
          f"seq {s['seq_len']}, micro-batch {s['micro_batch']}, {s['steps']} steps ({s['warmup']} warm-up), "
          f"{s['precision']}", flush=True)
    rows = []
    started = time.perf_counter()
    rows.append(("a. CUDA tests (attention, loss)", cuda_tests()))
    print(f"  {rows[-1][0]}: {rows[-1][1]}", flush=True)
    vocab = load_model_config(s["preset"]).vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokens = (s["steps"] + 2) * s["micro_batch"] * (s["seq_len"] + 1)
        data = synthetic_data(workdir / "data", vocab, tokens)
        ours = {}
        for masking in (True, False):
            r = run_llm_train(workdir, data, s, masking)
            ours[masking] = r
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            rows.append((f"b. llm train, document masking {'on' if masking else 'off'}",
                         f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, peak {r['memory_gb']:.1f} GB, "
                         f"attention {r['backend']}"))
            print(f"  {rows[-1][0]}: {rows[-1][1]} ({r['wall_s']:.0f} s)", flush=True)
        hf = hf_bare_loop(data, s, device)
        memory = f"peak {hf['memory_gb']:.1f} GB" if hf["memory_gb"] == hf["memory_gb"] else "peak n/a on the CPU"
        rows.append(("c. LlamaForCausalLM (SDPA), bare loop",
                     f"{hf['tokens_per_s']:,.0f} tokens/s, {memory}; ours / theirs "
                     f"{ours[False]['tokens_per_s'] / hf['tokens_per_s']:.2f}x (document masking off)"))
        print(f"  {rows[-1][0]}: {rows[-1][1]}", flush=True)
    print("\n| check | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
