"""Model definitions. This package imports only torch, `llm.attention` and `llm.config`."""

from __future__ import annotations

import torch

from llm.config import ModelConfig

from .decoder import Decoder
from .init import construct


def build_model(cfg: ModelConfig, device: str | torch.device | None = None, seed: int | None = None) -> Decoder:
    """Build the model for `cfg`. On `device="meta"` nothing is allocated: use it to count or size a model.

    The initial weights are a function of `seed` alone (any device, any number of threads); without one, a seed is
    drawn from torch's global generator. Inside `llm.models.init.no_init()` the parameters are left uninitialised.
    """
    return construct(Decoder, cfg, device, seed)


__all__ = ["Decoder", "build_model"]
