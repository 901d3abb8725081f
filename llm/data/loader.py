"""The packed LM loader: memory-mapped windows of seq_len + 1 tokens, in an order no process count can change.

Sample i of a split is the window of tokens [i * T, i * T + T + 1) of its token stream (T = seq_len): inputs are
the first T, labels the last T. Consecutive windows share one token, so every token is a target exactly once.

Order. Global sample positions 0, 1, 2, ... run across epochs; position p maps to a (dataset, sample) pair through
a `Blend` (one dataset is a blend of one): a keyed permutation per epoch, a function of (seed, epoch, p) only.
A step takes the next `micro_batch_size * world_size` positions (the global batch); rank r takes rows
[r * mb, (r + 1) * mb) of it. Batches run straight across epoch boundaries, so every batch is full on every rank.

State. (epoch, consumed): consumed counts global samples taken in the current epoch. Resuming from it gives the
exact continuation, also with a different world size: 2 ranks x mb 4 and 1 rank x mb 8 see the same global batches.
"""

from __future__ import annotations

import numpy as np
import torch

from llm.config import DataConfig
from llm.data.errors import DataError
from llm.data.mixture import Blend
from llm.data.shards import MANIFEST, PackedSplit


def open_splits(cfg: DataConfig, split: str, vocab_size: int | None = None) -> list[PackedSplit]:
    """Open and check the `split` of every dataset in `cfg`: files against manifests, tokenizers, vocab, size."""
    if not cfg.datasets:
        raise DataError("data.datasets is empty: name at least one folder written by data_prep.pack_lm")
    splits = []
    for entry in cfg.datasets:
        s = PackedSplit(entry.path, split, verify_checksums=cfg.verify_checksums)
        where = f"{s.folder / MANIFEST}"
        if vocab_size is not None and s.vocab_size > vocab_size:
            raise DataError(f"{where}: tokenizer vocab_size is {s.vocab_size}, larger than the model's "
                            f"vocab_size = {vocab_size} (token ids would index past the embedding)")
        if s.num_tokens < cfg.seq_len + 1:
            raise DataError(f"{where}: split {split!r} has {s.num_tokens} tokens, fewer than one window of "
                            f"data.seq_len + 1 = {cfg.seq_len + 1}")
        if splits and s.tokenizer_sha256 != splits[0].tokenizer_sha256:
            raise DataError(f"{where}: tokenizer sha256 {s.tokenizer_sha256[:12]}... differs from "
                            f"{splits[0].folder / MANIFEST} ({splits[0].tokenizer_sha256[:12]}...); a mixture needs "
                            f"one tokenizer")
        splits.append(s)
    return splits


def make_batch(splits: list[PackedSplit], datasets: np.ndarray, samples: np.ndarray, seq_len: int,
               document_masking: bool, vocab_size: int | None = None) -> dict:
    """Read the windows of (dataset, sample) pairs and build the batch dict of torch tensors.

    Every id is checked against `vocab_size` (the model's; default: the tokenizer's), so a damaged shard stops the run
    with its name instead of indexing past the embedding or training on garbage. One max() per batch; the search for
    the culprit runs only on failure."""
    T = seq_len
    pairs = list(zip(datasets.tolist(), samples.tolist(), strict=True))
    rows = [splits[d].read(s * T, T + 1) for d, s in pairs]
    stacked = np.stack(rows)  # (B, T + 1)
    limit = vocab_size if vocab_size is not None else min(s.vocab_size for s in splits)
    if stacked.max() >= limit:
        for (d, s), row in zip(pairs, rows, strict=True):
            splits[d].check_ids(row, s * T, limit)
    window = torch.from_numpy(stacked.astype(np.int64))  # (B, T + 1)
    # (B, T) each; labels = inputs shifted by one. Contiguous copies: callers flatten them with .view(-1).
    batch = {"input_ids": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous()}
    if not document_masking:
        return batch
    B = len(rows)
    position_ids = np.empty((B, T), dtype=np.int64)
    bounds = []
    for b, (d, s) in enumerate(pairs):
        # Documents starting inside the row (its first token is a boundary anyway): input positions in [1, T).
        starts = np.concatenate([[0], splits[d].doc_starts(s * T + 1, s * T + T) - s * T])
        segment = np.zeros(T, dtype=np.int64)
        segment[starts[1:]] = 1
        position_ids[b] = np.arange(T) - starts[np.cumsum(segment)]  # restart at 0 at every document start
        bounds.append(b * T + starts)
    cu = np.concatenate(bounds + [[B * T]])
    batch["position_ids"] = torch.from_numpy(position_ids)
    batch["cu_seqlens"] = torch.from_numpy(cu.astype(np.int32))  # (n_segments + 1,) over the flattened B*T tokens
    batch["max_seqlen"] = int(np.diff(cu).max())
    return batch


def pin(batch: dict) -> dict:
    """With a GPU, the batch's tensors in page-locked memory: the trainer's `.to(device, non_blocking=True)` is then a
    real asynchronous copy that overlaps with the forward instead of a synchronous one."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class PackedLoader:
    """Training batches for one rank: an endless iterator; `state_dict()` says where it stands. (The validation
    sample is `llm.eval.validation`'s.)"""

    def __init__(self, cfg: DataConfig, micro_batch_size: int, rank: int = 0, world_size: int = 1, *,
                 vocab_size: int | None = None, split: str = "train"):
        if micro_batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need micro_batch_size > 0 and 0 <= rank < world_size, got "
                             f"{micro_batch_size}, rank {rank}, world_size {world_size}")
        self.cfg, self.micro_batch_size, self.rank, self.world_size = cfg, micro_batch_size, rank, world_size
        self.vocab_size = vocab_size
        self.splits = open_splits(cfg, split, vocab_size)
        sizes = [(s.num_tokens - 1) // cfg.seq_len for s in self.splits]
        self.blend = Blend(sizes, [e.weight for e in cfg.datasets], cfg.seed)
        self.epoch, self.consumed = 0, 0

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def samples_per_epoch(self) -> int:
        return self.blend.epoch_size

    def _batch_at(self, position: int) -> dict:
        """This rank's rows of the global batch starting at global position `position`."""
        first = position + self.rank * self.micro_batch_size
        datasets, samples = self.blend.locate(np.arange(first, first + self.micro_batch_size))
        return pin(make_batch(self.splits, datasets, samples, self.cfg.seq_len, self.cfg.document_masking,
                              self.vocab_size))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = state.get("epoch"), state.get("consumed")
        if not isinstance(epoch, int) or not isinstance(consumed, int) or epoch < 0:
            raise DataError(f"loader state {state!r}: expected non-negative integers 'epoch' and 'consumed'")
        if not 0 <= consumed < self.samples_per_epoch:
            raise DataError(f"loader state consumed = {consumed} is outside this data's epoch of "
                            f"{self.samples_per_epoch} samples (data.seq_len or data.datasets changed since the "
                            f"checkpoint?)")
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict:
        batch = self._batch_at(self.epoch * self.samples_per_epoch + self.consumed)
        self.consumed += self.global_batch_size
        while self.consumed >= self.samples_per_epoch:  # a batch may straddle an epoch boundary
            self.consumed -= self.samples_per_epoch
            self.epoch += 1
        return batch


def build_train_loader(cfg: DataConfig, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                       vocab_size: int | None = None) -> PackedLoader:
    return PackedLoader(cfg, micro_batch_size, rank, world_size, vocab_size=vocab_size)
