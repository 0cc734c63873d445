"""Cross-entropy through an auxiliary head: the local objective of (decoupled) greedy learning."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.models.blocks import Activation
from locallearn.objectives.base import Objective, register_objective
from locallearn.objectives.heads import build_head
from locallearn.types import at_least_fp32


class HeadCE(Objective):
    """Cross-entropy of ``head(h)``; the head's logits are also the stage's prediction."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(self.head(h)), y)  # log-softmax in fp32 under autocast

    def predict(self, h: Activation) -> torch.Tensor:
        return self.head(h)


@register_objective("ce", "cross-entropy of an auxiliary classifier head (DGL / greedy local learning)")
def ce_objective(in_shape: tuple[int, ...], num_classes: int, *, head: str = "mlp",
                 last: bool = False, **options: Any) -> HeadCE:
    """A :class:`HeadCE` with a head of kind ``head`` (see :mod:`locallearn.objectives.heads`);
    ``options`` are the head's (``hidden``, ``pool``). Every stage is alike, ``last`` too."""
    return HeadCE(build_head(head, in_shape, num_classes, **options))
