import hashlib
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llm.data.errors import DataError
from llm.data.shards import (
    HEADER,
    MANIFEST,
    PackedSplit,
    ShardWriter,
    read_manifest,
    token_dtype,
    verify_dataset,
    write_manifest,
)
from llm.data.verify import RECORD, RECORD_DIR
from tests.data.conftest import flip_byte


def test_token_dtype_follows_vocab_size():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def _write_split(folder, docs, dtype, shard_tokens):
    writer = ShardWriter(folder, "train", dtype, shard_tokens)
    for i in range(0, len(docs), 3):  # several add() calls, as the packer makes
        part = docs[i:i + 3]
        writer.add(np.concatenate(part), [len(d) for d in part])
    entry = writer.close()
    manifest = {"format": "llm-packed-lm", "format_version": 1, "dtype": np.dtype(dtype).name,
                "tokenizer": {"sha256": "x", "vocab_size": 100}, "splits": {"train": entry}}
    write_manifest(folder, manifest)
    return entry


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_writer_round_trip_across_shards(tmp_path, dtype):
    rng = np.random.default_rng(0)
    big = 70000 if dtype == np.uint32 else 60000  # uint32 shards hold ids above 65535
    docs = [rng.integers(0, big, size=rng.integers(1, 40)).astype(dtype) for _ in range(50)]
    entry = _write_split(tmp_path, docs, dtype, shard_tokens=100)
    assert len(entry["shards"]) > 3
    assert entry["num_docs"] == 50 and entry["num_tokens"] == sum(len(d) for d in docs)
    for shard in entry["shards"][:-1]:  # closed at the first document boundary at or after 100 tokens
        assert shard["num_tokens"] >= 100
    split = PackedSplit(tmp_path, "train", verify_checksums=True)
    stream = np.concatenate(docs)
    assert split.num_tokens == len(stream) and split.num_docs == 50
    for k in range(50):
        np.testing.assert_array_equal(split.document(k), docs[k])
    np.testing.assert_array_equal(split.read(0, len(stream)), stream)
    np.testing.assert_array_equal(split.read(95, 30), stream[95:125])  # crosses a shard boundary
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]])
    np.testing.assert_array_equal(split.doc_starts(0, len(stream)), starts)
    np.testing.assert_array_equal(split.doc_starts(90, 130), starts[(starts >= 90) & (starts < 130)])
    with open(tmp_path / entry["shards"][0]["bin"], "rb") as f:
        magic, version, code, n_tokens, n_docs = HEADER.unpack(f.read(HEADER.size))
    assert (magic, version, n_tokens) == (b"LLMTOKS\x00", 1, entry["shards"][0]["num_tokens"])


def test_writer_rejects_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="sum to"):
        ShardWriter(tmp_path, "train", np.uint16, 10).add(np.zeros(5, np.uint16), [2, 2])


def test_packed_dataset_verifies(packed):
    manifest = verify_dataset(packed, checksums=True)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 512
    assert len(manifest["splits"]["train"]["shards"]) > 1


@pytest.fixture
def copy_of(packed, tmp_path):
    shutil.copytree(packed, tmp_path / "ds")
    return tmp_path / "ds"


def _first_shard(folder):
    return folder / json.loads((folder / MANIFEST).read_text())["splits"]["train"]["shards"][0]["bin"]


def test_truncated_shard_is_named(copy_of):
    shard = _first_shard(copy_of)
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{shard.name}: size is .* bytes, manifest.json says .* \(truncated\)"):
        PackedSplit(copy_of, "train")


def test_one_byte_change_is_named(copy_of):
    shard = _first_shard(copy_of)
    flip_byte(shard, HEADER.size + 11)  # one token byte; size and header unchanged, mtime new
    PackedSplit(copy_of, "train", verify_checksums=False)  # sizes and headers still agree: only the checksum sees it
    with pytest.raises(DataError, match=rf"{shard.name}: sha256 is [0-9a-f]{{64}}, manifest.json says"):
        PackedSplit(copy_of, "train")
    with pytest.raises(DataError, match=shard.name):
        verify_dataset(copy_of)


def test_freshly_packed_and_unchanged_data_is_not_hashed_again(copy_of, hashes):
    PackedSplit(copy_of, "train")
    assert hashes == []  # the packer recorded its shards
    shutil.rmtree(copy_of / RECORD_DIR)
    split = PackedSplit(copy_of, "train")
    n_files = 2 * len(split._tokens)
    assert len(hashes) == n_files and sorted(set(hashes)) == sorted(hashes)  # each file once
    record = json.loads((copy_of / RECORD_DIR / RECORD).read_text())
    assert len(record["files"]) == n_files
    PackedSplit(copy_of, "train")
    assert len(hashes) == n_files  # the second open trusts the record
    verify_dataset(copy_of, rehash=True)  # what data_prep.inspect --verify does: everything again
    assert len(hashes) == 2 * n_files + 2 * len(PackedSplit(copy_of, "val")._tokens)


def test_flip_with_restored_mtime_is_caught_when_read(copy_of, hashes):
    shard = _first_shard(copy_of)
    flip_byte(shard, HEADER.size + 11, keep_mtime=True)  # stat as recorded: bit rot
    split = PackedSplit(copy_of, "train")
    assert hashes == []
    first = split._tokens[0]
    split.read(len(first), 10)  # other shards (other blocks) read fine
    with pytest.raises(DataError, match=rf"{shard}: bytes \[0, {shard.stat().st_size}\) changed after the file "
                                        r"was verified \(block 0 crc32"):
        split.read(3, 5)
    assert PackedSplit(copy_of, "train", verify_checksums=False).read(3, 5) is not None  # no block checks
    with pytest.raises(DataError, match=f"{shard.name}: sha256 is"):
        verify_dataset(copy_of, rehash=True)


def test_flip_in_a_document_index_is_caught_when_read(copy_of):
    idx = _first_shard(copy_of).with_suffix(".idx")
    flip_byte(idx, HEADER.size + 8 * 3, keep_mtime=True)  # the offset of document 3
    split = PackedSplit(copy_of, "train")
    with pytest.raises(DataError, match=rf"{idx}: bytes \[0, "):
        split.doc_starts(0, 100)
    with pytest.raises(DataError, match=rf"{idx}: bytes \[0, "):
        PackedSplit(copy_of, "train").document(2)


def test_changed_manifest_checksum_is_hashed_again(copy_of, hashes):
    manifest = json.loads((copy_of / MANIFEST).read_text())
    shard = manifest["splits"]["train"]["shards"][1]
    shard["bin_sha256"] = "0" * 64
    write_manifest(copy_of, manifest)
    with pytest.raises(DataError, match=rf"{shard['bin']}: sha256 is [0-9a-f]{{64}}, manifest.json says 0000"):
        PackedSplit(copy_of, "train")
    assert hashes == [shard["bin"]]  # only the file whose expected sha256 changed


def test_damaged_record_never_blames_a_good_shard(copy_of, hashes):
    shard = _first_shard(copy_of)
    crc = copy_of / RECORD_DIR / f"{shard.name}.crc32"
    crc.write_bytes(bytes(len(crc.read_bytes())))  # zeros: no block would match
    split = PackedSplit(copy_of, "train")
    split.read(0, 20)
    assert hashes == [shard.name]  # the crc file did not match its record entry: the shard was hashed instead
    (copy_of / RECORD_DIR / RECORD).write_text("{not json")
    PackedSplit(copy_of, "train").read(0, 20)  # an unreadable record means: verify again


def test_read_only_dataset_keeps_its_record_in_the_cache(copy_of, tmp_path, monkeypatch, hashes):
    import llm.data.verify as verify

    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    usable = verify._usable
    monkeypatch.setattr(verify, "_usable", lambda d: not d.is_relative_to(copy_of) and usable(d))  # as root too
    shutil.rmtree(copy_of / RECORD_DIR)
    copy_of.chmod(0o555)
    try:
        PackedSplit(copy_of, "train")
        n = len(hashes)
        assert n > 0 and not (copy_of / RECORD_DIR).exists()
        manifest_sha = hashlib.sha256((copy_of / MANIFEST).read_bytes()).hexdigest()
        assert (tmp_path / "cache" / RECORD_DIR / manifest_sha / RECORD).is_file()
        PackedSplit(copy_of, "train").read(0, 100)
        assert len(hashes) == n
    finally:
        copy_of.chmod(0o755)


def test_record_shipped_in_a_read_only_dataset_is_used(copy_of, tmp_path, monkeypatch, hashes):
    import llm.data.verify as verify

    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(verify, "_usable", lambda d: False)  # nowhere writable at all
    PackedSplit(copy_of, "train").read(0, 100)
    assert hashes == [] and not (tmp_path / "cache").exists()
    flip_byte(_first_shard(copy_of), HEADER.size + 11, keep_mtime=True)
    with pytest.raises(DataError, match="changed after the file was verified"):
        PackedSplit(copy_of, "train").read(0, 100)


def test_processes_opening_at_once_hash_each_file_once(copy_of, hashes):
    shutil.rmtree(copy_of / RECORD_DIR)
    with ThreadPoolExecutor(4) as pool:  # flock excludes separate open files, so threads stand in for processes
        splits = list(pool.map(lambda _: PackedSplit(copy_of, "train"), range(4)))
    assert len(hashes) == 2 * len(splits[0]._tokens)
    assert all(s.read(0, 50).tolist() == splits[0].read(0, 50).tolist() for s in splits)


def test_header_change_is_named_without_checksums(copy_of):
    shard = _first_shard(copy_of)
    data = bytearray(shard.read_bytes())
    data[16] ^= 0x01  # n_tokens in the header
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{shard.name}: header num_tokens is"):
        PackedSplit(copy_of, "train")


def test_missing_files_and_bad_manifests(copy_of, tmp_path):
    with pytest.raises(DataError, match="manifest.json: not found"):
        read_manifest(tmp_path)
    idx = _first_shard(copy_of).with_suffix(".idx")
    idx.unlink()
    with pytest.raises(DataError, match=rf"{idx.name}: missing"):
        PackedSplit(copy_of, "train")
    with pytest.raises(DataError, match="no split 'test'"):
        PackedSplit(copy_of, "test")
    manifest = json.loads((copy_of / MANIFEST).read_text())
    del manifest["splits"]["val"]["shards"][0]["bin_sha256"]
    (copy_of / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="a 'val' shard entry lacks bin_sha256"):
        PackedSplit(copy_of, "val")
    manifest["format_version"] = 99
    (copy_of / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format_version is 99"):
        read_manifest(copy_of)
    (copy_of / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_manifest(copy_of)
