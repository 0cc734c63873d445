"""InfoPro-style reconstruction term: a small decoder rebuilds the input image from a stage's output.

The term is added to any local objective: ``loss = inner.loss(h, y) + w * MSE(dec(h), x)``
with ``dec`` = bilinear upsampling to the image size -> 3x3 conv -> BN -> ReLU -> 3x3
conv back to the image channels, and x the (normalised) network input. It keeps early
stages from throwing away information that later stages need.

The stage gets x through its context hook (:class:`locallearn.context.StageContext`
taps it from ``trail[0]``), so in a pipeline x travels to every stage with a
reconstruction term like any other context tensor.

Weights per stage (:func:`reconstruct_weights`): one value for every local stage, two
values interpolated linearly from the first stage to the last local one, or one value
per local stage. The last stage never reconstructs: its objective is the task loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.models.blocks import Activation
from locallearn.objectives.base import Objective


class ReconstructError(ValueError):
    """Bad reconstruction options or a missing target; the message names the fix."""


class ImageDecoder(nn.Module):
    """Upsample a (C, h, w) feature map to the image size and map it to the image channels."""

    def __init__(self, in_shape: tuple[int, ...], image_shape: tuple[int, ...],
                 hidden: int = 12) -> None:
        super().__init__()
        if len(in_shape) != 3 or len(image_shape) != 3:
            raise ReconstructError(f"reconstruction needs image inputs and (C, H, W) stage "
                                   f"outputs, got {tuple(image_shape)} and {tuple(in_shape)}; "
                                   f"set objective.reconstruct=[] for this model")
        self.size = tuple(image_shape[1:])
        self.net = nn.Sequential(nn.Conv2d(in_shape[0], hidden, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                                 nn.Conv2d(hidden, image_shape[0], 3, padding=1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if tuple(h.shape[-2:]) != self.size:
            h = F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)
        return self.net(h)


class ReconstructObjective(Objective):
    """``inner``'s loss plus ``weight`` times the reconstruction MSE of the network input.

    Args:
        inner: any local objective (its ``predict`` is this objective's).
        in_shape: the stage output shape.
        image_shape: the network input shape.
        weight: the weight of the reconstruction term.
        hidden: channels of the decoder's hidden conv.
    """

    def __init__(self, inner: Objective, in_shape: tuple[int, ...], image_shape: tuple[int, ...],
                 weight: float, hidden: int = 12) -> None:
        super().__init__()
        self.inner = inner
        self.decoder = ImageDecoder(in_shape, image_shape, hidden)
        self.weight = float(weight)
        self._target: torch.Tensor | None = None

    def set_target(self, x: Activation) -> None:
        """Receive the network input of the current batch (called by the stage's context)."""
        self._target = x if isinstance(x, torch.Tensor) else x[0]

    def reconstruction_loss(self, h: Activation) -> torch.Tensor:
        """MSE between the decoded ``h`` and the current target."""
        if self._target is None:
            raise ReconstructError("the reconstruction term has no target: the stage's context "
                                   "must pass it the network input (build stages with "
                                   "LocalNet.from_backbone(..., reconstruct=...))")
        return F.mse_loss(self.decoder(h), self._target)

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        return self.inner.loss(h, y) + self.weight * self.reconstruction_loss(h)

    def predict(self, h: Activation) -> torch.Tensor | None:
        return self.inner.predict(h)


def reconstruct_weights(spec: Sequence[float], k: int) -> list[float]:
    """The reconstruction weight of each of ``k`` stages (the last is always 0).

    Args:
        spec: ``[]`` (off), ``[w]`` (every local stage), ``[w_first, w_last]``
            (interpolated linearly), or ``k - 1`` values (one per local stage).
        k: number of stages.

    Raises:
        ReconstructError: for another length or a negative weight.
    """
    spec = [float(w) for w in spec]
    local = k - 1
    if any(w < 0 for w in spec):
        raise ReconstructError(f"objective.reconstruct={spec}: weights must be >= 0")
    if not spec or local == 0:
        return [0.0] * k
    if len(spec) == 1:
        weights = spec * local
    elif len(spec) == local:
        weights = spec
    elif len(spec) == 2:
        steps = max(local - 1, 1)
        weights = [spec[0] + (spec[1] - spec[0]) * i / steps for i in range(local)]
    else:
        raise ReconstructError(f"objective.reconstruct lists {len(spec)} weights for {local} "
                               f"local stages; give 1 (constant), 2 (first, last: "
                               f"interpolated) or {local} values")
    return [*weights, 0.0]
