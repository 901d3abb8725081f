"""One full fp32 state dict from a training checkpoint, on CPU, whatever the ZeRO stage and world size.

ZeRO-1/2/3 checkpoints are consolidated by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint` from the
fp32 master weights in the optimizer shards (ZeRO-3 parameters are partitioned, so the model file alone would be
empty). A ZeRO-0 fp32 checkpoint holds the full weights in its model file. Every file is vetted first.

A weights-only checkpoint (`llm average` writes one) is a folder with `model.safetensors` and the run's
`config.yaml`: every reader of checkpoints (export, generate, translate) takes it like a training checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llm.checkpoint.checkpointer import Checkpointer
from llm.checkpoint.safety import vet_deepspeed_folder
from llm.checkpoint.staging import staged_folder
from llm.config import RunConfig, save_config

WEIGHTS = "model.safetensors"


class CheckpointNotFound(FileNotFoundError):
    pass


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (step-N, or weights-only) from itself, a run folder (its latest) or a run's checkpoints/
    folder."""
    path = Path(path)
    if (path / "trainer_state.json").is_file() or is_weights_checkpoint(path):
        return path
    for checkpoints in (path / "checkpoints", path):
        latest = _latest_in(checkpoints)
        if latest is not None:
            return latest
    raise CheckpointNotFound(f"{path}: not a checkpoint, nor a run folder with a complete checkpoint")


class _NoProcesses:  # discovery only: no collective calls are made
    process_index, num_processes = 0, 1


def _discovery(checkpoints: Path) -> Checkpointer:
    ck = Checkpointer(checkpoints.parent, _NoProcesses(), keep_last=1)
    ck.dir = checkpoints
    return ck


def _latest_in(checkpoints: Path) -> Path | None:
    return _discovery(checkpoints).latest() if checkpoints.is_dir() else None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoints, oldest first."""
    return _discovery(Path(run_dir) / "checkpoints").complete()


def is_weights_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / "config.yaml").is_file()


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    if is_weights_checkpoint(Path(step_dir)):
        from safetensors.torch import load_file

        return load_file(Path(step_dir) / WEIGHTS)
    ds_dir = Path(step_dir) / "deepspeed"
    vet_deepspeed_folder(ds_dir)
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
    else:
        model_file = ds_dir / "mp_rank_00_model_states.pt"
        state = torch.load(model_file, weights_only=True, map_location="cpu")["module"]
    return {k: v.float() for k, v in state.items()}


def write_weights_checkpoint(state: dict[str, torch.Tensor], cfg: RunConfig, out_dir: str | Path, info: dict,
                             overwrite: bool = False) -> Path:
    """Write a weights-only checkpoint (fp32 safetensors, the run config, `info` as checkpoint.json) atomically:
    built in a temporary folder next to `out_dir`, renamed when complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    with staged_folder(out_dir) as tmp:
        # Shared (tied) tensors are written once per name: safetensors refuses aliases.
        save_file({k: v.float().contiguous().clone() for k, v in state.items()}, tmp / WEIGHTS)
        save_config(cfg, tmp / "config.yaml")
        (tmp / "checkpoint.json").write_text(json.dumps(info, indent=2))
    return out_dir


def tokenizer_folder(cfg: RunConfig) -> Path:
    """The tokenizer a run trained with: the one packed next to its (first) dataset."""
    if cfg.task == "translation":
        folder = Path(cfg.data.path)
    elif not cfg.data.datasets:
        raise CheckpointNotFound("the run config names no dataset, so its tokenizer is unknown")
    else:
        folder = Path(cfg.data.datasets[0].path)
    if not (folder / "tokenizer.json").is_file() and not (folder / "source.spm").is_file():
        raise CheckpointNotFound(f"{folder}: the training data's tokenizer (tokenizer.json, or a Marian model's "
                                 "source.spm) is not there")
    return folder
