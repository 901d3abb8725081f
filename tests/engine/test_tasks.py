"""Translation through `llm train`: two real processes with ZeRO-2 and ZeRO-3 over gloo compute what one process
(every target token weighs the same, whatever batch it is in), validation BLEU gathers the ranks' translations in
order, and a run killed with -9 resumes exactly. Both tasks' losses come from the model's chunked output head and
equal the unfused loss of its logits."""

import json

import pytest
import torch
import torch.nn.functional as F

from llm.config import load_config
from llm.engine.build import build_for_training
from llm.engine.tasks import make_task
from llm.engine.trainer import seed_everything
from llm.models.encoder_decoder import label_smoothed_loss
from tests.conftest import pair_vocab
from tests.helpers import kill_tree, losses, run_train, start_train, wait_for, write_config, write_translation_config


def records(run_dir, split):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["split"] == split}


@pytest.fixture(scope="module")
def one_process(packed_pairs, tmp_path_factory):
    """The two-process runs' computation on one process: with grad_accum 2 it takes global batches p and p + 1 as
    its micro-batches, exactly what ranks 0 and 1 take in one step of a two-process run. Validation: rank r of 2
    takes batches r, r + 2 of the first 4 (eval_batches 2 each); one process takes 0-3."""
    return _trained(packed_pairs, tmp_path_factory.mktemp("mt1"), 1, grad_accum=2, zero_stage=0, eval_batches=4)


@pytest.fixture(scope="module")
def zero3_run(packed_pairs, tmp_path_factory):
    """As `translation_run`, under ZeRO-3: parameters partitioned, every forward (beam search included) gathers."""
    return _trained(packed_pairs, tmp_path_factory.mktemp("mt-zero3"), 2, zero_stage=3, save_every=8, keep_last=3)


# The modern variant of the same model, by config fields (llm.models.encoder_decoder_layers).
MODERN = ["model.norm=pre", "model.norm_type=rmsnorm", "model.positions=rope", "model.activation=swiglu",
          "model.bias=false", "model.n_kv_heads=2"]


@pytest.fixture(scope="module")
def modern_one_process(packed_pairs, tmp_path_factory):
    return _trained(packed_pairs, tmp_path_factory.mktemp("mt-modern1"), 1, MODERN, grad_accum=2, zero_stage=0,
                    eval_batches=4)


def _trained(packed_pairs, tmp, processes: int, overrides=(), **train):
    config = write_translation_config(tmp, packed_pairs, pair_vocab(packed_pairs), **train)
    result = run_train(config, processes, list(overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    return config, tmp / "run"


def assert_same_run(run, reference) -> None:
    """Losses per step and target tokens, validation loss, BLEU and chrF at steps 12 and 24 equal the reference's."""
    ref, got = records(reference, "train"), records(run, "train")
    assert sorted(got) == list(range(1, 25))
    assert got[24]["loss"] < got[1]["loss"] - 1.0, got  # it learns
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step
        assert got[step]["tokens"] == ref[step]["tokens"]  # target tokens, summed over ranks
    assert len({got[s]["tokens"] - got[s - 1]["tokens"] for s in range(2, 25)}) > 1  # steps differ in tokens
    ref_val, val = records(reference, "val"), records(run, "val")
    assert sorted(val) == [12, 24]
    for step in (12, 24):
        assert val[step]["loss"] == pytest.approx(ref_val[step]["loss"], rel=1e-4)
        # The translations (shared out and gathered back in order, or under ZeRO-3 all made on every rank) score
        # the same.
        assert val[step]["bleu"] == pytest.approx(ref_val[step]["bleu"], abs=1e-6)
        assert val[step]["chrf"] == pytest.approx(ref_val[step]["chrf"], abs=1e-6)
    assert 0 <= val[24]["bleu"] <= 100 and 0 < val[24]["chrf"] <= 100 and val[24]["loss"] < val[12]["loss"]


def test_two_processes_match_one_process_with_the_same_batches(one_process, translation_run):
    config, reference = one_process
    assert_same_run(translation_run, reference)
    ref = records(reference, "train")

    # The loss is per target token of the whole step: at step 1 (the initial weights, rebuilt here as the trainer
    # builds them) it is the label-smoothed sum over both batches / their tokens. The batches hold different
    # numbers of tokens, so the mean of per-batch means (what a per-batch loss gives) differs.
    cfg = load_config(config)
    task = make_task(cfg)
    seed_everything(cfg.train.seed)
    loader, _ = task.loaders(0, 1)
    model = build_for_training(task, cfg, accelerator=None)  # ZeRO-0: the accelerator is not needed
    batches = [next(loader), next(loader)]
    with torch.no_grad():
        sums = [label_smoothed_loss(model(b["src_ids"], b["src_pad_mask"], b["tgt_in_ids"]), b["labels"],
                                    task.pad_id, 0.1, reduction="sum").item() for b in batches]
    counts = [b["num_tokens"] for b in batches]
    assert ref[1]["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert counts[0] != counts[1]
    assert ref[1]["loss"] != pytest.approx((sums[0] / counts[0] + sums[1] / counts[1]) / 2, rel=1e-5)


def test_zero3_on_two_processes_matches_one_process_bleu_included(one_process, zero3_run):
    assert_same_run(zero3_run[1], one_process[1])


@pytest.mark.parametrize("stage", [2, 3])
def test_the_modern_variant_trains_on_two_processes_as_on_one(modern_one_process, packed_pairs, tmp_path, stage):
    """Pre-norm RMSNorm, rotary positions, SwiGLU, no biases, grouped-query attention: ZeRO-2 and ZeRO-3 on two
    processes compute what one process does, BLEU included (beam search with the rotated key cache)."""
    config, run = _trained(packed_pairs, tmp_path, 2, MODERN, zero_stage=stage)
    assert_same_run(run, modern_one_process[1])
    saved = json.loads(json.dumps(load_config(run / "config.yaml").model.__dict__))
    assert saved["positions"] == "rope" and saved["activation"] == "swiglu" and saved["n_kv_heads"] == 2


def test_zero3_resume_after_kill_reproduces_the_uninterrupted_run(zero3_run, tmp_path):
    config, uninterrupted = zero3_run
    run = tmp_path / "run"
    proc = start_train(config, [f"train.output_dir={run}"])
    wait_for(proc, "saved checkpoint")  # step 8 is on disk
    wait_for(proc, "step 10/24")  # and training has gone on past it
    kill_tree(proc)
    result = run_train(config, 2, [f"train.output_dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000008 at step 8" in result.stdout
    assert losses(run) == losses(uninterrupted)  # exact, every step
    assert records(run, "val")[24]["bleu"] == records(uninterrupted, "val")[24]["bleu"]


def test_resume_after_kill_reproduces_the_uninterrupted_run(packed_pairs, translation_run, tmp_path):
    config = write_translation_config(tmp_path, packed_pairs, pair_vocab(packed_pairs), save_every=8, keep_last=3)
    proc = start_train(config)
    wait_for(proc, "saved checkpoint")  # step 8 is on disk
    wait_for(proc, "step 10/24")  # and training has gone on past it
    kill_tree(proc)
    result = run_train(config, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000008 at step 8" in result.stdout
    assert losses(tmp_path / "run") == losses(translation_run)  # exact, every step
    state = json.loads((tmp_path / "run/checkpoints/step-00000024/trainer_state.json").read_text())
    assert state["loader"] == json.loads((translation_run / "checkpoints/step-00000024/trainer_state.json")
                                         .read_text())["loader"]


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same(loss, grads, ref_loss, ref_grads):
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max().item() <= 1e-5 * max(1.0, ref_grads[name].abs().max().item()), name


def test_lm_loss_is_the_unfused_cross_entropy_of_the_logits(packed_data, tmp_path):
    cfg = load_config(write_config(tmp_path, packed_data, label_smoothing=0.1, grad_accum=1))
    task = make_task(cfg)
    loader, _ = task.loaders(0, 1)
    batch = next(loader)
    model = task.build_model()
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "cu_seqlens") if k in batch}
    logits = model(**inputs, max_seqlen=batch.get("max_seqlen")).float().flatten(0, 1)
    ref = F.cross_entropy(logits, batch["labels"].flatten(), label_smoothing=0.1)
    ref.backward()
    ref_grads = _grads(model)
    loss = task.loss(model, batch, torch.device("cpu"), step_tokens=0)
    loss.backward()
    _assert_same(loss, _grads(model), ref, ref_grads)


def test_translation_loss_is_the_unfused_label_smoothed_loss_of_the_logits(packed_pairs, tmp_path):
    cfg = load_config(write_translation_config(tmp_path, packed_pairs, pair_vocab(packed_pairs)))
    task = make_task(cfg)
    loader, _ = task.loaders(0, 1)
    batch = next(loader)
    assert (batch["labels"] == task.pad_id).any()  # padding to ignore
    model = task.build_model()
    logits = model(batch["src_ids"], batch["src_pad_mask"], batch["tgt_in_ids"])
    ref = label_smoothed_loss(logits, batch["labels"], task.pad_id, 0.1, reduction="sum") / batch["num_tokens"]
    ref.backward()
    ref_grads = _grads(model)
    # One process, no accumulation: the step's tokens are this batch's, so the loss is the mean per target token.
    loss = task.loss(model, batch, torch.device("cpu"), step_tokens=batch["num_tokens"])
    loss.backward()
    _assert_same(loss, _grads(model), ref, ref_grads)
