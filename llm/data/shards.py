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
with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from llm.data.errors import DataError

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
    with zero counts first and patched when the shard closes; checksums are taken after that.
    """

    def __init__(self, folder: str | Path, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder, self.split, self.dtype, self.shard_tokens = Path(folder), split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
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
            record[f"{kind}_bytes"] = (self.folder / name).stat().st_size
            record[f"{kind}_sha256"] = sha256_file(self.folder / name)
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


def _check_file(folder: Path, shard: dict, kind: str, magic: bytes, dtype_code: int, checksums: bool) -> Path:
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
    if checksums:
        digest = sha256_file(path)
        if digest != shard[f"{kind}_sha256"]:
            raise DataError(f"{path}: sha256 is {digest}, {MANIFEST} says {shard[f'{kind}_sha256']} (altered shard)")
    return path


class PackedSplit:
    """One split of a packed dataset as a single memory-mapped token stream (its shards in order).

    Opening checks every shard against the manifest (existence, size, header; sha256 when `verify_checksums`), so a
    truncated, altered or missing file fails here with its path, not as garbage batches later.
    """

    def __init__(self, folder: str | Path, split: str = "train", verify_checksums: bool = False):
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
        self._tokens, self._offsets = [], []
        for shard in entry["shards"]:
            missing = [k for k in SHARD_KEYS if k not in shard]
            if missing:
                raise DataError(f"{self.folder / MANIFEST}: a {split!r} shard entry lacks {', '.join(missing)}")
            bin_path = _check_file(self.folder, shard, "bin", TOKENS_MAGIC, code, verify_checksums)
            idx_path = _check_file(self.folder, shard, "idx", INDEX_MAGIC, 0, verify_checksums)
            n, d = shard["num_tokens"], shard["num_docs"]
            offsets = np.memmap(idx_path, dtype=INDEX_DTYPE, mode="r", offset=HEADER.size, shape=(d + 1,))
            if offsets[0] != 0 or offsets[-1] != n:
                raise DataError(f"{idx_path}: document offsets run {offsets[0]}..{offsets[-1]}, expected 0..{n}")
            self._offsets.append(offsets)
            self._tokens.append(np.memmap(bin_path, dtype=self.dtype, mode="r", offset=HEADER.size, shape=(n,)))
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

    def _shard_of(self, pos: int) -> int:
        return int(np.searchsorted(self._starts, pos, side="right")) - 1

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
            out[done:done + len(piece)] = piece
            done, i = done + len(piece), i + 1
        return out

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Global offsets of the documents that start inside [start, end), ascending."""
        found, i = [], self._shard_of(start)
        while i < len(self._tokens) and self._starts[i] < end:
            base, offsets = int(self._starts[i]), self._offsets[i][:-1]  # the last entry is the shard's end
            lo, hi = np.searchsorted(offsets, [start - base, end - base], side="left")
            found.append(offsets[lo:hi].astype(np.int64) + base)
            i += 1
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def document(self, k: int) -> np.ndarray:
        """Document k of the split (its tokens, EOS included)."""
        for i, offsets in enumerate(self._offsets):
            if k < len(offsets) - 1:
                return np.asarray(self._tokens[i][offsets[k]:offsets[k + 1]])
            k -= len(offsets) - 1
        raise IndexError(f"document index out of range for the {self.num_docs}-document {self.split} split")


def verify_dataset(folder: str | Path, checksums: bool = True) -> dict:
    """Check every split's shards against the manifest (sha256 too when `checksums`); return the manifest."""
    manifest = read_manifest(folder)
    for split in manifest["splits"]:
        PackedSplit(folder, split, verify_checksums=checksums)
    return manifest
