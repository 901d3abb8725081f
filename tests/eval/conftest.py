"""Tasks built offline and runs that score them while they train: one process, and two processes under ZeRO-3."""

import json
from pathlib import Path

import pytest

from llm.eval.cloze import write_cloze_task
from tests.helpers import run_train, write_config


def write_generation_task(folder: Path, packed: Path) -> Path:
    """A generate_until task on local data: complete a line of held-out code (stops at a newline)."""
    from llm.data.shards import PackedSplit
    from llm.data.tokenizer import load_tokenizer

    split, decode = PackedSplit(packed, "val"), load_tokenizer(packed).tokenizer.decode
    text = decode(split.document(0).tolist(), skip_special_tokens=True)
    lines = [line for line in text.splitlines() if len(line.strip()) > 20][:12]
    rows = [{"context": text[:text.index(line)] + line[:len(line) // 2], "target": line[len(line) // 2:]}
            for line in lines]
    (folder / "complete.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": "complete_line", "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(folder / "complete.jsonl")}}, "test_split": "test",
              "output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "target",
              "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
              "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}]}
    path = folder / "complete.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def eval_tasks(packed_data, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("tasks")
    cloze, n = write_cloze_task(packed_data, folder / "cloze", examples=24)
    assert n == 24
    return [str(cloze), str(write_generation_task(folder, packed_data))]


@pytest.fixture(scope="session")
def eval_runs(packed_data, eval_tasks, tmp_path_factory) -> dict[int, Path]:
    """ZeRO-3 runs of 8 steps scoring both tasks at steps 4 and 8: on one process (micro-batch 8) and on two
    (micro-batch 4: the same global batches)."""
    runs = {}
    for processes in (1, 2):
        tmp = tmp_path_factory.mktemp(f"eval{processes}")
        config = write_config(tmp, packed_data, zero_stage=3, steps=8, grad_accum=1, micro_batch_size=8 // processes,
                              eval_every=4, eval_windows=64, eval_tasks=eval_tasks)
        result = run_train(config, processes)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = tmp / "run"
    return runs
