"""Deterministic sample order: a 64-bit hash and a keyed permutation, both pure functions of their inputs.

Data order must be a function of (seed, epoch, global sample index) only, stable across machines, numpy versions
and numbers of processes. `numpy.random.Generator.permutation` does not promise the same stream across numpy
releases and needs O(N) memory, so the order is defined here instead: a Feistel network over the next power of four
>= N, keyed by (seed, stream, epoch), with cycle-walking to stay inside [0, N). Any index can be mapped on its own
(O(1) memory), which is what lets a loader resume at any global position without replaying anything.
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_ROUNDS = 6  # 4 rounds already give a pseudo-random permutation (Luby-Rackoff); 6 mixes small domains better


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array: a fast, well-mixed 64-bit hash (wrapping arithmetic is intended)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """Fold integers (seed, stream id, epoch, ...) into one 64-bit key; different tuples give unrelated keys."""
    key = 0x243F6A8885A308D3  # pi's fraction bits: any fixed non-zero start works
    for part in parts:
        key = int(splitmix64(np.array([(key ^ (part & _MASK64)) & _MASK64], dtype=np.uint64))[0])
    return key


def unit_hash(key: int, index: np.ndarray) -> np.ndarray:
    """Map integer indices to floats uniform in [0, 1), keyed: the same (key, index) always gives the same value."""
    h = splitmix64(np.asarray(index, dtype=np.uint64) ^ np.uint64(key))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # top 53 bits: exact in a float64


class Permutation:
    """A keyed pseudo-random permutation of range(n), evaluated per index: `perm(idx)` -> permuted indices.

    `perm(np.arange(n))` contains every index in [0, n) exactly once.
    """

    def __init__(self, n: int, key: int):
        if n <= 0:
            raise ValueError(f"permutation size must be positive, got {n}")
        self.n = n
        half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # domain 4**half_bits >= n, < 4n: few cycle-walks
        self._half_bits = np.uint64(half_bits)
        self._half_mask = np.uint64((1 << half_bits) - 1)
        self._round_keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half_bits, x & self._half_mask
        for rk in self._round_keys:
            left, right = right, left ^ (splitmix64(right ^ rk) & self._half_mask)
        return (left << self._half_bits) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        x = self._feistel(idx.astype(np.uint64))
        # Cycle-walking: the Feistel network permutes [0, 4**half_bits); re-applying it to values that land outside
        # [0, n) until they fall inside gives a permutation of [0, n) (each cycle is followed to its next member).
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = self._feistel(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)
