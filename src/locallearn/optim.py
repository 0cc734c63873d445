"""One optimizer and one learning-rate schedule per stage.

Schedules are multiplicative factors of the base LR, updated every step:
a linear warm-up over ``warmup_steps``, then ``constant``, ``cosine`` (down to
``min_lr``), ``linear`` (down to ``min_lr``) or ``step`` (times ``gamma`` every
``step_every`` steps).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear", "step")


def build_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float,
                    momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """Build SGD (momentum, Nesterov, weight decay), Adam or AdamW.

    Raises:
        ValueError: for an unknown optimizer name.
    """
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, schedule: str, warmup: int = 0, min_factor: float = 0.0,
              step_every: int = 1, gamma: float = 0.1) -> float:
    """The factor of the base LR at ``step`` (0-based) of ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_factor + (1 - min_factor) * (1 - progress)
    if schedule == "step":
        return gamma ** ((step - warmup) // max(1, step_every))
    raise ValueError(f"unknown schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def build_scheduler(opt: torch.optim.Optimizer, total: int, schedule: str, warmup: int = 0,
                    min_factor: float = 0.0, step_every: int = 1, gamma: float = 0.1) -> LambdaLR:
    """A per-step LambdaLR following :func:`lr_factor`."""
    lr_factor(0, total, schedule)  # validate the name now, not at the first step
    return LambdaLR(opt, lambda s: lr_factor(s, total, schedule, warmup, min_factor,
                                             step_every, gamma))
