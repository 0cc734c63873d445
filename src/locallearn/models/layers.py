"""Small building blocks shared by the vision models: channel scaling, shape checks, conv layers.

Downsampling rule (every vision model): a max-pool or a stride-2 step is applied only while
both spatial sizes are at least 2 (:func:`can_downsample`); otherwise it is skipped (a pool
is left out, a strided conv runs at stride 1). So every model accepts any input size, e.g.
(3, 32, 32), (1, 28, 28) or (1, 8, 8), and simply stops shrinking at 1x1.
"""

from __future__ import annotations

from torch import nn


def check_width(width: float, channel_multiple: int) -> None:
    """Validate the width options of a model.

    Raises:
        ValueError: if ``width`` is not positive or ``channel_multiple`` is not a positive int.
    """
    if not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"width must be a positive number (e.g. 0.5, 1.0, 2.0), got {width!r}")
    if not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise ValueError(f"channel_multiple must be a positive int, got {channel_multiple!r}")


def scale_channels(channels: int, width: float = 1.0, multiple: int = 1) -> int:
    """``channels * width`` rounded to the nearest multiple of ``multiple`` (at least ``multiple``).

    Rounding to a multiple keeps every layer divisible into ``multiple`` equal channel groups,
    which width-wise splits (neuron groups) need.
    """
    return max(multiple, multiple * round(channels * width / multiple))


def check_image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` from ``input_shape``.

    Raises:
        ValueError: if the shape is not three positive ints.
    """
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"model {model!r} needs an image input shape (C, H, W), got "
                         f"{tuple(input_shape)}; use model 'mlp' for flat inputs")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def can_downsample(h: int, w: int) -> bool:
    """Whether a 2x downsampling step is still applied at spatial size ``h`` x ``w``."""
    return min(h, w) >= 2


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution with 'same' padding, no bias (a BatchNorm follows), Kaiming init."""
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """A 1x1 convolution without bias, Kaiming init (used for projection shortcuts)."""
    conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class ConvBNReLU(nn.Sequential):
    """conv3x3 -> BatchNorm -> ReLU, optionally followed by a 2x2 max-pool.

    The sub-modules are named ``conv``, ``bn``, ``relu`` (and ``pool``) so that code that
    rewrites layers (e.g. into grouped convolutions) can find them.
    """

    # types of the sub-modules added by name below (``pool`` only with ``pool=True``)
    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    relu: nn.ReLU
    pool: nn.MaxPool2d

    def __init__(self, c_in: int, c_out: int, pool: bool = False) -> None:
        super().__init__()
        self.add_module("conv", conv3x3(c_in, c_out))
        self.add_module("bn", nn.BatchNorm2d(c_out))
        self.add_module("relu", nn.ReLU(inplace=True))
        if pool:
            self.add_module("pool", nn.MaxPool2d(2, 2))
