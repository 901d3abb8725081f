"""Decoding and evaluation: a tiny model learns to reverse sequences (attention over the whole source), greedy and
beam search on it and on a scripted model whose best translation greedy misses, sacreBLEU, checkpoint averaging."""

from __future__ import annotations

import functools
import itertools
import math
import random
import time
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from llm.data.tokenizer import SPECIAL_TOKENS, LoadedTokenizer
from llm.models.encoder_decoder import build_translation_model, label_smoothed_loss, translation_preset
from llm.translate import (
    DecodeConfig,
    SpecialIds,
    average_state_dicts,
    beam_search,
    evaluate_bleu,
    greedy_search,
    pad_batch,
    translate,
    translate_ids,
)

SYMBOLS = [chr(ord("a") + i) for i in range(20)]  # token ids 4..23
IDS = SpecialIds(bos=1, eos=2, pad=3)
TRAIN_STEPS = 450


def reversal_tokenizer() -> LoadedTokenizer:
    """Whitespace-separated letters, one token each; ids 0..3 are <unk>, <s>, </s>, <pad> as in our tokenizers."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())} | {s: 4 + i for i, s in enumerate(SYMBOLS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return LoadedTokenizer(tok, dict(SPECIAL_TOKENS), "test")


def random_sequences(n: int, seed: int, lo: int = 3, hi: int = 12) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 4 + len(SYMBOLS)) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def as_text(ids: list[int]) -> str:
    return " ".join(SYMBOLS[i - 4] for i in ids)


@functools.cache
def trained_reverser():
    """A tiny post-norm model trained to reverse letter sequences (about 15 s on one CPU thread); cached per session
    so the export tests reuse it. Returns (model, tokenizer, seconds)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is shared; one thread is barely slower at this size
    try:
        torch.manual_seed(0)
        cfg = translation_preset("tiny", vocab_size=4 + len(SYMBOLS), d_model=64, n_heads=4, d_ff=256,
                                 dropout=0.0, max_seq_len=64, attention="sdpa")
        model = build_translation_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
        rng = itertools.count()
        for step in range(1, TRAIN_STEPS + 1):
            for group in opt.param_groups:  # warm-up, then linear decay: post-norm needs the warm-up
                group["lr"] = 3e-3 * min(1.0, step / 50) * (1 - step / (TRAIN_STEPS + 1))
            seqs = random_sequences(64, seed=next(rng))
            src, src_pad = pad_batch([s + [IDS.eos] for s in seqs], IDS.pad)
            tgt_in, _ = pad_batch([[IDS.bos] + s[::-1] for s in seqs], IDS.pad)
            labels, _ = pad_batch([s[::-1] + [IDS.eos] for s in seqs], IDS.pad)
            loss = label_smoothed_loss(model(src, src_pad, tgt_in, None), labels, IDS.pad, eps=0.1)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), reversal_tokenizer(), time.perf_counter() - start


def held_out(n: int = 200):
    seqs = random_sequences(n, seed=10_000)
    src, src_pad = pad_batch([s + [IDS.eos] for s in seqs], IDS.pad)
    return seqs, src, src_pad


def test_tiny_model_learns_to_reverse_sequences():
    model, _, seconds = trained_reverser()
    seqs, src, src_pad = held_out()
    hyps = greedy_search(model, src, src_pad, IDS, max_len_a=1.0, max_len_b=5)
    exact = sum(h.tokens == s[::-1] for h, s in zip(hyps, seqs, strict=True)) / len(seqs)
    print(f"trained in {seconds:.1f}s; greedy exact match {exact:.3f}")
    assert exact >= 0.98
    assert seconds < 60


@pytest.mark.parametrize("beam_size", [2, 5])
def test_beam_search_never_scores_below_greedy(beam_size):
    model, _, _ = trained_reverser()
    seqs, src, src_pad = held_out()
    greedy = greedy_search(model, src, src_pad, IDS, max_len_a=1.0, max_len_b=5, length_penalty=0.0)
    beams = beam_search(model, src, src_pad, IDS, beam_size=beam_size, length_penalty=0.0, max_len_a=1.0,
                        max_len_b=5)
    for g, hyps in zip(greedy, beams, strict=True):
        assert len(hyps) == beam_size and all(a.score >= b.score for a, b in itertools.pairwise(hyps))
        assert hyps[0].logprob >= g.logprob - 1e-4  # the model's own score
    exact = lambda hyps: sum(h.tokens == s[::-1] for h, s in zip(hyps, seqs, strict=True))  # noqa: E731
    assert exact([h[0] for h in beams]) >= exact(greedy)  # and the task's


def test_batched_decoding_equals_one_sentence_at_a_time():
    model, tok, _ = trained_reverser()
    texts = [as_text(s) for s in random_sequences(12, seed=7, lo=1, hi=14)]
    for decode in (DecodeConfig(beam_size=1), DecodeConfig(beam_size=4, length_penalty=1.0)):
        batched = translate_ids(model, tok, texts, decode, batch_size=16)
        alone = [translate_ids(model, tok, [t], decode, batch_size=1)[0] for t in texts]
        assert batched == alone


def test_translate_and_bleu_on_text():
    model, tok, _ = trained_reverser()
    seqs = random_sequences(60, seed=11)
    sources, references = [as_text(s) for s in seqs], [as_text(s[::-1]) for s in seqs]
    assert translate(model, tok, sources[:3], DecodeConfig(beam_size=3)) == references[:3]
    result = evaluate_bleu(model, tok, sources, references, DecodeConfig(beam_size=4), batch_size=16)
    assert result.bleu == pytest.approx(100.0) and result.chrf == pytest.approx(100.0)
    assert result.metrics() == {"bleu": result.bleu, "chrf": result.chrf}
    assert "nrefs:1" in result.bleu_signature and "13a" in result.bleu_signature
    # against the sources themselves (wrong order) the scores fall, and agree with sacrebleu's own
    import sacrebleu

    worse = evaluate_bleu(model, tok, sources, sources, DecodeConfig(beam_size=1))
    assert worse.bleu < 50 and worse.bleu == pytest.approx(sacrebleu.corpus_bleu(worse.hypotheses, [sources]).score)
    assert model.training is False


def test_maximum_length_forces_eos():
    model, _, _ = trained_reverser()
    seqs, src, src_pad = held_out(20)
    for hyps in (greedy_search(model, src, src_pad, IDS, max_len_a=0.0, max_len_b=2),
                 [h[0] for h in beam_search(model, src, src_pad, IDS, beam_size=3, max_len_a=0.0, max_len_b=2)]):
        assert all(len(h.tokens) <= 2 for h in hyps)
        assert all(h.tokens == s[::-1][:2] for h, s in zip(hyps, seqs, strict=True))


# ---- beam search on a scripted model ---------------------------------------------------------------------------


@dataclass
class _Cache:
    length: int = 0


@dataclass
class _State:
    prefixes: list[tuple[int, ...]]
    cache: _Cache

    def select(self, rows: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[r] for r in rows.tolist()]


class ScriptedModel:
    """A stand-in for the model with next-token probabilities given per target prefix (every source alike), so
    beam search can be checked against exhaustive search. Tokens 4 (A) and 5 (B); 2 is EOS."""

    cfg = type("Cfg", (), {"max_seq_len": 16})()
    V = 6
    TABLE = {(): {4: 0.6, 5: 0.4},  # greedy takes A ...
             (4,): {2: 0.3, 4: 0.35, 5: 0.35},  # ... where nothing is likely,
             (5,): {2: 0.9, 4: 0.05, 5: 0.05}}  # while "B EOS" has probability 0.36, the best of all
    OTHER = {2: 0.5, 4: 0.25, 5: 0.25}

    def probs(self, prefix: tuple[int, ...]) -> dict[int, float]:
        return self.TABLE.get(prefix, self.OTHER)

    def encode(self, src_ids, src_pad_mask):
        return torch.zeros(src_ids.shape[0], 1, 1)

    def start_decoding(self, memory, src_pad_mask, max_len, expand=1):
        return _State([()] * (memory.shape[0] * expand), _Cache())

    def decode_step(self, tgt_ids, state):
        if state.cache.length:  # the first input is BOS, which is not part of the prefix
            state.prefixes = [p + (t,) for p, t in zip(state.prefixes, tgt_ids[:, 0].tolist(), strict=True)]
        state.cache.length += 1
        logits = torch.full((len(state.prefixes), 1, self.V), float("-inf"))
        for r, p in enumerate(state.prefixes):
            for token, prob in self.probs(p).items():
                logits[r, 0, token] = math.log(prob)
        return logits

    def exhaustive(self, max_tokens: int, length_penalty: float) -> list[tuple[float, tuple[int, ...]]]:
        """Every translation of up to max_tokens tokens, scored, best first (EOS forced after max_tokens)."""
        found = []
        for n in range(max_tokens + 1):
            for body in itertools.product((4, 5), repeat=n):
                if 2 not in self.probs(body):
                    continue  # cannot end here
                lp = sum(math.log(self.probs(body[:i])[body[i]]) for i in range(n))
                lp += math.log(self.probs(body)[2])  # forced or not, EOS keeps its own probability
                found.append((lp / (n + 1) ** length_penalty, body))
        return sorted(found, reverse=True)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_what_greedy_misses(length_penalty):
    model = ScriptedModel()
    src = torch.zeros(3, 4, dtype=torch.long)
    greedy = greedy_search(model, src, None, IDS, max_len_a=0.0, max_len_b=4, length_penalty=length_penalty)
    assert greedy[0].tokens[0] == 4  # greedy commits to A
    beams = beam_search(model, src, None, IDS, beam_size=4, length_penalty=length_penalty, max_len_a=0.0,
                        max_len_b=4)
    best_score, best = model.exhaustive(4, length_penalty)[0]
    for hyps in beams:
        assert tuple(hyps[0].tokens) == best == (5,)
        assert hyps[0].score == pytest.approx(best_score, abs=1e-6)
        assert hyps[0].score > greedy[0].score


# ---- checkpoint averaging --------------------------------------------------------------------------------------


def test_average_state_dicts_is_the_elementwise_mean():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g),
               "step": torch.tensor(7)} for _ in range(3)]
    avg = average_state_dicts(iter(states))
    assert torch.allclose(avg["w"], torch.stack([s["w"] for s in states]).mean(0), atol=1e-7)
    assert avg["w"].dtype == torch.float32 and torch.equal(avg["step"], torch.tensor(7))
    assert torch.equal(average_state_dicts([states[0]])["w"], states[0]["w"])
    with pytest.raises(ValueError, match="different keys"):
        average_state_dicts([states[0], {"w": states[1]["w"]}])
    with pytest.raises(ValueError, match="shape"):
        average_state_dicts([states[0], {**states[1], "w": torch.zeros(4, 3)}])


def test_averaged_trained_weights_still_translate():
    """Averaging checkpoints of one run (here: the weights and a slightly perturbed copy) keeps a working model."""
    model, tok, _ = trained_reverser()
    g = torch.Generator().manual_seed(1)
    state = model.state_dict()
    noisy = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    averaged = build_translation_model(model.cfg)
    averaged.load_state_dict(average_state_dicts([state, noisy]))
    texts = [as_text(s) for s in random_sequences(10, seed=3)]
    assert translate(averaged.eval(), tok, texts, DecodeConfig(beam_size=1)) == translate(
        model, tok, texts, DecodeConfig(beam_size=1))
