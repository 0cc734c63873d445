"""Supervised contrastive loss (SupCon, Khosla et al. 2020): the local objective of SCPL.

Each stage's output goes through a projector (:mod:`locallearn.objectives.projectors`),
is L2-normalised, and samples that share a label pull together while all others push
apart. For anchor ``i`` with positives ``P(i)`` (same label, not ``i``) and all other
samples ``A(i)``::

    loss_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

The loss is the mean over anchors that have at least one positive: an anchor whose
class has no other member in the batch has no term to pull towards, and is left out
rather than turned into a NaN. The denominator is a log-sum-exp, stable for any ``t``.

In an SCPL model the last stage also carries the task classifier, trained by CE on the
same output: :class:`SupConObjective` composes the contrastive term with a
:class:`~locallearn.objectives.ce.HeadCE` (option ``classifier``).
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
from locallearn.objectives.projectors import build_projector
from locallearn.types import at_least_fp32

CLASSIFIER_ON = ("last", "all", "none")


def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The SupCon loss of embeddings ``z`` (N, D) with labels ``y`` (N,).

    Args:
        z: embeddings, usually L2-normalised (the loss does not normalise them).
        y: integer labels; samples with equal labels are positives of each other.
        temperature: divides the similarities; smaller is sharper.

    Returns:
        The mean over anchors with at least one positive; zero (still attached to the
        graph, with zero gradient) if no anchor has one.
    """
    with torch.autocast(z.device.type, enabled=False):  # similarities / temperature in fp32
        return _supcon_loss(at_least_fp32(z), y, temperature)


def _supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    pos = (y.view(-1, 1) == y.view(1, -1)) & ~eye
    n_pos = pos.sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return z.sum() * 0.0
    sim = (z @ z.t() / temperature).masked_fill(eye, float("-inf"))  # an anchor is not its own contrast
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    # where() rather than a product: log_prob is -inf on the diagonal, and -inf * 0 is NaN
    pos_sum = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)
    return (-pos_sum[valid] / n_pos[valid]).mean()


class SupConObjective(Objective):
    """SupCon on ``normalize(projector(h))``, plus CE of an optional classifier.

    Args:
        projector: maps a stage output to (N, D) embeddings.
        temperature: SupCon temperature.
        classifier: a CE objective on the same output (the task classifier of the last
            SCPL stage); it also gives this stage its prediction.
        ce_weight: weight of the classifier's CE in the sum.
    """

    def __init__(self, projector: nn.Module, temperature: float = 0.1,
                 classifier: HeadCE | None = None, ce_weight: float = 1.0) -> None:
        super().__init__()
        self.projector = projector
        self.temperature = temperature
        self.classifier = classifier
        self.ce_weight = ce_weight

    def embed(self, h: Activation) -> torch.Tensor:
        """The L2-normalised embeddings of a stage output."""
        return F.normalize(at_least_fp32(self.projector(h)), dim=1)  # fp32 under autocast

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        loss = supcon_loss(self.embed(h), y, self.temperature)
        if self.classifier is not None:
            loss = loss + self.ce_weight * self.classifier.loss(h, y)
        return loss

    def predict(self, h: Activation) -> torch.Tensor | None:
        return self.classifier.predict(h) if self.classifier is not None else None


@register_objective("supcon", "supervised contrastive loss on a projector (SCPL); "
                              "the last stage adds a CE classifier")
def supcon_objective(in_shape: tuple[int, ...], num_classes: int, *, head: str = "mlp",
                     last: bool = False, temperature: float = 0.1, projector: str = "mlp",
                     proj_dim: int = 128, proj_hidden: int = 512, proj_pool: str = "avg",
                     classifier: str = "last", ce_weight: float = 1.0, pool: str = "mean",
                     **head_options: Any) -> SupConObjective:
    """Build a :class:`SupConObjective` (options come from ``objective.options``).

    Args:
        in_shape: stage output shape.
        num_classes: classes of the classifier.
        head: head kind of the classifier (on the last stage: the model's task head).
        last: whether this is the last stage.
        temperature: SupCon temperature (default 0.1, as in SCPL).
        projector: ``identity``, ``linear`` or ``mlp``.
        proj_dim, proj_hidden: projector output and hidden sizes.
        proj_pool: ``avg`` (average-pool conv features first) or ``none`` (flatten).
        classifier: which stages add a CE classifier: ``last`` (SCPL), ``all`` or ``none``.
        ce_weight: weight of the classifier's CE.
        pool: sequence pooling of text activations, for projector and classifier.
        **head_options: classifier head options (e.g. ``hidden``).

    Raises:
        ValueError: for a bad temperature or ``classifier`` value, or bad projector options.
    """
    if temperature <= 0:
        raise ValueError(f"supcon temperature must be positive, got {temperature}")
    if classifier not in CLASSIFIER_ON:
        raise ValueError(f"supcon classifier={classifier!r}; choose one of: {', '.join(CLASSIFIER_ON)}")
    proj = build_projector(projector, in_shape, proj_dim, proj_hidden, proj_pool, seq_pool=pool)
    clf = None
    if classifier == "all" or (classifier == "last" and last):
        clf = HeadCE(build_head(head, in_shape, num_classes, pool=pool, **head_options))
    return SupConObjective(proj, temperature, clf, ce_weight)
