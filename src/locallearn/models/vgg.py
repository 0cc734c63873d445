"""VGG-style convolutional nets as block lists: one block per conv layer.

Each block is conv3x3 -> BatchNorm -> ReLU, followed by the 2x2 max-pool when the
configuration has one after that conv (``"M"`` below) and the input is still at least
2x2 (see :mod:`locallearn.models.layers`). The classifier is not a block: the backbone names
the head the last stage uses as the task classifier.

============  ========================================================  =================
model         convs (``M`` = max-pool)                                  task head
============  ========================================================  =================
``vgg6a``     128 M 256 M 512 M 512                                     ``mlp`` [1024]
``vgg8``      128 256 M 256 512 M 512 M 512 M                           ``mlp`` [2500]
``vgg11``     64 M 128 M 256 256 M 512 512 M 512 512 M                  ``0c1f``
``vgg8b``     128 256 M 256 512 M 512 M 512 M, FC 1024 (a block)          ``linear``
``vgg11b``    128 128 128 256 M 256 512 M 512 512 M 512 M, FC 1024       ``linear``
============  ========================================================  =================

``vgg8b`` and ``vgg11b`` are the nets of Nøkland & Eidnes' PredSim experiments; their
hidden FC layer (flatten -> FC 1024 -> BN -> ReLU) is a block too, so a layer-wise split is
``split.k`` = number of blocks (7 and 10). ``width`` scales every conv and the FC layer (the
paper's 2x and 3x nets); option ``dropout`` adds dropout after every block, as the paper does.

Sources. ``vgg6a`` is the configuration named VGG6a by Nøkland & Eidnes (2019, "Training
neural networks with local error signals"; 4 convs + one 1024-unit FC layer + the output
layer), the net the neuron-groups work (GN-DGL) trains on CIFAR. ``vgg8`` is the VGG of
the SCPL code (Nøkland & Eidnes' VGG8b convs); its classifier is flatten -> FC 2500 -> FC,
with a sigmoid in SCPL where our ``mlp`` head uses ReLU. ``vgg11`` is configuration A of
Simonyan & Zisserman with BatchNorm and, as usual on CIFAR, a single linear classifier on
the pooled 512 features instead of the three 4096-unit FC layers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from locallearn.models.blocks import Backbone, infer_shapes, register_model
from locallearn.models.layers import (
    ConvBNReLU,
    can_downsample,
    check_image_shape,
    check_width,
    scale_channels,
)

Config = list[int | str]

VGG6A: Config = [128, "M", 256, "M", 512, "M", 512]
VGG8: Config = [128, 256, "M", 256, 512, "M", 512, "M", 512, "M"]
VGG11: Config = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


VGG8B: Config = VGG8
VGG11B: Config = [128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"]


def vgg_blocks(config: Config, input_shape: tuple[int, ...], width: float = 1.0,
               channel_multiple: int = 1, model: str = "vgg") -> list[nn.Module]:
    """Build the conv blocks of a VGG configuration.

    Args:
        config: channel counts, with ``"M"`` for a 2x2 max-pool after the previous conv.
        input_shape: (C, H, W) of one input sample.
        width: multiplier of every channel count.
        channel_multiple: every channel count is rounded to a multiple of this.
        model: model name, for error messages.

    Raises:
        ValueError: for a non-image input shape or bad width options.
    """
    check_width(width, channel_multiple)
    c, h, w = check_image_shape(model, input_shape)
    blocks: list[nn.Module] = []
    for i, item in enumerate(config):
        if item == "M":
            continue
        pool = i + 1 < len(config) and config[i + 1] == "M" and can_downsample(h, w)
        c_out = scale_channels(int(item), width, channel_multiple)
        blocks.append(ConvBNReLU(c, c_out, pool=pool))
        c = c_out
        if pool:
            h, w = h // 2, w // 2
    return blocks


def _build(name: str, config: Config, input_shape: tuple[int, ...], num_classes: int,
           width: float, channel_multiple: int, head: str,
           head_options: dict[str, Any]) -> Backbone:
    blocks = vgg_blocks(config, input_shape, width, channel_multiple, model=name)
    return Backbone(name=name, blocks=blocks, shapes=infer_shapes(blocks, input_shape),
                    num_classes=num_classes, head=head, head_options=head_options)


@register_model("vgg6a", help="VGG6a (Nøkland & Eidnes 2019): 4 conv blocks + FC-1024 head")
def vgg6a(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
          channel_multiple: int = 1) -> Backbone:
    """VGG6a: convs 128 M 256 M 512 M 512; task head flatten -> FC 1024 -> FC.

    Args:
        input_shape: (C, H, W) of one input sample.
        num_classes: number of classes.
        width: multiplier of every channel count.
        channel_multiple: every channel count is rounded to a multiple of this.
    """
    return _build("vgg6a", VGG6A, input_shape, num_classes, width, channel_multiple,
                  head="mlp", head_options={"hidden": [1024]})


@register_model("vgg8", help="VGG8 of SCPL (VGG8b convs): 6 conv blocks + FC-2500 head")
def vgg8(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
         channel_multiple: int = 1) -> Backbone:
    """VGG8: convs 128 256 M 256 512 M 512 M 512 M; task head flatten -> FC 2500 -> FC.

    Args: as :func:`vgg6a`.
    """
    return _build("vgg8", VGG8, input_shape, num_classes, width, channel_multiple,
                  head="mlp", head_options={"hidden": [2500]})


@register_model("vgg11", help="VGG-11 with BatchNorm: 8 conv blocks + linear head")
def vgg11(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
          channel_multiple: int = 1) -> Backbone:
    """VGG-11 (configuration A) with BatchNorm; task head global avg pool -> linear.

    Args: as :func:`vgg6a`.
    """
    return _build("vgg11", VGG11, input_shape, num_classes, width, channel_multiple,
                  head="0c1f", head_options={})


def _vgg_b(name: str, config: Config, input_shape: tuple[int, ...], num_classes: int,
           width: float, channel_multiple: int, dropout: float, fc: int = 1024) -> Backbone:
    """Conv blocks, then one FC block (flatten -> FC -> BN -> ReLU), dropout after each."""
    blocks = vgg_blocks(config, input_shape, width, channel_multiple, model=name)
    shapes = infer_shapes(blocks, input_shape)
    c, h, w = shapes[-1]
    hidden = scale_channels(fc, width, channel_multiple)
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden),
                                nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)))
    if dropout:
        for block in blocks:
            block.add_module("drop", nn.Dropout(dropout))
    return Backbone(name=name, blocks=blocks, shapes=infer_shapes(blocks, input_shape),
                    num_classes=num_classes, head="linear", head_options={})


@register_model("vgg8b", help="VGG8B (Nøkland & Eidnes 2019): 6 conv blocks + an FC-1024 block")
def vgg8b(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
          channel_multiple: int = 1, dropout: float = 0.0) -> Backbone:
    """VGG8B: convs 128 256 M 256 512 M 512 M 512 M, block FC 1024; task head linear.

    Args: as :func:`vgg6a`, and ``dropout`` after every block (0 = none).
    """
    return _vgg_b("vgg8b", VGG8B, input_shape, num_classes, width, channel_multiple, dropout)


@register_model("vgg11b", help="VGG11B (Nøkland & Eidnes 2019): 9 conv blocks + an FC-1024 block")
def vgg11b(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
           channel_multiple: int = 1, dropout: float = 0.0) -> Backbone:
    """VGG11B: convs 128 128 128 256 M 256 512 M 512 512 M 512 M, block FC 1024; head linear.

    Args: as :func:`vgg8b`.
    """
    return _vgg_b("vgg11b", VGG11B, input_shape, num_classes, width, channel_multiple, dropout)
