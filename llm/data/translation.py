"""Parallel-text batches for translation: token-count batching over packed sentence pairs, resumable.

Format. `data_prep.pack_translation` writes the packed-token format of `llm.data.shards` (same files, headers,
manifest and checks) with four splits: `train.src`, `train.tgt`, `val.src`, `val.tgt`. Pair k of a split is document
k of its `.src` and of its `.tgt`, each ending in EOS; the manifest says `"task": "translation"`.

Batches, as fairseq's `--max-tokens`. Pairs are sorted by (source length, target length), ties in a random order;
consecutive pairs form a batch while batch size * longest side <= max_tokens (padding included), so a batch holds
sentences of similar length; then the batches are shuffled. Because ties only swap pairs of equal lengths, the batch
boundaries are the same in every epoch (computed once); which pairs fill them and the batch order change per epoch.

Order and state. Global batch positions 0, 1, 2, ... run across epochs; position p is batch p % n of epoch p // n,
a pure function of (seed, epoch, p). A step takes the next `world_size` positions; rank r takes the r-th. The state
is (epoch, consumed batches), so a run resumes exactly, also on a different number of processes (which then
groups the same sequence of batches differently into steps). `max_tokens` is per process, as in fairseq.

A batch: `src_ids` (B, S) and `src_pad_mask` (True at padding); `tgt_in_ids` (B, T) = BOS + target without its EOS,
`labels` (B, T) = target with EOS, padded with the pad id, and `tgt_pad_mask`; `num_tokens`, the non-pad labels.
Everything is right-padded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llm.config import TranslationDataConfig
from llm.data.errors import DataError
from llm.data.loader import pin
from llm.data.order import Permutation, derive_key
from llm.data.shards import MANIFEST, PackedSplit, read_manifest

TASK = "translation"
SIDES = ("src", "tgt")
_PAIR_STREAM, _BATCH_STREAM = 0x7A1_0001, 0x7A1_0002  # keys of the tie order and of the batch order


class ParallelSplit:
    """One split of a packed translation dataset: lengths of all pairs, and the tokens of any pair."""

    def __init__(self, folder: str | Path, split: str = "train", verify_checksums: bool = True):
        if not str(folder):
            raise DataError("data.path is empty: name a folder written by data_prep.pack_translation")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if self.manifest.get("task") != TASK:
            raise DataError(f"{self.folder / MANIFEST}: task is {self.manifest.get('task')!r}, expected {TASK!r} "
                            f"(a folder written by data_prep.pack_translation)")
        self.src, self.tgt = (PackedSplit(self.folder, f"{split}.{side}", verify_checksums) for side in SIDES)
        if self.src.num_docs != self.tgt.num_docs:
            raise DataError(f"{self.folder}: split {split!r} has {self.src.num_docs} source and "
                            f"{self.tgt.num_docs} target sentences")
        self.num_pairs = self.src.num_docs
        self.src_starts, self.src_lens = self._documents(self.src)
        self.tgt_starts, self.tgt_lens = self._documents(self.tgt)
        ids = self.manifest["tokenizer"]["special_ids"]
        self.eos_id, self.pad_id = ids.get("eos"), ids.get("pad")
        # the decoder's start token: the tokenizer's (Marian's: padding), else BOS, else EOS
        start = ids.get("decoder_start", ids.get("bos"))
        self.bos_id = self.eos_id if start is None else start
        if self.pad_id is None or self.eos_id is None:
            raise DataError(f"{self.folder / MANIFEST}: the tokenizer needs EOS and padding tokens, has {ids}")

    @staticmethod
    def _documents(split: PackedSplit) -> tuple[np.ndarray, np.ndarray]:
        starts = split.doc_starts(0, split.num_tokens)  # (n,) global offsets
        return starts, np.diff(np.append(starts, split.num_tokens))  # lengths, EOS included

    def pair(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and target tokens of pair k, each ending in EOS."""
        return (self.src.read(int(self.src_starts[k]), int(self.src_lens[k])),
                self.tgt.read(int(self.tgt_starts[k]), int(self.tgt_lens[k])))

    def check_ids(self, pairs: np.ndarray, tokens: list[tuple[np.ndarray, np.ndarray]], vocab_size: int) -> None:
        """Raise DataError naming the shard and offset of an id >= vocab_size in the pairs `pairs` (their tokens)."""
        for k, (src, tgt) in zip(pairs.tolist(), tokens, strict=True):
            self.src.check_ids(src, int(self.src_starts[k]), vocab_size)
            self.tgt.check_ids(tgt, int(self.tgt_starts[k]), vocab_size)


def batch_boundaries(sizes: np.ndarray, max_tokens: int, max_sentences: int | None = None) -> np.ndarray:
    """Cut a sequence of sizes into runs with len(run) * max(run) <= max_tokens: (n_batches + 1,) start offsets."""
    bounds, start, longest = [0], 0, 0
    for i, size in enumerate(sizes.tolist()):
        longest_with = max(longest, size)
        full = max_sentences is not None and i - start >= max_sentences
        if i > start and ((i - start + 1) * longest_with > max_tokens or full):
            bounds.append(i)
            start, longest_with = i, size
        longest = longest_with
    bounds.append(len(sizes))
    return np.asarray(bounds, dtype=np.int64)


def collate(pairs: list[tuple[np.ndarray, np.ndarray]], bos_id: int, pad_id: int) -> dict:
    """Right-padded tensors of a list of (source, target) token arrays (both ending in EOS)."""
    B = len(pairs)
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    src = np.full((B, S), pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), pad_id, dtype=np.int64)
    for b, (s, t) in enumerate(pairs):
        src[b, :len(s)] = s
        labels[b, :len(t)] = t
        tgt_in[b, 0] = bos_id
        tgt_in[b, 1:len(t)] = t[:-1]  # teacher forcing: the target shifted right, its EOS dropped
    src, tgt_in, labels = (torch.from_numpy(a) for a in (src, tgt_in, labels))
    src_len = torch.tensor([len(s) for s, _ in pairs])
    tgt_len = torch.tensor([len(t) for _, t in pairs])
    return {"src_ids": src, "src_pad_mask": torch.arange(S)[None, :] >= src_len[:, None],  # (B, S)
            "tgt_in_ids": tgt_in, "tgt_pad_mask": torch.arange(T)[None, :] >= tgt_len[:, None],  # (B, T)
            "labels": labels, "num_tokens": int(tgt_len.sum())}


class _Batches:
    """The batches of one split: sizes, sorted-order boundaries, and the pairs of batch i in epoch e."""

    def __init__(self, cfg: TranslationDataConfig, split: str, shuffle: bool, max_positions: int | None,
                 vocab_size: int | None = None):
        if cfg.max_tokens <= 0 or (cfg.max_sentences is not None and cfg.max_sentences <= 0):
            raise ValueError(f"max_tokens and max_sentences must be positive, got {cfg.max_tokens}, "
                             f"{cfg.max_sentences}")
        self.cfg, self.shuffle = cfg, shuffle
        self.data = ParallelSplit(cfg.path, split, cfg.verify_checksums)
        d = self.data
        tokenizer_vocab = d.manifest["tokenizer"]["vocab_size"]
        self.vocab_size = vocab_size if vocab_size is not None else tokenizer_vocab  # every batch's ids are below it
        if vocab_size is not None and tokenizer_vocab > vocab_size:
            raise DataError(f"{d.folder / MANIFEST}: the tokenizer has {tokenizer_vocab} tokens, more than "
                            f"model.vocab_size = {vocab_size}; set model.vocab_size to at least {tokenizer_vocab}")
        if d.num_pairs == 0:
            raise DataError(f"{d.folder / MANIFEST}: split {split!r} has no sentence pairs")
        sizes = np.maximum(d.src_lens, d.tgt_lens)  # a batch's padded size is count * longest side
        for limit, what in ((cfg.max_tokens, "max_tokens"), (max_positions, "the model's max_seq_len")):
            if limit is not None and (sizes > limit).any():
                raise DataError(f"{d.folder}: {int((sizes > limit).sum())} pairs of split {split!r} are longer "
                                f"than {what} = {limit} tokens (longest: {int(sizes.max())}); raise it or re-pack "
                                f"with a lower --max-len")
        self._sorted = self._sorted_order(0)
        self.bounds = batch_boundaries(sizes[self._sorted], cfg.max_tokens, cfg.max_sentences)
        self.num_batches = len(self.bounds) - 1
        self._epoch = 0
        self._batch_order = self._order(0)

    def _sorted_order(self, epoch: int) -> np.ndarray:
        d, n = self.data, self.data.num_pairs
        order = np.arange(n)
        if self.shuffle:  # ties (equal length pairs) in a random order, new each epoch
            order = Permutation(n, derive_key(self.cfg.seed, _PAIR_STREAM, epoch))(order)
        return order[np.lexsort((d.tgt_lens[order], d.src_lens[order]))]  # stable: by source, then target length

    def _order(self, epoch: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        return Permutation(self.num_batches, derive_key(self.cfg.seed, _BATCH_STREAM, epoch))(
            np.arange(self.num_batches))

    def pairs_of(self, position: int) -> np.ndarray:
        """Pair indices of the batch at global position `position` (epochs run one after another)."""
        epoch, i = divmod(position, self.num_batches)
        if epoch != self._epoch:
            self._epoch, self._sorted, self._batch_order = epoch, self._sorted_order(epoch), self._order(epoch)
        b = i if self._batch_order is None else int(self._batch_order[i])
        return self._sorted[self.bounds[b]:self.bounds[b + 1]]

    def batch(self, position: int) -> dict:
        d, pairs = self.data, self.pairs_of(position)
        tokens = [d.pair(int(k)) for k in pairs]
        batch = collate(tokens, d.bos_id, d.pad_id)
        # One max() per side (padding is a vocabulary id too); the search for the culprit only on failure.
        if max(int(batch["src_ids"].max()), int(batch["labels"].max())) >= self.vocab_size:
            d.check_ids(pairs, tokens, self.vocab_size)
        return pin(batch)


class TranslationLoader:
    """Training batches for one rank: an endless iterator; `state_dict()` says where it stands."""

    def __init__(self, cfg: TranslationDataConfig, rank: int = 0, world_size: int = 1, *,
                 max_positions: int | None = None, vocab_size: int | None = None, split: str = "train"):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.batches = _Batches(cfg, split, shuffle=True, max_positions=max_positions, vocab_size=vocab_size)
        self.epoch, self.consumed = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.batches.num_batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        epoch, consumed = state.get("epoch"), state.get("consumed")
        if not isinstance(epoch, int) or not isinstance(consumed, int) or epoch < 0:
            raise DataError(f"loader state {state!r}: expected non-negative integers 'epoch' and 'consumed'")
        if not 0 <= consumed < self.batches_per_epoch:
            raise DataError(f"loader state consumed = {consumed} is outside this data's epoch of "
                            f"{self.batches_per_epoch} batches (data or max_tokens changed since the checkpoint?)")
        self.epoch, self.consumed = epoch, consumed

    def __iter__(self) -> TranslationLoader:
        return self

    def __next__(self) -> dict:
        batch = self.batches.batch(self.epoch * self.batches_per_epoch + self.consumed + self.rank)
        self.consumed += self.world_size
        while self.consumed >= self.batches_per_epoch:  # a step may straddle an epoch boundary
            self.consumed -= self.batches_per_epoch
            self.epoch += 1
        return batch


class TranslationValidationLoader:
    """Validation batches in sorted order (no shuffle): the same batches on every pass, as many on every rank.

    Yields `min(max_batches, num_batches // world_size)` batches per rank per pass: rank r takes batches
    r, r + world_size, ...; a last partial round is left out, so every rank runs the same number of forwards.
    """

    def __init__(self, cfg: TranslationDataConfig, rank: int = 0, world_size: int = 1, *,
                 max_positions: int | None = None, vocab_size: int | None = None, max_batches: int | None = None):
        self.rank, self.world_size = rank, world_size
        self.batches = _Batches(cfg, "val", shuffle=False, max_positions=max_positions, vocab_size=vocab_size)
        rounds = self.batches.num_batches // world_size
        if rounds == 0:
            raise DataError(f"{cfg.path}: the validation split makes {self.batches.num_batches} batches, fewer than "
                            f"{world_size} processes; pack with a larger --val-fraction or lower max_tokens")
        self.num_batches = rounds if max_batches is None else min(rounds, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for step in range(self.num_batches):
            yield self.batches.batch(step * self.world_size + self.rank)
