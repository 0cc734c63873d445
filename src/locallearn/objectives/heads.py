"""Auxiliary heads: small networks that turn a stage's output into class logits.

Names follow the local-learning literature (convs and FC layers):

=======  ==================================================================
``0c1f``  global average pool -> linear
``1c2f``  3x3 conv stride 2 (2x channels) -> BN -> ReLU -> avg pool -> FC -> ReLU -> FC
``2c2f``  like ``1c2f`` with two convs (the second at stride 1)
``mlp``   flatten -> hidden FC layers with ReLU -> linear (option ``hidden``)
``linear`` flatten -> linear
=======  ==================================================================

Conv heads need a (C, H, W) input; on a flat (D,) input they fall back to ``mlp`` /
``linear``. Sequence inputs of shape (L, D) (a Masked text sequence, or a ViT's plain tokens) are
pooled first with :class:`locallearn.layers.SequencePool` (option ``pool``).
"""

from __future__ import annotations

from torch import nn

from locallearn.errors import ConfigError

HEAD_KINDS = ("0c1f", "1c2f", "2c2f", "mlp", "linear")


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


def _conv_head(c: int, convs: int, hidden: int, num_classes: int) -> nn.Sequential:
    layers = _conv_bn_relu(c, 2 * c, 2)
    if convs == 2:
        layers += _conv_bn_relu(2 * c, 2 * c, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * c, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, num_classes))


def _mlp(d: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, num_classes))


def build_head(kind: str, in_shape: tuple[int, ...], num_classes: int,
               hidden: int | list[int] | None = None, pool: str = "mean") -> nn.Module:
    """Build an auxiliary head.

    Args:
        kind: one of :data:`HEAD_KINDS`.
        in_shape: the shape of one input sample: (C, H, W), (D,) or (L, D) for sequences.
        num_classes: number of logits.
        hidden: hidden width (conv heads, default 128) or list of widths (``mlp``,
            default ``[256]``).
        pool: sequence pooling for (L, D) inputs: ``mean``, ``last`` or ``cls``.

    Raises:
        ValueError: for an unknown kind (the message lists the choices).
    """
    if kind not in HEAD_KINDS:
        raise ConfigError(f"unknown head {kind!r}; choose one of: {', '.join(HEAD_KINDS)}")
    if len(in_shape) == 2:  # a sequence (L, D): pool over real tokens, then a flat head
        from locallearn.layers import SequencePool

        flat_kind = "mlp" if kind in ("mlp", "1c2f", "2c2f") else "linear"
        return nn.Sequential(SequencePool(pool),
                             build_head(flat_kind, in_shape[1:], num_classes, hidden))
    if len(in_shape) == 3 and kind in ("1c2f", "2c2f"):
        width = hidden if isinstance(hidden, int) else 128
        return _conv_head(in_shape[0], 2 if kind == "2c2f" else 1, width, num_classes)
    if len(in_shape) == 3 and kind == "0c1f":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(in_shape[0], num_classes))
    d = 1
    for s in in_shape:
        d *= s
    if kind == "linear" or (kind == "0c1f"):
        return _mlp(d, [], num_classes)
    widths = list(hidden) if isinstance(hidden, (list, tuple)) else [hidden or 256]
    return _mlp(d, list(widths), num_classes)
