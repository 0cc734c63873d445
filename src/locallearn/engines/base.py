"""What every engine shares: the boundary detach and the step interface.

Gradient isolation lives here and only here: :func:`detach` cuts an activation (a
tensor or a tuple of tensors) from the graph at a stage boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from locallearn.models.blocks import Activation
from locallearn.network import LocalNet, Stage


def detach(h: Activation) -> Activation:
    """Cut ``h`` from the autograd graph (every tensor of a tuple activation)."""
    if isinstance(h, tuple):
        return tuple(detach(t) for t in h)
    return h.detach()


def stage_loss(stage: Stage, out: Activation, y: torch.Tensor) -> torch.Tensor:
    """The local objective of ``stage`` plus its predictor's loss on the detached output."""
    loss = stage.objective.loss(out, y)
    if stage.predictor is not None:
        loss = loss + stage.predictor.loss(detach(out), y)
    return loss


class Engine(Protocol):
    """Runs one training step of a LocalNet; returns each stage's loss (NaN where none)."""

    name: str

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation, y: torch.Tensor) -> list[float]:
        ...
