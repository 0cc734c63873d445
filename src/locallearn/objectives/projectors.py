"""Projectors: the small networks that map a stage's output into an embedding space.

Contrastive objectives compare samples in a low-dimensional space rather than on the
raw features. A projector first reduces the activation to a vector, then maps it:

============  ============================================================
``identity``   the (pooled or flattened) features themselves
``linear``     one linear layer to ``dim``
``mlp``        linear to ``hidden`` -> ReLU -> linear to ``dim``
============  ============================================================

Reduction depends on the activation: conv features (C, H, W) are average-pooled to C
(``pool="avg"``, the default: flattening a 256x16x16 map into a linear layer would
cost millions of weights) or flattened (``pool="none"``); sequences (L, D) with a mask
are pooled over real tokens (:class:`locallearn.layers.SequencePool`); flat (D,)
features are used as they are.
"""

from __future__ import annotations

from torch import nn

PROJECTOR_KINDS = ("identity", "linear", "mlp")
POOLS = ("avg", "none")


def _reducer(in_shape: tuple[int, ...], pool: str, seq_pool: str) -> tuple[nn.Module, int]:
    """The module turning one activation into a (N, D) matrix, and D."""
    if pool not in POOLS:
        raise ValueError(f"unknown projector pool {pool!r}; choose one of: {', '.join(POOLS)}")
    if len(in_shape) == 2:  # a text sequence (L, D) travelling with its mask
        from locallearn.layers import SequencePool

        return SequencePool(seq_pool), in_shape[1]
    if len(in_shape) == 3 and pool == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), in_shape[0]
    d = 1
    for s in in_shape:
        d *= s
    return nn.Flatten(), d


def build_projector(kind: str, in_shape: tuple[int, ...], dim: int = 128, hidden: int = 512,
                    pool: str = "avg", seq_pool: str = "mean") -> nn.Module:
    """Build a projector for activations of shape ``in_shape`` (without batch).

    Args:
        kind: one of :data:`PROJECTOR_KINDS`.
        in_shape: (C, H, W), (D,) or (L, D) for sequences.
        dim: output dimension of ``linear`` and ``mlp``.
        hidden: hidden width of ``mlp``.
        pool: ``avg`` (global average pool of conv features first) or ``none``.
        seq_pool: pooling of sequences: ``mean``, ``last``, ``cls`` or ``bilast``.

    Raises:
        ValueError: for an unknown kind or pool, or a non-positive size.
    """
    if kind not in PROJECTOR_KINDS:
        raise ValueError(f"unknown projector {kind!r}; choose one of: {', '.join(PROJECTOR_KINDS)}")
    if dim < 1 or hidden < 1:
        raise ValueError(f"projector dim and hidden must be positive, got {dim} and {hidden}")
    reduce, d = _reducer(tuple(in_shape), pool, seq_pool)
    if kind == "identity":
        return reduce
    if kind == "linear":
        return nn.Sequential(reduce, nn.Linear(d, dim))
    return nn.Sequential(reduce, nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
