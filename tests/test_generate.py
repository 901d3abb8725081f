import dataclasses

import pytest
import torch

from llm.generate import Sampling, generate, next_token
from llm.models import build_model


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_cfg, init_std=0.3, attention="sdpa")  # sharp distributions
    return build_model(cfg).eval()


def test_kv_cache_decoding_equals_recomputing_the_whole_sequence(model):
    prompt = [5, 17, 42, 8]
    out = generate(model, prompt, Sampling(max_new_tokens=20))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_cached_logits_equal_full_forward(model):
    x = torch.randint(0, model.cfg.vocab_size, (1, 30))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(1)
        parts = [model(x[:, :10], cache=cache), model(x[:, 10:11], cache=cache), model(x[:, 11:], cache=cache)]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5 * full.abs().max().item()
    assert cache.length == 30


def test_stops_at_eos(model):
    greedy = generate(model, [1, 2, 3], Sampling(max_new_tokens=10))
    eos = greedy[3]
    first = greedy.index(eos)  # the first time that token comes
    assert generate(model, [1, 2, 3], Sampling(max_new_tokens=10), eos_id=eos) == greedy[:first + 1]
    assert len(greedy) == 10


def test_sampling_is_seeded_and_filters_work(model):
    s = Sampling(max_new_tokens=15, temperature=1.0, seed=7)
    assert generate(model, [3, 4], s) == generate(model, [3, 4], s)
    assert generate(model, [3, 4], s) != generate(model, [3, 4], dataclasses.replace(s, seed=8))
    greedy = generate(model, [3, 4], Sampling(max_new_tokens=15))
    assert generate(model, [3, 4], dataclasses.replace(s, top_k=1)) == greedy
    assert generate(model, [3, 4], dataclasses.replace(s, top_p=1e-6)) == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {next_token(logits, Sampling(temperature=1.0, top_p=0.75), g) for _ in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are never drawn
    picks = {next_token(logits, Sampling(temperature=1.0, top_k=3), g) for _ in range(300)}
    assert picks == {0, 1, 2}
