"""Translation with the encoder-decoder: batched greedy and beam search, sacreBLEU scores, checkpoint averaging.

Decoding encodes a batch of sources once; each decoder layer keeps the cross-attention keys and values of the
encoder output and a self-attention KV cache, so every step runs the decoder on one new token per row.

Beam search follows fairseq's. Each live hypothesis is extended by every token; of the 2 * beam_size best
candidates (by summed log-probability), those ending in EOS among the first beam_size are finished, scored by
log-probability / length ** length_penalty (the length counts EOS), and the best beam_size others live on. Unlike
fairseq, which stops a sentence at its first beam_size finished hypotheses, a sentence is done only when no live
hypothesis can beat the beam_size best finished ones (an exact bound, see `_sentence_done`), or at its maximum
length, where EOS is forced (at log-probability 0, as `transformers` forces it); done sentences leave the batch.
Greedy decoding is the same loop with one hypothesis and the arg max.

A target may have at most max_len_a * source length + max_len_b tokens before its EOS (fairseq's --max-len-a and
--max-len-b; the source length counts its EOS), and never more than the model's positions allow. Padding and the
decoder start token are never produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.config import DecodeConfig
from llm.models.encoder_decoder import EncoderDecoder

__all__ = ["DecodeConfig", "SpecialIds", "average_checkpoints", "beam_search", "evaluate_bleu", "generate",
           "greedy_search", "translate", "translate_ids"]


@dataclass(frozen=True)
class SpecialIds:
    bos: int  # the decoder's start token
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialIds:
        """From a `LoadedTokenizer` (BOS starts the decoder, EOS where there is no BOS) or a `MarianSentencePiece`
        (padding starts it)."""
        eos, pad = tokenizer.token_id("eos"), tokenizer.token_id("pad")
        if eos is None or pad is None:
            raise ValueError(f"translation needs EOS and padding tokens; the tokenizer has eos={eos}, pad={pad}")
        return cls(bos=tokenizer.decoder_start_id, eos=eos, pad=pad)

    @property
    def never_generated(self) -> list[int]:
        return [self.pad] + ([self.bos] if self.bos not in (self.eos, self.pad) else [])


@dataclass
class Hypothesis:
    tokens: list[int]  # the translation, without EOS
    logprob: float  # summed log-probability of tokens and EOS
    score: float  # logprob / (len(tokens) + 1) ** length_penalty


def _hypothesis(tokens: list[int], logprob: float, length_penalty: float) -> Hypothesis:
    return Hypothesis(tokens, logprob, logprob / (len(tokens) + 1) ** length_penalty)


def max_lengths(model: EncoderDecoder, src_ids: torch.Tensor, src_pad_mask: torch.Tensor | None, a: float,
                b: int) -> list[int]:
    """Per row, how many tokens may come before EOS: a * source length + b, capped by the model's positions."""
    B, S = src_ids.shape
    lengths = [S] * B if src_pad_mask is None else (~src_pad_mask).sum(dim=1).tolist()
    cap = model.cfg.max_seq_len - 1  # BOS plus the tokens before EOS must fit the decoder's positions
    return [max(1, min(cap, int(a * n + b))) for n in lengths]


def _step_logprobs(model: EncoderDecoder, last: torch.Tensor, state, ids: SpecialIds,
                   force_eos: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (rows, V) of the next token after `last` (rows, 1); rows in `force_eos` may only end, and
    that forced EOS costs nothing (log-probability 0: it was no choice), as `transformers` forces it."""
    lp = model.decode_step(last, state)[:, -1].float().log_softmax(dim=-1)  # (rows, V)
    lp[:, ids.never_generated] = float("-inf")
    eos = torch.zeros(lp.shape[-1], dtype=torch.bool, device=lp.device)
    eos[ids.eos] = True
    forced = force_eos[:, None]
    return lp.masked_fill(forced & ~eos, float("-inf")).masked_fill(forced & eos, 0.0)


@torch.no_grad()
def greedy_search(model: EncoderDecoder, src_ids: torch.Tensor, src_pad_mask: torch.Tensor | None, ids: SpecialIds,
                  max_len_a: float = 1.2, max_len_b: int = 10, length_penalty: float = 1.0) -> list[Hypothesis]:
    """The arg-max translation of each source row. src_ids (B, S), src_pad_mask (B, S) True at padding."""
    B = src_ids.shape[0]
    limits = max_lengths(model, src_ids, src_pad_mask, max_len_a, max_len_b)
    steps = max(limits) + 1  # the last step can only produce EOS
    limit_t = torch.tensor(limits, device=src_ids.device)
    state = model.start_decoding(model.encode(src_ids, src_pad_mask), src_pad_mask, steps)
    last = src_ids.new_full((B, 1), ids.bos)
    out = src_ids.new_full((B, steps), ids.pad)
    logprob = torch.zeros(B, device=src_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
    for t in range(steps):
        best, token = _step_logprobs(model, last, state, ids, force_eos=limit_t <= t).max(dim=-1)  # (B,) each
        logprob += best.masked_fill(done, 0.0)
        token = token.masked_fill(done, ids.pad)  # finished rows run along on padding, which nothing reads
        out[:, t] = token
        done |= token == ids.eos
        if bool(done.all()):
            break
        last = token[:, None]
    hyps = []
    for row, lp in zip(out.tolist(), logprob.tolist(), strict=True):
        hyps.append(_hypothesis(row[:row.index(ids.eos)], lp, length_penalty))
    return hyps


@torch.no_grad()
def beam_search(model: EncoderDecoder, src_ids: torch.Tensor, src_pad_mask: torch.Tensor | None, ids: SpecialIds,
                beam_size: int = 5, length_penalty: float = 1.0, max_len_a: float = 1.2,
                max_len_b: int = 10) -> list[list[Hypothesis]]:
    """Up to `beam_size` finished hypotheses per source row, best first (see the module docstring)."""
    B, K = src_ids.shape[0], beam_size
    device = src_ids.device
    limits = max_lengths(model, src_ids, src_pad_mask, max_len_a, max_len_b)
    steps = max(limits) + 1
    limit_t = torch.tensor(limits, device=device)
    state = model.start_decoding(model.encode(src_ids, src_pad_mask), src_pad_mask, steps, expand=K)
    sent = torch.arange(B, device=device)  # the source sentence of each live block of K rows
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis at the start, or the K beams would be K copies of it
    history = src_ids.new_full((B * K, 1), ids.bos)  # (rows, t + 1) decoder inputs so far, BOS first
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    for t in range(steps):
        n = len(sent)
        force = (limit_t[sent] <= t).repeat_interleave(K)  # (n * K,)
        lp = _step_logprobs(model, history[:, -1:], state, ids, force)  # (n * K, V)
        V = lp.shape[-1]
        candidates = (scores.reshape(n * K, 1) + lp).view(n, K * V)  # (n, K * V)
        top, index = candidates.topk(min(2 * K, K * V), dim=1)  # (n, 2K), best first
        beam, token = index // V, index % V
        # A candidate ending in EOS that ranks among the K best of its step is finished; each sentence keeps its K
        # best finished hypotheses.
        ends = (token[:, :K] == ids.eos) & torch.isfinite(top[:, :K])
        for i, j in ends.nonzero().tolist():
            hyp = _hypothesis(history[i * K + int(beam[i, j]), 1:].tolist(), float(top[i, j]), length_penalty)
            kept = finished[int(sent[i])]
            if len(kept) < K:
                kept.append(hyp)
            else:
                worst = min(range(K), key=lambda h: kept[h].score)
                if hyp.score > kept[worst].score:
                    kept[worst] = hyp
        # The K best candidates that do not end live on.
        scores, keep = top.masked_fill(token == ids.eos, float("-inf")).topk(K, dim=1)  # (n, K), best first
        rows = (torch.arange(n, device=device)[:, None] * K + beam.gather(1, keep)).flatten()  # (n * K,) parents
        history = torch.cat([history[rows], token.gather(1, keep).reshape(n * K, 1)], dim=1)
        done = torch.tensor([_sentence_done(finished[b], float(best), t, limits[b], K, length_penalty)
                             for b, best in zip(sent.tolist(), scores[:, 0].tolist(), strict=True)], device=device)
        if bool(done.all()):
            break
        if bool(done.any()):  # drop finished sentences from the batch
            alive = (~done).nonzero().squeeze(1)  # (n',)
            alive_rows = (alive[:, None] * K + torch.arange(K, device=device)).flatten()  # (n' * K,)
            rows, history, scores, sent = rows[alive_rows], history[alive_rows], scores[alive], sent[alive]
        state.select(rows)
    return [sorted(f, key=lambda h: -h.score) for f in finished]


def _sentence_done(finished: list[Hypothesis], best_live: float, t: int, limit: int, K: int,
                   length_penalty: float) -> bool:
    """True when no live hypothesis can still enter the K best finished ones, or at the maximum length.

    A live hypothesis's log-probability only falls as it grows, so its final score is at most `best_live` divided
    by the length penalty at the length that flatters it most: the longest allowed when the penalty is positive,
    the shortest (the next step) otherwise. This bound is exact, unlike stopping at the first K finished (fairseq),
    which on a confident model can stop with K poor early-EOS hypotheses while a far better one is still live.
    """
    if t >= limit:
        return True
    if len(finished) < K:
        return False
    length = limit + 1 if length_penalty > 0 else t + 2  # tokens with EOS; the live ones have t + 1 now
    return min(h.score for h in finished) >= best_live / length ** length_penalty


def generate(model: EncoderDecoder, src_ids: torch.Tensor, src_pad_mask: torch.Tensor | None, ids: SpecialIds,
             decode: DecodeConfig) -> list[Hypothesis]:
    """The best hypothesis per source row: greedy for beam_size 1, beam search otherwise."""
    if decode.beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {decode.beam_size}")
    if decode.beam_size == 1:
        return greedy_search(model, src_ids, src_pad_mask, ids, decode.max_len_a, decode.max_len_b,
                             decode.length_penalty)
    nbest = beam_search(model, src_ids, src_pad_mask, ids, decode.beam_size, decode.length_penalty,
                        decode.max_len_a, decode.max_len_b)
    return [hyps[0] for hyps in nbest]


# ---- text in, text out ---------------------------------------------------------------------------------------


def encode_sources(tokenizer, sentences: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids of each sentence followed by EOS, as the translation data is packed; cut to `max_len`."""
    eos = tokenizer.token_id("eos")
    return [ids[:max_len - 1] + [eos] for ids in tokenizer.encode(list(sentences), "src")]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad token rows: ids (B, T) and the pad mask (B, T), True at padding."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    pad = torch.arange(T)[None, :] >= torch.tensor([len(r) for r in rows])[:, None]
    return ids.to(device), pad.to(device)


@torch.no_grad()
def translate_ids(model: EncoderDecoder, tokenizer, sentences: Sequence[str], decode: DecodeConfig | None = None,
                  batch_size: int = 64) -> list[list[int]]:
    """Translated token ids (without EOS) for each sentence, in input order."""
    decode = decode or DecodeConfig()
    ids = SpecialIds.from_tokenizer(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = encode_sources(tokenizer, sentences, model.cfg.max_seq_len)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together: little padding
    out: list[list[int]] = [[] for _ in encoded]
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            src, pad = pad_batch([encoded[i] for i in chunk], ids.pad, device)
            for i, hyp in zip(chunk, generate(model, src, pad, ids, decode), strict=True):
                out[i] = hyp.tokens
    finally:
        model.train(was_training)
    return out


def translate(model: EncoderDecoder, tokenizer, sentences: Sequence[str], decode: DecodeConfig | None = None,
              batch_size: int = 64) -> list[str]:
    """Translate sentences (`tokenizer`: a `LoadedTokenizer` or `MarianSentencePiece`) with greedy or beam search;
    input order kept."""
    tokens = translate_ids(model, tokenizer, sentences, decode, batch_size)
    return tokenizer.decode(tokens, "tgt")


@dataclass
class BleuResult:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    hypotheses: list[str]

    def metrics(self) -> dict[str, float]:
        return {"bleu": self.bleu, "chrf": self.chrf}


def score_translations(hypotheses: Sequence[str], references: Sequence[str], bleu_tokenize: str = "13a") -> BleuResult:
    """Corpus BLEU and chrF of `hypotheses` against one reference each (sacreBLEU)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} translations but {len(references)} references")
    bleu, chrf = BLEU(tokenize=bleu_tokenize), CHRF()
    refs = [list(references)]
    b, c = bleu.corpus_score(list(hypotheses), refs), chrf.corpus_score(list(hypotheses), refs)
    return BleuResult(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()), list(hypotheses))


def evaluate_bleu(model: EncoderDecoder, tokenizer, sources: Sequence[str], references: Sequence[str],
                  decode: DecodeConfig | None = None, batch_size: int = 64, bleu_tokenize: str = "13a") -> BleuResult:
    """Translate `sources` and score them against `references` with sacreBLEU: corpus BLEU and chrF."""
    if len(sources) != len(references):
        raise ValueError(f"{len(sources)} sources but {len(references)} references")
    return score_translations(translate(model, tokenizer, sources, decode, batch_size), references, bleu_tokenize)


def read_lines(path: str | Path) -> list[str]:
    """One sentence per line (a source or reference file), surrounding whitespace stripped as in packing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected one sentence per line)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


# ---- checkpoint averaging -------------------------------------------------------------------------------------


def average_state_dicts(states) -> dict[str, torch.Tensor]:
    """Element-wise mean of state dicts with the same keys and shapes (an iterable: one is held at a time).

    Summed in float64 so that the mean of K fp32 tensors is the correctly rounded fp32 mean; non-float entries
    must be equal and are kept.
    """
    total: dict[str, torch.Tensor] = {}
    count = 0
    for state in states:
        if count and set(state) != set(total):
            raise ValueError(f"state dict {count} has different keys: {sorted(set(state) ^ set(total))[:5]}")
        for key, value in state.items():
            if not count:
                total[key] = value.double() if value.is_floating_point() else value.clone()
            elif value.shape != total[key].shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in state dict {count}, "
                                 f"{tuple(total[key].shape)} before")
            elif value.is_floating_point():
                total[key] += value.double()
            elif not torch.equal(value, total[key]):
                raise ValueError(f"{key}: non-float entries differ between state dicts")
        count += 1
    if not count:
        raise ValueError("no state dicts to average")
    return {k: (v / count).float() if v.is_floating_point() else v for k, v in total.items()}


def average_checkpoints(step_dirs: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """The mean of the consolidated fp32 weights of several checkpoints (the last K of a run, as fairseq's
    `average_checkpoints.py` is used); one checkpoint is in memory at a time besides the running sum."""
    from llm.checkpoint.consolidate import consolidated_state_dict

    if not step_dirs:
        raise ValueError("no checkpoints to average")
    return average_state_dicts(consolidated_state_dict(Path(d)) for d in step_dirs)


# ---- loading -------------------------------------------------------------------------------------------------


def load_translation_model(path: str | Path, device: str = "cpu"):
    """(model in eval mode, fp32, on `device`; its tokenizer; the run config) from a translation run folder, one of
    its checkpoints, a weights-only checkpoint (`llm average`), or a MarianMTModel folder (OPUS-MT: its tokenizer,
    and its generation config's beam size and length penalty as the decoding defaults)."""
    import dataclasses

    from llm.checkpoint.consolidate import consolidated_state_dict, resolve_checkpoint, tokenizer_folder
    from llm.config import load_config
    from llm.data.tokenizer import load_tokenizer
    from llm.export.marian_import import is_marian_folder, load_marian_folder
    from llm.models.encoder_decoder import build_translation_model

    if is_marian_folder(path):
        model, cfg = load_marian_folder(path)
        return model.float().to(device).eval(), load_tokenizer(path), cfg
    step_dir = resolve_checkpoint(path)
    cfg = load_config(step_dir / "config.yaml")
    if cfg.task != "translation":
        raise ValueError(f"{step_dir}: a {cfg.task!r} checkpoint, not a translation model (use `llm generate`)")
    model = build_translation_model(dataclasses.replace(cfg.model, attention="auto"))
    model.load_state_dict(consolidated_state_dict(step_dir), strict=True)
    return model.float().to(device).eval(), load_tokenizer(tokenizer_folder(cfg)), cfg
