"""Training metrics: a progress bar with ETA, metrics.jsonl, TensorBoard, MFU, memory, a loss-curve PNG.

All of it happens on rank 0; other ranks only take part in the reductions that produce the numbers.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil
import torch

from llm.engine.distributed import is_main

# Dense bf16 peak TFLOPs per device, from the vendors' data sheets (no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "A100": 312.0,
}


def device_peak_tflops(precision: str, override: float | None) -> float | None:
    """Peak TFLOPs of one device for MFU: the config's override, else the table for known GPUs in bf16, else None."""
    if override is not None:
        return override
    if precision != "bf16" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return peak
    return None


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return psutil.Process().memory_info().rss / 1e9


class Metrics:
    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int, flops_per_token: float,
                 peak_tflops: float | None, world_size: int):
        self.main = is_main()
        self.flops_per_token = flops_per_token
        self.peak_total = peak_tflops * 1e12 * world_size if peak_tflops else None
        self.memory_name = "cuda_max_alloc_gb" if torch.cuda.is_available() else "rss_gb"
        self.history: list[dict] = []
        self.last_time, self.last_tokens = time.perf_counter(), 0
        if not self.main:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        # A run resumed at step N will log N+1... again: drop what the previous attempt logged past its checkpoint,
        # here and in TensorBoard (purge_step removes events at or after it).
        truncate_jsonl(out / "metrics.jsonl", start_step)
        self.jsonl = open(out / "metrics.jsonl", "a")
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        # A bar for terminals; in a log file (Slurm, CI) one plain line per logged step instead of redraws.
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.interactive)
        self.total_steps = total_steps

    def reset_clock(self, tokens: int) -> None:
        self.last_time, self.last_tokens = time.perf_counter(), tokens

    def log(self, step: int, tokens: int, values: dict) -> dict:
        """Log train metrics at `step`, with throughput since the previous call. `tokens` is the global total."""
        now = time.perf_counter()
        tokens_per_s = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, tokens
        record = {"step": step, **values, "tokens": tokens, "tokens_per_s": tokens_per_s,
                  self.memory_name: memory_gb()}
        if self.peak_total:
            record["mfu"] = self.flops_per_token * tokens_per_s / self.peak_total
        self._write(record, "train")
        if self.main:
            shown = {k: _short(record[k]) for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu") if k in record}
            if self.interactive:
                self.bar.set_postfix(shown)
            else:
                print(f"step {step}/{self.total_steps} " + " ".join(f"{k} {v}" for k, v in shown.items()),
                      flush=True)
        return record

    def log_eval(self, step: int, values: dict) -> None:
        self._write({"step": step, **values}, "val")
        if self.main:
            line = f"step {step}: validation " + ", ".join(f"{k} {_short(v)}" for k, v in values.items())
            self.bar.write(line) if self.interactive else print(line, flush=True)

    def log_info(self, step: int, values: dict) -> None:
        """Facts about the run rather than time series (the attention backend): one {"split": "info"} record."""
        self._write({"step": step, **values}, "info")

    def advance(self, steps: int = 1) -> None:
        if self.main:
            self.bar.update(steps)

    def _write(self, record: dict, split: str) -> None:
        self.history.append({"split": split, **record})
        if not self.main:
            return
        self.jsonl.write(json.dumps({"split": split, **record}) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{split}/{key}", value, record["step"])

    def close(self) -> None:
        if not self.main or self.jsonl.closed:
            return
        self.bar.close()
        self.tb.close()
        self.jsonl.close()
        plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of metrics.jsonl up to and including `last_step` (atomically: a temporary file, renamed)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by a kill: drop it
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def plot_loss_curve(jsonl: Path, png: Path) -> None:
    """Train and validation loss against step, from every record in metrics.jsonl (resumed runs included); with
    per-dataset validation losses, those too; with downstream task scores (train.eval_tasks), a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    val = [r for r in records if r.get("split") == "val"]
    scores = sorted({k for r in val for k in r if "/" in k and not k.startswith("loss/")})
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 7, 4), squeeze=False)
    ax = axes[0, 0]

    def curve(axis, split: str, key: str, style: str, label: str) -> None:
        points = sorted({r["step"]: r[key] for r in records if r.get("split") == split and key in r}.items())
        if points:
            axis.plot(*zip(*points, strict=True), style, label=label)

    curve(ax, "train", "loss", "-", "train loss")
    curve(ax, "val", "loss", "o-", "val loss")
    for key in sorted({k for r in val for k in r if k.startswith("loss/")}):
        curve(ax, "val", key, ".--", f"val {key}")
    ax.set_ylabel("loss")
    for key in scores:
        curve(axes[0, 1], "val", key, "o-", key)
    if scores:
        axes[0, 1].set_ylabel("task score")
    for axis in axes[0]:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)
