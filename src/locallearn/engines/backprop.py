"""End-to-end backpropagation of the same stages, as the reference for local learning.

Only the last stage's objective trains the network. With ``aux_heads`` the other
stages' objectives (and any predictors) are trained on detached features, so every
stage reports an accuracy comparable with a local run without changing the network's
gradients.

Gradient checkpointing (``checkpoint``, the memory baseline of local learning): with
``blocks`` only every block's input is kept for backward, with ``stages`` only every
stage's input; the rest is recomputed during backward
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``). The gradients are
exactly those of plain BP. The recomputation runs each module a second time in training
mode, so BatchNorm running statistics are frozen during it (momentum 0, counter
restored): they are updated once per step, as without checkpointing. Dropout sees the
same random numbers both times (the checkpoint restores the RNG state).

Measuring: a saved-tensors meter (:class:`locallearn.measure.SavedTensorsMeter`) sees the
inputs a checkpoint keeps, but not the recomputation in backward (the checkpoint's own
hooks take those tensors), so the true peak is the meter's plus one segment's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from locallearn.engines.base import InProcess, Losses, StageUpdate, stage_loss
from locallearn.network import LocalNet, Stage
from locallearn.types import Activation, detach

CHECKPOINT_MODES = ("none", "blocks", "stages")


@contextmanager
def frozen_batch_norm(module: nn.Module) -> Iterator[None]:
    """Run ``module`` without changing any BatchNorm running statistics."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def checkpointed(module: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` keeping only its inputs for backward; ``module`` holds its BatchNorms."""
    calls = 0

    def run(*inputs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*inputs)
        with frozen_batch_norm(module):  # the recomputation in backward
            return fn(*inputs)

    return checkpoint(run, *args, use_reentrant=False)


class BackpropEngine(InProcess):
    """End-to-end BP (``engine: backprop``).

    Args:
        aux_heads: also train the other stages' objectives on detached features.
        checkpoint: ``none``, ``blocks`` (keep only block inputs) or ``stages`` (keep only
            stage inputs) for backward; see the module doc.

    Raises:
        ValueError: for an unknown checkpoint mode.
    """

    name = "backprop"

    def __init__(self, aux_heads: bool = True, checkpoint: str = "none",
                 update: StageUpdate | None = None) -> None:
        super().__init__(update)
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"engine.checkpoint={checkpoint!r}; choose one of: "
                             f"{', '.join(CHECKPOINT_MODES)}")
        self.aux_heads = aux_heads
        self.checkpoint = checkpoint

    def trains(self, k: int, net: LocalNet) -> bool:
        return self.aux_heads or k == net.k - 1

    def forward_stage(self, stage: Stage, h: Activation, trail: list[Activation]) -> Activation:
        """One stage's forward, checkpointed as configured (only while gradients are on)."""
        if self.checkpoint == "none" or not torch.is_grad_enabled():
            return stage(h, trail)
        if self.checkpoint == "stages":
            return checkpointed(stage, stage, h, trail)
        if stage.context is not None:  # context encoders and taps: cheap, not checkpointed
            h = stage.context(h, trail)
        for block in stage.body.children():
            h = checkpointed(block, block, h)
        return h

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation | None, y: torch.Tensor | None) -> Losses:
        assert x is not None and y is not None, "the backprop engine needs the batch (x, y)"
        u = self.update
        outs: list[Activation] = []
        trail: list[Activation] = []
        h = x
        with u.autocast():
            for stage in net.stages:
                trail.append(h)
                h = self.forward_stage(stage, h, trail)
                outs.append(h)
            task = stage_loss(net.stages[-1], h, y)
            losses = [float("nan")] * (net.k - 1) + [task.detach()]
            total = task
            if self.aux_heads:
                for k, (stage, out) in enumerate(zip(net.stages[:-1], outs[:-1])):
                    aux = stage_loss(stage, detach(out), y)
                    losses[k] = aux.detach()
                    total = total + aux
        for opt in optimizers:
            u.zero_grad(opt)
        u.backward(total, net.k - 1)
        for k, opt in enumerate(optimizers):
            u.step(opt, k)
        return losses
