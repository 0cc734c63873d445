"""Data: stratified seeded subsets for every data set, a note while a cache is built, and
one-line messages for a non-gzip archive and 1-based CSV labels."""

import logging
from pathlib import Path

import pytest
import torch

from locallearn.cli import main
from locallearn.data import ArrayData, DataError, load_data


def _class_sorted(sizes: list[int]) -> ArrayData:
    y = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    return ArrayData(torch.arange(len(y)).view(-1, 1), y, [str(c) for c in range(len(sizes))])


def test_a_subset_of_class_sorted_data_keeps_every_class_in_proportion():
    data = _class_sorted([60, 30, 10])
    part = data.subset(20)
    assert torch.bincount(part.y).tolist() == [12, 6, 2]
    assert len(set(part.x.flatten().tolist())) == 20  # no sample twice
    assert torch.equal(part.x, data.subset(20).x)  # seeded: the same every time
    assert not torch.equal(part.x, data.subset(20, seed=1).x)
    assert torch.bincount(data.subset(7).y).tolist() == [4, 2, 1]  # largest remainders
    assert len(data.subset(500)) == 100


def _text_folder(root: Path) -> None:
    for split, n in (("train", 30), ("test", 9)):
        for c in ("alpha", "beta", "gamma"):
            folder = root / "news" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i:03d}.txt").write_text(f"{c} words number {i} {c}")


def test_textfolder_subsets_hold_every_class(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    _text_folder(tmp_path)
    data = load_data("textfolder", tmp_path, path="news")
    assert data.train.y[:30].unique().tolist() == [0]  # read class by class
    assert torch.bincount(data.train.subset(12).y).tolist() == [4, 4, 4]


def test_the_first_build_of_a_cache_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    _text_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="locallearn"):
        load_data("textfolder", tmp_path, path="news")
    assert "into the cache" in caplog.text and "only this once" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="locallearn"):
        load_data("textfolder", tmp_path, path="news")
    assert "into the cache" not in caplog.text


def test_a_non_gzip_archive_is_one_line(tmp_path, tiny_cfg, monkeypatch, capsys):
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "images.tar.gz").write_bytes(b"PK\x03\x04 a zip file, not a tar" * 50)
    with pytest.raises(DataError) as e:
        load_data("imagefolder", tmp_path, path="images.tar.gz")
    assert "\n" not in str(e.value) and "not a tar archive" in str(e.value)
    assert main(["train", *tiny_cfg, "data=imagefolder", f"data.data_dir={tmp_path}",
                 "data.options={path: images.tar.gz}"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "Traceback" not in err and "images.tar.gz: it is not a tar archive" in line


def test_one_based_csv_labels_hint_at_label_base(tmp_path):
    folder = tmp_path / "tab"
    folder.mkdir()
    (folder / "classes.txt").write_text("a\nb\nc\n")
    for split in ("train", "test"):
        (folder / f"{split}.csv").write_text("".join(f"{1 + i % 3},word {i}\n" for i in range(9)))
    with pytest.raises(DataError, match=r"label 3 out of range.*data.options=\{label_base: 1\}"):
        load_data("csv", tmp_path, path="tab", label_base=0)
    assert load_data("csv", tmp_path, path="tab", label_base=1).num_classes == 3
