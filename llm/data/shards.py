"""The packed-token format: shard files, their headers, the manifest, and verification.

A packed dataset is a folder:

    manifest.json          format version, tokenizer hash + vocab size, dtype, per-shard counts, sizes, sha256
    tokenizer.json         the tokenizer that made it (its sha256 is the manifest's tokenizer hash)
    tokenizer_config.json  so the folder itself loads with transformers.AutoTokenizer
    train_00000.bin        32-byte header, then tokens (uint16 when the vocabulary fits, else uint32)
    train_00000.idx        32-byte header, then n_docs + 1 int64 offsets: where each document starts, and the end
    val_00000.bin ...      the validation split, same layout

Documents are separated by EOS (each document's tokens are followed by one EOS, which belongs to that document) and
never span two shards. A split's token stream is its shards concatenated in order; training windows may cross shard
boundaries. The header repeats the counts so a shard is self-describing; the manifest is written last, so a folder
with a manifest is complete. A `verified/` folder records which files were checked against the manifest's sha256,
with per-block checksums (see llm.data.verify); it is a cache, not part of the format.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from llm.data.errors import DataError
from llm.data.verify import BlockCheck, Record, hash_file

FORMAT = "llm-packed-lm"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
HEADER = struct.Struct("<8sIIQQ")  # magic, format version, dtype code (0 in .idx), n_tokens, n_docs: 32 bytes
TOKENS_MAGIC = b"LLMTOKS\x00"
INDEX_MAGIC = b"LLMDOCS\x00"
DTYPE_CODES = {"uint16": 1, "uint32": 2}
INDEX_DTYPE = np.dtype("<i8")
SHARD_KEYS = ("bin", "idx", "num_tokens", "num_docs", "bin_bytes", "idx_bytes", "bin_sha256", "idx_sha256")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use whenever every id fits (vocab <= 65536), uint32 otherwise."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name  # "uint16" / "uint32"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends documents to one split's shards, starting a new shard once one holds >= `shard_tokens` tokens.

    Shards end at document boundaries, so a shard may exceed `shard_tokens` by one document. Headers are written
    with zero counts first and patched when the shard closes; checksums are taken after that, and recorded as
    verified (llm.data.verify) when the split closes, so a freshly packed dataset opens without being hashed again.
    """

    def __init__(self, folder: str | Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder, self.split, self.dtype, self.shard_tokens = Path(folder), split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._verified: dict[str, tuple] = {}  # file name -> (stat, sha256, block crcs), recorded by close()
        self._bin = self._idx = None
        self._tokens = self._docs = 0  # in the open shard

    def _open(self) -> None:
        stem = f"{self.split}_{len(self.shards):05d}"
        self._names = (f"{stem}.bin", f"{stem}.idx")
        self._bin = open(self.folder / self._names[0], "wb")
        self._idx = open(self.folder / self._names[1], "wb")
        self._bin.write(bytes(HEADER.size))
        self._idx.write(bytes(HEADER.size))
        self._idx.write(np.zeros(1, INDEX_DTYPE).tobytes())  # the first document starts at 0
        self._tokens = self._docs = 0

    def _close_shard(self) -> None:
        code = DTYPE_CODES[dtype_name(self.dtype)]
        for f, header in ((self._bin, HEADER.pack(TOKENS_MAGIC, FORMAT_VERSION, code, self._tokens, self._docs)),
                          (self._idx, HEADER.pack(INDEX_MAGIC, FORMAT_VERSION, 0, self._tokens, self._docs))):
            f.seek(0)
            f.write(header)
            f.close()
        record = {"bin": self._names[0], "idx": self._names[1], "num_tokens": self._tokens, "num_docs": self._docs}
        for kind, name in zip(("bin", "idx"), self._names, strict=True):
            st = (self.folder / name).stat()
            sha256, crcs = hash_file(self.folder / name)
            record[f"{kind}_bytes"], record[f"{kind}_sha256"] = st.st_size, sha256
            self._verified[name] = (st, sha256, crcs)
        self.shards.append(record)
        self._bin = self._idx = None

    def add(self, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
        """Append documents: `tokens` is their concatenation (EOS included), `doc_lens` their lengths."""
        doc_lens = np.asarray(doc_lens, dtype=np.int64)
        if int(doc_lens.sum()) != len(tokens):
            raise ValueError(f"doc_lens sum to {int(doc_lens.sum())} but {len(tokens)} tokens were given")
        tokens = np.asarray(tokens).astype(self.dtype, copy=False)
        while len(doc_lens):
            if self._bin is None:
                self._open()
            ends = np.cumsum(doc_lens)
            # Take documents up to and including the one that brings the shard to shard_tokens (at least one).
            n = min(int(np.searchsorted(ends, self.shard_tokens - self._tokens, side="left")) + 1, len(doc_lens))
            take = int(ends[n - 1])
            self._bin.write(tokens[:take].tobytes())
            self._idx.write((self._tokens + ends[:n]).astype(INDEX_DTYPE).tobytes())
            self._tokens += take
            self._docs += n
            tokens, doc_lens = tokens[take:], doc_lens[n:]
            if self._tokens >= self.shard_tokens:
                self._close_shard()

    def abort(self) -> None:
        """Close open files without finishing the shard (the caller removes the folder)."""
        if self._bin is not None:
            self._bin.close()
            self._idx.close()
            self._bin = self._idx = None

    def close(self) -> dict:
        """Close the open shard; return the split's manifest entry."""
        if self._bin is not None:
            self._close_shard()
        if self._verified:
            Record(self.folder).add(self._verified)
            self._verified = {}
        return {"num_tokens": sum(s["num_tokens"] for s in self.shards),
                "num_docs": sum(s["num_docs"] for s in self.shards), "shards": self.shards}


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write manifest.json deterministically (sorted keys), via a temporary file: it appears whole or not at all."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Reading and verification
# --------------------------------------------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict:
    """Read and sanity-check a packed dataset's manifest. Raises DataError naming the file and what is wrong."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found; is {folder} a folder written by data_prep.pack_lm?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version is {manifest.get('format_version')!r}; this code reads version "
                        f"{FORMAT_VERSION} (re-pack the data with this version of data_prep.pack_lm)")
    if manifest.get("dtype") not in DTYPE_CODES:
        raise DataError(f"{path}: dtype is {manifest.get('dtype')!r}, expected one of {', '.join(DTYPE_CODES)}")
    for key in ("tokenizer", "splits"):
        if not isinstance(manifest.get(key), dict):
            raise DataError(f"{path}: missing or malformed {key!r} entry")
    return manifest


def _check_file(folder: Path, shard: dict, kind: str, magic: bytes, dtype_code: int, payload: int) -> Path:
    """Existence, size and header of one shard file against the manifest (`payload`: bytes after the header)."""
    path = folder / shard[kind]
    if not path.is_file():
        raise DataError(f"{path}: missing (listed in {folder / MANIFEST})")
    size = path.stat().st_size
    if size != shard[f"{kind}_bytes"]:
        what = "truncated" if size < shard[f"{kind}_bytes"] else "larger than written"
        raise DataError(f"{path}: size is {size} bytes, {MANIFEST} says {shard[f'{kind}_bytes']} ({what})")
    with open(path, "rb") as f:
        got = HEADER.unpack(f.read(HEADER.size))
    want = (magic, FORMAT_VERSION, dtype_code, shard["num_tokens"], shard["num_docs"])
    for name, g, w in zip(("magic", "format version", "dtype code", "num_tokens", "num_docs"), got, want, strict=True):
        if g != w:
            raise DataError(f"{path}: header {name} is {g!r}, {MANIFEST} says {w!r}")
    if size != HEADER.size + payload:
        raise DataError(f"{path}: size is {size} bytes, but its header's counts need {HEADER.size + payload}")
    return path


class PackedSplit:
    """One split of a packed dataset as a single memory-mapped token stream (its shards in order).

    Opening checks every shard against the manifest (existence, size, header), so a truncated or missing file fails
    here with its path, not as garbage batches later. With `verify_checksums` (the default) it also makes sure every
    file's sha256 was found to match the manifest: files unchanged (size, mtime) since their recorded verification
    are not read again, others are hashed now (`rehash`: all of them); then each 64 KiB block read through this
    object is checked against its recorded crc32 the first time (llm.data.verify).
    """

    def __init__(self, folder: str | Path, split: str = "train", verify_checksums: bool = True, *,
                 rehash: bool = False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.split = split
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.folder / MANIFEST}: no split {split!r} (has: {', '.join(self.manifest['splits'])})")
        entry = self.manifest["splits"][split]
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) or "num_tokens" not in entry:
            raise DataError(f"{self.folder / MANIFEST}: split {split!r} entry is malformed (needs shards, num_tokens)")
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        code = DTYPE_CODES[self.manifest["dtype"]]
        files = []  # (path, sha256 from the manifest): .bin, .idx of each shard
        for shard in entry["shards"]:
            missing = [k for k in SHARD_KEYS if k not in shard]
            if missing:
                raise DataError(f"{self.folder / MANIFEST}: a {split!r} shard entry lacks {', '.join(missing)}")
            n, d = shard["num_tokens"], shard["num_docs"]
            files.append((_check_file(self.folder, shard, "bin", TOKENS_MAGIC, code, n * self.dtype.itemsize),
                          shard["bin_sha256"]))
            files.append((_check_file(self.folder, shard, "idx", INDEX_MAGIC, 0, (d + 1) * INDEX_DTYPE.itemsize),
                          shard["idx_sha256"]))
        self.record = Record(self.folder, self.folder / MANIFEST) if verify_checksums else None
        crcs = self.record.verify(files, rehash) if self.record is not None else {}
        # Per shard: the .bin path, its tokens, its document offsets, and the block checks of both files (or None).
        self._paths, self._tokens, self._offsets, self._checks = [], [], [], []
        for (bin_path, bin_sha), (idx_path, idx_sha) in zip(files[::2], files[1::2], strict=True):
            raw_bin, raw_idx = (np.memmap(p, dtype=np.uint8, mode="r") for p in (bin_path, idx_path))
            tokens, offsets = raw_bin[HEADER.size:].view(self.dtype), raw_idx[HEADER.size:].view(INDEX_DTYPE)
            if self.record is not None:
                self._checks.append((BlockCheck(bin_path, raw_bin, self.record, bin_sha, crcs.get(bin_path.name)),
                                     BlockCheck(idx_path, raw_idx, self.record, idx_sha, crcs.get(idx_path.name))))
            if offsets[0] != 0 or offsets[-1] != len(tokens):
                raise DataError(f"{idx_path}: document offsets run {offsets[0]}..{offsets[-1]}, expected "
                                f"0..{len(tokens)}")
            self._paths.append(bin_path)
            self._tokens.append(tokens)
            self._offsets.append(offsets)
        sizes = [len(t) for t in self._tokens]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # global offset of each shard
        self.num_tokens = int(self._starts[-1])
        self.num_docs = sum(len(o) - 1 for o in self._offsets)
        if self.num_tokens != entry["num_tokens"]:
            raise DataError(f"{self.folder / MANIFEST}: split {split!r} says {entry['num_tokens']} tokens, "
                            f"its shards hold {self.num_tokens}")

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes of text per token of this split (EOS/BOS included), for bits per byte; None for a dataset
        packed before the manifest recorded `text_bytes`."""
        text_bytes = self.manifest["splits"][self.split].get("text_bytes")
        return text_bytes / self.num_tokens if text_bytes else None

    def _shard_of(self, pos: int) -> int:
        return int(np.searchsorted(self._starts, pos, side="right")) - 1

    def _check_tokens(self, i: int, lo: int, hi: int) -> None:
        """Block checks for tokens [lo, hi) of shard i (local offsets)."""
        if self._checks:
            size = self.dtype.itemsize
            self._checks[i][0].check(HEADER.size + lo * size, HEADER.size + hi * size)

    def _check_offsets(self, i: int, lo: int, hi: int) -> None:
        """Block checks for document offset entries [lo, hi) of shard i."""
        if self._checks:
            size = INDEX_DTYPE.itemsize
            self._checks[i][1].check(HEADER.size + max(lo, 0) * size, HEADER.size + hi * size)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream (a copy; may span shards)."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside the {self.split} split's "
                             f"{self.num_tokens} tokens")
        out = np.empty(length, dtype=self.dtype)
        done, i = 0, self._shard_of(start)
        while done < length:
            local = start + done - int(self._starts[i])
            piece = self._tokens[i][local:local + length - done]
            self._check_tokens(i, local, local + len(piece))
            out[done:done + len(piece)] = piece
            done, i = done + len(piece), i + 1
        return out

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Global offsets of the documents that start inside [start, end), ascending."""
        found, i = [], self._shard_of(start)
        while i < len(self._tokens) and self._starts[i] < end:
            base, offsets = int(self._starts[i]), self._offsets[i]
            lo, hi = (int(x) for x in np.searchsorted(offsets[:-1], [start - base, end - base], side="left"))
            if self._checks:
                # The search itself read unchecked entries: check the answer and its neighbours instead. If they
                # bracket both ends, the answer is right whatever the search read on its way.
                self._check_offsets(i, lo - 1, hi + 1)
                n = len(offsets) - 1
                if ((lo > 0 and offsets[lo - 1] >= start - base) or (lo < n and offsets[lo] < start - base)
                        or (hi > 0 and offsets[hi - 1] >= end - base) or (hi < n and offsets[hi] < end - base)):
                    self._check_offsets(i, 0, n + 1)  # names the damaged block
                    raise DataError(f"{self._checks[i][1].path}: document offsets are not ascending")
            found.append(offsets[lo:hi].astype(np.int64) + base)
            i += 1
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def document(self, k: int) -> np.ndarray:
        """Document k of the split (its tokens, EOS included)."""
        for i, offsets in enumerate(self._offsets):
            if k < len(offsets) - 1:
                self._check_offsets(i, k, k + 2)
                lo, hi = int(offsets[k]), int(offsets[k + 1])
                self._check_tokens(i, lo, hi)
                return np.asarray(self._tokens[i][lo:hi])
            k -= len(offsets) - 1
        raise IndexError(f"document index out of range for the {self.num_docs}-document {self.split} split")

    def check_ids(self, tokens: np.ndarray, start: int, vocab_size: int) -> None:
        """Raise DataError naming the shard and offset of the first id >= vocab_size in `tokens` (read from `start`).

        Callers take one max() over a whole batch first and call this only when it fails."""
        bad = np.flatnonzero(tokens >= vocab_size)
        if len(bad):
            pos = start + int(bad[0])
            i = self._shard_of(pos)
            raise DataError(f"{self.folder}: token id {int(tokens[bad[0]])} >= vocab_size {vocab_size} at token "
                            f"offset {pos - int(self._starts[i])} of {self._paths[i]} ({self.split} split); the shard "
                            f"is damaged or was packed with another tokenizer")


def verify_dataset(folder: str | Path, checksums: bool = True, rehash: bool = False) -> dict:
    """Check every split's shards against the manifest; return the manifest.

    `checksums`: as PackedSplit's verify_checksums (sha256 of files not recorded as verified as they are now);
    `rehash`: hash every file again and refresh the record."""
    manifest = read_manifest(folder)
    for split in manifest["splits"]:
        PackedSplit(folder, split, verify_checksums=checksums or rehash, rehash=rehash)
    return manifest
