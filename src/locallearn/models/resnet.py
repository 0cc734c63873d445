"""ResNets with basic blocks as block lists: the stem is block 0, each BasicBlock one block.

``resnet20/32/56/110`` are the CIFAR ResNets of He et al. (2016, section 4.2): a 3x3 conv
stem with 16 channels, then three stages of n = (depth - 2) / 6 basic blocks with 16, 32
and 64 channels, the first block of stages 2 and 3 at stride 2. ``resnet18`` is the
ResNet-18 commonly used on CIFAR-size inputs: a 3x3 stem conv with 64 channels at stride 1
and no max-pool, then four stages of two basic blocks with 64/128/256/512 channels.

The task head is ``0c1f`` (global average pool -> linear), as in both papers. A stride-2
step is only taken while the input is at least 2x2 (see :mod:`locallearn.models.layers`).

Shortcuts: option ``"B"`` (default) projects with 1x1 conv + BN whenever the shape
changes; option ``"A"`` subsamples and zero-pads the channels (no parameters), the variant
He et al. used for their CIFAR parameter counts (0.27M for ResNet-20, 0.46M for ResNet-32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from locallearn.models.blocks import Backbone, infer_shapes, register_model
from locallearn.models.layers import (
    ConvBNReLU,
    can_downsample,
    check_image_shape,
    check_width,
    conv1x1,
    conv3x3,
    scale_channels,
)

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and zero-pad the new channels.

    With ``groups`` > 1 (width groups, :mod:`locallearn.groups`) every group of channels
    is padded on its own, so output group g holds only input group g's channels.
    """

    def __init__(self, extra_channels: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        if self.groups == 1:
            return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        n, c, h, w = x.shape
        x = x.reshape(n, self.groups, c // self.groups, h, w)
        x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels // self.groups))
        return x.reshape(n, -1, h, w)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: relu(bn(conv(relu(bn(conv x)))) + s(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = (nn.Sequential(conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))
                             if shortcut == "B" else PadShortcut(c_out - c_in, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Not in-place: x may be a stage input leaf that requires grad.
        return F.relu(out + self.shortcut(x))


def resnet_blocks(input_shape: tuple[int, ...], stem: int, stages: list[tuple[int, int]],
                  width: float = 1.0, channel_multiple: int = 1, shortcut: str = "B",
                  model: str = "resnet") -> list[nn.Module]:
    """Build a stem and stages of basic blocks.

    Args:
        input_shape: (C, H, W) of one input sample.
        stem: channels of the 3x3 stem conv (before the width multiplier).
        stages: ``(channels, num_blocks)`` per stage; every stage but the first starts at
            stride 2.
        width: multiplier of every channel count.
        channel_multiple: every channel count is rounded to a multiple of this.
        shortcut: ``"A"`` (zero-padding) or ``"B"`` (1x1 conv projection).
        model: model name, for error messages.

    Raises:
        ValueError: for a non-image input shape, bad width options or an unknown shortcut.
    """
    check_width(width, channel_multiple)
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; choose one of: {', '.join(SHORTCUTS)}")
    c, h, w = check_image_shape(model, input_shape)
    c_out = scale_channels(stem, width, channel_multiple)
    blocks: list[nn.Module] = [ConvBNReLU(c, c_out)]
    c = c_out
    for s, (channels, num_blocks) in enumerate(stages):
        c_out = scale_channels(channels, width, channel_multiple)
        for b in range(num_blocks):
            stride = 2 if s > 0 and b == 0 and can_downsample(h, w) else 1
            blocks.append(BasicBlock(c, c_out, stride, shortcut))
            c = c_out
            if stride == 2:
                h, w = (h + 1) // 2, (w + 1) // 2  # 3x3 conv, padding 1, stride 2
    return blocks


def _register_cifar_resnet(depth: int) -> None:
    """Register ``resnet{depth}``, a CIFAR ResNet with (depth - 2) / 6 blocks per stage."""
    n = (depth - 2) // 6
    name = f"resnet{depth}"

    def build(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
              channel_multiple: int = 1, shortcut: str = "B") -> Backbone:
        blocks = resnet_blocks(input_shape, 16, [(16, n), (32, n), (64, n)], width,
                               channel_multiple, shortcut, model=name)
        return Backbone(name=name, blocks=blocks, shapes=infer_shapes(blocks, input_shape),
                        num_classes=num_classes, head="0c1f")

    build.__name__ = name
    build.__doc__ = (f"CIFAR ResNet-{depth}: stem + 3 stages x {n} basic blocks (16/32/64 "
                     "channels), head 0c1f.\n\n    Options: width, channel_multiple, "
                     "shortcut ('A' or 'B').")
    register_model(name, help=f"CIFAR ResNet-{depth} (He et al. 2016): stem + {3 * n} "
                              "basic blocks, 16/32/64 channels")(build)


for _depth in (20, 32, 56, 110):
    _register_cifar_resnet(_depth)


@register_model("resnet18", help="ResNet-18 for CIFAR-size inputs: 3x3 stem + 8 basic blocks")
def resnet18(input_shape: tuple[int, ...], num_classes: int, *, width: float = 1.0,
             channel_multiple: int = 1, shortcut: str = "B") -> Backbone:
    """ResNet-18 for small inputs: 3x3 stem (64, stride 1, no max-pool) + 4 x 2 basic blocks.

    Args:
        input_shape: (C, H, W) of one input sample.
        num_classes: number of classes.
        width: multiplier of every channel count.
        channel_multiple: every channel count is rounded to a multiple of this.
        shortcut: ``"A"`` (zero-padding) or ``"B"`` (1x1 conv projection).
    """
    blocks = resnet_blocks(input_shape, 64, [(64, 2), (128, 2), (256, 2), (512, 2)], width,
                           channel_multiple, shortcut, model="resnet18")
    return Backbone(name="resnet18", blocks=blocks, shapes=infer_shapes(blocks, input_shape),
                    num_classes=num_classes, head="0c1f")
