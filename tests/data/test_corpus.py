import gzip
import json
import sysconfig
from pathlib import Path

import pytest

from llm.data.corpus import builder_for, default_corpus_files, iter_text_batches, resolve_inputs
from llm.data.errors import DataError


def test_builder_by_suffix():
    assert builder_for(Path("a.txt")) == "text"
    assert builder_for(Path("a.jsonl.gz")) == "json"
    assert builder_for(Path("a.PARQUET")) == "parquet"
    assert builder_for(Path("a.csv")) == "csv"
    assert builder_for(Path("a.bin")) is None


def test_resolve_files_folders_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.jsonl", "notes.bin", ".git/x.txt"):
        (tmp_path / name).write_text("x")
    folder = resolve_inputs([str(tmp_path)])
    assert [p.relative_to(tmp_path).as_posix() for p in folder] == ["a.txt", "b.txt", "sub/c.jsonl"]
    assert resolve_inputs([str(tmp_path / "*.txt")]) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    # Input order is kept, repeats dropped.
    assert resolve_inputs([str(tmp_path / "b.txt"), str(tmp_path / "*.txt")]) == [tmp_path / "b.txt",
                                                                                  tmp_path / "a.txt"]
    with pytest.raises(DataError, match="no such file or folder"):
        resolve_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="matches no corpus files"):
        resolve_inputs([str(tmp_path / "*.md")])
    with pytest.raises(DataError, match="notes.bin: unsupported file type"):
        resolve_inputs([str(tmp_path / "notes.bin")])


def test_reads_every_format_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first file\nsecond line")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": f"json {i}", "n": i}) + "\n" for i in range(3)))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "gzipped"}) + "\n")
    (tmp_path / "d.csv").write_text('body,n\n"csv, quoted",1\nplain,2\n')
    pq.write_table(pa.table({"body": ["parquet row", None]}), tmp_path / "e.parquet")
    files = [tmp_path / n for n in ("a.txt", "b.jsonl", "c.jsonl.gz", "d.csv", "e.parquet")]
    docs = [d for batch in iter_text_batches(files, text_column="body", batch_size=2) for d in batch]
    assert docs == ["first file\nsecond line", "json 0", "json 1", "json 2", "gzipped", "csv, quoted", "plain",
                    "parquet row", ""]
    lines = [d for b in iter_text_batches(files[:1], txt_unit="line") for d in b]
    assert lines == ["first file", "second line"]


def test_missing_column_and_bad_json_are_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl: no column 'text' \(columns: content\)"):
        list(iter_text_batches([path]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl: could not read as json"):
        list(iter_text_batches([bad]))


def test_default_corpus_is_the_stdlib_without_site_packages():
    files = default_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert len(files) > 500 and files == sorted(files)
    assert all(f.suffix == ".py" and f.is_relative_to(stdlib) for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert stdlib / "os.py" in files
