"""Sequential local training: every stage learns from its own loss on a detached input.

Per batch, stage k runs forward on the detached output of stage k-1, computes its
local loss, runs backward and steps its own optimizer. Its autograd graph is freed
by that backward before stage k+1 runs, so at most one stage's activations are held
for backward at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locallearn.engines.base import detach, stage_loss
from locallearn.models.blocks import Activation
from locallearn.network import LocalNet


class LocalEngine:
    """Sequential gradient-isolated training of the stages (``engine: local``).

    Attribute ``active`` (a set of stage indices, or ``None`` for all) names the stages
    that train this step (dynamic layer accumulation); inactive stages below the
    deepest active one only run forward, the stages beyond it do not run.
    """

    name = "local"

    def __init__(self) -> None:
        self.active: set[int] | None = None  # None: every stage trains

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation, y: torch.Tensor) -> list[float]:
        losses = [float("nan")] * net.k
        depth = net.k if self.active is None else max(self.active, default=-1) + 1
        h = x
        trail: list[Activation] = []  # detached input and boundary outputs, for context supply
        # Stages beyond the deepest active one feed no loss: they do not run (the net grows).
        for k, (stage, opt) in enumerate(zip(net.stages[:depth], optimizers)):
            h = detach(h)
            if net.needs_trail:
                trail.append(h)
            if self.active is not None and k not in self.active:
                with torch.no_grad():
                    h = stage(h, trail)
                continue
            out = stage(h, trail)
            loss = stage_loss(stage, out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[k] = loss.item()
            h = out
        return losses
