"""lm-eval on our model during training: sharded over the ranks, in step under ZeRO-3, equal to one process."""

import json

import pytest

from tests.helpers import losses


def val_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "val"]


def test_in_loop_scores_on_two_processes_with_zero3_equal_one_process(eval_runs):
    one, two = val_records(eval_runs[1]), val_records(eval_runs[2])
    assert [r["step"] for r in one] == [r["step"] for r in two] == [4, 8]
    for a, b in zip(one, two, strict=True):
        assert set(a) == set(b) >= {"loss", "ppl", "bpb", "cloze/acc", "cloze/acc_norm", "complete_line/exact_match"}
        for key in ("loss", "ppl", "bpb"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        # Every example scored once (24 cloze examples over 2 ranks) with the same choices made; the generation task
        # ran on both ranks under ZeRO-3 (its forwards are collective) to the same scores.
        for key in ("cloze/acc", "cloze/acc_norm", "complete_line/exact_match", "complete_line/chrf"):
            assert b[key] == a[key], key
        assert 0 <= a["cloze/acc"] <= 1
    train_one, train_two = losses(eval_runs[1]), losses(eval_runs[2])
    assert all(train_two[s] == pytest.approx(train_one[s], rel=1e-4) for s in train_one)  # training unaffected
    assert (eval_runs[2] / "loss.png").stat().st_size > 0
    tags = list((eval_runs[2] / "tensorboard").glob("events*"))
    assert tags and b"val/cloze/acc" in tags[0].read_bytes()
