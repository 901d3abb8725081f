"""Shard integrity without re-hashing the corpus at every start: a verification record and block checksums.

A file's sha256 is compared with the manifest once; the same read takes a crc32 of every 64 KiB block. The result
is recorded next to the data:

    <dataset>/verified/record.json     per file: the sha256 it matched, its size and mtime_ns then, and a crc32 of
                                       its block list
    <dataset>/verified/<file>.crc32    the file's block crc32s, little-endian uint32 (4 bytes per 64 KiB: 64 MB per TB)

Where the dataset folder is not writable the record goes to $LLM_CACHE_DIR/verified/<manifest sha256>/ (default
~/.cache/llm/...); a record already inside the folder (written when it was packed) is still used.

At open, a file whose size and mtime_ns equal its entry, and whose manifest sha256 is the one the entry matched, is
trusted without being read; any other file is hashed again and its entry replaced. On read, the first time this
process touches a block its crc32 is compared with the record, so a byte that changed without changing the stat
(bit rot, a restored mtime) is caught where it would be used, with the file and byte range named.

Entries are keyed by file name and by the sha256 they matched rather than by the whole manifest: the packer records
its shards before the manifest exists, and a rewritten manifest invalidates exactly the files whose sha256 changed.

Many processes open a dataset at once. Whoever has to hash takes an exclusive lock file (flock) and re-reads the
record once it has it, so one process hashes while the others wait and then find the files recorded. Records are
written to a temporary file and renamed into place. Where flock does not work, processes may hash the same file
twice, which costs time but corrupts nothing: a lost update only means a file is hashed again at the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

from llm.data.errors import DataError

try:
    import fcntl
except ImportError:  # not POSIX: no locking (see above)
    fcntl = None

BLOCK_BYTES = 1 << 16  # about what the kernel reads around a page fault anyway, so a first check costs little I/O
RECORD_DIR = "verified"
RECORD = "record.json"
RECORD_FORMAT, RECORD_VERSION = "llm-verified", 1
CRC_DTYPE = np.dtype("<u4")


def hash_file(path: str | Path, chunk: int = 64 * BLOCK_BYTES) -> tuple[str, np.ndarray]:
    """sha256 of a file and the crc32 of each of its BLOCK_BYTES blocks, in one read."""
    h, crcs = hashlib.sha256(), []
    buf = memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as f:
        while True:
            n = 0
            while n < chunk and (got := f.readinto(buf[n:])):  # fill the buffer: blocks must stay aligned
                n += got
            if n == 0:
                break
            h.update(buf[:n])
            crcs += [zlib.crc32(buf[i:min(i + BLOCK_BYTES, n)]) for i in range(0, n, BLOCK_BYTES)]
    return h.hexdigest(), np.array(crcs, dtype=CRC_DTYPE)


def cache_root() -> Path | None:
    if os.environ.get("LLM_CACHE_DIR"):
        return Path(os.environ["LLM_CACHE_DIR"])
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llm"
    except RuntimeError:  # no home directory
        return None


def _usable(folder: Path) -> bool:
    """Whether records can be written in `folder` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # unique per process
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the record from the other users of a shared dataset
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_record(path: Path) -> dict:
    """The file entries of a record; {} when it is missing, unreadable or of another format (then re-verified)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = (isinstance(record, dict) and record.get("format") == RECORD_FORMAT
          and record.get("version") == RECORD_VERSION and record.get("block_bytes") == BLOCK_BYTES)
    return record["files"] if ok and isinstance(record.get("files"), dict) else {}


class Record:
    """The verification record of one dataset folder: which files are trusted as they are, and their block crcs."""

    def __init__(self, folder: str | Path, manifest: str | Path | None = None):
        self.folder = Path(folder)
        self.manifest = Path(manifest) if manifest is not None else None  # None while packing: no manifest yet
        self.home = self.folder / RECORD_DIR
        self._cache: Path | None = None
        self.load()

    def cache_dir(self) -> Path | None:
        """Where records go when the dataset folder is read-only: named by the manifest's sha256."""
        if self._cache is None and self.manifest is not None and (root := cache_root()) is not None:
            try:
                self._cache = root / RECORD_DIR / hashlib.sha256(self.manifest.read_bytes()).hexdigest()
            except OSError:
                return None
        return self._cache

    def load(self) -> None:
        self.entries: dict[str, list[tuple[dict, Path]]] = {}
        for folder in (self.home, self.cache_dir()):
            if folder is not None:
                for name, entry in _read_record(folder / RECORD).items():
                    if isinstance(entry, dict):
                        self.entries.setdefault(name, []).append((entry, folder))

    def trusted(self, path: Path, sha256: str) -> tuple[dict, Path] | None:
        """The entry (and its folder) that vouches for `path` as it is now against `sha256`, or None."""
        st = path.stat()
        for entry, folder in self.entries.get(path.name, ()):
            if (entry.get("sha256"), entry.get("size"), entry.get("mtime_ns")) == (sha256, st.st_size,
                                                                                    st.st_mtime_ns):
                return entry, folder
        return None

    def verify(self, files: list[tuple[Path, str]], rehash: bool = False) -> dict[str, np.ndarray]:
        """Make sure each (path, expected sha256) is recorded as matching: hash the files that are not (all of them
        if `rehash`), raise DataError for one whose sha256 differs. Returns the block crcs of the files hashed now."""
        if not rehash and all(self.trusted(p, s) for p, s in files):
            return {}
        hashed: dict[str, np.ndarray] = {}
        with self._locked() as folder:
            if not rehash:
                self.load()  # another process may have recorded them while this one waited for the lock
            new = {}
            try:
                for path, sha256 in files:
                    if not rehash and self.trusted(path, sha256):
                        continue
                    st = path.stat()  # taken before reading: a change during the read shows as a new stat
                    digest, crcs = hash_file(path)
                    if digest != sha256:
                        where = self.manifest.name if self.manifest is not None else "the record"
                        raise DataError(f"{path}: sha256 is {digest}, {where} says {sha256} (altered shard)")
                    hashed[path.name] = crcs
                    new[path.name] = ({"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                       "blocks_crc32": zlib.crc32(crcs.tobytes())}, crcs)
            finally:  # what was verified stays recorded, also when a later file fails
                if folder is not None and new:
                    self._save(folder, new)
        return hashed

    def add(self, files: dict[str, tuple[os.stat_result, str, np.ndarray]]) -> None:
        """Record files whose sha256 and block crcs the packer has just computed: name -> (stat, sha256, crcs)."""
        with self._locked() as folder:
            if folder is not None:
                self._save(folder, {name: ({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                            "blocks_crc32": zlib.crc32(crcs.tobytes())}, crcs)
                                    for name, (st, sha, crcs) in files.items()})

    def block_crcs(self, path: Path, sha256: str, n_blocks: int) -> np.ndarray:
        """The recorded block crcs of `path`; hashed again when the record no longer vouches for it or its crc file
        is missing or damaged (so a bad record never blames a good shard)."""
        found = self.trusted(path, sha256)
        if found is not None:
            entry, folder = found
            try:
                data = (folder / f"{path.name}.crc32").read_bytes()
            except OSError:
                data = b""
            if len(data) == n_blocks * CRC_DTYPE.itemsize and zlib.crc32(data) == entry.get("blocks_crc32"):
                return np.frombuffer(data, dtype=CRC_DTYPE)
        return self.verify([(path, sha256)], rehash=True)[path.name]

    @contextlib.contextmanager
    def _locked(self):
        """Yield the folder to write the record in (None: nowhere writable), holding its lock where flock works."""
        folder = next((f for f in (self.home, self.cache_dir()) if f is not None and _usable(f)), None)
        if folder is None:
            yield None
            return
        try:  # read-only is enough for flock, so another user's lock file works too
            lock = os.open(folder / "lock", os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            lock = None
        try:
            if lock is not None and fcntl is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
                except OSError:
                    pass  # a file system without flock: go on unlocked
            yield folder
        finally:
            if lock is not None:
                os.close(lock)

    def _save(self, folder: Path, new: dict[str, tuple[dict, np.ndarray]]) -> None:
        """Write crc files, then merge the entries into the newest record on disk (others' entries are kept)."""
        try:
            for name, (_, crcs) in new.items():
                _atomic_write(folder / f"{name}.crc32", crcs.astype(CRC_DTYPE).tobytes())
            files = _read_record(folder / RECORD)
            files.update({name: entry for name, (entry, _) in new.items()})
            record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "block_bytes": BLOCK_BYTES, "files": files}
            _atomic_write(folder / RECORD, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        except OSError:
            return  # not recorded: verified again at the next start, which is slower but safe
        for name, (entry, _) in new.items():
            others = [(e, f) for e, f in self.entries.get(name, ()) if f != folder]
            self.entries[name] = [(entry, folder)] + others


class BlockCheck:
    """One file's block crc32s; each block is checked the first time this process reads it."""

    def __init__(self, path: Path, raw: np.ndarray, record: Record, sha256: str, crcs: np.ndarray | None = None):
        self.path, self.raw, self.record, self.sha256 = path, raw, record, sha256
        self.n_blocks = -(-len(raw) // BLOCK_BYTES)
        self.seen = np.zeros(self.n_blocks, dtype=bool)  # 1 byte per 64 KiB: 16 MB per TB, only for files read
        self._crcs = crcs

    def check(self, lo: int, hi: int) -> None:
        """Check the blocks holding bytes [lo, hi) of the file that this process has not checked yet."""
        if hi <= lo:
            return
        b0, b1 = lo // BLOCK_BYTES, (hi - 1) // BLOCK_BYTES + 1
        if self.seen[b0:b1].all():
            return
        if self._crcs is None:
            self._crcs = self.record.block_crcs(self.path, self.sha256, self.n_blocks)
        for b in (np.flatnonzero(~self.seen[b0:b1]) + b0).tolist():
            start, end = b * BLOCK_BYTES, min((b + 1) * BLOCK_BYTES, len(self.raw))
            got, want = zlib.crc32(self.raw[start:end]), int(self._crcs[b])
            if got != want:
                raise DataError(f"{self.path}: bytes [{start}, {end}) changed after the file was verified (block {b} "
                                f"crc32 is {got:08x}, recorded {want:08x}); restore the file from a good copy "
                                f"(python -m data_prep.inspect {self.record.folder} --verify re-checks every file)")
            self.seen[b] = True
