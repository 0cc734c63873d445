"""NT-Xent (SimCLR, Chen et al. 2020): a self-supervised local objective, one per stage.

A self-supervised stage sees a batch that holds two augmented views of every image,
stacked along the batch: rows ``0..N-1`` are view 1, rows ``N..2N-1`` view 2 of the
same images in the same order (the trainer builds such batches when an objective
declares ``views = 2``). Each stage's output goes through its *own* projector
(:mod:`locallearn.objectives.projectors`) and is L2-normalised to ``z``. For anchor
``i`` with positive ``p(i)`` (the other view of the same image) and the candidate set
``A(i)`` (the positive plus the negatives it is contrasted with)::

    loss_i = -log( exp(z_i.z_p(i) / t) / sum_{a in A(i)} exp(z_i.z_a / t) )

The loss is the mean over all 2N anchors. By default ``A(i)`` is every other row
(2N-2 negatives); with ``neg_fraction < 1`` each anchor draws a random subset of the
negatives, which makes the task easier (see :mod:`locallearn.difficulty`). Labels are
ignored: ``loss(h, y)`` takes ``y`` only to keep the objective interface.

The objective cannot classify (``predict`` returns ``None``): evaluate its features
with linear probes (:mod:`locallearn.probe`) or give the stages a predictor trained on
detached features (``objective.predictor``, an online probe).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.models.blocks import Activation
from locallearn.objectives.base import Objective, register_objective
from locallearn.objectives.projectors import build_projector
from locallearn.types import at_least_fp32


def positive_index(n2: int, device: torch.device | None = None) -> torch.Tensor:
    """The row of each anchor's positive in a [view1; view2] batch of ``n2`` rows.

    Raises:
        ValueError: if ``n2`` is odd (the batch cannot hold two views of each image).
    """
    if n2 % 2:
        raise ValueError(f"a two-view batch must have an even number of rows, got {n2}; "
                         "the trainer stacks [view1; view2] when the objective has views=2")
    n = n2 // 2
    return torch.cat([torch.arange(n, n2), torch.arange(0, n)]).to(device)


def negative_mask(n2: int, neg_fraction: float = 1.0, generator: torch.Generator | None = None,
                  device: torch.device | None = None) -> torch.Tensor:
    """Which rows each anchor contrasts against as negatives: a (n2, n2) boolean mask.

    Every row keeps ``max(1, round(neg_fraction * (n2 - 2)))`` negatives, drawn at random
    (without replacement) among the rows that are neither the anchor nor its positive.

    Raises:
        ValueError: for a fraction outside (0, 1] or an odd ``n2``.
    """
    if not 0 < neg_fraction <= 1:
        raise ValueError(f"neg_fraction must be in (0, 1], got {neg_fraction}")
    eye = torch.eye(n2, dtype=torch.bool, device=device)
    pos = torch.zeros_like(eye)
    pos[torch.arange(n2, device=device), positive_index(n2, device)] = True
    candidates = ~(eye | pos)
    m = max(1, round(neg_fraction * (n2 - 2)))
    if m >= n2 - 2:
        return candidates
    # Random scores with the anchor and its positive pushed below every candidate: the
    # top m of each row are m distinct negatives drawn uniformly.
    scores = torch.rand(n2, n2, generator=generator).to(device).masked_fill(~candidates, -1.0)
    keep = torch.zeros_like(eye)
    keep.scatter_(1, scores.topk(m, dim=1).indices, True)
    return keep


def nt_xent(z: torch.Tensor, temperature: float = 0.5, negatives: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The NT-Xent loss of a [view1; view2] batch of embeddings ``z`` (2N, D).

    Args:
        z: embeddings, usually L2-normalised (the loss does not normalise them).
        temperature: divides the similarities; smaller is sharper.
        negatives: optional (2N, 2N) mask of the negatives of each anchor
            (:func:`negative_mask`); default every row but the anchor and its positive.

    Returns:
        The mean over the 2N anchors of ``-log softmax`` at the positive.
    """
    with torch.autocast(z.device.type, enabled=False):  # similarities / temperature in fp32
        return _nt_xent(at_least_fp32(z), temperature, negatives)


def _nt_xent(z: torch.Tensor, temperature: float, negatives: torch.Tensor | None) -> torch.Tensor:
    n2 = z.shape[0]
    pos = positive_index(n2, z.device)
    keep = negatives.clone() if negatives is not None else torch.ones(n2, n2, dtype=torch.bool,
                                                                       device=z.device)
    keep.fill_diagonal_(False)  # an anchor is never its own contrast
    keep[torch.arange(n2, device=z.device), pos] = True
    sim = (z @ z.t() / temperature).masked_fill(~keep, float("-inf"))
    return (torch.logsumexp(sim, dim=1) - sim[torch.arange(n2, device=z.device), pos]).mean()


class SimCLRObjective(Objective):
    """NT-Xent on ``normalize(projector(h))`` of a two-view batch.

    Args:
        projector: maps a stage output to (2N, D) embeddings.
        temperature: NT-Xent temperature.
        neg_fraction: fraction of the 2N-2 negatives each anchor sees (1 = all).
    """

    views = 2  # the trainer feeds [view1; view2] batches to nets holding this objective

    def __init__(self, projector: nn.Module, temperature: float = 0.5,
                 neg_fraction: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"simclr temperature must be positive, got {temperature}")
        if not 0 < neg_fraction <= 1:
            raise ValueError(f"simclr neg_fraction must be in (0, 1], got {neg_fraction}")
        self.projector = projector
        self.temperature = temperature
        self.neg_fraction = neg_fraction

    def embed(self, h: Activation) -> torch.Tensor:
        """The L2-normalised embeddings of a stage output."""
        return F.normalize(at_least_fp32(self.projector(h)), dim=1)  # fp32 under autocast

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        z = self.embed(h)
        mask = None
        if self.neg_fraction < 1:  # draws from the global RNG, which the trainer seeds
            mask = negative_mask(len(z), self.neg_fraction, device=z.device)
        return nt_xent(z, self.temperature, mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, neg_fraction={self.neg_fraction}"


@register_objective("simclr", "self-supervised NT-Xent (SimCLR) on two views, own projector "
                              "per stage; no labels (evaluate with `locallearn probe`)")
def simclr_objective(in_shape: tuple[int, ...], num_classes: int, *, head: str = "mlp",
                     last: bool = False, temperature: float = 0.5, neg_fraction: float = 1.0,
                     projector: str = "mlp", proj_dim: int = 128, proj_hidden: int = 512,
                     proj_pool: str = "avg", pool: str = "mean",
                     **head_options: Any) -> SimCLRObjective:
    """Build a :class:`SimCLRObjective` (options come from ``objective.options``).

    Args:
        in_shape: stage output shape.
        num_classes: unused (no classifier).
        head: unused (no classifier).
        last: whether this is the last stage; it alone receives the backbone's task-head
            options, which are ignored.
        temperature: NT-Xent temperature (0.5, SimCLR's CIFAR setting).
        neg_fraction: fraction of the negatives each anchor sees (1 = all 2N-2).
        projector: ``identity``, ``linear`` or ``mlp``.
        proj_dim, proj_hidden: projector output and hidden sizes.
        proj_pool: ``avg`` (average-pool conv features first) or ``none`` (flatten).
        pool: sequence pooling of text activations.

    Raises:
        ValueError: for a bad temperature, fraction or projector option, or an unknown
            option on a stage that is not the last.
    """
    if head_options and not last:
        raise ValueError(f"unknown simclr option(s) {', '.join(sorted(head_options))}; known: "
                         "temperature, neg_fraction, projector, proj_dim, proj_hidden, "
                         "proj_pool, pool")
    proj = build_projector(projector, in_shape, proj_dim, proj_hidden, proj_pool, seq_pool=pool)
    return SimCLRObjective(proj, temperature, neg_fraction)
