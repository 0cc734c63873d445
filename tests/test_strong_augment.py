"""Strong augmentation: shapes and range, determinism from the generator, real changes."""

import builtins

import pytest
import torch

from locallearn.data import DataError, batches
from locallearn.data.core import ArrayData
from locallearn.data.strong_augment import StrongAugment, _pipeline, build_augment

torch.set_num_threads(1)


def _images(n: int = 8, c: int = 3) -> torch.Tensor:
    return torch.rand(n, c, 16, 16, generator=torch.Generator().manual_seed(0))


def test_shape_and_range_are_kept():
    out = StrongAugment()(_images(), torch.Generator().manual_seed(1))
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_same_seed_same_batch_and_global_rng_untouched():
    x = _images()
    state = torch.get_rng_state()
    a = StrongAugment()(x, torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = StrongAugment()(x, torch.Generator().manual_seed(5))
    c = StrongAugment()(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_each_sample_draws_its_own_transform():
    x = _images(1).expand(6, -1, -1, -1).contiguous()  # six copies of one image
    out = StrongAugment()(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:20].tolist()) for o in out}) > 1


def test_grayscale_only_gives_grey_images():
    out = StrongAugment(gray_p=1.0, jitter_p=0.0)(_images(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[:, 0], out[:, 1])


def test_single_channel_images_work():
    out = StrongAugment()(_images(4, c=1), torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 16, 16)


def test_batches_applies_strong_augmentation_before_normalising():
    data = ArrayData((_images() * 255).to(torch.uint8), torch.zeros(8, dtype=torch.int64), ["a"])
    g = torch.Generator().manual_seed(0)
    x, _ = next(batches(data, 8, shuffle=False, generator=g, augment=build_augment("strong"),
                        mean=[0.5] * 3, std=[0.25] * 3))
    assert x.shape == (8, 3, 16, 16) and x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6


def test_build_augment_names_the_choices():
    assert build_augment("none") is None
    with pytest.raises(ValueError, match="none, basic, strong"):
        build_augment("simclr")
    with pytest.raises(ValueError, match="scale"):
        StrongAugment(scale=(0.0, 1.0))


def test_missing_kornia_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_kornia(name, *args, **kwargs):
        if name.startswith("kornia"):
            raise ImportError("no kornia")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kornia)
    _pipeline.cache_clear()
    with pytest.raises(DataError, match="pip install kornia"):
        StrongAugment(gray_p=0.5)(_images(), torch.Generator().manual_seed(0))
    _pipeline.cache_clear()
