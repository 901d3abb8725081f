"""Ulysses sequence parallelism end to end: `llm train` with train.sequence_parallel = 2 on two real processes
(DeepSpeed over gloo, the all-to-alls included) against one process without it, on the same samples.

Both runs compute every token's loss once, in fp32; only the order of the sums differs (each rank sums its slice,
then the gradients of the two slices are added), so the losses agree to a relative 1e-5, not bit for bit.
"""

import pytest

from tests.helpers import kill_tree, losses, run_train, start_train, wait_for, write_config

SEQ, STEPS = 512, 10


def _config(tmp_path, data, sp: int, **train):
    import yaml

    path = write_config(tmp_path, data, steps=STEPS, micro_batch_size=2, grad_accum=1, sequence_parallel=sp,
                        **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["seq_len"] = SEQ
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("stage,masking", [(2, False), (3, True)], ids=["zero2", "zero3-document-masking"])
def test_two_ranks_split_the_sequence_and_match_one_process(packed_data, tmp_path, stage, masking):
    train = dict(zero_stage=stage, eval_every=5, eval_windows=6)
    overrides = [f"data.document_masking={str(masking).lower()}"]
    one = _config(tmp_path / "one", packed_data, 1, **train)
    assert run_train(one, 1, overrides).returncode == 0
    # Activation checkpointing recomputes the forward's all-to-alls in the backward: the same numbers.
    two = _config(tmp_path / "two", packed_data, 2, activation_checkpointing=masking, **train)
    result = run_train(two, 2, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"llm train: 2 process(es), ZeRO-{stage}" in result.stdout
    for split in ("train", "val"):
        expected, got = losses(tmp_path / "one/run", split), losses(tmp_path / "two/run", split)
        assert sorted(got) == sorted(expected) == (list(range(1, STEPS + 1)) if split == "train" else [5, 10])
        for step, loss in expected.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (split, step, got[step], loss)
    # Tokens are counted once per sequence-parallel group: the same tokens as the one-process run.
    import json

    last = [json.loads(line) for line in (tmp_path / "two/run/metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("split") == "train"][-1]
    assert last["tokens"] == STEPS * 2 * SEQ

    # Another sequence-parallel size cannot load these checkpoints: a clear error, nothing lost.
    result = run_train(two, 1, [*overrides, "train.sequence_parallel=1", "train.steps=12"])
    assert result.returncode != 0
    assert "saved with train.sequence_parallel = 2 on 2 process(es), now 1 on 1" in result.stderr
    assert sorted(losses(tmp_path / "two/run")) == list(range(1, STEPS + 1))


def test_resume_after_kill_reproduces_the_uninterrupted_run(packed_data, tmp_path):
    full = _config(tmp_path / "full", packed_data, 2, save_every=4)
    assert run_train(full, 2).returncode == 0
    expected = losses(tmp_path / "full/run")

    config = _config(tmp_path / "killed", packed_data, 2, save_every=4)
    proc = start_train(config)
    wait_for(proc, "saved checkpoint")  # step 4 is on disk
    wait_for(proc, "step 6/")  # and training has gone on past it
    kill_tree(proc)  # kill -9, launcher and both ranks
    result = run_train(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in result.stdout
    got = losses(tmp_path / "killed/run")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(5, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])
