"""Ulysses sequence parallelism (`train.sequence_parallel: N`), applied to a built decoder.

Each sequence of a micro-batch is split over the N consecutive ranks of a group, which all load the same samples:
rank r runs positions [r T/N, (r+1) T/N) through the embedding, the projections, the feed-forward and the loss head.
Attention needs every position: DeepSpeed's `DistributedAttention` all-to-alls the slice's q, k and v (B, T/N, H, D)
into the whole sequence for 1/N of the heads (B, T, H/N, D), the model's own attention backend runs on that (causal,
document masks of the whole sequence), and a second all-to-all brings the output back to the slice. Key/value heads
fewer than N are repeated up to N first, so that each rank's query heads meet their own group's keys and values.

The model knows nothing of process groups: its attention modules get a wrapped backend here, and each forward is
told the slice's first position (`offset`) with the position ids of the whole sequences. DeepSpeed is not told
either (see `llm.engine.distributed.sequence_parallel_group`); the task scales each slice's loss instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class _SequenceParallelAttention:
    """An attention backend that sees the whole sequences from a slice: all-to-all, attend, all-to-all back."""

    def __init__(self, attend, group, n_kv_heads: int):
        from deepspeed.sequence.layer import DistributedAttention

        self.attend = attend  # the model's own backend, put back by `SequenceParallel.remove`
        # (B, T/N, H, D) -> scatter the heads (dim 2), gather the sequence (dim 1) -> (B, T, H/N, D)
        self.exchange = DistributedAttention(attend, group, scatter_idx=2, gather_idx=1)
        self.repeat = max(1, torch.distributed.get_world_size(group) // n_kv_heads)

    def __call__(self, q, k, v, **kwargs):
        if self.repeat > 1:
            k, v = (t.repeat_interleave(self.repeat, dim=2) for t in (k, v))
        return self.exchange(q, k, v, 0, None, **kwargs)  # batch dim 0, no rotary inside (applied before)


class SequenceParallel:
    """One rank's part in a sequence-parallel `group`: wraps a model's attention and cuts its batches."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)

    def apply(self, model: nn.Module) -> None:
        for module in _attention_modules(model):
            if not isinstance(module.attend, _SequenceParallelAttention):
                module.attend = _SequenceParallelAttention(module.attend, self.group, module.n_kv_heads)

    def remove(self, model: nn.Module) -> None:
        """The model's own attention back (whole sequences on every rank, e.g. for lm-eval's requests)."""
        for module in _attention_modules(model):
            if isinstance(module.attend, _SequenceParallelAttention):
                module.attend = module.attend.attend

    def local(self, batch: dict) -> dict:
        """This rank's slice of the batch's sequences and its first position (`offset`, a forward argument); the
        position ids and document lengths stay whole (attention needs every boundary of the sequence)."""
        n = batch["input_ids"].shape[1] // self.size
        part = slice(self.rank * n, (self.rank + 1) * n)
        return batch | {k: batch[k][:, part] for k in ("input_ids", "labels")} | {"offset": self.rank * n}


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from llm.models.decoder import Attention

    found = [m for m in model.modules() if isinstance(m, Attention)]
    if not found:
        raise ValueError(f"sequence parallelism applies to the decoder's attention; {type(model).__name__} has none")
    return found
