"""Diversity penalty between the heads of one stage (neuron groups, GN-DGL).

Each head's prediction is turned into a distribution over the *wrong* classes:

1. softmax of the logits at temperature ``T``;
2. the true class's probability set to zero;
3. renormalised to sum to one;
4. L2-normalised.

The penalty is the mean cosine similarity of these vectors over all pairs of
different heads (and over the batch). Minimising it pushes the groups of a stage to
disagree about the wrong classes, so their ensemble errs less often together.

Gradient note: for head ``g`` the gradient of the mean over all pairs equals the
gradient of ``sum_{j != g} cos(p_g, p_j.detach()) / n_pairs``, so summing the penalty
into the stage loss trains every group exactly as if it saw the other heads' vectors
as fixed messages (which is what a group-parallel placement would send).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from locallearn.types import at_least_fp32

EPS = 1e-12  # keeps the normalisations finite when a head puts all mass on the true class


def wrong_class_vectors(logits: torch.Tensor, y: torch.Tensor, temperature: float = 3.0) -> torch.Tensor:
    """Unit vectors of each sample's wrong-class distribution (steps 1-4 of the module doc).

    Args:
        logits: (B, C) class logits of one head.
        y: (B,) true class indices.
        temperature: softmax temperature ``T`` (> 0).

    Raises:
        ValueError: if ``temperature`` is not positive.
    """
    if temperature <= 0:
        raise ValueError(f"diversity temperature must be positive, got {temperature}")
    p = torch.softmax(at_least_fp32(logits) / temperature, dim=1)  # fp32 under autocast
    p = p * (1.0 - F.one_hot(y, p.shape[1]).to(p.dtype))
    p = p / p.sum(dim=1, keepdim=True).clamp_min(EPS)
    return p / p.norm(dim=1, keepdim=True).clamp_min(EPS)


def diversity_penalty(logits: Sequence[torch.Tensor], y: torch.Tensor,
                      temperature: float = 3.0) -> torch.Tensor:
    """Mean pairwise cosine similarity between different heads' wrong-class vectors.

    Args:
        logits: one (B, C) logits tensor per head (at least one).
        y: (B,) true class indices.
        temperature: softmax temperature ``T``.

    Returns:
        A scalar; zero when there is a single head (no pairs).

    Raises:
        ValueError: if ``logits`` is empty.
    """
    if len(logits) == 0:
        raise ValueError("diversity_penalty needs the logits of at least one head")
    g = len(logits)
    if g == 1:
        return logits[0].sum() * 0.0  # keeps the graph (and device/dtype) of a real loss
    v = torch.stack([wrong_class_vectors(z, y, temperature) for z in logits])  # (G, B, C)
    gram = torch.einsum("gbc,hbc->gh", v, v) / v.shape[1]  # mean cosine over the batch
    off_diagonal = gram.sum() - gram.diagonal().sum()
    return off_diagonal / (g * (g - 1))
