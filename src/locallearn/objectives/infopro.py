"""InfoPro (Wang et al., ICLR 2021): a reconstruction term plus a task term, weighted per stage.

The local loss of stage k (0-based, K stages, the last one trains the task head alone)::

    L_k = lambda1(k) * MSE(decoder(h_k), x) + lambda2(k) * L_task(h_k, y)

``L_task`` is the CE of an auxiliary classifier (``variant=softmax``) or SupCon on a
projection head (``variant=contrast``, :mod:`locallearn.objectives.supcon`). The
reconstruction term is :class:`~locallearn.objectives.reconstruct.ReconstructObjective`
(a small decoder of the network input x, which reaches the stage through its context
taps, so in a pipeline x travels with the batch).

Weights (choices of ours; the paper only says lambda1 falls and lambda2 rises with depth,
and its code interpolates linearly between two end values): ``recon_weights`` and
``task_weights`` each take one value (constant), two values (first and last local
stage, linear in between) or one value per local stage. Defaults: lambda1 from 1.0 to
0.2 and lambda2 from 0.5 to 1.0, so the first stage keeps most of the input and the
last local stage is mostly a classifier. SupCon temperature 0.07 as in the paper's
contrast variant (the library's SupCon default is SCPL's 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from locallearn.models.blocks import Activation
from locallearn.objectives.base import Objective, register_objective
from locallearn.objectives.ce import HeadCE
from locallearn.objectives.heads import build_head
from locallearn.objectives.reconstruct import ReconstructObjective
from locallearn.objectives.supcon import supcon_objective

VARIANTS = ("softmax", "contrast")


class Weighted(Objective):
    """``weight`` times ``inner``'s loss; ``inner``'s prediction."""

    def __init__(self, inner: Objective, weight: float) -> None:
        super().__init__()
        self.inner, self.weight = inner, float(weight)

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        return self.weight * self.inner.loss(h, y)

    def predict(self, h: Activation) -> torch.Tensor | None:
        return self.inner.predict(h)


def stage_weight(spec: Sequence[float], stage: int, local: int, key: str) -> float:
    """The weight of local stage ``stage`` (of ``local``) from a 1-, 2- or ``local``-value spec.

    Raises:
        ValueError: for another length or a negative value (naming ``key``).
    """
    spec = [float(w) for w in spec]
    if not spec or any(w < 0 for w in spec):
        raise ValueError(f"objective.options.{key}={spec}: give 1, 2 or {local} weights >= 0")
    if len(spec) == local:
        return spec[stage]
    if len(spec) == 1:
        return spec[0]
    if len(spec) == 2:
        return spec[0] + (spec[1] - spec[0]) * stage / max(local - 1, 1)
    raise ValueError(f"objective.options.{key} lists {len(spec)} weights for {local} local "
                     f"stages; give 1 (constant), 2 (first, last: interpolated) or {local}")


@register_objective("infopro", "InfoPro: reconstruction of the input + CE (variant=softmax) or "
                               "SupCon (variant=contrast), weighted per stage")
def infopro_objective(in_shape: tuple[int, ...], num_classes: int, *, head: str = "mlp",
                      last: bool = False, stage: int = 0, num_stages: int = 1,
                      image_shape: tuple[int, ...] = (), variant: str = "softmax",
                      recon_weights: Sequence[float] = (1.0, 0.2),
                      task_weights: Sequence[float] = (0.5, 1.0), decoder_hidden: int = 12,
                      temperature: float = 0.07, proj_dim: int = 128, proj_hidden: int = 512,
                      pool: str = "mean", **head_options: Any) -> Objective:
    """Build stage ``stage``'s InfoPro objective (the last stage: CE of the task head).

    Args:
        in_shape: stage output shape (C, H, W).
        num_classes: number of classes.
        head: classifier head kind (softmax variant and the last stage).
        last: whether this is the last stage.
        stage, num_stages, image_shape: passed by :meth:`LocalNet.from_backbone`; without
            ``image_shape`` the objective has no reconstruction term.
        variant: ``softmax`` or ``contrast``.
        recon_weights, task_weights: lambda1 and lambda2 (see the module doc).
        decoder_hidden: channels of the decoder's hidden conv.
        temperature, proj_dim, proj_hidden: SupCon options of the contrast variant.
        pool: sequence pooling of the heads.
        **head_options: classifier head options (e.g. ``hidden``).

    Raises:
        ValueError: for an unknown variant or bad weights.
    """
    if variant not in VARIANTS:
        raise ValueError(f"objective.options.variant={variant!r}; choose one of: "
                         f"{', '.join(VARIANTS)}")
    if last:
        return HeadCE(build_head(head, in_shape, num_classes, pool=pool, **head_options))
    local = max(num_stages - 1, 1)
    lam_recon = stage_weight(recon_weights, stage, local, "recon_weights")
    lam_task = stage_weight(task_weights, stage, local, "task_weights")
    task: Objective
    if variant == "softmax":
        task = HeadCE(build_head(head, in_shape, num_classes, pool=pool, **head_options))
    else:
        task = supcon_objective(in_shape, num_classes, temperature=temperature, proj_dim=proj_dim,
                                proj_hidden=proj_hidden, classifier="none", pool=pool)
    if not image_shape:  # built outside LocalNet.from_backbone (e.g. to time heads): no decoder
        return Weighted(task, lam_task)
    return ReconstructObjective(Weighted(task, lam_task), in_shape, tuple(image_shape), lam_recon,
                                decoder_hidden)
