"""Finding corpus files and reading their documents through HF `datasets`, streaming (never the whole corpus in RAM).

An input is a file, a folder (searched recursively) or a glob. The file's suffix picks the `datasets` builder:
text-like files (`.txt`, `.md`, `.py`, ...) give one document per file by default, `.jsonl`/`.json`, `.csv` and
`.parquet` give one document per row, taken from the text column. Compressed files (`.gz`, `.zst`, ...) use the
suffix before the compression one.

With no input at all, the default corpus is the Python standard library's source: about 30 MB of real text that is
present wherever Python is, so the README's main job and the benchmark run anywhere without a download.
"""

from __future__ import annotations

import glob
import itertools
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from llm.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
BUILDERS = {**{s: "text" for s in TEXT_SUFFIXES},
            ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
TXT_UNITS = ("document", "paragraph", "line")  # `datasets` text builder's sample_by


def builder_for(path: Path) -> str | None:
    """The `datasets` builder name for a file, from its suffix (ignoring a compression suffix), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _folder_files(folder: Path) -> list[Path]:
    def visible(p: Path) -> bool:  # skip .git, .cache and other hidden entries
        return not any(part.startswith(".") for part in p.relative_to(folder).parts)

    return sorted(p for p in folder.rglob("*") if p.is_file() and builder_for(p) and visible(p))


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders and globs into a sorted-per-input, de-duplicated list of readable corpus files.

    Input order is kept (a user listing `a.jsonl b.jsonl` gets a's documents first); inside a folder or glob the
    files are sorted by path, so the result never depends on the file system's listing order.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_file():
            if builder_for(path) is None:
                raise DataError(f"{path}: unsupported file type; supported suffixes: {', '.join(BUILDERS)} "
                                f"(optionally compressed: {', '.join(COMPRESSION_SUFFIXES)})")
            found = [path]
        elif path.is_dir():
            found = _folder_files(path)
            if not found:
                raise DataError(f"{path}: folder has no corpus files (suffixes: {', '.join(BUILDERS)})")
        else:
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            found = [m for m in matches if m.is_file() and builder_for(m)]
            if not found:
                why = "matches no corpus files" if glob.has_magic(item) else "no such file or folder"
                raise DataError(f"{item}: {why}")
        files += [f.resolve() for f in found]
    return list(dict.fromkeys(files))  # drop repeats, keep first occurrence


def default_corpus_files() -> list[Path]:
    """The Python standard library's `.py` files (no site-packages), sorted: ~30 MB, ~1800 documents."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for root, dirs, names in os.walk(stdlib):  # os.walk prunes site-packages (often far larger than the stdlib)
        dirs[:] = [d for d in dirs if d not in skip]
        files += [Path(root) / n for n in names if n.endswith(".py")]
    files = sorted(f for f in files if f.is_file())
    if not files:
        raise DataError(f"{stdlib}: no standard-library source files found for the default corpus; pass --input")
    return files


def _groups(files: list[Path], first: int = 16) -> Iterator[tuple[str, list[str]]]:
    """Consecutive files of one builder, in groups of 16, 64, 256, ... files.

    `load_dataset` resolves every file before yielding the first row (~0.3 ms per file), so one call over the
    ~1800 files of the default corpus would leave the tokenizer workers idle for half a second; growing groups get
    the first documents out at once and resolve the rest while the workers are busy.
    """
    for builder, same_kind in itertools.groupby(files, key=builder_for):
        rest, size = [str(f) for f in same_kind], first
        while rest:
            yield builder, rest[:size]
            rest, size = rest[size:], size * 4


def iter_text_batches(files: list[Path], text_column: str = "text", batch_size: int = 64,
                      txt_unit: str = "document", encoding_errors: str = "replace") -> Iterator[list[str]]:
    """Yield the documents of `files`, in order, as lists of strings (`None` cells become empty strings).

    Consecutive files of the same kind are read by streaming `datasets.load_dataset` calls (see `_groups`):
    streaming reads file by file and chunk by chunk, so memory stays bounded by one chunk (or one document, for
    whole-file documents).
    """
    if txt_unit not in TXT_UNITS:
        raise DataError(f"txt_unit = {txt_unit!r}: expected one of {', '.join(TXT_UNITS)}")
    import datasets  # heavy import, only when reading

    datasets.disable_progress_bars()
    for builder, group in _groups(files):
        kwargs = {"sample_by": txt_unit, "encoding_errors": encoding_errors} if builder == "text" else {}
        where = group[0] if len(group) == 1 else f"{group[0]} (and {len(group) - 1} more {builder} files)"
        try:
            stream = datasets.load_dataset(builder, data_files=group, split="train", streaming=True, **kwargs)
            for batch in stream.iter(batch_size=batch_size):
                column = text_column if builder != "text" else "text"
                if column not in batch:
                    raise DataError(f"{where}: no column {column!r} (columns: {', '.join(batch)}); "
                                    f"choose one with --text-column")
                yield [t if isinstance(t, str) else ("" if t is None else str(t)) for t in batch[column]]
        except DataError:
            raise
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e}); use encoding_errors='replace' to keep going") from None
        except Exception as e:  # pyarrow / datasets parse errors: say which input they came from
            raise DataError(f"{where}: could not read as {builder}: {type(e).__name__}: {e}") from e
