"""One full fp32 state dict from a training checkpoint, on CPU, whatever the ZeRO stage and world size.

ZeRO-1/2/3 checkpoints are consolidated by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` from the
fp32 master weights in the optimizer shards (ZeRO-3 parameters are partitioned, so the model file alone would be
empty). A ZeRO-0 fp32 checkpoint holds the full weights in its model file. Every file is vetted first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llm.checkpoint.checkpointer import Checkpointer
from llm.checkpoint.safety import vet_deepspeed_folder
from llm.config import RunConfig


class CheckpointNotFound(FileNotFoundError):
    pass


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (step-N) from itself, a run folder (its latest) or a run's checkpoints/ folder."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    for checkpoints in (path / "checkpoints", path):
        latest = _latest_in(checkpoints)
        if latest is not None:
            return latest
    raise CheckpointNotFound(f"{path}: not a checkpoint, nor a run folder with a complete checkpoint")


def _latest_in(checkpoints: Path) -> Path | None:
    class _NoProcesses:  # discovery only: no collective calls are made
        process_index, num_processes = 0, 1

    if not checkpoints.is_dir():
        return None
    ck = Checkpointer(checkpoints.parent, _NoProcesses(), keep_last=1)
    ck.dir = checkpoints
    return ck.latest()


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    ds_dir = Path(step_dir) / "deepspeed"
    vet_deepspeed_folder(ds_dir)
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
    else:
        model_file = ds_dir / "mp_rank_00_model_states.pt"
        state = torch.load(model_file, weights_only=True, map_location="cpu")["module"]
    return {k: v.float() for k, v in state.items()}


def tokenizer_folder(cfg: RunConfig) -> Path:
    """The tokenizer a run trained with: the one packed next to its (first) dataset."""
    if not cfg.data.datasets:
        raise CheckpointNotFound("the run config names no dataset, so its tokenizer is unknown")
    folder = Path(cfg.data.datasets[0].path)
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointNotFound(f"{folder}: the training data's tokenizer (tokenizer.json) is not there")
    return folder
