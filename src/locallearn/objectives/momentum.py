"""MAN (Su et al., ECCV 2024): a momentum copy of the next stage's first block in the aux net.

With ``objective.options.momentum_aux=m`` (0 < m < 1) the objective of every local stage
k reads its output through an exponential moving average (EMA) copy of stage k+1's first
block, then a learnable per-channel scale and bias (which compensate the gap between
the EMA weights and the block they follow), then the configured objective::

    loss_k = inner.loss(gamma * ema_block(h_k) + beta, y)

The EMA copy is not trained: its parameters have ``requires_grad=False`` (the gradient
of stage k's loss passes through it to h_k, never into it). After every optimizer step
:meth:`LocalNet.update_momentum` moves it towards stage k+1's current weights::

    p_ema <- m * p_ema + (1 - m) * p          (floating-point parameters and buffers)

integer buffers (BatchNorm's batch counter) are copied. In training the copy's BatchNorm
normalises with batch statistics; its running statistics see stage k's batches, then
the EMA pulls them towards stage k+1's. The scale (gamma, ones) and bias
(beta, zeros) act on channels: dim 0 of a (C, H, W) map, the last dim otherwise. Tuple
activations (text) are not supported. The last stage has no next stage and is unchanged.

In a pipeline stage k+1's weights live on another rank; sending them is not implemented
yet, so :func:`check_config` refuses MAN with ``engine=pipeline``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from locallearn.models.blocks import Activation, infer_shapes
from locallearn.objectives.base import WRAPPERS, Objective, build_objective


class MomentumAux(Objective):
    """``inner`` on ``scale * ema(h) + bias``; ``ema`` follows a source block by EMA.

    Args:
        block: the block to follow (copied; the copy gets no gradient).
        out_shape: the block's output shape.
        inner: the objective on the compensated EMA output.
        momentum: the EMA momentum m.
    """

    def __init__(self, block: nn.Module, out_shape: tuple[int, ...], inner: Objective,
                 momentum: float) -> None:
        super().__init__()
        self.ema = copy.deepcopy(block)
        self.ema.requires_grad_(False)
        self.momentum = float(momentum)
        c = out_shape[0] if len(out_shape) == 3 else out_shape[-1]
        view = (c, 1, 1) if len(out_shape) == 3 else (c,)
        self.scale = nn.Parameter(torch.ones(view))
        self.bias = nn.Parameter(torch.zeros(view))
        self.inner = inner
        if hasattr(inner, "set_target"):  # a reconstruction term: the stage passes it x
            self.set_target = inner.set_target

    def features(self, h: Activation) -> torch.Tensor:
        """The compensated output of the EMA block for a stage output ``h``."""
        if not isinstance(h, torch.Tensor):
            raise TypeError("momentum_aux needs tensor activations, not tuples (text models)")
        return self.ema(h) * self.scale + self.bias

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        return self.inner.loss(self.features(h), y)

    def predict(self, h: Activation) -> torch.Tensor | None:
        return self.inner.predict(self.features(h))

    @torch.no_grad()
    def update_momentum(self, source: nn.Module) -> None:
        """``p_ema = m * p_ema + (1 - m) * p`` for each parameter and float buffer of ``source``."""
        m = self.momentum
        pairs = [*zip(self.ema.parameters(), source.parameters()),
                 *zip(self.ema.buffers(), source.buffers())]
        for mine, theirs in pairs:
            if mine.is_floating_point():
                mine.mul_(m).add_(theirs.detach().to(mine.device, mine.dtype), alpha=1 - m)
            else:
                mine.copy_(theirs)


def build_momentum_objective(name: str, in_shape: tuple[int, ...], num_classes: int, *,
                             momentum_aux: float, last: bool = False,
                             later_blocks: Sequence[tuple[nn.Module, tuple[int, ...]]] = (),
                             **options: Any) -> Objective:
    """Objective ``name`` behind an EMA copy of the next block (plain on the last stage).

    Raises:
        ValueError: for a momentum outside (0, 1).
    """
    if not 0.0 < float(momentum_aux) < 1.0:
        raise ValueError(f"objective.options.momentum_aux={momentum_aux} is not allowed: "
                         "it must be in (0, 1), e.g. 0.995")
    if last or not later_blocks:
        return build_objective(name, in_shape, num_classes, last=last, **options)
    block, block_in = later_blocks[0]
    out_shape = infer_shapes([block], tuple(block_in))[-1]
    inner = build_objective(name, out_shape, num_classes, last=False, **options)
    return MomentumAux(block, out_shape, inner, momentum_aux)


def check_config(cfg: Any) -> None:
    """Refuse MAN where stage k+1's weights are not at hand (width-group nodes).

    In the stage pipeline every rank sends its first block's parameters and buffers to
    the rank before it every ``engine.share_every`` steps (never gradients); see
    :meth:`locallearn.engines.pipeline.PipelineEngine.share_weights`.

    Raises:
        ConfigError: for ``objective.options.momentum_aux`` with ``engine.placement=groups``
            or ``split.groups > 1``.
    """
    if cfg.objective.options.get("momentum_aux") and (
            cfg.split.groups > 1 or cfg.engine.placement == "groups"):
        from locallearn.errors import ConfigError

        raise ConfigError("objective.options.momentum_aux (MAN) follows the next stage's first "
                          "block, which width groups split across nodes: use split.groups=1, "
                          "or drop momentum_aux")


WRAPPERS["momentum_aux"] = build_momentum_objective
