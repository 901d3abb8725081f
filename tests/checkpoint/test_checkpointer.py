"""Checkpoint pieces that need no training run: RNG state, discovery, frozen settings. The save/resume/kill
behaviour is tested end to end with real processes in tests/engine/test_trainer.py."""

import random

import numpy as np
import torch

from llm.checkpoint.checkpointer import Checkpointer, frozen_differences, rng_state, set_rng_state
from llm.config import RunConfig, load_model_config, to_dict


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _OneProcess:
    process_index, num_processes = 0, 1

    def wait_for_everyone(self):
        pass


def test_discovery_ignores_unfinished_and_follows_latest(tmp_path):
    ck = Checkpointer(tmp_path, _OneProcess(), keep_last=2)
    assert ck.latest() is None
    for step in (5, 10):
        (ck.dir / f"step-{step:08d}").mkdir(parents=True)
        (ck.dir / f"step-{step:08d}" / "trainer_state.json").write_text("{}")
    (ck.dir / "step-00000015").mkdir()  # no trainer state: incomplete
    (ck.dir / ".tmp-step-00000020").mkdir()
    assert ck.latest().name == "step-00000010"  # no pointer: the newest complete one
    (ck.dir / "latest").write_text("step-00000005")
    assert ck.latest().name == "step-00000005"
    (ck.dir / "latest").write_text("step-00000015")  # points at an incomplete folder: fall back
    assert ck.latest().name == "step-00000010"
    ck.remove_unfinished()
    assert not (ck.dir / ".tmp-step-00000020").exists()


def test_frozen_differences_name_the_keys():
    cfg = RunConfig(model=load_model_config("tiny"))
    saved = to_dict(cfg)
    assert frozen_differences(saved, cfg) == []
    cfg.model.n_layers = 8
    cfg.data.seed = 7
    cfg.model.attention = "eager"  # allowed: same weights
    cfg.train.steps = 99  # allowed: a run may be extended
    diffs = frozen_differences(saved, cfg)
    assert diffs == ["model.n_layers: checkpoint has 4, config has 8", "data.seed: checkpoint has 1234, config has 7"]


def test_frozen_differences_of_a_translation_run():
    from llm.config import TranslationDataConfig

    cfg = RunConfig(task="translation", model=load_model_config("transformer-tiny"),
                    data=TranslationDataConfig(path="data/pairs"))
    saved = to_dict(cfg)
    cfg.data.max_tokens = 1000  # changes the batches, so the loader state would point elsewhere
    cfg.data.bleu_sentences = 10  # allowed: evaluation only
    cfg.decode.beam_size = 2
    assert frozen_differences(saved, cfg) == ["data.max_tokens: checkpoint has 4096, config has 1000"]
    assert frozen_differences(to_dict(RunConfig(model=load_model_config("tiny"))), cfg) == [
        "task: checkpoint has 'lm', config has 'translation'"]


def test_each_rank_fsyncs_the_files_it_wrote():
    from llm.checkpoint.checkpointer import written_by

    rank1 = ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_model_states.pt", "rank-00001.pt"]
    rank0 = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank-00000.pt",
             "zero_to_fp32.py"]
    assert all(written_by(n, 1) and not written_by(n, 0) for n in rank1)
    assert all(written_by(n, 0) and not written_by(n, 1) for n in rank0)
    assert written_by("zero_pp_rank_12_mp_rank_00_optim_states.pt", 12)
    assert not written_by("zero_pp_rank_12_mp_rank_00_optim_states.pt", 1)


def test_remove_unfinished_puts_back_the_old_copy_of_an_interrupted_resave(tmp_path):
    ck = Checkpointer(tmp_path, _OneProcess(), keep_last=2)
    ck.dir.mkdir()
    for name in (".old-step-00000004", ".old-step-00000002", "step-00000002"):
        (ck.dir / name).mkdir()
        (ck.dir / name / "trainer_state.json").write_text(name)
    ck.remove_unfinished()
    # step 4: the new copy never landed, the old one is back; step 2: the new copy landed, the old one goes.
    assert (ck.dir / "step-00000004" / "trainer_state.json").read_text() == ".old-step-00000004"
    assert (ck.dir / "step-00000002" / "trainer_state.json").read_text() == "step-00000002"
    assert not list(ck.dir.glob(".old-*"))


def test_resume_plans(tmp_path):
    import pytest

    from llm.checkpoint.universal import ResumeError, plan

    ds = tmp_path / "deepspeed"
    ds.mkdir()
    (ds / "mp_rank_00_model_states.pt").touch()
    assert not plan(tmp_path, 2, 0, 1, 0).universal  # ZeRO-0 fp32: whole states, any world size
    with pytest.raises(ResumeError, match="saved with ZeRO-0 on 2 process.*ZeRO-2 on 1.*resumes only at ZeRO-0"):
        plan(tmp_path, 2, 0, 1, 2)
    for rank in (0, 1):
        (ds / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    assert not plan(tmp_path, 2, 2, 2, 2).universal  # same world and stage: DeepSpeed's own load
    assert plan(tmp_path, 2, 2, 1, 2).universal
    assert plan(tmp_path, 2, 3, 4, 3).universal
    assert plan(tmp_path, 2, 2, 2, 3).universal  # another ZeRO stage re-slices the same way
    with pytest.raises(ResumeError, match="resumes only at ZeRO-0"):
        plan(tmp_path, 2, 2, 2, 0)
