"""What every engine shares: the engine protocol and the one place a loss becomes an update.

Gradient isolation lives in one place: :func:`locallearn.types.detach` cuts an activation
from the graph at a stage boundary, and only the engines call it.

:class:`StageUpdate` is where every engine runs a stage's forward context, its backward
and its optimizer step, so precision, gradient scaling, clipping and compilation are
added once for every engine. :class:`Engine` declares everything the training loop asks
of an engine; every engine implements all of it (no probing with ``getattr``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch

from locallearn.network import LocalNet, Stage
from locallearn.precision import PrecisionUpdate
from locallearn.types import Activation, detach

Batches = Iterable[tuple[Activation, torch.Tensor]]
# What a training step returns, per stage: its loss on the batch as a detached 0-d tensor
# on the stage's device (no ``.item()``, so no host-device sync per stage per step; the
# loop sums them on the device and reads them once per log interval), or NaN (a float)
# where the stage did not train here. ``float(v)`` reads one (pytest's ``approx`` refuses
# tensors: tests compare ``floats(losses)``).
Losses = list[float | torch.Tensor]


def stage_loss(stage: Stage, out: Activation, y: torch.Tensor) -> torch.Tensor:
    """The local objective of ``stage`` plus its predictor's loss on the detached output."""
    loss = stage.objective.loss(out, y)
    if stage.predictor is not None:
        loss = loss + stage.predictor.loss(detach(out), y)
    return loss


class StageUpdate(PrecisionUpdate):
    """Forward context, backward and optimizer step of one stage, for every engine.

    Args:
        choice: the run's precision, memory format and compilation
            (:func:`locallearn.precision.resolve`); default plain fp32.

    ``autocast()`` is the forward context (``torch.autocast`` in bf16/fp16, nothing in
    fp32), ``backward(loss, k)`` and ``step(optimizer, k)`` scale and unscale with stage
    ``k``'s gradient scaler in fp16 (see :class:`locallearn.precision.PrecisionUpdate`),
    ``input(x)`` puts a network input in the run's memory format.
    """

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)


class Engine(Protocol):
    """Everything the training loop asks of an engine.

    Attributes:
        name: the engine's config name.
        active: the stages that train this epoch (dynamic layer accumulation), or
            ``None`` for all; engines that cannot follow it have ``accumulates = False``.
        accumulates: True if the engine can follow ``active``.
        update: the engine's :class:`StageUpdate`.
    """

    name: str
    active: set[int] | None
    accumulates: bool
    update: StageUpdate

    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation | None, y: torch.Tensor | None) -> Losses:
        """Train on one batch; each stage's loss (see ``Losses``; NaN where a stage has
        none here)."""
        ...

    def owned(self, k: int) -> range:
        """The stage indices (of ``k``) this engine trains here: all of them in one process."""
        ...

    def trains(self, k: int, net: LocalNet) -> bool:
        """True if stage ``k``'s reported loss comes from a trained objective here."""
        ...

    def begin_epoch(self) -> None:
        """Start an epoch (the pipeline restarts its clocks)."""
        ...

    def share_weights(self, net: LocalNet, step: int) -> None:
        """Bring the weights of other ranks' stages that this rank's objectives follow up to
        date (MAN's momentum copies), after training step ``step``."""
        ...

    def end_epoch(self) -> dict[str, Any]:
        """End an epoch: wait for what is in flight; the engine's own figures
        (``stage_seconds``: compute seconds per stage index, where it times them)."""
        ...

    def evaluate(self, net: LocalNet, batches: Batches | None, comm: Any) -> dict[str, Any] | None:
        """Test accuracy (see :func:`locallearn.evaluate.evaluate`) on the first rank, else None.

        ``batches`` are the test batches on the first rank (``None`` elsewhere); ``comm``
        (:class:`locallearn.loop.Comm`) gathers what other ranks counted.
        """
        ...

    def close(self) -> None:
        """Release what the engine holds (links, threads) at the end of a run."""
        ...


class InProcess:
    """The parts of the protocol shared by the engines that run every stage in one process.

    Args:
        update: the stage update (default: plain fp32).
    """

    name = "local"
    accumulates = False

    def __init__(self, update: StageUpdate | None = None) -> None:
        self.update = update or StageUpdate()
        self.active: set[int] | None = None

    def owned(self, k: int) -> range:
        return range(k)

    def trains(self, k: int, net: LocalNet) -> bool:
        return self.active is None or k in self.active

    def evaluate(self, net: LocalNet, batches: Batches | None, comm: Any) -> dict[str, Any] | None:
        from locallearn.evaluate import evaluate

        assert batches is not None, "an in-process engine reads the test batches itself"
        return evaluate(net, batches)

    def begin_epoch(self) -> None:
        """Nothing to restart."""

    def share_weights(self, net: LocalNet, step: int) -> None:
        """Every stage is here: nothing to send."""

    def end_epoch(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    def forward_all(net: LocalNet, x: Activation) -> Iterator[tuple[Stage, Activation]]:
        """Every stage and its output, without detaching (end-to-end engines)."""
        trail: list[Activation] = []
        h = x
        for stage in net.stages:
            trail.append(h)
            h = stage(h, trail)
            yield stage, h
