"""Tests of the image data sets, the decoded-array cache and batching.

Every reader is run on tiny files that the test writes in the real download layout.
"""

import gzip
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from locallearn.data import DATASETS, ArrayData, DataError, batches, cache_dir, load_data, vision

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache folder, never the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(folder))
    return folder


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def tar_folder(folder: Path, archive: Path, arcname: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname or folder.name)
    return archive


# --- CIFAR ----------------------------------------------------------------------------


def write_pickle(path: Path, obj: dict) -> None:
    # bytes keys and protocol 2, as in the official (Python 2) files
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(folder: Path, batches_: int = 5, per: int = 3) -> Path:
    folder.mkdir(parents=True)
    g = rng()
    for i in range(1, batches_ + 1):
        write_pickle(folder / f"data_batch_{i}", {
            b"data": g.integers(0, 256, (per, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in g.integers(0, 10, per)]})
    write_pickle(folder / "test_batch", {b"data": np.full((2, 3072), 7, np.uint8),
                                         b"labels": [3, 9]})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    write_pickle(folder / "batches.meta", {b"label_names": names})
    return folder


def test_cifar10_python_folder(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")
    d = load_data("cifar10", tmp_path)
    assert d.train.x.shape == (15, 3, 32, 32) and d.test.x.shape == (2, 3, 32, 32)
    assert d.train.x.dtype == torch.uint8 and d.train.y.dtype == torch.int64
    assert d.train.classes[3] == "cat" and d.num_classes == 10
    assert d.test.y.tolist() == [3, 9] and int(d.test.x.max()) == 7
    first = pickle.loads((folder / "data_batch_1").read_bytes(), encoding="bytes")[b"data"]
    assert torch.equal(d.train.x[0].reshape(-1), torch.from_numpy(first[0]))
    assert d.meta["source"] == str(folder) and len(d.meta["mean"]) == 3


def test_cifar10_python_archive_with_two_batches_warns(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path / "src" / "cifar-10-batches-py", batches_=2)
    tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")
    with pytest.warns(UserWarning, match="2 of 5"):
        d = load_data("cifar10", tmp_path)
    assert len(d.train) == 6 and d.meta["source"].endswith("cifar-10-python.tar.gz")


def test_cifar100_archive_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "src" / "cifar-100-python"
    folder.mkdir(parents=True)
    data = rng().integers(0, 256, (4, 3072), dtype=np.uint8)
    write_pickle(folder / "train", {b"data": data, b"fine_labels": [0, 99, 5, 5],
                                    b"coarse_labels": [0, 1, 2, 3]})
    write_pickle(folder / "test", {b"data": data[:2], b"fine_labels": [1, 2],
                                   b"coarse_labels": [0, 0]})
    write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    tar_folder(folder, tmp_path / "cifar-100-python.tar.gz")
    d = load_data("cifar100", tmp_path)
    assert d.train.y.tolist() == [0, 99, 5, 5] and d.num_classes == 100


def test_cifar10_prefers_pickles_then_jpeg_archive(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "tree", size=32)
    tar_folder(tmp_path / "tree", tmp_path / "cifar10-jpeg.tar.gz", arcname=".")
    d = load_data("cifar10", tmp_path)
    assert d.meta["source"].endswith("cifar10-jpeg.tar.gz") and d.input_shape == (3, 32, 32)
    write_cifar10(tmp_path / "cifar-10-batches-py")
    assert load_data("cifar10", tmp_path).meta["source"].endswith("cifar-10-batches-py")


def test_cifar_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        load_data("cifar10", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "data_batch_1..5" in str(err.value)
    empty = tmp_path / "cifar-10-batches-py"
    empty.mkdir()
    with pytest.raises(DataError, match="no CIFAR files") as err:
        load_data("cifar10", tmp_path)
    assert str(empty) in str(err.value) and "cifar10-jpeg.tar.gz" in str(err.value)
    write_cifar10(tmp_path / "x" / "cifar-10-batches-py")
    (tmp_path / "x" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="corrupt CIFAR file") as err:
        load_data("cifar10", tmp_path / "x")
    assert "data_batch_2" in str(err.value)


def test_truncated_archive_is_a_data_error(tmp_path: Path) -> None:
    archive = tar_folder(write_cifar10(tmp_path / "src" / "cifar-10-batches-py"),
                         tmp_path / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_data("cifar10", tmp_path)
    assert str(archive) in str(err.value)


# --- image folders --------------------------------------------------------------------


def make_image_tree(folder: Path, size: int = 4, split_names=("train", "test"),
                    mode: str = "RGB") -> dict[str, np.ndarray]:
    """Two classes x two images per split as PNGs; returns the pixels by relative path."""
    g, pixels = rng(1), {}
    for split in split_names:
        for cls in ("cat", "dog"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(2):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                arr = g.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(arr, mode).save(folder / split / cls / f"{i}.png")
                pixels[f"{split}/{cls}/{i}.png"] = arr
    return pixels


def test_imagefolder_dir_and_tar_give_the_same_pixels(tmp_path: Path) -> None:
    pixels = make_image_tree(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "cat" / "notes.txt").write_text("ignored")
    archive = tar_folder(tmp_path / "tree", tmp_path / "pets.tar.gz")
    from_dir = load_data("imagefolder", tmp_path, path=tmp_path / "tree")
    from_tar = load_data("imagefolder", tmp_path, path="pets.tar.gz")  # relative to root
    assert from_dir.train.classes == ["cat", "dog"] and from_dir.input_shape == (3, 4, 4)
    assert torch.equal(from_dir.train.x, from_tar.train.x)
    assert torch.equal(from_dir.test.y, from_tar.test.y)
    hwc = from_dir.train.x.permute(0, 2, 3, 1).numpy()
    for cls_index, cls in enumerate(["cat", "dog"]):
        for i in range(2):
            want = pixels[f"train/{cls}/{i}.png"]
            hits = [j for j in range(4) if np.array_equal(hwc[j], want)]
            assert len(hits) == 1 and from_dir.train.y[hits[0]] == cls_index
    assert from_tar.meta["sha256"] and archive.exists()


def test_imagefolder_val_grey_and_resize(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "tree", size=5, split_names=("train", "val"), mode="L")
    d = load_data("imagefolder", tmp_path, path=tmp_path / "tree")
    assert d.input_shape == (1, 5, 5) and len(d.test) == 4
    d = load_data("imagefolder", tmp_path, path=tmp_path / "tree", size=(3, 2))
    assert d.input_shape == (1, 3, 2)


def test_imagefolder_odd_size_and_empty_errors(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "tree", size=4)
    odd = tmp_path / "tree" / "test" / "dog" / "odd.png"
    Image.fromarray(np.zeros((6, 4, 3), np.uint8)).save(odd)
    with pytest.raises(DataError, match="size=") as err:
        load_data("imagefolder", tmp_path, path=tmp_path / "tree")
    assert "odd.png" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train images") as err:
        load_data("imagefolder", tmp_path, path=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(DataError, match="path="):
        load_data("imagefolder", tmp_path)


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    make_image_tree(tmp_path / "tree")
    (tmp_path / "tree" / "train" / "cat" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.png"):
        load_data("imagefolder", tmp_path, path=tmp_path / "tree")


# --- cache ----------------------------------------------------------------------------


def test_second_load_comes_from_the_cache(tmp_path: Path, private_cache: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    make_image_tree(tmp_path / "tree")
    archive = tar_folder(tmp_path / "tree", tmp_path / "pets.tar.gz")
    first = load_data("imagefolder", tmp_path, path=archive)
    assert cache_dir() == private_cache
    entries = list(private_cache.glob("*.npz"))
    assert len(entries) == 1 and not list(private_cache.glob("*.tmp"))

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was decoded again")

    monkeypatch.setattr(vision, "decode_image", no_decoding)
    second = load_data("imagefolder", tmp_path, path=archive)
    assert torch.equal(first.train.x, second.train.x) and first.meta == second.meta
    with pytest.raises(AssertionError, match="decoded again"):  # a new option, a new key
        load_data("imagefolder", tmp_path, path=archive, size=2)


def test_corrupt_cache_entry_is_rebuilt(tmp_path: Path, private_cache: Path) -> None:
    make_image_tree(tmp_path / "tree")
    first = load_data("imagefolder", tmp_path, path=tmp_path / "tree")
    (entry,) = private_cache.glob("*.npz")
    entry.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="unreadable cache"):
        again = load_data("imagefolder", tmp_path, path=tmp_path / "tree")
    assert torch.equal(first.train.x, again.train.x)
    assert entry.stat().st_size > 100  # rewritten


# --- SVHN, STL-10, ImageNet32, Tiny ImageNet ------------------------------------------


def test_svhn_mat(tmp_path: Path) -> None:
    from scipy.io import savemat

    (tmp_path / "svhn").mkdir()
    x = rng().integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    savemat(tmp_path / "svhn" / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [9]])})
    savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x[..., :2], "y": np.array([[2], [10]])})
    d = load_data("svhn", tmp_path)
    assert d.train.y.tolist() == [0, 1, 9] and d.test.y.tolist() == [2, 0]
    assert d.input_shape == (3, 32, 32)
    assert torch.equal(d.train.x[1], torch.from_numpy(x[..., 1].transpose(2, 0, 1).copy()))
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"junk")
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_data("svhn", tmp_path)


def test_stl10_binary_is_column_major(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = rng().integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
    for split in ("train", "test"):
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        np.array([1, 10, 4], np.uint8).tofile(folder / f"{split}_y.bin")
    d = load_data("stl10", tmp_path)
    assert torch.equal(d.train.x, torch.from_numpy(images))
    assert d.train.y.tolist() == [0, 9, 3] and d.train.classes[0] == "airplane"
    (folder / "test_X.bin").write_bytes(images.tobytes()[:1000])
    with pytest.raises(DataError, match="truncated") as err:
        load_data("stl10", tmp_path)
    assert str(folder / "test_X.bin") in str(err.value)


@pytest.mark.parametrize("split_folders", [False, True])
def test_imagenet32_npz(tmp_path: Path, split_folders: bool) -> None:
    train_dir = tmp_path / ("Imagenet32_train_npz" if split_folders else "imagenet32")
    val_dir = tmp_path / ("Imagenet32_val_npz" if split_folders else "imagenet32")
    train_dir.mkdir()
    val_dir.mkdir(exist_ok=True)
    data = rng().integers(0, 256, (2, 3072), dtype=np.uint8)
    for i, labels in ((1, [1, 2]), (2, [1, 1000])):  # 1-based; 1000 is the last class
        np.savez(train_dir / f"train_data_batch_{i}.npz", data=data, labels=labels)
    np.savez(val_dir / "val_data.npz", data=data, labels=[3, 4])
    d = load_data("imagenet32", tmp_path)
    assert d.train.y.tolist() == [0, 1, 0, 999] and d.num_classes == 1000
    assert torch.equal(d.train.x[0].reshape(-1), torch.from_numpy(data[0]))


def test_imagenet32_corrupt_npz(tmp_path: Path) -> None:
    (tmp_path / "imagenet32").mkdir()
    (tmp_path / "imagenet32" / "train_data_batch_1.npz").write_bytes(b"PK garbage")
    np.savez(tmp_path / "imagenet32" / "val_data.npz", data=np.zeros((1, 3072), np.uint8),
             labels=[1])
    with pytest.raises(DataError, match="train_data_batch_1.npz"):
        load_data("imagenet32", tmp_path)


def test_tinyimagenet_tree(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            img = Image.new("RGB" if i == 0 else "L", (64, 64), 40)  # one grey JPEG
            img.save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(wnids):
        Image.new("RGB", (64, 64), (200, 0, 0)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    d = load_data("tinyimagenet", tmp_path)
    assert d.input_shape == (3, 64, 64) and len(d.train) == 4 and len(d.test) == 2
    assert d.train.classes == wnids and sorted(d.test.y.tolist()) == [0, 1]
    assert list(Path(cache_dir()).glob("tinyimagenet-*.npz"))


# --- MNIST family ---------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    header = (0x0800 + arr.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, compress: bool) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = rng().integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], np.uint8)
    for prefix in ("train", "t10k"):
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data, name = idx_bytes(arr), f"{prefix}-{kind}-ubyte"
            if compress:
                data, name = gzip.compress(data), name + ".gz"
            (folder / name).write_bytes(data)
    return images


@pytest.mark.parametrize(("name", "compress"), [("mnist", False), ("fashion-mnist", True),
                                                ("kmnist", True)])
def test_idx_sets(tmp_path: Path, name: str, compress: bool) -> None:
    images = write_idx_set(tmp_path / name, compress)
    d = load_data(name, tmp_path)
    assert d.input_shape == (1, 28, 28) and d.test.y.tolist() == [7, 0, 9]
    assert torch.equal(d.train.x[:, 0], torch.from_numpy(images))


def test_mnist_files_directly_in_root(tmp_path: Path) -> None:
    write_idx_set(tmp_path, compress=False)
    assert len(load_data("mnist", tmp_path).train) == 3


def test_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "mnist", compress=False)
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(DataError, match="magic number") as err:
        load_data("mnist", tmp_path)
    assert str(labels) in str(err.value)
    write_idx_set(tmp_path / "m2", compress=False)
    images = tmp_path / "m2" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_data("mnist", tmp_path, path="m2")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_data("kmnist", tmp_path)


# --- embedded sets, registry ----------------------------------------------------------


def test_digits_shapes_and_split() -> None:
    d = load_data("digits")
    assert d.train.x.shape == (1437, 1, 8, 8) and d.test.x.shape == (360, 1, 8, 8)
    assert d.train.x.dtype == torch.uint8 and int(d.train.x.max()) == 255
    assert d.num_classes == 10 and set(d.test.y.tolist()) == set(range(10))
    assert torch.equal(d.test.x, load_data("digits").test.x)  # fixed split


def test_synthetic_is_learnable_by_class_means() -> None:
    d = load_data("synthetic", n_train=200, n_test=100, shape=(1, 6, 6), num_classes=3, seed=4)
    assert d.input_shape == (1, 6, 6) and d.num_classes == 3
    x_tr, x_te = d.train.x.float().flatten(1), d.test.x.float().flatten(1)
    means = torch.stack([x_tr[d.train.y == k].mean(0) for k in range(3)])
    accuracy = (torch.cdist(x_te, means).argmin(1) == d.test.y).float().mean()
    assert accuracy > 0.9


def test_registry_errors() -> None:
    assert {"cifar10", "imagefolder", "digits", "mnist"} <= set(DATASETS)
    with pytest.raises(DataError, match="choices: .*cifar10"):
        load_data("cifar11")
    with pytest.raises(DataError, match="unknown option.*n_train"):
        load_data("digits", n_train=5)


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path / "mnist", compress=True)
    monkeypatch.setenv("LOCALLEARN_DATA_DIR", str(tmp_path))
    assert load_data("mnist").meta["source"] == str(tmp_path / "mnist")


# --- batches --------------------------------------------------------------------------


def labelled_images(n: int = 23) -> ArrayData:
    x = torch.from_numpy(rng().integers(0, 256, (n, 3, 4, 4), dtype=np.uint8))
    return ArrayData(x, torch.arange(n), ["a"])


def test_batches_cover_every_sample_once_and_are_deterministic() -> None:
    data = labelled_images()

    def epoch(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [i for _, y in batches(data, 5, shuffle=True, generator=gen) for i in y.tolist()]

    assert sorted(epoch(0)) == list(range(23))
    assert epoch(0) == epoch(0) and epoch(0) != epoch(1)
    sizes = [len(y) for _, y in batches(data, 5, shuffle=False, generator=None, drop_last=True)]
    assert sizes == [5, 5, 5, 5]


def test_batches_scale_and_normalise() -> None:
    d = load_data("synthetic", n_train=64, n_test=8)
    (x, _), = batches(d.train, 64, shuffle=False, generator=None)
    assert x.dtype == torch.float32 and torch.allclose(x * 255, d.train.x.float(), atol=1e-4)
    (z, _), = batches(d.train, 64, shuffle=False, generator=None, mean=d.meta["mean"],
                      std=d.meta["std"])
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3)


def test_batches_pass_token_ids_through() -> None:
    tokens = ArrayData(torch.arange(12).view(4, 3), torch.tensor([0, 1, 0, 1]), ["n", "p"])
    (x, _), = batches(tokens, 4, shuffle=False, generator=None, device="cpu")
    assert torch.equal(x, tokens.x) and x.dtype == torch.int64
    with pytest.raises(ValueError, match="images only"):
        next(batches(tokens, 2, shuffle=False, generator=None, mean=[0.0], std=[1.0]))


def test_subset_draws_every_class_in_proportion_and_keeps_all_when_asked_for_more() -> None:
    data = ArrayData(labelled_images().x, torch.arange(23) % 3, ["a", "b", "c"])  # 8/8/7
    part = data.subset(12)
    assert len(part) == 12 and part.classes == data.classes
    assert torch.bincount(part.y).tolist() == [4, 4, 4]
    assert len(data.subset(100)) == 23


# --- the real CIFAR-10 archive ----------------------------------------------------------


def test_real_cifar10_jpeg_archive(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"no cifar10-jpeg.tar.gz in {SHARED_DATA} (the shared data folder)")
    d = load_data("cifar10", SHARED_DATA)  # decodes 60k JPEGs: about 10 s
    assert d.train.x.shape == (50000, 3, 32, 32) and d.test.x.shape == (10000, 3, 32, 32)
    assert d.train.classes[0] == "airplane" and d.train.classes[-1] == "truck"
    assert np.allclose(d.meta["mean"], [0.491, 0.482, 0.447], atol=0.002)
    assert torch.bincount(d.test.y).tolist() == [1000] * 10
    assert len(set(d.train.subset(100).y.tolist())) == 10  # fixed shuffled order
    assert len(list(private_cache.glob("imagefolder-*.npz"))) == 1
    monkeypatch.setattr(vision, "iter_members", None)  # the archive must not be read again
    assert torch.equal(load_data("cifar10", SHARED_DATA).test.x, d.test.x)
