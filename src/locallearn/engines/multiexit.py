"""A classic early-exit network (BranchyNet style), trained end to end.

Every stage's objective is an exit: its loss is added to the task loss and the sum
is backpropagated through the whole trunk, so the exits shape the features of every
stage below them. This is the baseline that local learning with per-stage
predictors is compared with: there the exits do not reach the trunk (local) or are
trained on detached features (``backprop`` with ``aux_heads``).

Per-stage predictors, if any, still train on detached outputs (see
:func:`locallearn.engines.base.stage_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locallearn.engines.base import stage_loss
from locallearn.models.blocks import Activation
from locallearn.network import LocalNet


class MultiExitEngine:
    """End-to-end BP of the weighted sum of every stage's loss (``engine: multiexit``).

    Args:
        weights: weight of each stage's loss (default 1 for every stage).
    """

    name = "multiexit"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self.weights = list(weights) if weights else None

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation, y: torch.Tensor) -> list[float]:
        weights = self.weights or [1.0] * net.k
        if len(weights) != net.k:
            raise ValueError(f"multiexit engine has {len(weights)} exit weights for {net.k} stages")
        trail: list[Activation] = []
        h = x
        losses = []
        for stage in net.stages:
            trail.append(h)
            h = stage(h, trail)  # no detach: every exit's gradient flows into the trunk below
            losses.append(stage_loss(stage, h, y))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        sum((w * loss for w, loss in zip(weights, losses)), torch.zeros((), device=y.device)).backward()
        for opt in optimizers:
            opt.step()
        return [loss.item() for loss in losses]
