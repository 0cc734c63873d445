"""PredSim (Nøkland & Eidnes, ICML 2019): a prediction loss and a similarity-matching loss.

For a stage output h (batch of N) and labels y::

    pred = CE(linear(avgpool(h)), y)
    sim  = mean over the N x N entries of (S(conv3x3(h)) - S(onehot(y)))^2
    predsim = (1 - beta) * pred + beta * sim            (beta = 0.99)

where ``S(z)`` is the cosine-similarity matrix of the rows of z after each row (one
sample's features, flattened) is centred on its mean and L2-normalised. The average
pool shrinks a (C, H, W) output by a power of two until C*h*w <= ``pool_features``
(2048 by default; the paper pools "to a few thousand features"); a flat output is used
as it is. The 3x3 conv (``sim_conv``, C -> C channels, no bias) is only used on conv
outputs. ``dropout`` (default 0) drops features of h before both losses; the paper's
dropout inside the network is the VGG8B/VGG11B model option ``dropout``.

Names: ``predsim``, ``pred`` (beta = 0) and ``sim`` (beta = 1, no classifier: the stage
does not predict). The last stage trains the task head with CE, as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.models.blocks import Activation
from locallearn.objectives.base import Objective, register_objective
from locallearn.objectives.ce import HeadCE
from locallearn.objectives.heads import build_head


def similarity_matrix(z: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (N, N) of the rows of ``z`` (N, ...) after centring each row."""
    z = z.flatten(1)
    z = z - z.mean(dim=1, keepdim=True)
    z = F.normalize(z, dim=1, eps=1e-8)
    return (z @ z.t()).clamp(-1.0, 1.0)


def sim_loss(features: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean squared difference of the similarity matrices of ``features`` and one-hot ``y``."""
    target = similarity_matrix(F.one_hot(y, num_classes).to(features.dtype))
    return F.mse_loss(similarity_matrix(features), target)


def pool_size(shape: tuple[int, ...], max_features: int) -> int:
    """The smallest power-of-two pool that brings a (C, H, W) map to at most ``max_features``."""
    c, h, w = shape
    k = 1
    while c * (h // k) * (w // k) > max_features and k < min(h, w):
        k *= 2
    return k


class PredSimObjective(Objective):
    """``(1 - beta) * pred + beta * sim`` on a stage output (see the module doc).

    Args:
        in_shape: stage output shape, (C, H, W) or flat (D,).
        num_classes: number of classes.
        beta: weight of the similarity loss (1: sim only, 0: pred only).
        pool_features: most features the classifier sees after pooling.
        sim_conv: use a 3x3 conv before the similarity matrix (conv outputs only).
        dropout: dropout on h before both losses.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, beta: float = 0.99,
                 pool_features: int = 2048, sim_conv: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.beta, self.num_classes = float(beta), num_classes
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        image = len(in_shape) == 3
        self.classifier: nn.Module | None = None
        if beta < 1:
            k = pool_size(in_shape, pool_features) if image else 1
            d = (in_shape[0] * (in_shape[1] // k) * (in_shape[2] // k) if image
                 else int(torch.Size(in_shape).numel()))
            self.classifier = nn.Sequential(nn.AvgPool2d(k) if k > 1 else nn.Identity(),
                                            nn.Flatten(), nn.Linear(d, num_classes))
        self.sim_conv: nn.Module = (nn.Conv2d(in_shape[0], in_shape[0], 3, padding=1, bias=False)
                                    if image and sim_conv and beta > 0 else nn.Identity())

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        assert isinstance(h, torch.Tensor), "predsim needs tensor activations"
        z = self.drop(h)
        total = z.new_zeros(())
        if self.classifier is not None:
            total = total + (1 - self.beta) * F.cross_entropy(self.classifier(z), y)
        if self.beta > 0:
            total = total + self.beta * sim_loss(self.sim_conv(z), y, self.num_classes)
        return total

    def predict(self, h: Activation) -> torch.Tensor | None:
        return self.classifier(h) if self.classifier is not None else None


def _predsim(in_shape: tuple[int, ...], num_classes: int, *, head: str = "mlp",
             last: bool = False, beta: float = 0.99, pool_features: int = 2048,
             sim_conv: bool = True, dropout: float = 0.0, pool: str = "mean",
             **head_options: Any) -> Objective:
    if last:
        return HeadCE(build_head(head, in_shape, num_classes, pool=pool, **head_options))
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"objective.options.beta={beta} is not allowed: it must be in [0, 1]")
    return PredSimObjective(in_shape, num_classes, beta, pool_features, sim_conv, dropout)


def _fixed(beta: float) -> Any:
    """``pred`` / ``sim``: PredSim with ``beta`` fixed, so it is not an option of theirs (an
    ``objective.options.beta`` is refused, naming the options they take)."""
    def build(in_shape: tuple[int, ...], num_classes: int, *, head: str = "mlp",
              last: bool = False, pool_features: int = 2048, sim_conv: bool = True,
              dropout: float = 0.0, pool: str = "mean", **head_options: Any) -> Objective:
        return _predsim(in_shape, num_classes, head=head, last=last, beta=beta,
                        pool_features=pool_features, sim_conv=sim_conv, dropout=dropout,
                        pool=pool, **head_options)
    return build


register_objective("predsim", "PredSim: (1-beta) CE of a linear classifier on pooled features + "
                              "beta similarity-matrix matching (beta=0.99)")(_predsim)
register_objective("pred", "PredSim's prediction loss alone: CE of a linear classifier on "
                           "pooled features")(_fixed(0.0))
register_objective("sim", "PredSim's similarity-matching loss alone (the stage does not "
                          "predict)")(_fixed(1.0))
