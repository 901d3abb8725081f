"""The validation sample: spread over the whole split, the same windows on any number of processes, per dataset."""

import math

import numpy as np
import pytest
import torch

from llm.config import DataConfig, DatasetEntry
from llm.data.shards import PackedSplit
from llm.eval.validation import IGNORE, ValidationLoader, spread_sample

SEQ = 32


def test_spread_sample_takes_one_window_per_stratum():
    picks = spread_sample(10_000, 100, seed=3)
    assert len(picks) == 100 and np.all(np.diff(picks) > 0)
    assert np.array_equal(picks // 100, np.arange(100))  # exactly one in each hundredth of the split
    assert np.array_equal(picks, spread_sample(10_000, 100, seed=3))  # seeded
    assert not np.array_equal(picks, spread_sample(10_000, 100, seed=4))
    assert not np.array_equal(picks, spread_sample(10_000, 100, seed=3, dataset=1))
    assert not np.all(picks % 100 == picks[0] % 100)  # random within the strata, not a fixed stride
    assert np.array_equal(spread_sample(7, 100, seed=3), np.arange(7))  # small split: all of it


def windows_seen(loader: ValidationLoader, split: PackedSplit) -> list[tuple[int, int]]:
    """(dataset, window index) of every real (not padding) row the loader yields."""
    index = {split.read(i * SEQ, SEQ + 1).tobytes(): i for i in range((split.num_tokens - 1) // SEQ)}
    seen = []
    for batch in loader:
        window = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy().astype(split.dtype)
        for row, labels in zip(window, batch["labels"], strict=True):
            if (labels != IGNORE).any():
                seen.append((batch["dataset"], index[row.tobytes()]))
            else:
                assert (labels == IGNORE).all()
    return seen


def test_the_same_windows_spread_over_the_split_on_one_and_two_processes(packed_data):
    cfg = DataConfig(datasets=[DatasetEntry(path=str(packed_data))], seq_len=SEQ, document_masking=True)
    split = PackedSplit(packed_data, "val")
    n = (split.num_tokens - 1) // SEQ
    k = n // 4
    one = ValidationLoader(cfg, 8, max_windows=k)
    expected = [(0, int(i)) for i in spread_sample(n, k, cfg.seed)]
    assert sorted(windows_seen(one, split)) == expected
    assert sorted(windows_seen(one, split)) == expected  # the same at every pass
    idx = np.array([i for _, i in expected])
    assert idx[0] < n / k and idx[-1] >= (k - 1) * n // k  # from the start to the end of the split, not its first k
    ranks = [ValidationLoader(cfg, 3, r, 2, max_windows=k) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # every rank runs as many forwards (ZeRO-3)
    assert sorted(windows_seen(ranks[0], split) + windows_seen(ranks[1], split)) == expected
    everything = ValidationLoader(cfg, 8, max_windows=10**6)
    assert len(windows_seen(everything, split)) == n


def test_mixture_reports_each_dataset_and_the_weighted_total(packed_data):
    cfg = DataConfig(datasets=[DatasetEntry(path=str(packed_data), weight=3.0),
                               DatasetEntry(path=str(packed_data), weight=1.0)], seq_len=SEQ)
    loader = ValidationLoader(cfg, 4, max_windows=5)
    assert sorted({b["dataset"] for b in loader}) == [0, 1]
    result = loader.summarise(torch.tensor([[20.0, 10.0], [40.0, 10.0]], dtype=torch.float64))
    assert result["loss/packed.0"] == 2.0 and result["loss/packed.1"] == 4.0
    assert result["loss"] == pytest.approx(0.75 * 2.0 + 0.25 * 4.0)
    assert result["ppl"] == pytest.approx(math.exp(result["loss"]))
    split = PackedSplit(packed_data, "val")
    text_bytes = split.manifest["splits"]["val"]["text_bytes"]
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2) * split.num_tokens / text_bytes)
