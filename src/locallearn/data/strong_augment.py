"""Strong (SimCLR-style) augmentation on image batches, on the batch's own device.

Random resized crop, horizontal flip, colour jitter (applied with probability 0.8)
and grayscale (probability 0.2), the recipe of SimCLR and SupCon that SCPL trains
with. The transforms come from kornia, which works on whole (B, C, H, W) float
batches wherever they live; each sample draws its own parameters.

Determinism: kornia draws from the global torch RNG, so each call draws one seed
from the caller's generator and runs the transforms inside a forked RNG seeded with
it. The same generator state gives the same batch, and the global RNG is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from locallearn.data.augment import Augment
from locallearn.data.core import DataError

AUGMENTS = ("none", "basic", "strong")


@dataclass(frozen=True)
class StrongAugment:
    """SimCLR-style augmentation of float images in [0, 1].

    Attributes:
        scale: range of the crop's area, as a fraction of the image.
        ratio: range of the crop's aspect ratio.
        flip: mirror each sample left-right with probability 1/2.
        jitter: brightness, contrast, saturation, hue strengths (saturation and hue
            apply to 3-channel images only).
        jitter_p: probability of the colour jitter per sample.
        gray_p: probability of turning a sample grey (3-channel images only).
    """

    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        for name in ("jitter_p", "gray_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch ``x`` (B, C, H, W); randomness comes only from ``generator``.

        Raises:
            ValueError: for a batch that is not (B, C, H, W).
            DataError: if kornia is not installed.
        """
        if x.dim() != 4:
            raise ValueError(f"StrongAugment expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        pipeline = _pipeline(self, *x.shape[1:])
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return pipeline(x)


@lru_cache(maxsize=8)
def _pipeline(aug: StrongAugment, channels: int, height: int, width: int) -> nn.Module:
    """The kornia transforms for images of this shape (built once per shape)."""
    try:
        import kornia.augmentation as K
    except ImportError as e:
        raise DataError("data.augment=strong needs kornia: pip install kornia "
                        "(or pip install 'locallearn[aug]')") from e
    b, c, s, h = aug.jitter
    rgb = channels == 3
    steps: list[nn.Module] = [K.RandomResizedCrop((height, width), scale=aug.scale, ratio=aug.ratio)]
    if aug.flip:
        steps.append(K.RandomHorizontalFlip())
    steps.append(K.ColorJitter(b, c, s if rgb else 0.0, h if rgb else 0.0, p=aug.jitter_p))
    if rgb and aug.gray_p > 0:
        steps.append(K.RandomGrayscale(p=aug.gray_p))
    return nn.Sequential(*steps)


def build_augment(name: str) -> Callable[..., torch.Tensor] | None:
    """The batch augmentation named by ``data.augment``: ``none``, ``basic`` or ``strong``.

    Raises:
        ValueError: for an unknown name (the message lists the choices).
    """
    if name not in AUGMENTS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of: {', '.join(AUGMENTS)}")
    return {"none": None, "basic": Augment(), "strong": StrongAugment()}[name]
