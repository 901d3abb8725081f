"""The translation loader: token-count batches of similar lengths, every pair once per epoch, deterministic order,
ranks taking turns, exact resume on any number of processes, validation batches, and a model learning from it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data_prep.pack_translation import pack_pairs, train_joint_tokenizer
from llm.data.errors import DataError
from llm.data.translation import (
    ParallelSplit,
    TranslationDataConfig,
    TranslationLoader,
    TranslationValidationLoader,
    batch_boundaries,
)
from tests.data_prep.test_pack_translation import make_pairs


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    pairs = make_pairs(3000, seed=5)
    tok = train_joint_tokenizer(iter(pairs), vocab_size=400)
    out = tmp_path_factory.mktemp("translation") / "ds"
    pack_pairs(out, tok, iter(pairs), max_ratio=3.0, val_fraction=0.05, shard_tokens=5000)
    return out


def config(packed, **kw) -> TranslationDataConfig:
    return TranslationDataConfig(path=str(packed), **({"max_tokens": 256} | kw))


def test_batch_boundaries():
    sizes = np.array([2, 2, 3, 3, 3, 5, 9, 9, 10])
    bounds = batch_boundaries(sizes, max_tokens=10)
    assert bounds.tolist() == [0, 3, 5, 6, 7, 8, 9]  # [2 2 3] 9 tokens, [3 3], [5], [9], [9], [10]
    assert batch_boundaries(sizes, max_tokens=100, max_sentences=4).tolist() == [0, 4, 8, 9]


def test_an_epoch_covers_every_pair_once_in_batches_within_max_tokens(packed):
    loader = TranslationLoader(config(packed))
    data = loader.batches.data
    seen, src_padding, real = [], 0, 0
    for position in range(loader.batches_per_epoch):
        pairs = loader.batches.pairs_of(position)
        batch = next(loader)
        B, S = batch["src_ids"].shape
        T = batch["labels"].shape[1]
        assert B == len(pairs) and B * max(S, T) <= 256
        seen += pairs.tolist()
        src_padding += int(batch["src_pad_mask"].sum())
        real += int((~batch["src_pad_mask"]).sum())
    assert sorted(seen) == list(range(data.num_pairs))
    assert src_padding < 0.02 * real  # batched by length: almost no source padding
    assert loader.state_dict() == {"epoch": 1, "consumed": 0}


def test_batch_tensors_are_the_pairs_shifted_for_teacher_forcing(packed):
    loader = TranslationLoader(config(packed))
    data = loader.batches.data
    pairs = loader.batches.pairs_of(0)
    batch = next(loader)
    for row, k in enumerate(pairs.tolist()):
        src, tgt = (torch.from_numpy(a.astype(np.int64)) for a in data.pair(k))
        S, T = len(src), len(tgt)
        assert torch.equal(batch["src_ids"][row, :S], src) and (batch["src_ids"][row, S:] == data.pad_id).all()
        assert torch.equal(batch["labels"][row, :T], tgt) and (batch["labels"][row, T:] == data.pad_id).all()
        assert batch["tgt_in_ids"][row, 0] == data.bos_id
        assert torch.equal(batch["tgt_in_ids"][row, 1:T], tgt[:-1])
        assert batch["src_pad_mask"][row].tolist() == [i >= S for i in range(batch["src_ids"].shape[1])]
        assert batch["tgt_pad_mask"][row].tolist() == [i >= T for i in range(batch["labels"].shape[1])]
    assert batch["num_tokens"] == int((batch["labels"] != data.pad_id).sum())


def test_order_depends_on_seed_and_epoch_only(packed):
    def first(loader, n):
        return [loader.batches.pairs_of(p).tolist() for p in range(n)]

    a, b = TranslationLoader(config(packed)), TranslationLoader(config(packed))
    n = a.batches_per_epoch
    assert first(a, n + 5) == first(b, n + 5)
    epoch0, epoch1 = first(a, n), [a.batches.pairs_of(n + p).tolist() for p in range(n)]
    assert epoch0 != epoch1 and sorted(map(len, epoch0)) == sorted(map(len, epoch1))  # same boundaries
    assert first(TranslationLoader(config(packed, seed=7)), 5) != epoch0[:5]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_turns_and_resume_exactly_on_another_world_size(packed, world):
    single = TranslationLoader(config(packed))
    n = single.batches_per_epoch
    reference = [next(single) for _ in range(n + 2 * world + 1)]  # crosses an epoch boundary
    ranks = [TranslationLoader(config(packed), rank=r, world_size=world) for r in range(world)]
    steps = (n + world) // world
    for step in range(steps):
        for r, loader in enumerate(ranks):
            got, want = next(loader), reference[step * world + r]
            assert torch.equal(got["src_ids"], want["src_ids"]) and torch.equal(got["labels"], want["labels"])
    state = ranks[0].state_dict()
    assert state == {"epoch": (steps * world) // n, "consumed": (steps * world) % n}
    resumed = TranslationLoader(config(packed))  # one process picks up where `world` left off
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["labels"], reference[steps * world]["labels"])


def test_validation_batches_are_fixed_and_equal_in_number_on_every_rank(packed):
    cfg = config(packed, max_tokens=128)
    one = TranslationValidationLoader(cfg)
    passes = [[b["labels"] for b in one] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*passes, strict=True))
    lengths = [int((~b["src_pad_mask"]).sum(1).max()) for b in one]
    assert lengths == sorted(lengths)  # stored (sorted) order, no shuffle
    ranks = [TranslationValidationLoader(cfg, r, 3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == one.num_batches // 3
    assert torch.equal(list(ranks[1])[0]["labels"], list(one)[1]["labels"])
    assert len(TranslationValidationLoader(cfg, max_batches=2)) == 2


def test_bad_data_and_state_are_clear_errors(packed, tmp_path):
    with pytest.raises(DataError, match="longer than max_tokens = 8"):
        TranslationLoader(config(packed, max_tokens=8))
    with pytest.raises(DataError, match="longer than the model's max_seq_len = 4"):
        TranslationLoader(config(packed), max_positions=4)
    loader = TranslationLoader(config(packed))
    with pytest.raises(DataError, match="outside this data's epoch"):
        loader.load_state_dict({"epoch": 0, "consumed": loader.batches_per_epoch})
    with pytest.raises(DataError, match="expected non-negative integers"):
        loader.load_state_dict({"epoch": -1, "consumed": 0})
    from llm.data.pack import pack_corpus
    from llm.data.tokenizer import train_bpe

    (tmp_path / "lm.txt").write_text("some text for a language model\n" * 20)
    tok = train_bpe([["some text for a language model"]], vocab_size=300)
    pack_corpus(tmp_path / "lm", tok, [str(tmp_path / "lm.txt")], num_proc=1)
    with pytest.raises(DataError, match="task is None, expected 'translation'"):
        ParallelSplit(tmp_path / "lm")


def test_out_of_range_token_id_names_the_shard(packed, tmp_path):
    import hashlib
    import json
    import shutil

    from llm.data.shards import HEADER, MANIFEST, write_manifest

    shutil.copytree(packed, tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text())
    entry = manifest["splits"]["train.tgt"]["shards"][0]
    shard = tmp_path / "ds" / entry["bin"]
    data = bytearray(shard.read_bytes())
    data[HEADER.size + 2 * 7:HEADER.size + 2 * 8] = (401).to_bytes(2, "little")  # consistent data, id past the vocab
    shard.write_bytes(bytes(data))
    entry["bin_sha256"] = hashlib.sha256(data).hexdigest()
    write_manifest(tmp_path / "ds", manifest)
    loader = TranslationLoader(config(tmp_path / "ds"))
    with pytest.raises(DataError, match=rf"token id 401 >= vocab_size 400 at token offset 7 of {shard} "):
        for _ in range(loader.batches_per_epoch):
            next(loader)


def test_a_model_learns_from_the_loader(packed):
    from llm.models.encoder_decoder import build_translation_model, label_smoothed_loss, translation_preset

    loader = TranslationLoader(config(packed, max_tokens=512))
    data = loader.batches.data
    torch.manual_seed(0)
    cfg = translation_preset("tiny", vocab_size=data.manifest["tokenizer"]["vocab_size"], dropout=0.0,
                             attention="sdpa")
    model = build_translation_model(dataclasses.replace(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        batch = next(loader)
        logits = model(batch["src_ids"], batch["src_pad_mask"], batch["tgt_in_ids"], batch["tgt_pad_mask"])
        loss = label_smoothed_loss(logits, batch["labels"], data.pad_id, eps=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # nats
