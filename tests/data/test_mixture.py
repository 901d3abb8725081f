import numpy as np
import pytest
import torch

from llm.data.errors import DataError
from llm.data.loader import PackedLoader
from llm.data.mixture import Blend
from llm.data.shards import PackedSplit
from tests.data.conftest import data_config


def test_blend_tracks_weights_in_every_prefix():
    blend = Blend([1000, 50, 300], [0.7, 0.2, 0.1], seed=1, period=1000)
    datasets, _ = blend.locate(np.arange(3000))
    for n in (10, 97, 500, 1000, 2999):
        counts = np.bincount(datasets[:n], minlength=3)
        assert np.all(np.abs(counts - np.array([0.7, 0.2, 0.1]) * n) <= 1.5), (n, counts)


def test_blend_samples_each_dataset_epoch_exactly_once():
    sizes = [40, 7, 300]
    blend = Blend(sizes, [0.5, 0.3, 0.2], seed=3, period=64)
    datasets, samples = blend.locate(np.arange(5000))
    for d, n in enumerate(sizes):
        drawn = samples[datasets == d]
        for e in range(len(drawn) // n):  # every full epoch of dataset d is a permutation of its samples
            assert sorted(drawn[e * n:(e + 1) * n].tolist()) == list(range(n))
        if len(drawn) >= 2 * n:
            assert drawn[:n].tolist() != drawn[n:2 * n].tolist()  # a new order each epoch


def test_blend_is_a_pure_function_of_position():
    a = Blend([100, 30], [2.0, 1.0], seed=5)
    b = Blend([100, 30], [2.0, 1.0], seed=5)
    whole = a.locate(np.arange(1000))
    pieces = [b.locate(np.arange(s, s + 37)) for s in range(0, 1000, 37)]
    for i in range(2):
        np.testing.assert_array_equal(whole[i], np.concatenate([p[i] for p in pieces])[:1000])
    assert a.epoch_size == 130
    unshuffled = Blend([100, 30], [2.0, 1.0], seed=5, shuffle=False)
    d, s = unshuffled.locate(np.arange(130))
    assert s[d == 1].tolist()[:10] == list(range(10))  # validation blends keep stored order


def test_blend_rejects_bad_input():
    with pytest.raises(ValueError):
        Blend([10], [1.0, 2.0], seed=0)
    with pytest.raises(ValueError):
        Blend([10, 0], [1.0, 1.0], seed=0)


def test_mixture_loader_draws_by_weight_and_resumes(packed, packed_other):
    seq = 16
    cfg = data_config(packed, packed_other, weights=[3.0, 1.0], seq_len=seq)
    splits = [PackedSplit(p, "train") for p in (packed, packed_other)]
    owner = {}  # window tokens -> dataset index (the two corpora share no windows)
    for d, split in enumerate(splits):
        for i in range((split.num_tokens - 1) // seq):
            owner[split.read(i * seq, seq + 1).tobytes()] = d

    def sources(batch):
        window = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1).numpy().astype(np.uint16)
        return [owner[row.tobytes()] for row in window]

    loader = PackedLoader(cfg, 8)
    drawn = [d for _ in range(25) for d in sources(next(loader))]
    assert abs(drawn.count(1) / len(drawn) - 0.25) < 0.01

    state = loader.state_dict()
    expected = [next(loader)["input_ids"] for _ in range(5)]
    ranks = [PackedLoader(cfg, 2, r, 4) for r in range(4)]  # resume on 4 ranks x 2
    for r in ranks:
        r.load_state_dict(state)
    for step in range(5):
        torch.testing.assert_close(torch.cat([next(r)["input_ids"] for r in ranks]), expected[step])


def test_mixture_of_two_tokenizers_is_refused(tmp_path, packed, tiny_corpus):
    from llm.data.pack import pack_corpus
    from llm.data.tokenizer import train_bpe
    from tests.data.conftest import make_docs

    other_tok = train_bpe([make_docs(50, seed=9)], vocab_size=400).save(tmp_path / "tok")
    pack_corpus(tmp_path / "ds", other_tok, [str(tiny_corpus)], num_proc=1)
    with pytest.raises(DataError, match=r"tokenizer sha256 .* differs from .*a mixture needs one tokenizer"):
        PackedLoader(data_config(packed, tmp_path / "ds", seq_len=16), 2)
