"""The shipped cloze task: built offline from held-out documents, reproducible, well formed, written whole."""

import json
import re

import pytest
import yaml

from llm.data.errors import DataError
from llm.eval.cloze import write_cloze_task


def test_cloze_examples_are_well_formed_and_reproducible(packed_data, tmp_path):
    path, n = write_cloze_task(packed_data, tmp_path / "a", examples=40)
    again, _ = write_cloze_task(packed_data, tmp_path / "b", examples=40)
    rows = [json.loads(line) for line in (tmp_path / "a/cloze.jsonl").read_text().splitlines()]
    assert n == len(rows) == 40
    assert (tmp_path / "a/cloze.jsonl").read_bytes() == (tmp_path / "b/cloze.jsonl").read_bytes()
    other, _ = write_cloze_task(packed_data, tmp_path / "c", examples=40, seed=5)
    assert (tmp_path / "c/cloze.jsonl").read_bytes() != (tmp_path / "a/cloze.jsonl").read_bytes()
    for row in rows:
        answer = row["choices"][row["label"]]
        assert len(set(row["choices"])) == 4 and all(re.fullmatch(r"[A-Za-z_]\w{3,}", c) for c in row["choices"])
        assert answer in re.findall(r"[A-Za-z_]\w*", row["context"])  # the passage can tell it
        assert not re.search(r"[A-Za-z0-9_]$", row["context"])  # the passage ends before a whole word
    assert len({row["label"] for row in rows}) > 1  # the answer is not always in one place
    config = yaml.safe_load(path.read_text())
    assert config["output_type"] == "multiple_choice" and config["dataset_path"] == "json"
    assert config["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "a/cloze.jsonl").resolve())


def test_refusals_leave_nothing_behind(packed_data, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/keep.txt").write_text("x")
    with pytest.raises(DataError, match="exists and is not empty"):
        write_cloze_task(packed_data, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    with pytest.raises(DataError, match="task name"):
        write_cloze_task(packed_data, tmp_path / "x", name="a b")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
