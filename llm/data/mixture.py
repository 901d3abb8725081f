"""Blending several packed datasets by weight (as Megatron's BlendedDataset), deterministic and resumable.

A blend maps a global sample position p (0, 1, 2, ... across all epochs) to (dataset d, sample s of d):

1. Which dataset: a fixed schedule over a period of `period` positions, repeated. Dataset d's j-th slot in a
   period sits at "time" (j + 0.5) / w_d; merging all datasets' slots by time (ties by dataset index) gives an
   interleaving in which any prefix holds each dataset within one sample of its weight's share (the greedy
   error-minimising order Megatron builds, computed by sorting instead of a sequential loop).
2. Which sample: position p is dataset d's J-th draw overall (J = full periods * d's slots per period + its slot
   rank in this period). d's own epoch is J // N_d, and the sample is a keyed permutation of range(N_d) for that
   epoch (identity for validation) at J % N_d. A small dataset with a large weight repeats, in a new order each
   time; a large one with a small weight is sampled without repeats until its epoch runs out.

Everything is a pure function of (seed, weights, dataset sizes, p): no state beyond p, so a loader resumes exactly,
on any number of processes. Memory is O(period), never O(number of samples).
"""

from __future__ import annotations

import numpy as np

from llm.data.order import Permutation, derive_key


class Blend:
    """Map global sample positions to (dataset index, sample index within that dataset)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, shuffle: bool = True,
                 period: int = 1 << 16):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"need one weight per dataset, got {len(sizes)} sizes and {len(weights)} weights")
        if any(n <= 0 for n in sizes) or any(w <= 0 for w in weights):
            raise ValueError(f"dataset sizes and weights must be positive, got {sizes} and {weights}")
        self.sizes = [int(n) for n in sizes]
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.seed, self.shuffle, self.period = seed, shuffle, period
        self.epoch_size = sum(self.sizes)  # one loader epoch: as many samples as all datasets hold together

        # The schedule for one period: every dataset's candidate slots at time (j + 0.5) / w, earliest `period` win.
        cand_d, cand_j, cand_t = [], [], []
        for d, w in enumerate(self.weights):
            j = np.arange(int(np.ceil(w * period)) + 1)
            cand_d.append(np.full(len(j), d, dtype=np.int64))
            cand_j.append(j)
            cand_t.append((j + 0.5) / w)
        cand_d, cand_j, cand_t = map(np.concatenate, (cand_d, cand_j, cand_t))
        chosen = np.lexsort((cand_d, cand_t))[:period]  # sort by time, then dataset index
        self._dataset = cand_d[chosen]  # (period,) which dataset each slot draws from
        self._rank = cand_j[chosen]  # (period,) how many earlier slots of that dataset this period has
        self.slots_per_period = np.bincount(self._dataset, minlength=len(sizes))

    def _permutation(self, d: int, epoch: int) -> Permutation:
        return Permutation(self.sizes[d], derive_key(self.seed, d, epoch))

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, sample index) for each global position; both int64 arrays shaped like `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        block, offset = np.divmod(positions, self.period)
        datasets = self._dataset[offset]
        draw = block * self.slots_per_period[datasets] + self._rank[offset]  # J: the dataset's draw number
        sizes = np.asarray(self.sizes, dtype=np.int64)[datasets]
        epochs, within = np.divmod(draw, sizes)
        if not self.shuffle:
            return datasets, within
        samples = np.empty_like(within)
        # A batch touches few (dataset, epoch) pairs; each is one vectorised permutation call.
        for d, e in set(zip(datasets.tolist(), epochs.tolist(), strict=True)):
            sel = (datasets == d) & (epochs == e)
            samples[sel] = self._permutation(d, e)(within[sel])
        return datasets, samples
