"""AugLocal (Ma et al., ICLR 2024): auxiliary networks built from the network's own later blocks.

The auxiliary network of local stage k is ``d_k`` blocks selected uniformly from the
blocks after stage k, as fresh copies (``copy.deepcopy`` then ``reset_parameters`` of
every layer: their own parameters, trained only by stage k's loss), then the classifier
head (option ``head``, e.g. ``0c1f`` = the ResNets' own classifier), trained with CE.

Choices of ours, where the paper leaves them open:

* Depth (pyramidal): ``d_k = round(depth + (min_depth - depth) * k / (K - 2))`` for the
  local stages k = 0 .. K-2, so the first stage gets ``depth`` blocks and the last local
  stage ``min_depth``; never more than the blocks after the stage.
* Uniform selection of d out of n later blocks: positions ``round(j (n-1) / (d-1))``,
  j = 0 .. d-1 (the first and the last later block are always in); d = 1 takes the first.
* Shape adaptation: where a selected block expects another input shape than the previous
  one gives, an adapter is put before it: an adaptive average pool to the expected
  spatial size if that differs, then a 1x1 conv + BN + ReLU to the expected channels if
  those differ ((C, H, W) maps); a linear layer over the last dimension otherwise.
* The copies start from PyTorch's default initialisation of each layer, not the model's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from locallearn.models.blocks import Activation, infer_shapes
from locallearn.objectives.base import Objective, register_objective
from locallearn.objectives.ce import HeadCE
from locallearn.objectives.heads import build_head


def aux_depth(stage: int, num_stages: int, depth: int, min_depth: int) -> int:
    """Blocks in the auxiliary network of local stage ``stage`` (pyramidal, linear in k)."""
    steps = max(num_stages - 2, 1)
    return max(1, round(depth + (min_depth - depth) * stage / steps))


def uniform_picks(n: int, d: int) -> list[int]:
    """``d`` positions spread uniformly over ``0 .. n-1`` (first and last in when d > 1)."""
    d = min(d, n)
    if d <= 1:
        return [0][:n]
    return [round(j * (n - 1) / (d - 1)) for j in range(d)]


def adapter(got: tuple[int, ...], want: tuple[int, ...]) -> nn.Module | None:
    """A module mapping activations of shape ``got`` to ``want`` (``None`` if equal).

    Raises:
        ValueError: if the shapes have different ranks.
    """
    if got == want:
        return None
    if len(got) != len(want):
        raise ValueError(f"auglocal cannot adapt shape {got} to {want}")
    if len(got) != 3:
        return nn.Linear(got[-1], want[-1])
    layers: list[nn.Module] = []
    if got[1:] != want[1:]:
        layers.append(nn.AdaptiveAvgPool2d(want[1:]))
    if got[0] != want[0]:
        layers += [nn.Conv2d(got[0], want[0], 1, bias=False), nn.BatchNorm2d(want[0]),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def fresh_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` with newly initialised parameters of its own."""
    block = copy.deepcopy(block)
    for m in block.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return block


def aux_network(in_shape: tuple[int, ...], picks: Sequence[tuple[nn.Module, tuple[int, ...]]]
                ) -> tuple[nn.Sequential, tuple[int, ...]]:
    """Fresh copies of ``picks`` (block, input shape) with adapters; and its output shape."""
    layers: list[nn.Module] = []
    shape = tuple(in_shape)
    for block, want in picks:
        fit = adapter(shape, tuple(want))
        if fit is not None:
            layers.append(fit)
        layers.append(fresh_copy(block))
        shape = infer_shapes([layers[-1]], tuple(want))[-1]
    return nn.Sequential(*layers), shape


class AugLocalObjective(Objective):
    """CE of ``head(aux(h))``: the auxiliary blocks, then the classifier."""

    def __init__(self, aux: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.aux = aux
        self.classifier = HeadCE(head)

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        return self.classifier.loss(self.aux(h), y)

    def predict(self, h: Activation) -> torch.Tensor:
        return self.classifier.predict(self.aux(h))


@register_objective("auglocal", "AugLocal: CE through fresh copies of uniformly picked later "
                                "blocks (pyramidal depth), then the head")
def auglocal_objective(in_shape: tuple[int, ...], num_classes: int, *, head: str = "0c1f",
                       last: bool = False, stage: int = 0, num_stages: int = 1,
                       later_blocks: Sequence[tuple[nn.Module, tuple[int, ...]]] = (),
                       depth: int = 3, min_depth: int = 1, pool: str = "mean",
                       **head_options: Any) -> Objective:
    """Build stage ``stage``'s AugLocal objective (the last stage: CE of the task head).

    Args:
        in_shape: stage output shape.
        num_classes: number of classes.
        head: the classifier after the auxiliary blocks.
        last: whether this is the last stage.
        stage, num_stages, later_blocks: passed by :meth:`LocalNet.from_backbone`.
        depth: auxiliary blocks of the first stage.
        min_depth: auxiliary blocks of the last local stage.
        pool: sequence pooling of the head.
        **head_options: head options (e.g. ``hidden``).

    Raises:
        ValueError: for depths below 1 or ``min_depth > depth``.
    """
    if last or not later_blocks:
        return HeadCE(build_head(head, in_shape, num_classes, pool=pool, **head_options))
    if not 1 <= min_depth <= depth:
        raise ValueError(f"objective.options: auglocal needs 1 <= min_depth <= depth, got "
                         f"min_depth={min_depth}, depth={depth}")
    d = aux_depth(stage, num_stages, depth, min_depth)
    picks = [later_blocks[i] for i in uniform_picks(len(later_blocks), d)]
    aux, out_shape = aux_network(in_shape, picks)
    return AugLocalObjective(aux, build_head(head, out_shape, num_classes, pool=pool,
                                             **head_options))
