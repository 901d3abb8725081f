"""Model definitions. This package imports only torch, `llm.attention` and `llm.config`."""

from __future__ import annotations

import contextlib

import torch

from llm.config import ModelConfig

from .decoder import Decoder


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> Decoder:
    """Build the model for `cfg`. On `device="meta"` nothing is allocated: use it to count or size a model."""
    with contextlib.nullcontext() if device is None else torch.device(device):
        return Decoder(cfg)


__all__ = ["Decoder", "build_model"]
