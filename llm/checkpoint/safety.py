"""Refuse checkpoint files that could execute code when unpickled.

Our own files (RNG states, model states) are read with `torch.load(weights_only=True)`. DeepSpeed reads its files
with `weights_only=False`, and its optimizer files hold three of its own plain classes, so before any DeepSpeed file
is handed to DeepSpeed we load it once with `weights_only=True`, allowing exactly those classes: a file carrying
any other global (the way a planted pickle runs code) is rejected before DeepSpeed opens it.

Some Python versions (3.11.2, 3.12+) pickle an Enum member as `getattr(EnumClass, "name")`. The vetting load maps
that `getattr` to a function that returns Enum members and refuses every other attribute.
"""

from __future__ import annotations

import enum
from pathlib import Path

import torch


class UnsafeCheckpoint(RuntimeError):
    pass


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
            (_enum_member, "builtins.getattr"), (_enum_member, "__builtin__.getattr")]


def _enum_member(owner, name):
    """Stands in for `getattr` while vetting: only an allowed Enum's member by name."""
    if isinstance(owner, type) and issubclass(owner, enum.Enum) and name in owner.__members__:
        return owner[name]
    raise UnsafeCheckpoint(f"getattr({owner!r}, {name!r}) in a checkpoint: only Enum members are allowed")


def vet_torch_file(path: Path, allowed: list | None = None) -> None:
    """Unpickle `path` under weights_only rules (plus `allowed` classes); raise UnsafeCheckpoint if it is refused."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:
        raise UnsafeCheckpoint(f"{path}: refused to load: it is not plain tensors and data "
                               f"(weights_only unpickling failed: {str(e).splitlines()[0]})") from None


def vet_deepspeed_folder(folder: Path) -> None:
    """Vet every file DeepSpeed would unpickle in a checkpoint's `deepspeed/` folder."""
    allowed = _deepspeed_safe_globals()
    files = sorted(Path(folder).rglob("*.pt"))
    if not files:
        raise UnsafeCheckpoint(f"{folder}: no DeepSpeed checkpoint files")
    for f in files:
        vet_torch_file(f, allowed)
