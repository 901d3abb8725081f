"""What differs between training a language model and a translation model; the trainer loop is the same for both.

A task builds the model and the loaders, cuts the batches of one optimizer step, gives the loss of a micro-batch
and evaluates. The loss is scaled so that DeepSpeed's gradient averaging (over the `grad_accum` micro-batches and
the processes) yields the gradient of the step's loss per target token:

- lm: every micro-batch has the same number of tokens, so the mean over a micro-batch, averaged, is exact.
- translation: batches are cut by token count and hold different numbers of target tokens. As fairseq, every
  target token of the step weighs the same: the micro-batch's summed loss is divided by the step's global token
  count (one small all-reduce before the step's first forward) and multiplied by what DeepSpeed divides by.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from llm.config import ConfigError, RunConfig


class LanguageModelling:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self._harness = self._tokenizer = None
        self.sequence = None  # llm.engine.sequence.SequenceParallel

    def use_sequence_parallel(self, sequence) -> None:
        """Train on this rank's slice of every sequence of its group's shared batches (`SequenceParallel`)."""
        self.sequence = sequence

    def build_model(self) -> torch.nn.Module:
        from llm.models import build_model

        return build_model(self.cfg.model)

    def loaders(self, rank: int, world: int):
        from llm.data.loader import build_train_loader
        from llm.eval.validation import build_val_loader

        cfg = self.cfg
        train = build_train_loader(cfg.data, cfg.train.micro_batch_size, rank, world, vocab_size=cfg.model.vocab_size)
        val = build_val_loader(cfg.data, cfg.train.micro_batch_size, rank, world, vocab_size=cfg.model.vocab_size,
                               max_windows=cfg.train.eval_windows) if cfg.train.eval_every else None
        if cfg.train.eval_tasks:  # unknown tasks and missing files fail here, before the model is built
            try:
                from llm.eval.harness import Harness

                self._harness = Harness(cfg.train.eval_tasks, limit=cfg.train.eval_limit)
            except (ImportError, FileNotFoundError, ValueError) as e:
                raise ConfigError(f"train.eval_tasks = {cfg.train.eval_tasks}: {e}") from None
        return train, val

    def flops_per_token(self, model) -> tuple[float, str]:
        return model.flops_per_token(self.cfg.data.seq_len), f"at seq_len {self.cfg.data.seq_len}"

    def next_step(self, batches: Iterator[dict], accelerator) -> tuple[list[dict], int]:
        """The micro-batches of one optimizer step on this rank, and the step's tokens over all ranks."""
        t = self.cfg.train
        replicas = accelerator.num_processes // t.sequence_parallel  # a sequence-parallel group's tokens count once
        tokens = t.micro_batch_size * t.grad_accum * replicas * self.cfg.data.seq_len
        return [next(batches) for _ in range(t.grad_accum)], tokens

    def _local(self, batch: dict) -> dict:
        """This rank's slice of the batch under sequence parallelism; the batch itself otherwise."""
        return batch if self.sequence is None else self.sequence.local(batch)

    def _loss(self, engine, batch: dict, device: torch.device, label_smoothing: float,
              reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy (fp32), computed by the model's output head without the full logits."""
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "cu_seqlens",
                                                                       "labels") if k in batch}
        return engine(**inputs, max_seqlen=batch.get("max_seqlen"), label_smoothing=label_smoothing,
                      reduction=reduction, offset=batch.get("offset", 0))

    def loss(self, engine, batch: dict, device: torch.device, step_tokens: int) -> torch.Tensor:
        if self.sequence is None:
            return self._loss(engine, batch, device, self.cfg.label_smoothing)
        # A slice's summed loss over the whole sequences' targets, times N: DeepSpeed averages the gradients of all
        # ranks, so a group's N slices sum to the gradient of its sequences' per-token mean, as without sequence
        # parallelism; the mean of the N values is that mean loss too.
        from llm.eval.validation import IGNORE

        targets = int((batch["labels"] != IGNORE).sum())
        summed = self._loss(engine, self._local(batch), device, self.cfg.label_smoothing, "sum")
        return summed * (self.sequence.size / max(targets, 1))

    @torch.no_grad()
    def evaluate(self, engine, val_loader, accelerator) -> dict:
        """Validation loss (no label smoothing) per target token of the sampled windows, perplexity and bits per
        byte (`llm.eval.validation`); then the scores of train.eval_tasks. Every rank runs as many forwards (ZeRO-3's
        forward is collective)."""
        from llm.eval.validation import IGNORE

        engine.eval()
        # [dataset, (summed loss, target tokens)]
        sums = torch.zeros(len(val_loader.splits), 2, device=accelerator.device, dtype=torch.float64)
        for batch in map(self._local, val_loader):  # under sequence parallelism each slice counts its own
            sums[batch["dataset"], 0] += self._loss(engine, batch, accelerator.device, 0.0, "sum").double()
            sums[batch["dataset"], 1] += int((batch["labels"] != IGNORE).sum())
        result = val_loader.summarise(accelerator.reduce(sums, reduction="sum").cpu())
        if self.cfg.train.eval_tasks:
            result |= self.task_scores(engine, accelerator)
        engine.train()
        return result

    def task_scores(self, engine, accelerator) -> dict:
        """train.eval_tasks with lm-evaluation-harness, requests sharded over the ranks ({} on ranks other than 0)."""
        from llm.eval.harness import OurLM

        if self._tokenizer is None:
            self._tokenizer = self.tokenizer()
        model = engine.module
        lm = OurLM(model, self._tokenizer, batch_size=self.cfg.train.micro_batch_size,
                   distributed=accelerator.num_processes > 1, lockstep=engine.zero_optimization_stage() == 3)
        if self.sequence is None:
            return self._harness.scores(lm)
        self.sequence.remove(model)  # the harness's requests are sharded over every rank, whole sequences each
        try:
            return self._harness.scores(lm)
        finally:
            self.sequence.apply(model)

    def tokenizer(self):
        from transformers import AutoTokenizer

        from llm.checkpoint.consolidate import tokenizer_folder

        return AutoTokenizer.from_pretrained(str(tokenizer_folder(self.cfg)))


class Translation:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.pad_id: int | None = None
        self.world = 1
        self._bleu_set: tuple[list[str], list[str]] | None = None

    def build_model(self) -> torch.nn.Module:
        from llm.models.encoder_decoder import build_translation_model

        return build_translation_model(self.cfg.model)

    def loaders(self, rank: int, world: int):
        from llm.data.translation import TranslationLoader, TranslationValidationLoader

        cfg = self.cfg
        limits = dict(max_positions=cfg.model.max_seq_len, vocab_size=cfg.model.vocab_size)
        if cfg.train.init_from:
            self._check_init_tokenizer()
        train = TranslationLoader(cfg.data, rank, world, **limits)
        self.world, self.pad_id = world, train.batches.data.pad_id
        self.train_split = train.batches.data
        val = TranslationValidationLoader(cfg.data, rank, world, max_batches=cfg.train.eval_batches,
                                          **limits) if cfg.train.eval_every else None
        return train, val

    def _check_init_tokenizer(self) -> None:
        """A model fine-tuned from `train.init_from` must see its own token ids: the data packed with its tokenizer."""
        from llm.data.errors import DataError
        from llm.data.shards import read_manifest
        from llm.data.tokenizer import load_tokenizer
        from llm.export.marian_import import check_tokenizer, read_marian_config

        folder = Path(self.cfg.train.init_from)
        if not ((folder / "source.spm").is_file() or (folder / "tokenizer.json").is_file()):
            return  # a model folder without its tokenizer: the data's is taken on trust
        tokenizer = load_tokenizer(folder)
        check_tokenizer(folder, read_marian_config(folder), tokenizer)
        if tokenizer.sha256 != read_manifest(Path(self.cfg.data.path)).get("tokenizer", {}).get("sha256"):
            raise DataError(f"data.path {self.cfg.data.path} was packed with another tokenizer than train.init_from "
                            f"{folder}'s; re-pack it with `python -m data_prep.pack_translation --tokenizer {folder}`")

    def flops_per_token(self, model) -> tuple[float, str]:
        # Sentences, not windows: count at the mean target length of the training data.
        length = max(1, round(float(np.mean(self.train_split.tgt_lens))))
        return model.flops_per_token(length), f"(per target token, at the mean target length {length})"

    def next_step(self, batches: Iterator[dict], accelerator) -> tuple[list[dict], int]:
        micro = [next(batches) for _ in range(self.cfg.train.grad_accum)]
        local = torch.tensor(float(sum(b["num_tokens"] for b in micro)), device=accelerator.device)
        return micro, int(accelerator.reduce(local, reduction="sum").item())

    def _summed_loss(self, engine, batch: dict, device: torch.device, label_smoothing: float) -> torch.Tensor:
        """Label-smoothed cross-entropy summed over the non-padding targets (fp32), computed by the model's output
        head without the full logits. Right-padded targets: the causal mask alone keeps real positions off the
        padding (see encoder_decoder)."""
        return engine(batch["src_ids"].to(device), batch["src_pad_mask"].to(device), batch["tgt_in_ids"].to(device),
                      None, labels=batch["labels"].to(device), pad_id=self.pad_id, label_smoothing=label_smoothing,
                      reduction="sum")

    def loss(self, engine, batch: dict, device: torch.device, step_tokens: int) -> torch.Tensor:
        summed = self._summed_loss(engine, batch, device, self.cfg.label_smoothing)
        # DeepSpeed divides by grad_accum and averages over processes: undo both, divide by the step's tokens.
        scale = self.cfg.train.grad_accum * self.world / max(step_tokens, 1)
        return summed * scale

    @torch.no_grad()
    def evaluate(self, engine, val_loader, accelerator) -> dict:
        """Validation loss per target token (no label smoothing) and perplexity; then BLEU and chrF of beam
        search on the BLEU sentences (data.bleu_source/bleu_reference, or the start of the validation split)."""
        engine.eval()
        sums = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # [summed loss, target tokens]
        for batch in val_loader:
            sums[0] += self._summed_loss(engine, batch, accelerator.device, 0.0).double()
            sums[1] += batch["num_tokens"]
        engine.train()
        sums = accelerator.reduce(sums, reduction="sum")
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        result = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if self.cfg.data.bleu_sentences:
            result |= self.bleu(engine, accelerator)
        return result

    def bleu_set(self) -> tuple[list[str], list[str]]:
        """(sources, references) of the training-time BLEU, read once."""
        if self._bleu_set is None:
            d, n = self.cfg.data, self.cfg.data.bleu_sentences
            if d.bleu_source:
                from llm.translate import read_lines

                sources, references = read_lines(d.bleu_source), read_lines(d.bleu_reference)
                if len(sources) != len(references):
                    raise ValueError(f"data.bleu_source {d.bleu_source} has {len(sources)} lines, "
                                     f"data.bleu_reference {d.bleu_reference} {len(references)}")
                self._bleu_set = sources[:n], references[:n]
            else:
                from llm.data.translation import ParallelSplit

                val = ParallelSplit(d.path, "val")
                tok = self.tokenizer()
                pairs = [val.pair(k) for k in range(min(n, val.num_pairs))]
                self._bleu_set = (tok.decode([s[:-1].tolist() for s, _ in pairs], "src"),
                                  tok.decode([t[:-1].tolist() for _, t in pairs], "tgt"))
        return self._bleu_set

    def tokenizer(self):
        from llm.data.tokenizer import load_tokenizer

        return load_tokenizer(self.cfg.data.path)

    def bleu(self, engine, accelerator) -> dict:
        """Under ZeRO-0/1/2 each process translates its share of the sentences; under ZeRO-3 every forward is a
        collective (parameters are gathered per layer), so every process translates all of them alike."""
        from llm.translate import score_translations, translate

        sources, references = self.bleu_set()
        rank, world = accelerator.process_index, accelerator.num_processes
        sharded = engine.zero_optimization_stage() < 3
        mine = list(range(rank, len(sources), world)) if sharded else list(range(len(sources)))
        model, decode = engine.module, self.cfg.decode
        hypotheses = translate(model, self.tokenizer(), [sources[i] for i in mine], decode, decode.batch_size)
        if sharded:
            by_index = dict(gather_object(list(zip(mine, hypotheses, strict=True))))
            hypotheses = [by_index[i] for i in range(len(sources))]
        return score_translations(hypotheses, references, decode.bleu_tokenize).metrics()


TASKS = {"lm": LanguageModelling, "translation": Translation}


def make_task(cfg: RunConfig):
    return TASKS[cfg.task](cfg)
