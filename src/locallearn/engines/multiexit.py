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

from locallearn.engines.base import InProcess, Losses, StageUpdate, stage_loss
from locallearn.network import LocalNet
from locallearn.types import Activation


class MultiExitEngine(InProcess):
    """End-to-end BP of the weighted sum of every stage's loss (``engine: multiexit``).

    Args:
        weights: weight of each stage's loss (default 1 for every stage).
    """

    name = "multiexit"

    def __init__(self, weights: Sequence[float] | None = None,
                 update: StageUpdate | None = None) -> None:
        super().__init__(update)
        self.weights = list(weights) if weights else None

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation | None, y: torch.Tensor | None) -> Losses:
        assert x is not None and y is not None, "the multiexit engine needs the batch (x, y)"
        weights = self.weights or [1.0] * net.k
        if len(weights) != net.k:
            raise ValueError(f"multiexit engine has {len(weights)} exit weights for {net.k} stages")
        u = self.update
        with u.autocast():  # no detach: every exit's gradient flows into the trunk below
            losses = [stage_loss(stage, h, y) for stage, h in self.forward_all(net, x)]
            total = sum((w * loss for w, loss in zip(weights, losses)),
                        torch.zeros((), device=y.device))
        for opt in optimizers:
            u.zero_grad(opt)
        u.backward(total, net.k - 1)
        for k, opt in enumerate(optimizers):
            u.step(opt, k)
        return [loss.detach() for loss in losses]
