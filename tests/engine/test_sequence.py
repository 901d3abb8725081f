"""Ulysses sequence parallelism (`llm.engine.sequence`) on two real processes (gloo, DeepSpeed's all-to-all).

The decoder alone: each rank runs its half of the sequence, and the two halves' summed losses and gradients add up to
the whole sequence's on one process, for every attention backend that runs here, with and without document masking,
with key/value heads split over the ranks or repeated (fewer than the ranks).

`llm train` with train.sequence_parallel = 2 on two processes against one process without it, on the same samples:
both compute every token's loss once, in fp32; only the order of the sums differs (each rank sums its slice, then
the gradients of the two slices are added), so the losses agree to a relative 1e-5, not bit for bit.
"""

import json
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

from llm.config import ModelConfig
from tests.helpers import kill_tree, losses, run_train, start_train, wait_for, write_config

CASES = [(attention, masking, kv) for attention in ("eager", "sdpa", "auto") for masking in (False, True)
         for kv in (2, 1)]


def _model(attention: str, kv: int):
    from llm.models.decoder import Decoder

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv, d_ff=96, max_seq_len=64,
                      attention=attention)
    return Decoder(cfg)


def _batch(masking: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 64), generator=g)
    labels = torch.randint(0, 97, (2, 64), generator=g)
    labels[0, 5] = -100
    positions = None
    if masking:  # documents of 20, 30 and 14 tokens in row 0, one of 64 in row 1
        positions = torch.stack([torch.cat([torch.arange(20), torch.arange(30), torch.arange(14)]), torch.arange(64)])
    return ids, labels, positions


def _worker(rank: int, store: str, out: str) -> None:
    import deepspeed  # its all-to-all runs through deepspeed.comm

    deepspeed.init_distributed("gloo", auto_mpi_discovery=False, init_method=f"file://{store}", rank=rank,
                               world_size=2)
    torch.set_num_threads(1)
    from llm.engine.sequence import SequenceParallel

    results = {}
    group = torch.distributed.new_group([0, 1])
    for attention, masking, kv in CASES:
        model = _model(attention, kv)
        ids, labels, positions = _batch(masking)
        sequence = SequenceParallel(group)
        sequence.apply(model)
        batch = sequence.local({"input_ids": ids, "labels": labels})
        loss = model(batch["input_ids"], position_ids=positions, labels=batch["labels"], reduction="sum",
                     offset=batch["offset"])
        loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in grads.values():
            torch.distributed.all_reduce(g)
        results[(attention, masking, kv)] = (total, grads)
    sequence.remove(model)  # the model's own attention back, as for lm-eval's whole-sequence requests
    results["removed"] = all(type(block.attention.attend).__name__ == "Backend" for block in model.layers)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp / "out.pt")), nprocs=2, start_method="spawn")
    return torch.load(tmp / "out.pt", weights_only=True)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
@pytest.mark.parametrize("attention,masking,kv", CASES)
def test_halves_add_up_to_the_whole_sequence(two_ranks, attention, masking, kv):
    model = _model(attention, kv)
    ids, labels, positions = _batch(masking)
    loss = model(ids, position_ids=positions, labels=labels, reduction="sum")
    loss.backward()
    total, grads = two_ranks[(attention, masking, kv)]
    torch.testing.assert_close(total, loss.detach(), rtol=1e-6, atol=0)  # fp32: summed in another order
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_removing_it_gives_the_model_its_own_attention_back(two_ranks):
    assert two_ranks["removed"]


# ---- llm train ----------------------------------------------------------------------------------------------------

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
    from llm.eval.cloze import write_cloze_task

    cloze, _ = write_cloze_task(packed_data, tmp_path / "cloze", examples=12)  # lm-eval: whole sequences per rank
    train = dict(zero_stage=stage, eval_every=5, eval_windows=6, eval_tasks=[str(cloze)])
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
    scores = [[json.loads(line)["cloze/acc"] for line in (tmp_path / f"{run}/run/metrics.jsonl").read_text()
               .splitlines() if "cloze/acc" in line] for run in ("one", "two")]
    assert len(scores[0]) == 2 and scores[1] == pytest.approx(scores[0], abs=1e-9), scores
    # Tokens are counted once per sequence-parallel group: the same tokens as the one-process run.
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
