"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from llm.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never norms or biases (any parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # A ZeRO-3 parameter built partitioned is an empty 1-D tensor here: its shape is `ds_shape`.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, offload: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if offload:
        # With ZeRO-Offload the optimizer step runs on the CPU: DeepSpeed's vectorised CPU Adam is several times
        # faster there than torch's (it JIT-compiles on first use).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of cfg.lr for the update made at `step` (0-based): linear warmup, then the schedule's decay.

    cosine and linear decay from 1 to min_lr_ratio over the steps after warmup; constant stays at 1; wsd
    (warmup-stable-decay) stays at 1 and decays linearly to min_lr_ratio over the last decay_fraction of the run;
    inverse_sqrt (fairseq's) is sqrt(warmup_steps / n) at update n = step + 1, with no floor and no dependence on the
    run's length.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "inverse_sqrt":
        return math.sqrt(cfg.warmup_steps / (step + 1))
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)
    progress = min(1.0, (step - cfg.warmup_steps + 1) / max(1, total_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (DeepSpeed's optimizer wrappers share the groups).

    The schedule is a pure function of the step, applied before each update: nothing to save beyond the step, and
    no scheduler object that a wrapper could step too often.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
