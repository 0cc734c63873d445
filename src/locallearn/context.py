"""Context supply (ContSup): at a boundary the next stage gets detached h plus encoded context.

Stage s (0-based) receives ``h = trail[s]``, the detached output of stage s-1, and the
*trail* of earlier boundaries: ``trail[0]`` is the network input x and ``trail[j]``
the output of stage j-1 (so ``trail[j]`` is the input of stage j). Its body runs on

    h + sum over sources j of M_j(trail[j])

with the sources set by the mode:

=========  ==================================================================
``none``    no context
``E``       x, through a small encoder: avg-pool to h's size -> 3x3 conv -> BN -> ReLU
``Rn``      the n previous boundaries ``trail[s-n .. s-1]`` (``trail[0]`` is x =
            h_0), each through 1x1 conv -> BN -> ReLU after resizing to h's size
``RnE``     both (``R1E`` is the ContSup paper's R1E)
=========  ==================================================================

The encoders M_j are parameters of stage s, so stage s's optimizer and local loss
train them, and they run at inference too. The first stage has no context (its input
is x). The context tensors are detached by the engine like every boundary tensor.

Communication: :meth:`StageContext.needs` lists the trail indices a stage reads, so
a pipeline sends only those tensors with the activation (x for ``E``; the n earlier
boundary outputs for ``Rn``). The same hook passes x to a stage's reconstruction
term (:mod:`locallearn.objectives.reconstruct`) through ``taps``.

Memory: each encoder saves about three tensors of h's size for backward (conv input,
BN input, ReLU output). With ``recompute=True`` the encoders are checkpointed: only
their (resized) inputs are kept and the encoder runs again during backward. Their
BatchNorm then updates its running statistics twice per step with the same batch
statistics, so its momentum m is set to 1 - sqrt(1 - m), which makes the two updates
exactly one update with momentum m.

Memory-balanced cuts with context (:func:`find_cuts_with_context`) add each stage's
encoder activation memory (measured) to the block memory the core balances.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from locallearn.measure import SavedTensorsMeter
from locallearn.models.blocks import Activation, Backbone
from locallearn.split import balanced_cuts, block_costs, find_cuts

MODE_PATTERN = re.compile(r"none|E|R([1-9][0-9]*)(E?)")


class ContextError(ValueError):
    """A context-supply mode or shape is not allowed; the message names it and the choices."""


@dataclass(frozen=True)
class ContextMode:
    """A parsed mode: how many previous boundaries to encode, and whether to encode x."""

    previous: int = 0
    input: bool = False

    @property
    def active(self) -> bool:
        return self.previous > 0 or self.input


def parse_mode(mode: str) -> ContextMode:
    """Parse ``none``, ``E``, ``R1`` .. ``Rn`` or ``RnE``.

    Raises:
        ContextError: for any other string.
    """
    m = MODE_PATTERN.fullmatch(str(mode))
    if m is None:
        raise ContextError(f"context mode {mode!r} is not allowed; choose none, E, Rn or RnE "
                           f"(n >= 1), e.g. R1, R2, R1E")
    if mode == "E":
        return ContextMode(0, True)
    if mode == "none":
        return ContextMode()
    return ContextMode(int(m.group(1)), bool(m.group(2)))


def _resize(c: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring ``c`` to spatial ``size``: average-pool down, nearest-neighbour up."""
    if tuple(c.shape[-2:]) == tuple(size):
        return c
    if c.shape[-2] >= size[0] and c.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(c, size)
    return F.interpolate(c, size=size, mode="nearest")


class InputEncoder(nn.Module):
    """Mode ``E``: the input image pooled to the boundary's size, then 3x3 conv -> BN -> ReLU."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.size = cast("tuple[int, int]", tuple(out_shape[1:]))  # (H, W) of a (C, H, W) shape
        self.net = nn.Sequential(nn.Conv2d(in_shape[0], out_shape[0], 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out_shape[0]), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_resize(x, self.size))


class BoundaryEncoder(nn.Module):
    """Mode ``Rn``: an earlier boundary output resized to the boundary's size, 1x1 conv -> BN -> ReLU."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.size = cast("tuple[int, int]", tuple(out_shape[1:]))  # (H, W) of a (C, H, W) shape
        self.net = nn.Sequential(nn.Conv2d(in_shape[0], out_shape[0], 1, bias=False),
                                 nn.BatchNorm2d(out_shape[0]), nn.ReLU(inplace=True))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(_resize(c, self.size))


def _check_image(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 3:
        raise ContextError(f"context supply needs (C, H, W) activations, but {what} has shape "
                           f"{tuple(shape)}; use context.name=none for this model")


class StageContext(nn.Module):
    """The context of one stage: encoders of trail tensors added to h, and input taps.

    Args:
        stage: index s of the stage (0-based); ``trail_shapes[s]`` is its input shape.
        trail_shapes: shapes of ``trail[0 .. s]`` (x, then every earlier stage's input).
        mode: a context mode (see module doc).
        taps: objects with ``set_target(x)`` that receive the network input each
            forward (the reconstruction term); they are not sub-modules of this one.
        recompute: checkpoint the encoders (keep only their inputs; see module doc).

    Raises:
        ContextError: for a bad mode or non-image shapes.
    """

    def __init__(self, stage: int, trail_shapes: Sequence[tuple[int, ...]], mode: str = "none",
                 taps: Sequence[Any] = (), recompute: bool = False) -> None:
        super().__init__()
        parsed = parse_mode(mode)
        self.stage, self.mode, self.recompute = stage, mode, recompute
        out_shape = tuple(trail_shapes[stage])
        self.sources: list[int] = []
        encoders: list[nn.Module] = []
        if stage > 0 and parsed.active:
            _check_image(out_shape, f"the input of stage {stage + 1}")
            if parsed.input:
                self.sources.append(0)
                encoders.append(InputEncoder(tuple(trail_shapes[0]), out_shape))
            for j in range(max(0, stage - parsed.previous), stage):
                _check_image(tuple(trail_shapes[j]), f"trail entry {j}")
                self.sources.append(j)
                encoders.append(BoundaryEncoder(tuple(trail_shapes[j]), out_shape))
        self.encoders = nn.ModuleList(encoders)
        self.taps = list(taps)  # a plain list: the taps belong to the stage's objective
        if recompute:  # two running-stat updates per step must add up to one
            for m in self.encoders.modules():
                if isinstance(m, nn.BatchNorm2d) and m.momentum is not None:
                    m.momentum = 1.0 - math.sqrt(1.0 - m.momentum)

    def needs(self) -> list[int]:
        """Trail indices this stage reads (what must travel with its input in a pipeline)."""
        return sorted(set(self.sources) | ({0} if self.taps else set()))

    def forward(self, h: Activation, trail: Sequence[Activation]) -> Activation:
        for tap in self.taps:
            tap.set_target(trail[0])
        again = self.recompute and self.training and torch.is_grad_enabled()
        for j, module in zip(self.sources, self.encoders):
            encoder = cast("InputEncoder | BoundaryEncoder", module)
            # no parameters: outside the checkpoint (trail[j] is an image batch: _check_image)
            c = _resize(cast(torch.Tensor, trail[j]), encoder.size)
            h = h + (checkpoint(encoder.net, c, use_reentrant=False) if again else encoder.net(c))
        return h


def build_context(mode: str, stage: int, trail_shapes: Sequence[tuple[int, ...]],
                  taps: Sequence[Any] = (), recompute: bool = False) -> StageContext | None:
    """The :class:`StageContext` of stage ``stage``, or ``None`` when it would do nothing."""
    ctx = StageContext(stage, trail_shapes, mode, taps, recompute)
    return ctx if len(ctx.encoders) or ctx.taps else None


# -- memory-balanced cuts with context ---------------------------------------------------

def encoder_memory(backbone: Backbone, mode: str, block: int, batch: int = 32) -> float:
    """Bytes saved for backward by the context encoders of a stage starting at ``block``.

    The stage's R encoders are measured as if every earlier boundary had the shape of
    this one (their true input shapes depend on the other cuts; only the 1x1 conv's
    input channels differ, and only across a width change).
    """
    if block == 0 or not parse_mode(mode).active:
        return 0.0
    parsed = parse_mode(mode)
    shape = backbone.shapes[block]
    stage = parsed.previous + 1  # R sources are then trail[1 .. stage-1], all of this shape
    trail_shapes = [backbone.shapes[0], *[shape] * stage]
    ctx = StageContext(stage, trail_shapes, mode)
    trail = [torch.randn(batch, *s) for s in trail_shapes]
    with SavedTensorsMeter(ctx) as meter:
        ctx(trail[-1].requires_grad_(), trail).sum().backward()
    return float(meter.peak_bytes)


def find_cuts_with_context(backbone: Backbone, k: int, by: str = "count",
                           cuts: Sequence[int] | None = None, batch: int = 32,
                           mode: str = "none") -> list[int]:
    """:func:`locallearn.split.find_cuts`, with the encoders' memory counted when ``by="memory"``."""
    if by != "memory" or cuts or not parse_mode(mode).active:
        return find_cuts(backbone, k, by, list(cuts or []), batch)
    costs = block_costs(backbone, "memory", batch)
    start = [encoder_memory(backbone, mode, i, batch) for i in range(len(costs))]
    return balanced_cuts(costs, k, start_costs=start)


def stage_memory(backbone: Backbone, cuts: Sequence[int], mode: str = "none",
                 batch: int = 32) -> list[float]:
    """Bytes saved for backward by every stage (blocks plus context encoders) for ``cuts``."""
    costs = block_costs(backbone, "memory", batch)
    edges = [0, *cuts, len(costs)]
    return [sum(costs[a:b]) + encoder_memory(backbone, mode, a, batch)
            for a, b in zip(edges, edges[1:])]
