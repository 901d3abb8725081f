"""Validation loss that estimates the split's: a seeded sample of windows spread over the whole validation split.

Which windows. Dataset d's validation split holds N_d windows of seq_len + 1 tokens (the training loader's
geometry). With k = min(train.eval_windows, N_d), the range [0, N_d) is cut into k strata of (almost) equal size
and one window is drawn at random in each, from a generator keyed by (data.seed, d): every region of the split is
represented, and the sample is a function of the data and the seed only, so it is the same at every evaluation, on
any number of processes and with any batch size. When k = N_d every window is evaluated.

Who reads them. The sample of each dataset is dealt round-robin to the ranks (rank r takes items r, r + W, ...)
and cut into micro-batches; every rank runs the same number of batches (ZeRO-3's forward is collective), the
missing rows of a rank's last batch filled with a copy of a real window whose labels are all ignored. Batches never
mix datasets, so each batch's summed loss and target count go to its dataset; the totals are reduced over the
ranks: the loss per dataset is its mean over every target token of its sample, whatever the world size.

What is reported: `loss` and `ppl` (with a mixture, the blend-weighted mean of the datasets' losses, and one
`loss/<name>` per dataset), and `bpb`, bits per UTF-8 byte of text: loss / ln 2 * tokens / bytes of the split, a
figure that compares runs with different tokenizers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from llm.config import DataConfig
from llm.data.loader import make_batch, open_splits, pin
from llm.data.order import derive_key

IGNORE = -100  # labels of padding rows: no loss, not counted


def spread_sample(num_windows: int, k: int, seed: int, dataset: int = 0) -> np.ndarray:
    """k sorted window indices out of range(num_windows), one drawn uniformly in each of k equal strata (all of
    them when k >= num_windows)."""
    if k >= num_windows:
        return np.arange(num_windows, dtype=np.int64)
    bounds = (np.arange(k + 1, dtype=np.int64) * num_windows) // k  # stratum i is [bounds[i], bounds[i + 1])
    rng = np.random.default_rng(derive_key(seed, dataset, 0x7A11D))
    return bounds[:-1] + (rng.random(k) * np.diff(bounds)).astype(np.int64)


def dataset_names(cfg: DataConfig) -> list[str]:
    """A short, unique name per dataset for per-dataset metrics: the folder's name (with its index if repeated)."""
    names = [Path(e.path).name or str(i) for i, e in enumerate(cfg.datasets)]
    return [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]


class ValidationLoader:
    """This rank's validation batches: the same windows at every pass; each batch has a "dataset" index."""

    def __init__(self, cfg: DataConfig, micro_batch_size: int, rank: int = 0, world_size: int = 1, *,
                 vocab_size: int | None = None, max_windows: int = 512):
        if micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size or max_windows <= 0:
            raise ValueError(f"need micro_batch_size > 0, max_windows > 0 and 0 <= rank < world_size, got "
                             f"{micro_batch_size}, {max_windows}, rank {rank}, world_size {world_size}")
        self.cfg, self.micro_batch_size, self.rank, self.world_size = cfg, micro_batch_size, rank, world_size
        self.vocab_size = vocab_size
        self.splits = open_splits(cfg, "val", vocab_size)
        total = sum(e.weight for e in cfg.datasets)
        self.weights = [e.weight / total for e in cfg.datasets]
        self.names = dataset_names(cfg)
        self.windows = [spread_sample((s.num_tokens - 1) // cfg.seq_len, max_windows, cfg.seed, d)
                        for d, s in enumerate(self.splits)]  # per dataset: the sampled window indices

    def __len__(self) -> int:
        per_rank = [-(-len(w) // self.world_size) for w in self.windows]
        return sum(-(-n // self.micro_batch_size) for n in per_rank)

    def __iter__(self):
        mb, T = self.micro_batch_size, self.cfg.seq_len
        for d, windows in enumerate(self.windows):
            mine = windows[self.rank::self.world_size]
            rows = -(-len(windows) // self.world_size)  # every rank runs as many rows (and so batches) as rank 0
            for start in range(0, rows, mb):
                take = mine[start:start + mb]
                real = len(take)
                samples = np.concatenate([take, np.full(min(mb, rows - start) - real, windows[0])]).astype(np.int64)
                batch = make_batch(self.splits, np.full(len(samples), d), samples, T, self.cfg.document_masking,
                                   self.vocab_size)
                batch["labels"][real:] = IGNORE
                batch["dataset"] = d
                yield pin(batch)

    def summarise(self, sums: torch.Tensor) -> dict:
        """Metrics from the reduced [dataset, (summed loss, target tokens)] totals."""
        losses = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
        loss = sum(w * x for w, x in zip(self.weights, losses, strict=True))
        result = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        ratios = [s.bytes_per_token for s in self.splits]
        if all(r is not None for r in ratios):
            result["bpb"] = sum(w * x / (math.log(2) * r) for w, x, r in zip(self.weights, losses, ratios, strict=True))
        if len(losses) > 1:
            result |= {f"loss/{name}": x for name, x in zip(self.names, losses, strict=True)}
        return result


def build_val_loader(cfg: DataConfig, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                     vocab_size: int | None = None, max_windows: int = 512) -> ValidationLoader:
    return ValidationLoader(cfg, micro_batch_size, rank, world_size, vocab_size=vocab_size, max_windows=max_windows)
