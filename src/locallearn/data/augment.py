"""Batched image augmentation on tensors: random crop with padding and horizontal flip.

Each sample gets its own crop offset and flip, drawn all at once; the crop is one
gather with per-sample row/column indices, so there is no Python loop over samples
and it runs wherever the batch lives. Random numbers are drawn on the CPU from the
given generator, then moved, so results do not depend on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "reflect")


def shift_crop(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Pad ``x`` (B, C, H, W) by ``padding`` zeros and cut an H x W window per sample.

    Sample ``i`` keeps rows ``dy[i] .. dy[i] + H - 1`` of the padded image, so its
    content moves by ``padding - dy[i]`` rows down (and likewise for columns).

    Args:
        x: float images (B, C, H, W).
        padding: pad on every side.
        dy, dx: int offsets (B,) in ``[0, 2 * padding]``.
    """
    return _gather_windows(F.pad(x, (padding,) * 4), x.shape[-2], x.shape[-1], dy, dx)


def _gather_windows(
    padded: torch.Tensor, height: int, width: int, dy: torch.Tensor, dx: torch.Tensor
) -> torch.Tensor:
    rows = dy.to(padded.device).view(-1, 1, 1) + torch.arange(height, device=padded.device).view(
        1, -1, 1
    )
    cols = dx.to(padded.device).view(-1, 1, 1) + torch.arange(width, device=padded.device).view(
        1, 1, -1
    )
    batch = torch.arange(padded.shape[0], device=padded.device).view(-1, 1, 1)
    # Channels-last so that the three index tensors broadcast to (B, H, W) and the
    # channel slice trails: the result is (B, H, W, C).
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples of ``x`` (B, C, H, W) where ``mask`` (B,) is True."""
    return torch.where(mask.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


@dataclass(frozen=True)
class Augment:
    """Basic augmentation applied to a float image batch on its own device.

    Attributes:
        crop_padding: pad by this much, then crop back to size at a random offset
            per sample (0 = no crop).
        flip: mirror each sample left-right with probability 1/2.
        padding_mode: ``"zeros"`` (the usual CIFAR recipe) or ``"reflect"``.
    """

    crop_padding: int = 4
    flip: bool = True
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}"
            )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch ``x`` (B, C, H, W); randomness comes only from ``generator``."""
        if x.dim() != 4:
            raise ValueError(f"Augment expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        batch = x.shape[0]
        if self.crop_padding > 0:
            p = self.crop_padding
            if self.padding_mode == "reflect" and p >= min(x.shape[-2:]):
                raise ValueError(f"reflect padding {p} needs images larger than {p} pixels")
            offsets = torch.randint(0, 2 * p + 1, (2, batch), generator=generator)
            mode = "constant" if self.padding_mode == "zeros" else "reflect"
            padded = F.pad(x, (p,) * 4, mode=mode)
            x = _gather_windows(padded, x.shape[-2], x.shape[-1], offsets[0], offsets[1])
        if self.flip:
            x = flip_where(x, torch.randint(0, 2, (batch,), generator=generator).bool())
        return x
