"""Tests of the batched crop/flip augmentation (locallearn.data.augment)."""

import pytest
import torch

from locallearn.data import ArrayData, Augment, batches
from locallearn.data.augment import flip_where, shift_crop

torch.set_num_threads(1)


def ramp_images(batch: int, channels: int = 2, size: int = 6) -> torch.Tensor:
    """Images with every pixel distinct and non-zero, so shifts and flips are visible."""
    values = torch.arange(1, channels * size * size + 1, dtype=torch.float32)
    return values.view(1, channels, size, size).repeat(batch, 1, 1, 1)


def shifted(img: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """``img`` (C, H, W) moved by (down, right) with zeros filling the gap."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    src = img[:, max(0, -down) : h - max(0, down), max(0, -right) : w - max(0, right)]
    out[:, max(0, down) : h - max(0, -down), max(0, right) : w - max(0, -right)] = src
    return out


def test_shift_crop_moves_content_by_padding_minus_offset() -> None:
    x = ramp_images(3)
    out = shift_crop(x, 2, torch.tensor([0, 2, 4]), torch.tensor([1, 2, 3]))
    assert torch.equal(out[0], shifted(x[0], 2, 1))  # offset 0 -> content moves down 2
    assert torch.equal(out[1], x[1])  # offset == padding is the identity
    assert torch.equal(out[2], shifted(x[2], -2, -1))


def test_flip_where_flips_only_masked_samples() -> None:
    img = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # (C=1, H=2, W=3)
    x = torch.stack([img, img])
    out = flip_where(x, torch.tensor([True, False]))
    assert torch.equal(out[0], torch.tensor([[[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]]))
    assert torch.equal(out[1], img)


def test_augment_keeps_shape_and_dtype() -> None:
    x = torch.rand(5, 3, 8, 10)
    out = Augment()(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_augment_is_deterministic_given_the_generator() -> None:
    x = torch.rand(16, 3, 8, 8)
    aug = Augment(crop_padding=2)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flip_alone_gives_original_or_mirror_and_both_occur() -> None:
    x = ramp_images(64)
    out = Augment(crop_padding=0, flip=True)(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54  # each sample flips on its own, about half


def test_crop_alone_shifts_each_sample_by_its_own_offset() -> None:
    p = 2
    x = ramp_images(40)
    out = Augment(crop_padding=p, flip=False)(x, torch.Generator().manual_seed(0))
    shifts = set()
    for img, res in zip(x, out):
        match = [(d, r) for d in range(-p, p + 1) for r in range(-p, p + 1)
                 if torch.equal(res, shifted(img, d, r))]
        assert len(match) == 1
        shifts.add(match[0])
    assert len(shifts) > 5  # offsets differ between samples


def test_reflect_padding_leaves_no_zeros() -> None:
    x = ramp_images(8)
    out = Augment(crop_padding=2, flip=False, padding_mode="reflect")(x, torch.Generator())
    assert bool((out > 0).all())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="crop_padding"):
        Augment(crop_padding=-1)
    with pytest.raises(ValueError, match="padding_mode"):
        Augment(padding_mode="wrap")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Augment()(torch.rand(3, 8, 8))


def test_batches_with_augment_is_deterministic() -> None:
    data = ArrayData(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8),
                     torch.arange(20), ["a"])

    def epoch(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [x for x, _ in batches(data, 6, shuffle=True, generator=gen, augment=Augment())]

    assert all(torch.equal(a, b) for a, b in zip(epoch(3), epoch(3)))
