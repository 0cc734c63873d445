"""A multi-layer perceptron as a block list: one block per hidden layer.

Block i is Linear -> [BatchNorm1d] -> ReLU; the first block flattens its input first, so
any input shape works. The task head is ``linear`` (the output layer).
"""

from __future__ import annotations

import math

from torch import nn

from locallearn.models.blocks import Backbone, infer_shapes, register_model


def _hidden_block(d_in: int, d_out: int, batch_norm: bool, flatten: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers.append(nn.Linear(d_in, d_out))
    if batch_norm:
        layers.append(nn.BatchNorm1d(d_out))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@register_model("mlp", help="MLP: one block per hidden Linear+ReLU layer (input flattened)")
def mlp(input_shape: tuple[int, ...], num_classes: int, *,
        hidden: list[int] | tuple[int, ...] = (256, 256, 256, 256),
        batch_norm: bool = False) -> Backbone:
    """Build an MLP whose hidden layers are the blocks.

    Args:
        input_shape: shape of one input sample (flattened by the first block).
        num_classes: number of classes.
        hidden: width of each hidden layer; one block per entry.
        batch_norm: put a BatchNorm1d between each Linear and its ReLU.

    Raises:
        ValueError: if ``hidden`` is empty or holds a non-positive width.
    """
    widths = list(hidden)
    if not widths or any(not isinstance(h, int) or h < 1 for h in widths):
        raise ValueError(f"hidden must be a non-empty list of positive ints, got {hidden!r}")
    d = math.prod(int(s) for s in input_shape)
    blocks: list[nn.Module] = []
    for i, h in enumerate(widths):
        blocks.append(_hidden_block(d, h, batch_norm, flatten=i == 0))
        d = h
    return Backbone(name="mlp", blocks=blocks, shapes=infer_shapes(blocks, input_shape),
                    num_classes=num_classes, head="linear")
