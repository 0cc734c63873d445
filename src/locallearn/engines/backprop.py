"""End-to-end backpropagation of the same stages, as the reference for local learning.

Only the last stage's objective trains the network. With ``aux_heads`` the other
stages' objectives (and any predictors) are trained on detached features, so every
stage reports an accuracy comparable with a local run without changing the network's
gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locallearn.engines.base import detach, stage_loss
from locallearn.models.blocks import Activation
from locallearn.network import LocalNet


class BackpropEngine:
    """End-to-end BP (``engine: backprop``)."""

    name = "backprop"

    def __init__(self, aux_heads: bool = True) -> None:
        self.aux_heads = aux_heads

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation, y: torch.Tensor) -> list[float]:
        outs: list[Activation] = []
        trail: list[Activation] = []
        h = x
        for stage in net.stages:
            trail.append(h)
            h = stage(h, trail)
            outs.append(h)
        last = net.stages[-1]
        task = stage_loss(last, h, y)
        losses = [float("nan")] * (net.k - 1) + [task.item()]
        total = task
        if self.aux_heads:
            for k, (stage, out) in enumerate(zip(net.stages[:-1], outs[:-1])):
                aux = stage_loss(stage, detach(out), y)
                losses[k] = aux.item()
                total = total + aux
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in optimizers:
            opt.step()
        return losses
