"""Image data sets: readers of the standard download layouts, registered by name.

Every loader is ``loader(root, **options) -> DataSplits`` where ``root`` is the data
folder; ``path=`` points at a specific file or folder instead of the default place.
Readers of slow sources (JPEG/PNG folders and archives, Tiny ImageNet) cache the
decoded uint8 arrays (see :mod:`locallearn.data.cache`). Folder-based sources are
stored in a fixed shuffled order (``numpy`` seed 0), so that ``subset(n)`` holds every
class rather than the first class only.
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from locallearn.data.cache import Arrays, cached_arrays, fingerprint
from locallearn.data.core import (
    DataError,
    DataSplits,
    archive_problem,
    make_splits,
    register_dataset,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
SPLIT_KEYS = ("train_x", "train_y", "test_x", "test_y", "classes")
ORDER_SEED = 0  # seed of the fixed order of folder-based sources
DIGITS_SPLIT_SEED = 0  # random_state of the stratified 80/20 split of `digits`


# --- shared helpers -------------------------------------------------------------------


def _not_found(what: str, root: Path, expected: str) -> DataError:
    """A 'not found' error that also says when the data folder itself is missing."""
    hint = (
        ""
        if root.is_dir()
        else f" (the data directory {root} does not exist: pass --data-dir (or "
        "data.data_dir=), set LOCALLEARN_DATA_DIR or create ./data)"
    )
    return DataError(f"{what} not found under {root}{hint}: expected {expected}")


def _resolve_path(root: Path, path: str | Path) -> Path:
    """``path=`` as given, or relative to the data folder if it exists only there."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    if not p.exists():
        raise DataError(
            f"{p} does not exist (path= may be absolute, relative to the working "
            f"directory or relative to the data directory {root})"
        )
    return p


def _fixed_order(n: int) -> np.ndarray:
    return np.random.default_rng(ORDER_SEED).permutation(n)


def iter_members(
    source: Path, wanted: Callable[[str], bool], expected: str
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(relative name, bytes)`` of the wanted files of a folder or tar archive.

    A tar (optionally compressed) is read member by member in one pass, without
    extracting anything to disk.

    Raises:
        DataError: the archive is corrupt or truncated (``expected`` says the layout).
    """
    if source.is_dir():
        for item in sorted(p for p in source.rglob("*") if p.is_file()):
            name = item.relative_to(source).as_posix()
            if wanted(name):
                yield name, item.read_bytes()
        return
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                if member.isfile() and wanted(member.name):
                    handle = tar.extractfile(member)
                    assert handle is not None  # regular files always have one
                    yield member.name, handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(
            f"cannot read archive {source}: {archive_problem(err)} (or it is corrupt or "
            f"truncated); expected {expected}"
        ) from err


def decode_image(
    data: bytes, name: str, size: tuple[int, int] | None = None, rgb: bool = False
) -> np.ndarray:
    """Decode one image file to uint8 ``(H, W, C)`` with C = 1 (grey) or 3.

    Args:
        data: the file's bytes.
        name: shown in errors.
        size: ``(height, width)`` to resize to (bilinear), or None to keep the size.
        rgb: always return 3 channels.

    Raises:
        DataError: the bytes are not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as file:
            grey = file.mode in ("L", "1", "I;16", "I", "F") and not rgb
            mode = "L" if grey else "RGB"
            img: Image.Image = file if file.mode == mode else file.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot decode image {name}: {err}") from err
    return arr[:, :, None] if arr.ndim == 2 else arr


def stack_images(images: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """Stack ``(H, W, C)`` images into uint8 ``(N, C, H, W)``; grey becomes RGB if mixed.

    Raises:
        DataError: images differ in size (names the first odd file and the fix).
    """
    first = images[0].shape[:2]
    for img, name in zip(images, names):
        if img.shape[:2] != first:
            raise DataError(
                f"image {name} is {img.shape[0]}x{img.shape[1]} but {names[0]} is "
                f"{first[0]}x{first[1]}; all images must share a size, or pass size=(H, W) "
                "(or size=N) to resize them"
            )
    channels = max(img.shape[2] for img in images)
    batch = np.empty((len(images), *first, channels), dtype=np.uint8)
    for i, img in enumerate(images):
        batch[i] = img  # a grey (H, W, 1) image broadcasts to every channel
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def _splits_from_arrays(name: str, arrays: Arrays, **meta: Any) -> DataSplits:
    classes = [str(c) for c in arrays["classes"]]
    train = (arrays["train_x"], arrays["train_y"])
    return make_splits(name, train, (arrays["test_x"], arrays["test_y"]), classes, **meta)


def _as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) <= 0:
        raise DataError(f"size= must be a positive int or (height, width), got {size!r}")
    return pair[0], pair[1]


# --- image folders (directory or tar) -------------------------------------------------

FOLDER_LAYOUT = (
    "train/<class>/<image> and test/<class>/<image> (or val/<class>/<image>), "
    "images as .jpg/.png/..., in a folder or a .tar/.tar.gz archive"
)


def _folder_entry(name: str) -> tuple[str, str] | None:
    """``(split, class)`` of an archive member ``.../<split>/<class>/<file>``, else None."""
    parts = name.split("/")  # plain string work: this runs for every one of 60k members
    if len(parts) < 3 or parts[-1].startswith("."):
        return None
    if "." + parts[-1].rpartition(".")[2].lower() not in IMAGE_SUFFIXES:
        return None
    split = parts[-3].lower()
    return (split, parts[-2]) if split in ("train", "test", "val") else None


def read_image_folder(source: Path, size: tuple[int, int] | None = None) -> Arrays:
    """Decode an image-folder layout (see ``FOLDER_LAYOUT``) into split arrays.

    Raises:
        DataError: no train or test images, a test class unknown to train, an
            undecodable image, or images of different sizes without ``size``.
    """
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {"train": [], "test": [], "val": []}
    for name, data in iter_members(source, lambda n: _folder_entry(n) is not None, FOLDER_LAYOUT):
        split, cls = _folder_entry(name)  # type: ignore[misc]
        found[split].append((cls, name, decode_image(data, f"{source}/{name}", size)))
    test = found["test"] or found["val"]
    if not found["train"] or not test:
        missing = "train" if not found["train"] else "test (or val)"
        raise DataError(f"no {missing} images found in {source}: expected {FOLDER_LAYOUT}")
    classes = sorted({cls for cls, _, _ in found["train"]})
    arrays: Arrays = {"classes": np.array(classes)}
    for split, items in (("train", found["train"]), ("test", test)):
        arrays[f"{split}_x"], arrays[f"{split}_y"] = _folder_split(source, items, classes)
    return arrays


def _folder_split(
    source: Path, items: list[tuple[str, str, np.ndarray]], classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    index = {cls: i for i, cls in enumerate(classes)}
    items = sorted(items, key=lambda item: (item[0], item[1]))
    unknown = sorted({cls for cls, _, _ in items} - set(index))
    if unknown:
        raise DataError(f"test classes {unknown} of {source} have no train folder")
    items = [items[i] for i in _fixed_order(len(items))]
    x = stack_images([img for _, _, img in items], [f"{source}/{n}" for _, n, _ in items])
    y = np.array([index[cls] for cls, _, _ in items], dtype=np.int64)
    return x, y


def _load_folder(name: str, source: Path, size: tuple[int, int] | None) -> DataSplits:
    digest = fingerprint(source)
    arrays = cached_arrays(
        "imagefolder", digest, lambda: read_image_folder(source, size), SPLIT_KEYS,
        options={"size": size},
    )
    return _splits_from_arrays(name, arrays, source=str(source), sha256=digest)


@register_dataset("imagefolder", "images in train/<class>/ and test/<class>/ (path= dir or .tar.gz)")
def load_imagefolder(
    root: Path, path: str | Path | None = None, size: int | Sequence[int] | None = None
) -> DataSplits:
    """Generic class-sub-folder data set, from a folder or a tar archive.

    Args:
        root: data folder (``path`` may be relative to it).
        path: the folder or ``.tar``/``.tar.gz`` archive.
        size: resize every image to this (int or ``(height, width)``); without it all
            images must share one size.
    """
    if path is None:
        raise DataError(f"imagefolder needs path= (a folder or .tar.gz holding {FOLDER_LAYOUT})")
    return _load_folder("imagefolder", _resolve_path(root, path), _as_size(size))


# --- CIFAR ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarLayout:
    """File names of one official CIFAR python download."""

    name: str
    folder: str
    archive: str
    train_pattern: str  # regex of the train file names
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    train_files: int  # how many train files the full set has
    jpeg_archive: str | None = None


CIFAR10 = CifarLayout(
    "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz", r"data_batch_(\d+)",
    "test_batch", "batches.meta", "labels", "label_names", 5, "cifar10-jpeg.tar.gz",
)
CIFAR100 = CifarLayout(
    "cifar100", "cifar-100-python", "cifar-100-python.tar.gz", r"(train)", "test", "meta",
    "fine_labels", "fine_label_names", 1,
)


def _cifar_expected(root: Path, layout: CifarLayout) -> str:
    trains = "data_batch_1..5" if layout is CIFAR10 else "train, test, meta"
    text = f"{root}/{layout.folder}/{trains} (the official python layout) or {root}/{layout.archive}"
    if layout.jpeg_archive:
        text += f" or {root}/{layout.jpeg_archive} (image-folder archive: {FOLDER_LAYOUT})"
    return text


def _unpickle(data: bytes, name: str) -> dict[str, Any]:
    """Load one CIFAR pickle; keys come back as str whether pickled as bytes or str."""
    try:
        obj = pickle.loads(data, encoding="bytes")
    except Exception as err:  # a corrupt pickle can raise almost anything
        raise DataError(f"corrupt CIFAR file {name} ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"corrupt CIFAR file {name}: expected a pickled dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_images(batch: dict[str, Any], layout: CifarLayout, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch[layout.label_key], dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise DataError(
            f"corrupt CIFAR file {name}: needs 'data' (N, 3072) and '{layout.label_key}' ({err})"
        ) from err
    if len(x) != len(y):
        raise DataError(f"corrupt CIFAR file {name}: {len(x)} images but {len(y)} labels")
    return x, y


def read_cifar_pickles(source: Path, layout: CifarLayout) -> tuple[Arrays, int] | None:
    """Read a CIFAR python folder or archive; None if it holds no CIFAR pickles.

    Returns:
        the split arrays and the number of train files found.
    """
    wanted_names = re.compile(rf"({layout.train_pattern}|{layout.test_file}|{layout.meta_file})")

    def wanted(name: str) -> bool:
        return wanted_names.fullmatch(PurePosixPath(name).name) is not None

    files = {PurePosixPath(n).name: data for n, data in iter_members(source, wanted, "CIFAR")}
    trains = sorted((n for n in files if re.fullmatch(layout.train_pattern, n)), key=_batch_no)
    if not trains:
        return None
    for needed in (layout.test_file, layout.meta_file):
        if needed not in files:
            raise DataError(f"{source} has CIFAR train files but no '{needed}'")
    parts = [_cifar_images(_unpickle(files[n], f"{source}/{n}"), layout, f"{source}/{n}")
             for n in trains]
    test_name = f"{source}/{layout.test_file}"
    test = _cifar_images(_unpickle(files[layout.test_file], test_name), layout, test_name)
    names = _unpickle(files[layout.meta_file], f"{source}/{layout.meta_file}")
    classes = [c.decode() if isinstance(c, bytes) else str(c)
               for c in names.get(layout.names_key, [])]
    arrays: Arrays = {
        "train_x": np.concatenate([x for x, _ in parts]),
        "train_y": np.concatenate([y for _, y in parts]),
        "test_x": test[0], "test_y": test[1], "classes": np.array(classes),
    }
    return arrays, len(trains)


def _batch_no(name: str) -> int:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else 0


def _cifar_sources(root: Path, path: str | Path | None, layout: CifarLayout) -> list[Path]:
    """Candidate sources, in order of preference."""
    if path is not None:
        p = _resolve_path(root, path)
        if p.is_file():
            return [p]
        root = p
        if (p / f"{layout.test_file}").is_file():
            return [p]
    candidates = [root / layout.folder, root / layout.archive]
    if layout.jpeg_archive:
        candidates.append(root / layout.jpeg_archive)
    return [c for c in candidates if c.exists()]


def _load_cifar(root: Path, path: str | Path | None, layout: CifarLayout) -> DataSplits:
    sources = _cifar_sources(root, path, layout)
    if not sources:
        raise _not_found(layout.name, root, _cifar_expected(root, layout))
    source = sources[0]
    if layout.jpeg_archive and source.name == layout.jpeg_archive:
        return _load_folder(layout.name, source, None)
    found = read_cifar_pickles(source, layout)
    if found is None:
        if source.is_file() and layout.jpeg_archive:  # path= an image-folder archive
            return _load_folder(layout.name, source, None)
        raise DataError(f"no CIFAR files in {source}: expected {_cifar_expected(root, layout)}")
    arrays, n_train = found
    if n_train < layout.train_files:
        warnings.warn(f"{source} holds {n_train} of {layout.train_files} train batches",
                      stacklevel=3)
    return _splits_from_arrays(
        layout.name, arrays, source=str(source), sha256=fingerprint(source), train_files=n_train
    )


@register_dataset("cifar10", "CIFAR-10: 32x32 colour, 10 classes, 50k/10k (python or jpeg tar)")
def load_cifar10(root: Path, path: str | Path | None = None) -> DataSplits:
    """CIFAR-10 from ``cifar-10-batches-py/``, ``cifar-10-python.tar.gz`` or
    ``cifar10-jpeg.tar.gz`` (image-folder archive) under ``root``, or from ``path``."""
    return _load_cifar(root, path, CIFAR10)


@register_dataset("cifar100", "CIFAR-100: 32x32 colour, 100 fine classes, 50k/10k")
def load_cifar100(root: Path, path: str | Path | None = None) -> DataSplits:
    """CIFAR-100 (fine labels) from ``cifar-100-python/`` or ``cifar-100-python.tar.gz``."""
    return _load_cifar(root, path, CIFAR100)


# --- SVHN -----------------------------------------------------------------------------


def read_svhn_mat(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``*_32x32.mat``: X (32, 32, 3, N) -> (N, 3, 32, 32); label 10 -> 0."""
    from scipy.io import loadmat

    try:
        mat = loadmat(file)
        x, y = mat["X"], mat["y"]
    except Exception as err:  # scipy raises many kinds on a bad file
        raise DataError(
            f"cannot read {file} ({type(err).__name__}: {err}); expected a MATLAB v5 file "
            "with X (32, 32, 3, N) and y (N, 1), as downloaded from the SVHN site"
        ) from err
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.size:
        raise DataError(f"{file}: X has shape {x.shape} and y {y.shape}; expected (H, W, 3, N)")
    labels = y.reshape(-1).astype(np.int64) % 10  # SVHN labels digit 0 as 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1), dtype=np.uint8), labels


@register_dataset("svhn", "SVHN cropped digits: 32x32 colour, 10 classes, 73k/26k (.mat)")
def load_svhn(root: Path, path: str | Path | None = None, extra: bool = False) -> DataSplits:
    """SVHN from ``train_32x32.mat``/``test_32x32.mat`` in ``root/svhn``, ``root`` or ``path``.

    Args:
        extra: also train on ``extra_32x32.mat`` (531k easier images).
    """
    folders = [_resolve_path(root, path)] if path is not None else [root / "svhn", root]
    folder = next((f for f in folders if (f / "train_32x32.mat").is_file()), None)
    if folder is None:
        raise _not_found("SVHN", root, f"{folders[0]}/train_32x32.mat and test_32x32.mat")
    names = ["train_32x32.mat", "extra_32x32.mat"] if extra else ["train_32x32.mat"]
    parts = [read_svhn_mat(folder / n) for n in names]
    test = read_svhn_mat(folder / "test_32x32.mat")
    train = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    return make_splits("svhn", train, test, [str(d) for d in range(10)],
                       source=str(folder), sha256=fingerprint(folder / "train_32x32.mat"))


# --- STL-10 ---------------------------------------------------------------------------

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck"]


def read_stl10_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<split>_X.bin`` (column-major 3x96x96 per image) and ``<split>_y.bin`` (1..10)."""
    x_file, y_file = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    for f in (x_file, y_file):
        if not f.is_file():
            raise DataError(f"missing {f}: expected {folder}/{{train,test}}_{{X,y}}.bin")
    raw = np.fromfile(x_file, dtype=np.uint8)
    y = np.fromfile(y_file, dtype=np.uint8).astype(np.int64) - 1
    image_bytes = 3 * 96 * 96
    if raw.size % image_bytes or raw.size // image_bytes != y.size:
        raise DataError(
            f"corrupt or truncated {x_file}: {raw.size} bytes for {y.size} labels in {y_file} "
            f"(expected {image_bytes} bytes per image)"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"corrupt {y_file}: labels must be 1..10")
    # Each image is stored column-major: swap the last two axes to get (C, H, W).
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(x), y


@register_dataset("stl10", "STL-10 labelled part: 96x96 colour, 10 classes, 5k/8k (binary)")
def load_stl10(root: Path, path: str | Path | None = None) -> DataSplits:
    """STL-10 from ``root/stl10_binary`` (or ``path``); the unlabelled part is not read."""
    folder = _resolve_path(root, path) if path is not None else root / "stl10_binary"
    if not (folder / "train_X.bin").is_file():
        raise _not_found("STL-10", root, f"{folder}/train_X.bin, train_y.bin, test_X.bin, "
                         "test_y.bin (the binary version, stl10_binary)")
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else STL10_CLASSES
    return make_splits("stl10", read_stl10_split(folder, "train"),
                       read_stl10_split(folder, "test"), classes, source=str(folder),
                       sha256=fingerprint(folder))


# --- downsampled ImageNet -------------------------------------------------------------


def read_imagenet_npz(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one downsampled-ImageNet batch: ``data`` (N, 3*S*S) and 1-based ``labels``."""
    try:
        with np.load(file, allow_pickle=False) as z:
            data, labels = z["data"], z["labels"]
    except Exception as err:  # zip, pickle and key errors all mean a bad file
        raise DataError(
            f"cannot read {file} ({type(err).__name__}: {err}); expected an .npz with "
            "'data' (N, 3072) uint8 and 'labels' (N,) 1-based"
        ) from err
    side = round((data.shape[-1] / 3) ** 0.5) if data.ndim == 2 else 0
    if data.ndim != 2 or 3 * side * side != data.shape[1] or len(labels) != len(data):
        raise DataError(f"{file}: data {data.shape}, labels {np.shape(labels)}; expected "
                        "(N, 3*S*S) and (N,)")
    x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, side, side)
    return x, np.asarray(labels, dtype=np.int64).reshape(-1) - 1


def _imagenet_folders(root: Path, path: str | Path | None) -> tuple[Path, Path] | None:
    if path is not None:
        p = _resolve_path(root, path)
        return p, p
    for train, val in ((root / "imagenet32",) * 2,
                       (root / "Imagenet32_train_npz", root / "Imagenet32_val_npz")):
        if (val / "val_data.npz").is_file():
            return train, val
    return None


@register_dataset("imagenet32", "downsampled ImageNet 32x32: 1000 classes, 1.28M/50k (.npz)")
def load_imagenet32(root: Path, path: str | Path | None = None) -> DataSplits:
    """Downsampled ImageNet from ``train_data_batch_1..10.npz`` and ``val_data.npz`` in
    ``root/imagenet32`` (or ``Imagenet32_train_npz``/``Imagenet32_val_npz``) or ``path``."""
    folders = _imagenet_folders(root, path)
    expected = (f"{root}/imagenet32/train_data_batch_1..10.npz and val_data.npz, or the "
                f"folders {root}/Imagenet32_train_npz and {root}/Imagenet32_val_npz")
    if folders is None:
        raise _not_found("ImageNet32", root, expected)
    train_files = sorted(folders[0].glob("train_data_batch_*.npz"), key=lambda f: _batch_no(f.stem))
    if not train_files or not (folders[1] / "val_data.npz").is_file():
        raise DataError(f"no train_data_batch_*.npz or val_data.npz in {folders}: expected {expected}")
    parts = [read_imagenet_npz(f) for f in train_files]
    train = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    test = read_imagenet_npz(folders[1] / "val_data.npz")
    n_classes = int(max(train[1].max(), test[1].max())) + 1
    return make_splits("imagenet32", train, test, [str(i) for i in range(n_classes)],
                       source=str(folders[0]), sha256=fingerprint(folders[0]))


# --- Tiny ImageNet --------------------------------------------------------------------

TINY_LAYOUT = ("tiny-imagenet-200/wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG "
               "and val/val_annotations.txt")


def read_tiny_imagenet(folder: Path) -> Arrays:
    """Decode Tiny ImageNet's train and val (used as test) images; classes are wnids."""
    wnids = (folder / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    train = [(f, i) for w, i in index.items()
             for f in sorted((folder / "train" / w / "images").glob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES]
    annotations = folder / "val" / "val_annotations.txt"
    if not train or not annotations.is_file():
        raise DataError(f"no train images or no {annotations} in {folder}: expected {TINY_LAYOUT}")
    val = []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"bad line in {annotations}: {line!r} (expected file<TAB>wnid<TAB>...)")
        val.append((folder / "val" / "images" / fields[0], index[fields[1]]))
    arrays: Arrays = {"classes": np.array(wnids)}
    for split, items in (("train", train), ("test", sorted(val))):
        items = [items[i] for i in _fixed_order(len(items))]
        images = [decode_image(_read_bytes(f), str(f), rgb=True) for f, _ in items]
        arrays[f"{split}_x"] = stack_images(images, [str(f) for f, _ in items])
        arrays[f"{split}_y"] = np.array([label for _, label in items], dtype=np.int64)
    return arrays


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {file}: {err}") from err


@register_dataset("tinyimagenet", "Tiny ImageNet: 64x64 colour, 200 classes, 100k/10k (val)")
def load_tinyimagenet(root: Path, path: str | Path | None = None) -> DataSplits:
    """Tiny ImageNet from ``root/tiny-imagenet-200`` (or ``path``); val is the test split."""
    folder = _resolve_path(root, path) if path is not None else root / "tiny-imagenet-200"
    if not (folder / "wnids.txt").is_file():
        raise _not_found("Tiny ImageNet", root, f"{folder}/wnids.txt ({TINY_LAYOUT})")
    digest = fingerprint(folder)
    arrays = cached_arrays("tinyimagenet", digest, lambda: read_tiny_imagenet(folder), SPLIT_KEYS)
    return _splits_from_arrays("tinyimagenet", arrays, source=str(folder), sha256=digest)


# --- MNIST family (IDX files) ---------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049  # uint8 data with 3 and 1 dimensions


def read_idx(file: Path, magic: int) -> np.ndarray:
    """Parse an IDX file (raw or ``.gz``) of uint8 data, checking its magic number and size.

    Raises:
        DataError: unreadable, wrong magic number or truncated.
    """
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {file} (corrupt or truncated: {err})") from err
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if found != magic:
        raise DataError(f"corrupt IDX file {file}: magic number {found}, expected {magic}")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header) if len(raw) >= header else None
    if data is None or len(dims) != ndim or data.size != int(np.prod(dims)):
        raise DataError(f"truncated IDX file {file}: header says {dims}, "
                        f"{len(raw) - header} data bytes")
    return data.reshape(dims)


def _idx_file(folder: Path, base: str) -> Path | None:
    return next((f for f in (folder / base, folder / f"{base}.gz") if f.is_file()), None)


def _load_idx_set(name: str, root: Path, path: str | Path | None, folders: Sequence[str],
                  classes: Sequence[str]) -> DataSplits:
    candidates = [_resolve_path(root, path)] if path is not None else [root / f for f in folders]
    folder = next((f for f in candidates if _idx_file(f, IDX_FILES["train"][0])), None)
    expected = (f"{candidates[0]}/train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]")
    if folder is None:
        raise _not_found(name, root, expected)
    splits = []
    for images, labels in IDX_FILES.values():
        files = [_idx_file(folder, images), _idx_file(folder, labels)]
        if files[0] is None or files[1] is None:
            raise DataError(f"{name}: missing files in {folder}: expected {expected}")
        x = read_idx(files[0], IDX_IMAGES_MAGIC)[:, None]
        y = read_idx(files[1], IDX_LABELS_MAGIC).astype(np.int64)
        if len(x) != len(y):
            raise DataError(f"{files[0]} has {len(x)} images but {files[1]} {len(y)} labels")
        splits.append((x, y))
    return make_splits(name, splits[0], splits[1], classes, source=str(folder),
                       sha256=fingerprint(folder))


@register_dataset("mnist", "MNIST digits: 28x28 grey, 10 classes, 60k/10k (IDX files)")
def load_mnist(root: Path, path: str | Path | None = None) -> DataSplits:
    """MNIST IDX files in ``root/mnist``, ``root/MNIST/raw``, ``root`` or ``path``."""
    return _load_idx_set("mnist", root, path, ["mnist", "MNIST/raw", "."],
                         [str(d) for d in range(10)])


@register_dataset("fashion-mnist", "Fashion-MNIST: 28x28 grey, 10 classes, 60k/10k (IDX files)")
def load_fashion_mnist(root: Path, path: str | Path | None = None) -> DataSplits:
    """Fashion-MNIST IDX files in ``root/fashion-mnist`` (or ``FashionMNIST/raw``, ``path``)."""
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    return _load_idx_set("fashion-mnist", root, path, ["fashion-mnist", "FashionMNIST/raw"],
                         classes)


@register_dataset("kmnist", "Kuzushiji-MNIST: 28x28 grey, 10 classes, 60k/10k (IDX files)")
def load_kmnist(root: Path, path: str | Path | None = None) -> DataSplits:
    """Kuzushiji-MNIST IDX files in ``root/kmnist`` (or ``KMNIST/raw``, ``path``)."""
    classes = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]
    return _load_idx_set("kmnist", root, path, ["kmnist", "KMNIST/raw"], classes)


# --- embedded and synthetic -----------------------------------------------------------


@register_dataset("digits", "scikit-learn's 8x8 handwritten digits: 10 classes, 1437/360, no download")
def load_digits(root: Path) -> DataSplits:
    """The digits bundled with scikit-learn, scaled 0..16 -> 0..255, split 80/20.

    The split is stratified by class with ``random_state=DIGITS_SPLIT_SEED`` (0), so it is
    the same on every machine. ``root`` is not used.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return make_splits("digits", (x_tr, y_tr), (x_te, y_te), [str(d) for d in range(10)],
                       source="sklearn.datasets.load_digits")


@register_dataset("synthetic", "learnable random images (class patterns + noise), for tests")
def load_synthetic(
    root: Path,
    n_train: int = 512,
    n_test: int = 128,
    shape: Sequence[int] = (3, 8, 8),
    num_classes: int = 4,
    seed: int = 0,
    noise: float = 0.15,
) -> DataSplits:
    """Images made of a smooth per-class pattern plus Gaussian noise.

    Patterns are left-right symmetric and smooth, so flips and small crops keep the
    class recognisable. ``root`` is not used.
    """
    c, h, w = (int(s) for s in shape)
    if min(c, h, w, num_classes, n_train, n_test) <= 0:
        raise DataError("synthetic: shape, num_classes, n_train and n_test must be positive")
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.1, 0.9, size=(num_classes, c, min(h, 4), min(w, 4)))
    coarse = (coarse + coarse[..., ::-1]) / 2  # symmetric: survives a flip
    patterns = _upsample(coarse, h, w)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, num_classes, size=n)
        x = patterns[y] + rng.normal(0.0, noise, size=(n, c, h, w))
        return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), y.astype(np.int64)

    classes = [f"class{i}" for i in range(num_classes)]
    return make_splits("synthetic", draw(n_train), draw(n_test), classes, source="synthetic",
                       seed=seed)


def _upsample(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of (K, C, h0, w0) patterns to (K, C, h, w)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(coarse.astype(np.float32))
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False).numpy()
