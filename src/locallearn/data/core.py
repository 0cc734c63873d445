"""Data containers, the data-set registry and the on-device batch iterator.

Every data set is held whole in memory as two tensors (airbench style): uint8 images
``(N, C, H, W)`` (or int64 token ids ``(N, L)`` for text) and int64 labels ``(N,)``.
:func:`batches` moves one batch at a time to the device, converts it to float there,
augments it there (batched) and normalises it. Loaders register themselves by name
with :func:`register_dataset` and are called through :func:`load_data`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locallearn.errors import DataError  # re-exported as locallearn.data.DataError

DATA_DIR_ENV = "LOCALLEARN_DATA_DIR"
# An augmentation: a float batch (B, C, H, W) and a generator in, a batch out. Augment
# (basic crop/flip) is one; stronger pipelines follow the same call.
AugmentFn = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
DEFAULT_DATA_DIR = "./data"


@dataclass
class ArrayData:
    """One split of a data set, held whole in memory.

    Attributes:
        x: uint8 images ``(N, C, H, W)`` or int64 token ids ``(N, L)``.
        y: int64 labels ``(N,)``.
        classes: class names; label ``i`` is ``classes[i]``.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"x has {self.x.shape[0]} samples but y has {self.y.shape[0]} labels"
            )
        if self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise DataError(f"y must be an int64 vector, got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int, seed: int = 0) -> ArrayData:
        """``n`` samples drawn at random per class, every class in proportion (stratified).

        Sources stored class by class (folders of classes) would keep only their first
        classes if the first ``n`` were taken. The draw depends only on ``seed`` and the
        labels, so every run with ``data.train_subset=n`` sees the same samples. All the
        samples (in their order) if ``n`` is not smaller than the split.

        Raises:
            DataError: if ``n`` is negative.
        """
        if n < 0:
            raise DataError(f"subset size must be >= 0, got {n}")
        if n >= len(self):
            return ArrayData(self.x, self.y, list(self.classes))
        idx = stratified_indices(self.y, n, seed).to(self.x.device)
        return ArrayData(self.x[idx], self.y[idx.to(self.y.device)], list(self.classes))


def stratified_indices(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``n`` of the labels ``y``: each class's share of ``n`` (largest remainders)
    drawn at random within the class, returned in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / len(y)
    take = exact.floor().long()
    extra = n - int(take.sum())
    take[torch.argsort(exact - take.double(), descending=True, stable=True)[:extra]] += 1
    picked = [torch.nonzero(y == c).flatten()[torch.randperm(int(k_all), generator=g)[:int(k)]]
              for c, k_all, k in zip(classes.tolist(), counts.tolist(), take.tolist())]
    chosen = torch.cat(picked)
    return chosen[torch.randperm(len(chosen), generator=g)]


@dataclass
class DataSplits:
    """A named data set: a train split, a test split and facts about the source.

    ``meta`` holds e.g. ``source`` (path), ``sha256`` (fingerprint of the source) and,
    for images, ``mean``/``std``: per-channel statistics of the train split in [0, 1].
    """

    name: str
    train: ArrayData
    test: ArrayData
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(C, H, W)`` for images, ``(L,)`` for token ids."""
        return tuple(int(s) for s in self.train.x.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.train.classes)


def is_image_tensor(x: torch.Tensor) -> bool:
    """True for a uint8 ``(N, C, H, W)`` image tensor."""
    return x.dtype == torch.uint8 and x.dim() == 4


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of uint8 images, in [0, 1] units.

    Counts the 256 grey levels per channel (a fast exact histogram), so 50k CIFAR
    images take a fraction of a second and need no float copy.
    """
    if len(x) == 0:
        raise DataError("cannot compute channel statistics of an empty split")
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        m = float((counts * levels).sum() / counts.sum())
        var = float((counts * (levels - m) ** 2).sum() / counts.sum())
        mean.append(round(m, 6))
        std.append(round(var**0.5, 6))
    return mean, std


def make_splits(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    **meta: Any,
) -> DataSplits:
    """Build :class:`DataSplits` from numpy arrays, adding mean/std for images.

    Args:
        name: data-set name.
        train: ``(x, y)`` of the train split (uint8 NCHW images or int64 tokens).
        test: ``(x, y)`` of the test split.
        classes: class names.
        **meta: stored in ``DataSplits.meta`` (e.g. ``source``, ``sha256``).
    """
    names = [str(c) for c in classes]

    def to_split(pair: tuple[np.ndarray, np.ndarray]) -> ArrayData:
        array = np.ascontiguousarray(pair[0])
        # torch cannot share read-only memory (e.g. np.frombuffer): copy it then.
        x = torch.from_numpy(array if array.flags.writeable else array.copy())
        y = torch.from_numpy(np.array(pair[1], dtype=np.int64))  # a small, writable copy
        return ArrayData(x, y, names)

    splits = DataSplits(name, to_split(train), to_split(test), dict(meta))
    if is_image_tensor(splits.train.x):
        splits.meta["mean"], splits.meta["std"] = channel_stats(splits.train.x)
    return splits


def archive_problem(err: BaseException) -> str:
    """One line for why an archive cannot be read (tarfile lists every method it tried)."""
    text = str(err)
    if "could not be opened successfully" in text:
        return "it is not a tar archive (gzip, bzip2, xz or plain tar)"
    return (text.strip().splitlines() or [type(err).__name__])[0]


# --- registry -------------------------------------------------------------------------

DatasetLoader = Callable[..., DataSplits]
DATASETS: dict[str, DatasetLoader] = {}
DATASET_HELP: dict[str, str] = {}


def register_dataset(name: str, help: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Register ``loader(root: Path, **options) -> DataSplits`` under ``name``.

    Args:
        name: the name used by :func:`load_data` and configs.
        help: one line shown by ``locallearn list``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorate(loader: DatasetLoader) -> DatasetLoader:
        if name in DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        DATASETS[name] = loader
        DATASET_HELP[name] = help
        return loader

    return decorate


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data root: ``data_dir`` if given, else ``$LOCALLEARN_DATA_DIR``, else ``./data``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def load_data(
    name: str, data_dir: str | os.PathLike[str] | None = None, **options: Any
) -> DataSplits:
    """Load a registered data set.

    Args:
        name: registered name (see ``DATASETS``).
        data_dir: root folder of the data sets (see :func:`resolve_data_dir`).
        **options: passed to the loader (e.g. ``path=``, ``size=``).

    Raises:
        DataError: unknown name or option, or the data cannot be found or read.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choices: {', '.join(sorted(DATASETS))}")
    loader = DATASETS[name]
    _check_options(name, loader, options)
    return loader(resolve_data_dir(data_dir), **options)


def _check_options(name: str, loader: DatasetLoader, options: dict[str, Any]) -> None:
    params = list(inspect.signature(loader).parameters.values())[1:]  # skip root
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DataError(
            f"unknown option(s) {', '.join(unknown)} for data set {name!r}; "
            f"choices: {', '.join(known) or '(none)'}"
        )


# --- batching -------------------------------------------------------------------------


def batches(
    data: ArrayData,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    device: torch.device | str = "cpu",
    augment: AugmentFn | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of one epoch on ``device``.

    Images (uint8) are moved to the device, scaled to float32 in [0, 1], augmented
    there and then normalised by ``mean``/``std``. Other inputs (token ids) are moved
    unchanged. The order (and the augmentation) draws only on ``generator`` (the global
    torch RNG if it is None), so a seeded generator gives the same epoch every time.

    Raises:
        ValueError: bad batch size, mean without std, or augmentation of non-images.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    images = is_image_tensor(data.x)
    if not images and (augment is not None or mean is not None):
        raise ValueError("augment/mean/std apply to uint8 images only")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    norm = _norm_tensors(mean, std, data.x.shape[1], device) if images and mean is not None else None
    # Host data for a CUDA device: gather the batch into pinned memory so the copy runs
    # asynchronously (the host allocator keeps the buffer until the copy is done).
    pin = torch.device(device).type == "cuda" and data.x.device.type == "cpu"
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size].to(data.x.device)
        x, y = data.x[idx], data.y[idx]
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if images:
            x = x.to(torch.float32).div_(255.0)
            if augment is not None:
                x = augment(x, generator)
            if norm is not None:
                x = (x - norm[0]) / norm[1]
            x = standard_strides(x)
        yield x, y


def standard_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a fresh NCHW tensor.

    With one channel, broadcasting (``(x - mean) / std``) or a permute can leave
    strides like ``(H*W, 1, W, 1)``: ``is_contiguous()`` holds, yet convolutions take
    the batch for channels-last and pick other kernels than for the same values
    received over the wire (always plain NCHW), so pipelined ranks and the
    sequential engine would round differently.
    """
    want: list[int] = []
    step = 1
    for n in reversed(x.shape):
        want.insert(0, step)
        step *= n
    return x if list(x.stride()) == want else x.clone(memory_format=torch.contiguous_format)


def fits_on_device(splits: DataSplits, device: torch.device | str, share: float = 0.25) -> bool:
    """True if both splits take at most ``share`` of ``device``'s free memory (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(t.nbytes for part in (splits.train, splits.test) for t in (part.x, part.y))
    return size <= share * free


def place_data(splits: DataSplits, device: torch.device | str, on_device: str = "auto") -> DataSplits:
    """The splits held on ``device`` (``data.on_device``), or unchanged on the host.

    ``true`` moves them, ``auto`` moves them to a CUDA device where they fit
    (:func:`fits_on_device`), ``false`` keeps them on the host, from where
    :func:`batches` copies each batch through pinned memory. On a CPU device the data
    are already where they train.

    Raises:
        ValueError: for another value of ``on_device``.
    """
    if on_device not in ("auto", "true", "false"):
        raise ValueError(f"data.on_device={on_device!r} is not allowed; choose auto, true or false")
    device = torch.device(device)
    move = on_device == "true" or (on_device == "auto" and fits_on_device(splits, device))
    if not move or device.type == "cpu":
        return splits
    def moved(part: ArrayData) -> ArrayData:
        return ArrayData(part.x.to(device), part.y.to(device), list(part.classes))

    return DataSplits(splits.name, moved(splits.train), moved(splits.test), dict(splits.meta))


def _norm_tensors(
    mean: Sequence[float] | None, std: Sequence[float] | None, channels: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    assert mean is not None and std is not None
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values (one per channel)")
    m = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
    if (s <= 0).any():
        raise ValueError(f"std must be positive, got {list(std)}")
    return m, s
