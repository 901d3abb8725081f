"""Process setup: one Accelerator with DeepSpeed for every run, and the rank-0 output helper.

The DeepSpeed JSON in `configs/deepspeed/` says only how to shard (the ZeRO stage and its knobs). Batch size,
accumulation, precision and clipping come from the run config and are filled in here, so nothing is set twice; a
JSON that sets them anyway is an error.

Hosts without a GPU: Accelerate picks its communication backend from the accelerator it finds and finds none, so
with DeepSpeed it ends up believing there is one process (rank 0 everywhere, no data sharding, `reduce("mean")`
returning the sum) while DeepSpeed itself runs with the real world size. `_gloo_when_no_accelerator` makes that
probe answer "gloo, multi-CPU" whenever a launcher started us and no accelerator backend was found; Accelerate
then initialises DeepSpeed over gloo and reports the true world size and rank.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import torch

from llm.config import ConfigError, TrainConfig

DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
# Keys of the DeepSpeed config that the run config owns.
OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum x processes",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "optimizer": "optim (the optimizer is built by llm.engine.optim)",
    "scheduler": "optim (the schedule is built by llm.engine.optim)",
    "communication_data_type": "train.grad_reduce_dtype",
}


def _gloo_when_no_accelerator() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_falls_back_to_gloo", False):
        return

    def prepare_backend(self, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None):
        found, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if found is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return found, distributed_type

    prepare_backend._falls_back_to_gloo = True
    PartialState._prepare_backend = prepare_backend


def _default_group_timeout(timeout) -> None:
    """Make `timeout` the default of every process group created from now on, not only the world group's.

    DeepSpeed reduces gradients over groups of its own (`new_group(ranks)` without a timeout), and torch gives such
    groups its built-in default (30 min for gloo, 10 for NCCL) whatever the world group was given: a rank that hangs
    in a gradient all-reduce would otherwise outlast train.collective_timeout_s. `new_group` reads these module
    defaults when it is called, so setting them before the groups exist reaches all of them."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Without a launcher, describe a world of one so that DeepSpeed initialises the same way."""
    if "LOCAL_RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def resolve_precision(train: TrainConfig) -> str:
    if train.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if train.precision == "bf16" and not torch.cuda.is_available():
        raise ConfigError("train.precision = 'bf16': bf16 training needs a GPU here; use fp32 (or auto) on CPU")
    return train.precision


def deepspeed_config(train: TrainConfig, grad_clip: float, world_size: int, precision: str) -> dict:
    """The DeepSpeed config: the sharding JSON, plus what the run config owns."""
    if train.deepspeed_config:
        path = Path(train.deepspeed_config)
    else:
        path = DEEPSPEED_DIR / ("zero3_offload.json" if train.offload else f"zero{train.zero_stage}.json")
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed_config = {str(path)!r}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    for key, owner in OWNED_KEYS.items():
        if key in ds:
            raise ConfigError(f"{path}: sets {key!r}, which comes from the run config ({owner}); remove it there")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != train.zero_stage:
        raise ConfigError(f"{path}: zero_optimization.stage = {stage} but train.zero_stage = {train.zero_stage}")
    if precision == "bf16" and stage == 0:
        raise ConfigError("train.zero_stage = 0 with bf16: DeepSpeed accumulates and all-reduces gradients in bf16 "
                          "at stage 0; use train.zero_stage: 1 (the same traffic, the optimizer state sharded, "
                          "gradients accumulated in fp32)")
    if precision == "bf16":
        # Without these DeepSpeed accumulates the micro-batches' gradients in bf16 and reduces them in bf16: a sum of
        # grad_accum x processes terms with 8 mantissa bits. fp32 accumulation always; fp32 reduction by default.
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = train.grad_reduce_dtype
    ds.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch_size * train.grad_accum * world_size,
        gradient_clipping=grad_clip,
        bf16={"enabled": precision == "bf16"},
        steps_per_print=10**9,  # our metrics do the reporting
        wall_clock_breakdown=False,
        zero_allow_untested_optimizer=True,
    )
    return ds


def make_accelerator(train: TrainConfig, grad_clip: float):
    """Initialise the process group through Accelerate with DeepSpeed; returns (accelerator, precision). Every
    collective, on every process group, times out after train.collective_timeout_s."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    _single_process_env()
    _gloo_when_no_accelerator()
    precision = resolve_precision(train)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % train.sequence_parallel:
        raise ConfigError(f"train.sequence_parallel = {train.sequence_parallel} must divide the number of processes "
                          f"({world_size})")
    ds = deepspeed_config(train, grad_clip, world_size, precision)
    plugin = DeepSpeedPlugin(hf_ds_config=ds)
    _default_group_timeout(timedelta(seconds=train.collective_timeout_s))
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=train.collective_timeout_s))
    accelerator = Accelerator(deepspeed_plugin=plugin, mixed_precision="bf16" if precision == "bf16" else "no",
                              gradient_accumulation_steps=train.grad_accum, kwargs_handlers=[timeout])
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"Accelerate sees {accelerator.num_processes} processes but the launcher started "
                           f"{world_size}; refusing to train with unsharded data")
    return accelerator, precision


def sequence_parallel_group(size: int):
    """This rank's sequence-parallel process group: consecutive ranks [0, size), [size, 2 size), ... (every rank
    creates every group, in the same order); None for size 1.

    DeepSpeed is not told: to its engine each rank is a data-parallel replica that contributes a gradient (the
    task scales a slice's loss so that the average over all ranks is the right gradient), so ZeRO shards, reduces,
    clips and checkpoints over all ranks exactly as without sequence parallelism. (Handing it the groups as an
    `mpu` makes ZeRO-3's reduce-scatter average over the sequence-parallel ranks where ZeRO-2 sums them.)"""
    import torch.distributed as dist

    if size == 1:
        return None
    rank, mine = dist.get_rank(), None
    for first in range(0, dist.get_world_size(), size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine


def write_deepspeed_config(accelerator, path: str) -> None:
    """The DeepSpeed config that ran (after Accelerate and DeepSpeed filled it in), for the user to read."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    Path(path).write_text(json.dumps(ds, indent=2, sort_keys=True, default=str) + "\n")


def is_collective_timeout(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out (gloo: "Timed out waiting ..."; NCCL's watchdog: "Watchdog
    caught collective operation timeout"; torch's DistBackendError wraps both)."""
    text = str(error).lower()
    return isinstance(error, (RuntimeError, TimeoutError)) and ("timed out" in text or "timeout" in text)


def exit_worker(code: int) -> NoReturn:
    """Leave a worker of a multi-process run, its work done and its process group down, without interpreter
    teardown. Left to teardown, C++ destructors of communication objects still referenced from Python (gloo's,
    DeepSpeed's groups) can abort a worker that has finished ("terminate called without an active exception",
    SIGABRT), and the launcher then reports the whole run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """Print on global rank 0 only: every rank-0-only message goes through here."""
    if is_main():
        print(*args, **kwargs, flush=True)
