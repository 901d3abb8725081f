import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from llm.data.errors import DataError
from llm.data.loader import PackedLoader, build_train_loader
from llm.data.shards import HEADER, MANIFEST, PackedSplit, write_manifest
from tests.data.conftest import data_config, flip_byte

SEQ = 32


@pytest.fixture(scope="module")
def windows(packed):
    """Every train window's tokens -> its sample index (windows of this corpus are all distinct)."""
    split = PackedSplit(packed, "train")
    n = (split.num_tokens - 1) // SEQ
    table = {split.read(i * SEQ, SEQ + 1).tobytes(): i for i in range(n)}
    assert len(table) == n
    return split, table


def sample_ids(batch, split, table):
    window = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy().astype(split.dtype)
    return [table[row.tobytes()] for row in window]


def global_batches(loaders, steps, split, table):
    """Run `steps` steps on every rank; each step's global batch = the ranks' rows concatenated in rank order."""
    out = []
    for _ in range(steps):
        out.append([s for loader in loaders for s in sample_ids(next(loader), split, table)])
    return out


def test_batch_shapes_and_shift(packed, windows):
    split, table = windows
    loader = build_train_loader(data_config(packed, seq_len=SEQ), micro_batch_size=3)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].shape == (3, SEQ) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64
    assert batch["input_ids"].is_contiguous() and batch["labels"].is_contiguous()
    torch.testing.assert_close(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    for row, s in zip(batch["input_ids"], sample_ids(batch, split, table), strict=True):
        np.testing.assert_array_equal(row.numpy(), split.read(s * SEQ, SEQ))


def test_epoch_is_a_permutation_and_epochs_differ(packed, windows):
    split, table = windows
    n = len(table)
    loader = build_train_loader(data_config(packed, seq_len=SEQ, seed=7), micro_batch_size=1)
    assert loader.samples_per_epoch == n
    epoch0 = [sample_ids(next(loader), split, table)[0] for _ in range(n)]
    assert loader.state_dict() == {"epoch": 1, "consumed": 0}
    epoch1 = [sample_ids(next(loader), split, table)[0] for _ in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    other_seed = build_train_loader(data_config(packed, seq_len=SEQ, seed=8), micro_batch_size=1)
    assert [sample_ids(next(other_seed), split, table)[0] for _ in range(n)] != epoch0


def test_world_size_does_not_change_global_batches(packed, windows):
    split, table = windows
    cfg = data_config(packed, seq_len=SEQ)
    two = [PackedLoader(cfg, 4, rank=r, world_size=2) for r in range(2)]
    one = [PackedLoader(cfg, 8)]
    assert global_batches(two, 10, split, table) == global_batches(one, 10, split, table)


def test_resume_on_same_world_size_continues_exactly(packed, windows):
    split, table = windows
    cfg = data_config(packed, seq_len=SEQ)
    n = len(table)
    steps = 2 * n // 8 + 3  # runs across an epoch boundary (batches straddle it: n is not a multiple of 8)
    assert n % 8
    reference = global_batches([PackedLoader(cfg, 4, r, 2) for r in range(2)], steps, split, table)

    first = [PackedLoader(cfg, 4, r, 2) for r in range(2)]
    k = n // 8 - 1
    before = global_batches(first, k, split, table)
    state = first[0].state_dict()
    assert state == first[1].state_dict() == {"epoch": 0, "consumed": 8 * k}
    resumed = [PackedLoader(cfg, 4, r, 2) for r in range(2)]
    for loader in resumed:
        loader.load_state_dict(dict(state))
    assert before + global_batches(resumed, steps - k, split, table) == reference


def test_resume_on_one_rank_takes_exactly_the_rest_of_the_epoch(packed, windows):
    split, table = windows
    cfg = data_config(packed, seq_len=SEQ)
    n = len(table)
    two = [PackedLoader(cfg, 4, r, 2) for r in range(2)]
    seen = [s for batch in global_batches(two, 5, split, table) for s in batch]
    state = two[0].state_dict()

    one = PackedLoader(cfg, 3)  # another world size and micro-batch size
    one.load_state_dict(state)
    rest = []
    while one.state_dict()["epoch"] == 0:
        position = one.state_dict()["consumed"]
        rows = sample_ids(next(one), split, table)
        rest += rows[:n - position]  # the last batch straddles into epoch 1: keep this epoch's rows only
    assert len(seen) + len(rest) == n
    assert sorted(seen + rest) == list(range(n))  # no duplicates, none missing
    # The rows past the boundary are the first of epoch 1, as an uninterrupted run would have them.
    uninterrupted = PackedLoader(cfg, 1)
    uninterrupted.load_state_dict({"epoch": 1, "consumed": 0})
    straddled = rows[n - position:]
    assert [sample_ids(next(uninterrupted), split, table)[0] for _ in straddled] == straddled


def test_bad_state_and_arguments(packed):
    cfg = data_config(packed, seq_len=SEQ)
    loader = PackedLoader(cfg, 2)
    with pytest.raises(DataError, match="outside this data's epoch"):
        loader.load_state_dict({"epoch": 0, "consumed": 10**9})
    with pytest.raises(DataError, match="non-negative integers"):
        loader.load_state_dict({"epoch": -1, "consumed": 0})
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(cfg, 2, rank=2, world_size=2)
    with pytest.raises(DataError, match="data.datasets is empty"):
        PackedLoader(data_config(seq_len=SEQ), 2)


def test_vocab_and_size_checks(packed):
    with pytest.raises(DataError, match=r"manifest.json: tokenizer vocab_size is 512, larger than the model's"):
        PackedLoader(data_config(packed, seq_len=SEQ), 2, vocab_size=500)
    PackedLoader(data_config(packed, seq_len=SEQ), 2, vocab_size=512)
    with pytest.raises(DataError, match="fewer than one window"):
        PackedLoader(data_config(packed, seq_len=10**7), 2)


def test_document_masking(packed, loaded_tokenizer):
    eos = loaded_tokenizer.eos_id
    cfg = data_config(packed, seq_len=SEQ, document_masking=True)
    loader, inner_starts = PackedLoader(cfg, 6), 0
    for batch in (next(loader) for _ in range(8)):
        ids, pos, cu = batch["input_ids"], batch["position_ids"], batch["cu_seqlens"]
        B, T = ids.shape
        assert pos.shape == (B, T) and pos.dtype == torch.int64 and cu.dtype == torch.int32
        expected_bounds = []
        for b in range(B):
            # Independent check: a document starts at each row start and right after every EOS.
            starts = [0] + [t for t in range(1, T) if ids[b, t - 1] == eos]
            expected_bounds += [b * T + t for t in starts]
            expected_pos = [t - max(s for s in starts if s <= t) for t in range(T)]
            inner_starts += len(starts) - 1
            assert pos[b].tolist() == expected_pos
        assert cu.tolist() == expected_bounds + [B * T]
        assert batch["max_seqlen"] == int(torch.diff(cu).max())
    assert inner_starts > 5  # the rows did contain document boundaries


@pytest.fixture
def copy_of(packed, tmp_path):
    shutil.copytree(packed, tmp_path / "ds")
    return tmp_path / "ds"


def one_epoch(loader):
    for _ in range(-(-loader.samples_per_epoch // loader.global_batch_size)):
        next(loader)


def test_altered_shard_stops_at_open(copy_of):
    shard = sorted(copy_of.glob("train_*.bin"))[1]
    flip_byte(shard, shard.stat().st_size - 1)
    PackedLoader(data_config(copy_of, seq_len=SEQ, verify_checksums=False), 2)  # sizes and headers only
    with pytest.raises(DataError, match=rf"{shard}: sha256 is"):
        PackedLoader(data_config(copy_of, seq_len=SEQ, verify_checksums=True), 2)


def test_altered_shard_with_its_old_mtime_stops_when_read(copy_of, hashes):
    shard = sorted(copy_of.glob("train_*.bin"))[1]
    flip_byte(shard, shard.stat().st_size - 1, keep_mtime=True)
    loader = PackedLoader(data_config(copy_of, seq_len=SEQ, verify_checksums=True), 4)
    assert hashes == []  # the start did not read the data
    with pytest.raises(DataError, match=rf"{shard}: bytes \[0, \d+\) changed after the file was verified"):
        one_epoch(loader)
    one_epoch(PackedLoader(data_config(copy_of, seq_len=SEQ, verify_checksums=False), 4))  # unchecked: trains on


def test_out_of_range_token_id_names_dataset_shard_and_offset(copy_of):
    """A consistent shard (sha256 in the manifest matches) holding an id the model has no embedding for."""
    manifest = json.loads((copy_of / MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][2]
    shard, offset = copy_of / entry["bin"], 123
    data = bytearray(shard.read_bytes())
    data[HEADER.size + 2 * offset:HEADER.size + 2 * offset + 2] = (64926).to_bytes(2, "little")
    shard.write_bytes(bytes(data))
    entry["bin_sha256"] = hashlib.sha256(data).hexdigest()
    write_manifest(copy_of, manifest)
    for vocab_size, limit in ((None, 512), (512, 512)):  # the tokenizer's vocabulary by default, else the model's
        loader = PackedLoader(data_config(copy_of, seq_len=SEQ), 4, vocab_size=vocab_size)
        with pytest.raises(DataError) as e:
            one_epoch(loader)
        message = str(e.value)
        assert message == (f"{copy_of}: token id 64926 >= vocab_size {limit} at token offset {offset} of {shard} "
                           f"(train split); the shard is damaged or was packed with another tokenizer")
