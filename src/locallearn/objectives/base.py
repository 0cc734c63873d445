"""The local-objective interface and its registry.

An objective is a small module that scores a stage's output: ``loss(h, y)`` returns
a scalar to minimise and, where it can, ``predict(h)`` returns class logits. The
engine decides which inputs are detached; objectives never detach for gradient
isolation. Config names map to builders through :data:`OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from locallearn.models.blocks import Activation


class Objective(nn.Module):
    """Base class of local objectives."""

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        """The scalar local loss of stage output ``h`` for targets ``y``."""
        raise NotImplementedError

    def predict(self, h: Activation) -> torch.Tensor | None:
        """Class logits for ``h``, or ``None`` if this objective cannot classify."""
        return None


ObjectiveBuilder = Callable[..., Objective]
OBJECTIVES: dict[str, tuple[ObjectiveBuilder, str]] = {}


def register_objective(name: str, help: str) -> Callable[[ObjectiveBuilder], ObjectiveBuilder]:
    """Register ``builder(in_shape, num_classes, *, head, last, **options) -> Objective``."""

    def wrap(fn: ObjectiveBuilder) -> ObjectiveBuilder:
        OBJECTIVES[name] = (fn, help)
        return fn

    return wrap


def build_objective(name: str, in_shape: tuple[int, ...], num_classes: int,
                    **options: Any) -> Objective:
    """Build a registered objective for a stage whose output has shape ``in_shape``.

    Raises:
        ValueError: for an unknown name (the message lists the choices).
    """
    import locallearn.objectives  # noqa: F401  (importing registers the builders)

    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name][0](in_shape, num_classes, **options)
