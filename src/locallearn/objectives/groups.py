"""The local objective of a stage split into width groups: one head and loss per group.

A stage with G width groups (:mod:`locallearn.groups`) has G (stage, group) nodes.
Each node's head sees a *view* of the stage output:

* its own group's channels, with their gradient (the node's own features);
* with ``detach_ratio`` rho > 0, also the first ``round(rho * C / G)`` channels of
  every other group, **detached** (stop-gradient communication): the head may use the
  other groups' features, but its loss never trains them. rho = 0 is "own channels
  only", rho = 1 "the whole feature map".

The stage loss is the sum of the G node losses (a sum, not a mean, so each node learns
at the rate it would alone) plus ``diversity_weight`` times the diversity penalty of
:mod:`locallearn.objectives.diversity` between the G heads. With the views above, the
gradient of that sum reaching group g's parameters is exactly the gradient of node g's
own loss, so one backward of the sum trains the G nodes as G independent learners.

Why a ``.detach()`` here, when gradient isolation *between stages* lives only in
:func:`locallearn.engines.base.detach`? The two are different things. The engine's
detach cuts the graph at a stage boundary, for every objective. This one is part of
the GN-DGL objective itself: it shapes which features a group's head may read
without training them (its messages from sibling groups), inside one stage.

``predict`` returns the log of the mean softmax of the G heads, so the stage predicts
with its group ensemble (and ``softmax(predict(h))`` is that mean).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from locallearn.models.blocks import Activation
from locallearn.objectives.base import Objective, build_objective
from locallearn.objectives.ce import HeadCE
from locallearn.objectives.diversity import diversity_penalty
from locallearn.types import at_least_fp32


class GroupObjectiveError(ValueError):
    """Bad options for a grouped stage objective; the message names the option."""


def view_width(channels: int, groups: int, ratio: float) -> tuple[int, int]:
    """``(own, seen)``: own channels per group, and channels seen of each other group."""
    own = channels // groups
    return own, int(round(ratio * own))


def group_view(h: torch.Tensor, groups: int, g: int, ratio: float) -> torch.Tensor:
    """Channels group g's head sees: its own (with gradient), others' first ones detached.

    Args:
        h: (B, C, H, W) stage output; C divisible by ``groups``.
        groups: G.
        g: the group (0-based).
        ratio: the fraction rho of every other group's channels the head sees.
    """
    own, seen = view_width(h.shape[1], groups, ratio)
    parts = []
    for j in range(groups):
        start = j * own
        if j == g:
            parts.append(h[:, start:start + own])
        elif seen:
            parts.append(h[:, start:start + seen].detach())  # stop-gradient message
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def head_loss_and_logits(obj: Objective, view: torch.Tensor, y: torch.Tensor,
                         diversity_weight: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A group head's loss on its view, and its logits if the diversity penalty needs them.

    Raises:
        GroupObjectiveError: if the penalty is on but the head cannot predict classes.
    """
    if isinstance(obj, HeadCE):  # one head pass gives both loss and logits
        logits = obj.head(view)
        return nn.functional.cross_entropy(at_least_fp32(logits), y), logits  # fp32 log-softmax
    logits = obj.predict(view) if diversity_weight > 0 else None
    if diversity_weight > 0 and logits is None:
        raise GroupObjectiveError(
            f"objective.diversity_weight={diversity_weight} needs heads that predict classes, "
            f"but {type(obj).__name__} does not; set objective.diversity_weight=0")
    return obj.loss(view, y), logits


class GroupObjective(Objective):
    """G sub-objectives, one per width group, with stop-gradient views and a diversity penalty.

    Args:
        objectives: one objective per group, built for the view shape.
        detach_ratio: rho, fraction of every other group's channels a head sees (detached).
        diversity_weight: weight of the diversity penalty (0: off).
        temperature: softmax temperature of the diversity penalty.
    """

    def __init__(self, objectives: Sequence[Objective], detach_ratio: float = 0.0,
                 diversity_weight: float = 0.0, temperature: float = 3.0) -> None:
        super().__init__()
        self.objectives = nn.ModuleList(objectives)
        self.detach_ratio = detach_ratio
        self.diversity_weight = diversity_weight
        self.temperature = temperature

    @property
    def groups(self) -> int:
        return len(self.objectives)

    def view(self, h: Activation, g: int) -> torch.Tensor:
        """The input of group ``g``'s head (see :func:`group_view`)."""
        if not isinstance(h, torch.Tensor) or h.dim() != 4:
            raise GroupObjectiveError("width groups need (B, C, H, W) stage outputs (a conv model)")
        return group_view(h, self.groups, g, self.detach_ratio)

    def _loss_and_logits(self, g: int, h: Activation, y: torch.Tensor,
                         need_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return head_loss_and_logits(cast(Objective, self.objectives[g]), self.view(h, g), y,
                                    self.diversity_weight if need_logits else 0.0)

    def group_loss(self, h: Activation, y: torch.Tensor, g: int) -> torch.Tensor:
        """The loss of node ``g`` alone (without the diversity penalty)."""
        return self._loss_and_logits(g, h, y, need_logits=False)[0]

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        need = self.diversity_weight > 0
        total: torch.Tensor | float = 0.0
        logits: list[torch.Tensor | None] = []
        for g in range(self.groups):
            loss, lg = self._loss_and_logits(g, h, y, need)
            total = total + loss
            logits.append(lg)
        if need:
            # no None: with need, head_loss_and_logits raises for a head that cannot predict
            total = total + self.diversity_weight * diversity_penalty(
                cast(list[torch.Tensor], logits), y, self.temperature)
        return cast(torch.Tensor, total)  # a sum of G >= 1 losses

    def group_logits(self, h: Activation) -> list[torch.Tensor | None]:
        """Class logits of every group's head (``None`` for a head that cannot predict)."""
        return [cast(Objective, obj).predict(self.view(h, g))
                for g, obj in enumerate(self.objectives)]

    def predict(self, h: Activation) -> torch.Tensor | None:
        logits = self.group_logits(h)
        if any(lg is None for lg in logits):
            return None
        probs = torch.stack([lg.softmax(dim=1) for lg in cast(list[torch.Tensor], logits)]
                            ).mean(dim=0)
        return probs.clamp_min(1e-12).log()


def find_group_objective(obj: Objective | None) -> GroupObjective | None:
    """The :class:`GroupObjective` inside ``obj`` (through wrappers with ``.inner``), if any."""
    while obj is not None and not isinstance(obj, GroupObjective):
        obj = getattr(obj, "inner", None)
    return obj


def build_group_objective(name: str, in_shape: tuple[int, ...], num_classes: int, groups: int, *,
                          detach_ratio: float = 0.0, diversity_weight: float = 0.0,
                          temperature: float = 3.0, **options: Any) -> GroupObjective:
    """One registered objective ``name`` per width group, built for the group's view shape.

    Args:
        name: a registered objective (``ce``, ...), used for every group.
        in_shape: the stage output shape (C, H, W).
        num_classes: number of classes.
        groups: G (must divide C).
        detach_ratio: rho in [0, 1].
        diversity_weight: weight of the diversity penalty (>= 0).
        temperature: its softmax temperature (> 0).
        **options: options of the sub-objective builder (``head``, ``hidden``, ...).

    Raises:
        GroupObjectiveError: for a non-image shape, a G that does not divide C, or an
            option out of range.
    """
    if len(in_shape) != 3:
        raise GroupObjectiveError(f"width groups need (C, H, W) stage outputs, got {in_shape}; "
                                  f"use split.groups=1 for this model")
    c = in_shape[0]
    if groups < 1 or c % groups:
        raise GroupObjectiveError(f"split.groups={groups} does not divide the stage output "
                                  f"width {c}")
    if not 0.0 <= detach_ratio <= 1.0 or math.isnan(detach_ratio):
        raise GroupObjectiveError(f"objective.detach_ratio={detach_ratio} must be in [0, 1]")
    if diversity_weight < 0 or temperature <= 0:
        raise GroupObjectiveError("objective.diversity_weight must be >= 0 and "
                                  "objective.diversity_temperature > 0")
    own, seen = view_width(c, groups, detach_ratio)
    view_shape = (own + (groups - 1) * seen, *in_shape[1:])
    subs = [build_objective(name, view_shape, num_classes, **options) for _ in range(groups)]
    return GroupObjective(subs, detach_ratio, diversity_weight, temperature)
