"""Sequential local training: every stage learns from its own loss on a detached input.

Per batch, stage k runs forward on the detached output of stage k-1, computes its
local loss, runs backward and steps its own optimizer. Its autograd graph is freed
by that backward before stage k+1 runs, so at most one stage's activations are held
for backward at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from locallearn.engines.base import InProcess, Losses, stage_loss
from locallearn.network import LocalNet
from locallearn.types import Activation, detach


class LocalEngine(InProcess):
    """Sequential gradient-isolated training of the stages (``engine: local``).

    Attribute ``active`` (a set of stage indices, or ``None`` for all) names the stages
    that train this step (dynamic layer accumulation); inactive stages below the
    deepest active one only run forward, the stages beyond it do not run.
    """

    name = "local"
    accumulates = True

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation | None, y: torch.Tensor | None) -> Losses:
        assert x is not None and y is not None, "the local engine needs the batch (x, y)"
        losses: Losses = [float("nan")] * net.k
        depth = net.k if self.active is None else max(self.active, default=-1) + 1
        h = x
        trail: list[Activation] = []  # detached input and boundary outputs, for context supply
        u = self.update
        # Stages beyond the deepest active one feed no loss: they do not run (the net grows).
        for k, (stage, opt) in enumerate(zip(net.stages[:depth], optimizers)):
            h = detach(h)
            if net.needs_trail:
                trail.append(h)
            if self.active is not None and k not in self.active:
                with torch.no_grad(), u.autocast():
                    h = stage(h, trail)
                continue
            with u.autocast():
                out = stage(h, trail)
                loss = stage_loss(stage, out, y)
            u.zero_grad(opt)
            u.backward(loss, k)
            u.step(opt, k)
            losses[k] = loss.detach()  # read later, in one transfer: no sync per stage
            h = out
        return losses
