"""Building the model for training: partitioned from the start under ZeRO-3, whole otherwise, with the same initial
weights in every case.

ZeRO-0/1/2 build the whole model on every rank and initialise it in place. ZeRO-3 constructs it inside
`deepspeed.zero.Init`, which partitions each submodule's parameters as soon as that submodule's constructor returns:
DeepSpeed allocates the whole parameter, broadcasts it from rank 0 and keeps this rank's 1/N (`p.ds_tensor`), so at
most one whole parameter exists at a time and no rank ever holds the model. A constructor that initialised its model
would write into empty tensors by then, so the model is built with its init deferred (`no_init`) and each rank fills
its own partition from the model's init rules: `llm.models.init` draws any slice of a parameter bit-identical to the
same slice of a whole-tensor fill, so ZeRO-3 on any number of processes starts from exactly the weights a ZeRO-0 or
ZeRO-2 build starts from (the seed is `train.seed`).

A partition is the flattened parameter's elements [rank * size, (rank + 1) * size) with size = ceil(numel / N); the
last rank's partition runs past the end, and that padding is set to zero.

`train.init_from` loads a transformers folder (a MarianMTModel for translation) instead of initialising, one
parameter at a time from the memory-mapped safetensors: whole tensors, or under ZeRO-3 each rank copies its
partition's slice. Beyond its own part of the model, a rank holds one whole parameter in fp32 at a time (the
embedding, at most), never the whole model; a Marian model, small, is converted whole once.
"""

from __future__ import annotations

import os
import time

import torch

from llm.config import RunConfig
from llm.engine.distributed import print0
from llm.models.init import Slice, check_rules, fill_slices, init_parameters, no_init


def init_threads() -> int:
    """Threads for initialising: this machine's cores shared among the processes on it (launchers set OMP threads
    to 1 per process, which would make the init single-threaded for no reason: it runs before any training)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def build_for_training(task, cfg: RunConfig, accelerator) -> torch.nn.Module:
    """The task's model, initialised from `train.seed` (or `train.init_from`), partitioned under ZeRO-3.

    `accelerator` is the run's Accelerator; only ZeRO-3 uses it (the DeepSpeed config that zero.Init reads)."""
    start = time.perf_counter()
    zero3 = cfg.train.zero_stage == 3
    if zero3:
        import deepspeed

        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        with deepspeed.zero.Init(config_dict_or_path=ds_config), no_init():
            model = task.build_model()
    else:
        with no_init():
            model = task.build_model()
    threads = init_threads()
    if cfg.train.init_from:
        init_from_hf(model, cfg, zero3)
    elif zero3:
        init_partitions(model, model.init_rules(), cfg.train.seed, threads)
    else:
        init_parameters(model, model.init_rules(), cfg.train.seed, threads)
    how = "partitioned over the processes (ZeRO-3)" if zero3 else "whole on every process"
    init = "loaded" if cfg.train.init_from else f"initialised ({threads} thread{'s' if threads > 1 else ''})"
    print0(f"model built {how} and {init} in {time.perf_counter() - start:.1f} s")
    return model


# ---- ZeRO-3 partitions -----------------------------------------------------------------------------------------

def partition_range(p: torch.nn.Parameter) -> tuple[int, int]:
    """(start, count): this rank's partition holds elements [start, start + count) of the flattened parameter;
    the rest of the partition (the last rank's) is padding."""
    if getattr(p, "ds_tensor", None) is None:
        raise RuntimeError("parameter is not a ZeRO-3 parameter (was the model built under deepspeed.zero.Init?)")
    size = p.ds_tensor.ds_numel
    if p.ds_tensor.numel() != size:
        raise RuntimeError(f"ZeRO-3 partition not in memory ({p.ds_tensor.numel()} of {size} elements; NVMe "
                           "parameter offload is not supported here)")
    start = size * p.ds_zero_partition_rank
    return start, max(0, min(size, p.ds_numel - start))


def _partitions(model: torch.nn.Module):
    """(name, parameter, start, this rank's part of the parameter) per distinct parameter; zeroes the padding."""
    for name, p in model.named_parameters():
        start, count = partition_range(p)
        flat = p.ds_tensor.view(-1)
        flat[count:].zero_()
        yield name, p, start, flat[:count]


@torch.no_grad()
def init_partitions(model: torch.nn.Module, rules: dict, seed: int, threads: int | None = None) -> None:
    """Fill each of this rank's ZeRO-3 partitions with its slice of what `init_parameters` gives the whole model."""
    check_rules((name for name, _ in model.named_parameters()), rules)
    fill_slices([Slice(name, rules[name], p.ds_numel, start, part) for name, p, start, part in _partitions(model)],
                seed, threads)


# ---- train.init_from ---------------------------------------------------------------------------------------------

@torch.no_grad()
def init_from_hf(model: torch.nn.Module, cfg: RunConfig, partitioned: bool) -> None:
    """Start from a transformers folder's weights (Llama, Mistral, Qwen2, Qwen3; MarianMTModel for translation); a
    resumed run then overwrites them with its checkpoint. Read and converted one parameter at a time: besides the
    model (or under ZeRO-3 this rank's partitions), a process holds one whole parameter in fp32 at a time (a Marian
    model, small, is converted whole once)."""
    if cfg.task == "translation":
        from llm.export.marian_import import check_same_model as check_same_shape
        from llm.export.marian_import import open_marian_folder as open_hf_folder
    else:
        from llm.export.families import open_hf_folder
        from llm.export.hf import check_same_shape

    hf_cfg, readers = open_hf_folder(cfg.train.init_from)
    check_same_shape(cfg.model, hf_cfg, cfg.train.init_from)
    expected = set(model.state_dict(keep_vars=True))  # every name, a tied parameter under each of its names
    if set(readers) != expected:
        raise RuntimeError(f"{cfg.train.init_from}: weights do not match the model: missing "
                           f"{sorted(expected - set(readers))[:5]}, unexpected {sorted(set(readers) - expected)[:5]}")
    if partitioned:
        for name, p, start, part in _partitions(model):
            whole = readers[name]()
            if tuple(whole.shape) != tuple(p.ds_shape):
                raise RuntimeError(f"{name}: shape {tuple(whole.shape)} in {cfg.train.init_from}, "
                                   f"the model has {tuple(p.ds_shape)}")
            part.copy_(whole.reshape(-1)[start:start + part.numel()])
    else:
        for name, p in model.named_parameters():  # a tied output is the embedding: named once
            whole = readers[name]()
            if whole.shape != p.shape:
                raise RuntimeError(f"{name}: shape {tuple(whole.shape)} in {cfg.train.init_from}, "
                                   f"the model has {tuple(p.shape)}")
            p.copy_(whole)
    print0(f"initialised from {cfg.train.init_from}")
