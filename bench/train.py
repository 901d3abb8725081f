"""Training throughput of `llm train` against the loops a user would otherwise write, measured side by side.

For each model shape, in one run and interleaved (A B C A B C ...), on the same packed data, batch and precision:
  A  `llm train` as one process (a real subprocess: Accelerate + DeepSpeed, metrics, data loader)
  B  our Decoder in a bare PyTorch loop (AdamW, the same batches from memory): A / B is the trainer's overhead
  C  `transformers`' LlamaForCausalLM of the same shape (SDPA attention) in the same bare loop: B / C
Throughput is tokens/s over the steps after warm-up; the median of the repeats is reported.

    python bench/train.py                      # tiny and small shapes, 3 repeats
    python bench/train.py --shapes tiny --repeats 1 --steps 20
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

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm.config import (  # noqa: E402
    DataConfig,
    DatasetEntry,
    ModelConfig,
    OptimConfig,  # noqa: E402
    load_model_config,
)
from llm.data.loader import build_train_loader  # noqa: E402
from llm.engine.optim import build_optimizer  # noqa: E402
from llm.export.families import to_hf_config  # noqa: E402
from llm.models import build_model  # noqa: E402

SHAPES = {
    "tiny": [],  # the tiny preset: d 128, 4 layers
    "small": ["d_model=384", "n_layers=6", "n_heads=6", "n_kv_heads=2", "d_ff=1024"],
}


def prepare_data(workdir: Path) -> Path:
    data = ROOT / "data" / "stdlib"
    if (data / "manifest.json").is_file():
        return data
    tok, data = workdir / "tokenizer", workdir / "stdlib"
    subprocess.run([sys.executable, "-m", "data_prep.train_tokenizer", "--vocab-size", "4096", "--output", str(tok)],
                   cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "data_prep.pack_lm", "--tokenizer", str(tok), "--output", str(data)],
                   cwd=ROOT, check=True)
    return data


def run_llm_train(workdir: Path, data: Path, overrides: list[str], args) -> float:
    out = workdir / f"run-{time.time_ns()}"
    cfg = {"model": "tiny", "data": {"datasets": [{"path": str(data)}], "seq_len": args.seq_len},
           "optim": {"warmup_steps": 2},
           "train": {"output_dir": str(out), "steps": args.steps, "micro_batch_size": args.batch, "grad_accum": 1,
                     "zero_stage": args.zero_stage, "log_every": 1, "eval_every": 0, "save_every": 0,
                     "keep_last": 1}}
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run([sys.executable, "-m", "llm.cli", "train", str(path), *[f"model.{o}" for o in overrides]],
                   cwd=ROOT, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train" and r["step"] > args.warmup]
    return statistics.median(rates)


def bare_loop(model: torch.nn.Module, batches: list[dict], args, logits_of) -> float:
    """AdamW on the given batches; tokens/s over the steps after warm-up (median of per-step rates)."""
    opt = build_optimizer(model, OptimConfig())
    rates = []
    for step, batch in enumerate(batches, start=1):
        t = time.perf_counter()
        logits = logits_of(model, batch["input_ids"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > args.warmup:
            rates.append(batch["input_ids"].numel() / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch} x "
          f"{args.seq_len} tokens, {args.steps} steps ({args.warmup} warm-up), ZeRO-{args.zero_stage} for llm train")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = prepare_data(workdir)
        loader = iter(build_train_loader(DataConfig(datasets=[DatasetEntry(path=str(data))], seq_len=args.seq_len),
                                         args.batch, 0, 1))
        batches = [next(loader) for _ in range(args.steps)]
        rows = []
        for shape in args.shapes:
            cfg: ModelConfig = load_model_config("tiny", SHAPES[shape])
            cfg.attention = "sdpa"
            results = {"llm train": [], "bare loop (ours)": [], "bare loop (HF Llama)": []}
            for _ in range(args.repeats):
                results["llm train"].append(run_llm_train(workdir, data, SHAPES[shape], args))
                torch.manual_seed(0)
                ours = build_model(cfg)
                results["bare loop (ours)"].append(bare_loop(ours, batches, args, lambda m, x: m(x)))
                from transformers import LlamaConfig, LlamaForCausalLM

                hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(cfg)[1], attn_implementation="sdpa"))
                results["bare loop (HF Llama)"].append(bare_loop(hf, batches, args, lambda m, x: m(x).logits))
            med = {k: statistics.median(v) for k, v in results.items()}
            n_params = build_model(cfg, device="meta").num_params()
            rows.append((shape, n_params, med, results))

    print()
    print("| shape | params | llm train tok/s | bare loop (ours) tok/s | bare loop (HF Llama) tok/s "
          "| llm train / bare ours | ours / HF |")
    print("|---|---|---|---|---|---|---|")
    for shape, n_params, med, _ in rows:
        a, b, c = med["llm train"], med["bare loop (ours)"], med["bare loop (HF Llama)"]
        print(f"| {shape} | {n_params / 1e6:.2f}M | {a:,.0f} | {b:,.0f} | {c:,.0f} | {a / b:.3f} | {b / c:.2f} |")
    print("\nall repeats (tokens/s):")
    for shape, _, _, results in rows:
        for name, values in results.items():
            print(f"  {shape:6s} {name:22s} " + "  ".join(f"{v:,.0f}" for v in values))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
