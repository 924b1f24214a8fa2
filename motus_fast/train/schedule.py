"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay to ``min_lr_ratio``."""

from __future__ import annotations

import math

import torch

from motus_fast.config import TrainConfig


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of each parameter group's base learning rate at (0-based) optimizer step ``step``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """Set every group's lr for ``step`` from its ``base_lr`` (a pure function of the step: nothing to resume)."""
    f = lr_factor(cfg, step)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * f
