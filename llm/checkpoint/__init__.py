"""Atomic checkpoints: save, resume discovery, retention (see checkpointer.py for the layout)."""

from .checkpointer import Checkpointer, CheckpointError

__all__ = ["Checkpointer", "CheckpointError"]
