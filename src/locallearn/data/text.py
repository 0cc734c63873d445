"""Text classification data sets: readers for the standard layouts, then token ids.

Readers return raw :class:`RawText` (texts, integer labels, class names); the
registered data sets read a train and a test split, build the tokenizer from the
*training split only* (:mod:`locallearn.data.tokenize`) and return
:class:`~locallearn.data.core.DataSplits` whose ``x`` are int64 token ids (N, max_len)
padded with 0. ``meta`` holds ``vocab`` (the encoder's JSON-able dict, to save with
the run; :func:`~locallearn.data.tokenize.encoder_from_dict` rebuilds it),
``vocab_size``, ``max_len``, ``tokenizer``, ``source`` and ``sha256``.

============  ===========================================================================
``imdb``      ``aclImdb/{train,test}/{pos,neg}/*.txt``: a folder, or inside
              ``aclImdb-text.tar.gz`` / ``aclImdb_v1.tar.gz`` (read without extracting)
``sst2``      GLUE TSV folder ``SST-2/`` with ``train.tsv``, ``dev.tsv``, ``test.tsv``
``ag_news``   ``ag_news_csv/{train,test}.csv``: class index (1-based), title, description
``dbpedia``   ``dbpedia_csv/{train,test}.csv``: class index (1-based), title, content
``csv``       any ``train.csv``/``test.csv`` pair (options pick the columns)
``textfolder`` ``train/<class>/*.txt`` and ``test/<class>/*.txt``
============  ===========================================================================

Common options: ``max_len`` (default :data:`~locallearn.data.tokenize.DEFAULT_MAX_LEN`
of the data set, else 256), ``vocab_size`` (30000), ``min_freq`` (1), ``tokenizer``
(``word`` or ``bpe``) and ``path`` (the data set's file or folder, relative to the data
root, when it is not in the standard place). Encoded arrays are cached
(:mod:`locallearn.data.cache`), keyed by the source's fingerprint and these options.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from locallearn.data import cache
from locallearn.data.core import (
    DataError,
    DataSplits,
    archive_problem,
    make_splits,
    register_dataset,
)
from locallearn.data.tokenize import (
    DEFAULT_MAX_LEN,
    TOKENIZERS,
    Vocab,
    WordTokenizer,
    build_encoder,
)

GENERIC_MAX_LEN = 256
_CACHED = ("train_x", "train_y", "test_x", "test_y", "classes", "vocab", "vocab_size")
AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
DBPEDIA_CLASSES = ["Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                   "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal",
                   "Plant", "Album", "Film", "WrittenWork"]
IMDB_ARCHIVES = ("aclImdb-text.tar.gz", "aclImdb_v1.tar.gz")
IMDB_LAYOUT = "aclImdb/{train,test}/{pos,neg}/*.txt (a folder or a .tar.gz archive)"
_IMDB_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(neg|pos)/[^/]+\.txt$")


class RawText(NamedTuple):
    """One split as read from disk: ``labels[i]`` indexes ``classes``."""

    texts: list[str]
    labels: list[int]
    classes: list[str]


# --- readers ------------------------------------------------------------------------------


def _require(path: Path, what: str, layout: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: {path} (expected layout: {layout})")
    return path


def find_imdb(root: Path) -> Path:
    """The IMDB source under ``root``: an ``aclImdb`` folder or one of the archives.

    Raises:
        DataError: if none is there (the message names the places looked at).
    """
    candidates = [root / "aclImdb", root] + [root / a for a in IMDB_ARCHIVES]
    for c in candidates:
        if c.is_file() or (c / "train" / "pos").is_dir():
            return c
    raise DataError(f"IMDB not found under {root}: looked for {root / 'aclImdb'} and "
                    f"{', '.join(IMDB_ARCHIVES)} (expected layout: {IMDB_LAYOUT})")


def read_imdb(source: Path) -> dict[str, RawText]:
    """Read both IMDB splits from an ``aclImdb`` folder or a ``.tar.gz`` holding one.

    Files are ordered by path, so a folder and its archive give the same order.
    Classes are ``["neg", "pos"]``.

    Raises:
        DataError: if the source is missing or holds no review of a split.
    """
    _require(source, "IMDB source", IMDB_LAYOUT)
    found: dict[str, list[tuple[str, int, str]]] = {"train": [], "test": []}
    classes = ["neg", "pos"]
    if source.is_file():
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    m = _IMDB_MEMBER.search(member.name)
                    if m and member.isfile():
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        found[m[1]].append((member.name, classes.index(m[2]),
                                            data.decode("utf-8", "replace")))
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"cannot read IMDB archive {source}: {archive_problem(e)} (or it "
                            "is corrupt or truncated)") from e
    else:
        for split, items in found.items():
            for label, cls in enumerate(classes):
                for f in (source / split / cls).glob("*.txt"):
                    items.append((str(f), label, f.read_text("utf-8", "replace")))
    for split, items in found.items():
        if not items:
            raise DataError(f"no IMDB {split} reviews in {source} (expected layout: {IMDB_LAYOUT})")
        items.sort()
    return {s: RawText([t for _, _, t in v], [y for _, y, _ in v], classes)
            for s, v in found.items()}


def _rows(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a delimited file with their line numbers."""
    # GLUE TSVs are not quoted: a quote there is part of the sentence
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            return [(reader.line_num, row) for row in reader if row]
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: cannot parse ({e})") from e


def _column_index(col: int | str, header: list[str] | None, path: Path, option: str) -> int:
    if isinstance(col, int):
        return col
    if header is None:
        raise DataError(f"{path}: column {col!r} ({option}) is a name but the file has no "
                        "header; give a column number or has_header=true")
    if col not in header:
        raise DataError(f"{path} has no column {col!r} ({option}); columns found: "
                        f"{', '.join(header)}")
    return header.index(col)


def _parse_label(value: str, classes: list[str] | None, label_base: int | None,
                 where: str) -> int:
    """Label index of ``value``; ``classes`` None means "not known yet" (train split)."""
    if label_base is None:
        if classes is None:
            return -1  # names: indexed after the whole split is read
        if value not in classes:
            raise DataError(f"{where}: label {value!r} out of range; allowed: {', '.join(classes)}")
        return classes.index(value)
    try:
        label = int(value) - label_base
    except ValueError:
        raise DataError(f"{where}: label {value!r} is not an integer") from None
    if label < 0 or (classes is not None and label >= len(classes)):
        top = f"{label_base + len(classes) - 1}" if classes is not None else "..."
        hint = ""
        if classes is not None and label == len(classes):  # one past the top: counted from 1?
            hint = (f" (labels counted from {label_base + 1}? set "
                    f"data.options={{label_base: {label_base + 1}}})")
        raise DataError(f"{where}: label {value} out of range; allowed {label_base}..{top}{hint}")
    return label


def read_csv(path: Path, label_column: int | str = 0,
             text_columns: Sequence[int | str] = (1,), has_header: bool = False,
             classes: Sequence[str] | None = None, label_base: int | None = None,
             delimiter: str = ",") -> RawText:
    """Read a delimited file with a label column and one or more text columns.

    Text columns are joined with a space (e.g. AG News title and description).

    Args:
        path: the ``.csv`` (or ``.tsv`` with ``delimiter="\\t"``) file.
        label_column: column number (0-based) or header name of the label.
        text_columns: column numbers or header names of the text.
        has_header: the first row names the columns.
        classes: class names; labels outside them are an error. None: taken from this
            file (sorted names, or ``label_base .. max label`` for integer labels).
        label_base: None if labels are class names; else labels are integers and
            ``label_base`` is the first class (1 for AG News and DBpedia).
        delimiter: field separator (a tab for GLUE files, which are read unquoted).

    Raises:
        DataError: for a missing or empty file, a missing column, or a label that is
            not an integer / out of range (the message names file and line).
    """
    _require(path, "data file", "a delimited text file with a label column and text columns")
    rows = _rows(path, delimiter)
    header = rows.pop(0)[1] if has_header and rows else None
    if not rows:
        raise DataError(f"{path} is empty: no data rows")
    li = _column_index(label_column, header, path, "label_column")
    ti = [_column_index(c, header, path, "text_columns") for c in text_columns]
    known = list(classes) if classes is not None else None
    texts, labels, raw = [], [], []
    need = max([li] + ti)
    for line, row in rows:
        if len(row) <= need:
            raise DataError(f"{path} line {line}: {len(row)} columns, but column {need} is "
                            "needed (label_column / text_columns)")
        texts.append(" ".join(row[i] for i in ti))
        raw.append(row[li].strip())
        labels.append(_parse_label(raw[-1], known, label_base, f"{path} line {line}"))
    if known is None:  # classes from this file: sorted names, or label_base .. max label
        if label_base is None:
            known = sorted(set(raw))
            index = {c: i for i, c in enumerate(known)}
            labels = [index[v] for v in raw]
        else:
            known = [str(label_base + i) for i in range(max(labels) + 1)]
    return RawText(texts, labels, known)


def read_glue_tsv(path: Path, text_column: str | None = None, label_column: str = "label",
                  classes: Sequence[str] = ("negative", "positive")) -> RawText:
    """Read a GLUE-style TSV with a header (columns are found by name, in any order).

    Args:
        path: the ``.tsv`` file.
        text_column: name of the text column; default the first of ``sentence``,
            ``content``, ``text`` found in the header.
        label_column: name of the label column (integer labels from 0).
        classes: class names.

    Raises:
        DataError: as :func:`read_csv`, and when no text column is found.
    """
    _require(path, "TSV file", "GLUE TSV with a header row, e.g. label<TAB>sentence")
    if text_column is None:
        with path.open(encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        found = [c for c in ("sentence", "content", "text") if c in header]
        if not found:
            raise DataError(f"{path} has no text column (sentence, content or text); columns "
                            f"found: {', '.join(header) or '(empty file)'}; pass text_column")
        text_column = found[0]
    return read_csv(path, label_column, [text_column], has_header=True, classes=classes,
                    label_base=0, delimiter="\t")


def read_text_folder(folder: Path, classes: Sequence[str] | None = None) -> RawText:
    """Read ``folder/<class>/*.txt``; classes are the sorted subfolder names.

    Raises:
        DataError: for a missing folder, no class folder, or (with ``classes``) a class
            folder that is not one of them.
    """
    layout = "<folder>/<class>/*.txt, one subfolder per class"
    _require(folder, "text folder", layout)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        raise DataError(f"{folder} has no class subfolders (expected layout: {layout})")
    known = list(classes) if classes is not None else names
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} out of range; "
                        f"allowed: {', '.join(known)}")
    texts, labels = [], []
    for name in names:
        for f in sorted((folder / name).glob("*.txt")):
            texts.append(f.read_text("utf-8", "replace"))
            labels.append(known.index(name))
    if not texts:
        raise DataError(f"{folder} holds no .txt files (expected layout: {layout})")
    return RawText(texts, labels, known)


# --- raw text to DataSplits ---------------------------------------------------------------


def encode_splits(name: str, train: RawText, test: RawText, *, max_len: int,
                  vocab_size: int = 30000, min_freq: int = 1, tokenizer: str = "word",
                  **meta: Any) -> DataSplits:
    """Fit the tokenizer on ``train`` and encode both splits as token ids.

    Args:
        name: data-set name.
        train, test: raw splits (``test`` labels must index ``train.classes``).
        max_len: sequence length (truncate / pad).
        vocab_size: maximum vocabulary size (including ``<pad>`` and ``<unk>``).
        min_freq: minimum count of a word in the training split (``word`` only).
        tokenizer: ``word`` or ``bpe``.
        **meta: extra entries for ``DataSplits.meta``.
    """
    if tokenizer == "word":  # tokenize the training texts once for vocabulary and ids
        tok = WordTokenizer()
        tokens = [tok(t) for t in train.texts]
        encoder: Any = Vocab.build(tokens, vocab_size, min_freq)
        x_train = encoder.encode_tokens(tokens, max_len)
    else:
        encoder = build_encoder(tokenizer, train.texts, vocab_size, min_freq)
        x_train = encoder.encode(train.texts, max_len)
    x_test = encoder.encode(test.texts, max_len)
    return make_splits(name, (x_train.numpy(), np.asarray(train.labels, dtype=np.int64)),
                       (x_test.numpy(), np.asarray(test.labels, dtype=np.int64)), train.classes,
                       vocab=encoder.to_dict(), vocab_size=len(encoder), max_len=max_len,
                       tokenizer=tokenizer, **meta)


def _check_text_options(max_len: int, vocab_size: int, min_freq: int, tokenizer: str) -> None:
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    for option, value, low in (("max_len", max_len, 1), ("vocab_size", vocab_size, 3),
                               ("min_freq", min_freq, 1)):
        if not isinstance(value, int) or value < low:
            raise DataError(f"option {option} must be an integer >= {low}, got {value!r}")


def fingerprint(sources: Sequence[Path]) -> str:
    """One fingerprint of the files or folders a data set is read from."""
    parts = [f"{p.name}:{cache.fingerprint(p)}" for p in sources]
    return parts[0].split(":")[1] if len(parts) == 1 else \
        hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_text_splits(name: str, sources: Sequence[Path],
                     read: Callable[[], tuple[RawText, RawText]], max_len: int | None,
                     vocab_size: int, min_freq: int, tokenizer: str,
                     read_options: dict[str, Any] | None = None) -> DataSplits:
    """Read, tokenize and encode a data set, through the cache of encoded arrays.

    Args:
        name: data-set name (its default ``max_len`` comes from ``DEFAULT_MAX_LEN``).
        sources: the files or folders read (their fingerprint keys the cache).
        read: returns the raw ``(train, test)`` splits.
        max_len, vocab_size, min_freq, tokenizer: as in :func:`encode_splits`.
        read_options: reader options that change the result (part of the cache key).

    Raises:
        DataError: for bad options, or from the readers.
    """
    max_len = max_len if max_len is not None else DEFAULT_MAX_LEN.get(name, GENERIC_MAX_LEN)
    _check_text_options(max_len, vocab_size, min_freq, tokenizer)
    options = {"max_len": max_len, "vocab_size": vocab_size, "min_freq": min_freq,
               "tokenizer": tokenizer, **(read_options or {})}
    sha = fingerprint(sources)

    def build() -> dict[str, np.ndarray]:
        train, test = read()
        s = encode_splits(name, train, test, max_len=max_len, vocab_size=vocab_size,
                          min_freq=min_freq, tokenizer=tokenizer)
        # strings go in as numpy unicode arrays: the cache stores no pickled objects
        return {"train_x": s.train.x.numpy(), "train_y": s.train.y.numpy(),
                "test_x": s.test.x.numpy(), "test_y": s.test.y.numpy(),
                "classes": np.array(s.train.classes),
                "vocab": np.array(json.dumps(s.meta["vocab"])),
                "vocab_size": np.array(s.meta["vocab_size"])}

    a = cache.cached_arrays(f"text-{name}", sha, build, _CACHED, options)
    return make_splits(name, (a["train_x"], a["train_y"]), (a["test_x"], a["test_y"]),
                       [str(c) for c in a["classes"]], vocab=json.loads(str(a["vocab"])),
                       vocab_size=int(a["vocab_size"]), max_len=max_len, tokenizer=tokenizer,
                       source=", ".join(str(p) for p in sources), sha256=sha)


def _place(root: Path, path: str | None, default: str) -> Path:
    """The data set's location: ``path`` (absolute or under ``root``) or ``root/default``."""
    return root / path if path is not None else root / default


def _shuffled(raw: RawText, seed: int = 0) -> RawText:
    """``raw`` in a fixed random order (a seeded permutation of its samples)."""
    order = np.random.default_rng(seed).permutation(len(raw.texts))
    return RawText([raw.texts[i] for i in order], [raw.labels[i] for i in order], raw.classes)


# --- registered data sets ------------------------------------------------------------------


@register_dataset("imdb", "IMDB movie reviews, 25k/25k, 2 classes (aclImdb folder or .tar.gz)")
def imdb(root: Path, path: str | None = None, max_len: int | None = None,
         vocab_size: int = 30000, min_freq: int = 1, tokenizer: str = "word") -> DataSplits:
    """IMDB from ``root/aclImdb``, ``root/aclImdb-text.tar.gz`` or ``root/aclImdb_v1.tar.gz``."""
    source = _require(root / path, "IMDB source", IMDB_LAYOUT) if path else find_imdb(root)

    def read() -> tuple[RawText, RawText]:
        splits = read_imdb(source)
        # files come sorted (all neg, then all pos): mix them so that the first N samples
        # (data.train_subset / test_subset) hold both classes
        return _shuffled(splits["train"]), _shuffled(splits["test"])

    return load_text_splits("imdb", [source], read, max_len, vocab_size, min_freq, tokenizer,
                            {"order": "shuffled"})


@register_dataset("sst2", "Stanford Sentiment Treebank, binary (GLUE SST-2 TSV folder)")
def sst2(root: Path, path: str | None = None, test_split: str = "dev",
         max_len: int | None = None, vocab_size: int = 30000, min_freq: int = 1,
         tokenizer: str = "word") -> DataSplits:
    """SST-2 from ``root/SST-2/{train,dev,test}.tsv``; the test split is ``dev`` by default.

    Raises:
        DataError: for a ``test_split`` other than ``dev``/``test`` or a missing file.
    """
    if test_split not in ("dev", "test"):
        raise DataError(f"sst2: test_split must be 'dev' or 'test', got {test_split!r}")
    folder = _require(_place(root, path, "SST-2"), "SST-2 folder",
                      "SST-2/train.tsv, dev.tsv, test.tsv (GLUE TSV with a header)")

    def read() -> tuple[RawText, RawText]:
        return read_glue_tsv(folder / "train.tsv"), read_glue_tsv(folder / f"{test_split}.tsv")

    files = [folder / "train.tsv", folder / f"{test_split}.tsv"]
    return load_text_splits("sst2", files, read, max_len, vocab_size, min_freq, tokenizer,
                            {"test_split": test_split})


def _class_names(folder: Path, default: list[str]) -> list[str]:
    names_file = folder / "classes.txt"
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text("utf-8").splitlines() if n.strip()]
        if names:
            return names
    return default


def _csv_sources(folder: Path) -> list[Path]:
    """The files a CSV data set is read from (the cache key must not cover the whole root)."""
    files = [_require(folder / f"{s}.csv", f"{s}.csv", "<folder>/train.csv and test.csv")
             for s in ("train", "test")]
    return files + [p for p in [folder / "classes.txt"] if p.is_file()]


def _indexed_csv(name: str, root: Path, path: str | None, folder_name: str,
                 default_classes: list[str], max_len: int | None, vocab_size: int,
                 min_freq: int, tokenizer: str) -> DataSplits:
    """AG News / DBpedia layout: ``train.csv``, ``test.csv`` of (class 1.., title, text)."""
    folder = _require(_place(root, path, folder_name), f"{name} folder",
                      f"{folder_name}/train.csv and test.csv: class index (1-based), title, "
                      "text; optional classes.txt")
    classes = _class_names(folder, default_classes)

    def read() -> tuple[RawText, RawText]:
        return tuple(read_csv(folder / f"{s}.csv", 0, (1, 2), classes=classes, label_base=1)
                     for s in ("train", "test"))  # type: ignore[return-value]

    return load_text_splits(name, _csv_sources(folder), read, max_len, vocab_size, min_freq, tokenizer)


@register_dataset("ag_news", "AG News topics, 120k/7.6k, 4 classes (ag_news_csv folder)")
def ag_news(root: Path, path: str | None = None, max_len: int | None = None,
            vocab_size: int = 30000, min_freq: int = 1, tokenizer: str = "word") -> DataSplits:
    """AG News from ``root/ag_news_csv/{train,test}.csv``."""
    return _indexed_csv("ag_news", root, path, "ag_news_csv", AG_NEWS_CLASSES, max_len,
                        vocab_size, min_freq, tokenizer)


@register_dataset("dbpedia", "DBpedia ontology, 560k/70k, 14 classes (dbpedia_csv folder)")
def dbpedia(root: Path, path: str | None = None, max_len: int | None = None,
            vocab_size: int = 30000, min_freq: int = 1, tokenizer: str = "word") -> DataSplits:
    """DBpedia from ``root/dbpedia_csv/{train,test}.csv``."""
    return _indexed_csv("dbpedia", root, path, "dbpedia_csv", DBPEDIA_CLASSES, max_len,
                        vocab_size, min_freq, tokenizer)


@register_dataset("csv", "any train.csv/test.csv pair with a label column and text columns")
def csv_texts(root: Path, path: str = ".", label_column: int | str = 0,
              text_columns: Sequence[int | str] = (1,), has_header: bool = False,
              label_base: int | None = None, delimiter: str = ",",
              max_len: int | None = None, vocab_size: int = 30000, min_freq: int = 1,
              tokenizer: str = "word") -> DataSplits:
    """A folder ``path`` (under ``root``) holding ``train.csv`` and ``test.csv``.

    Labels are class names unless ``label_base`` is given (integer labels, first class
    ``label_base``); classes come from the train file (or ``classes.txt`` in the folder).
    See :func:`read_csv` for the column options.
    """
    folder = _require(root / path, "CSV folder", "<path>/train.csv and <path>/test.csv")
    file_classes = _class_names(folder, [])
    if isinstance(text_columns, (str, int)):  # one column given bare, e.g. from the CLI
        text_columns = [text_columns]

    def read() -> tuple[RawText, RawText]:
        kw: dict[str, Any] = {"label_column": label_column, "text_columns": list(text_columns),
                              "has_header": has_header, "label_base": label_base,
                              "delimiter": delimiter}
        train = read_csv(folder / "train.csv", classes=file_classes or None, **kw)
        return train, read_csv(folder / "test.csv", classes=train.classes, **kw)

    options = {"label_column": label_column, "text_columns": list(text_columns),
               "has_header": has_header, "label_base": label_base, "delimiter": delimiter}
    return load_text_splits("csv", _csv_sources(folder), read, max_len, vocab_size, min_freq, tokenizer,
                            options)


@register_dataset("textfolder", "one folder per class of .txt files: train/<class>, test/<class>")
def textfolder(root: Path, path: str = ".", max_len: int | None = None,
               vocab_size: int = 30000, min_freq: int = 1, tokenizer: str = "word") -> DataSplits:
    """``path/train/<class>/*.txt`` and ``path/test/<class>/*.txt`` (``path`` under root)."""
    folder = _require(root / path, "text folder", "<path>/train/<class>/*.txt and "
                      "<path>/test/<class>/*.txt")

    def read() -> tuple[RawText, RawText]:
        train = read_text_folder(folder / "train")
        return train, read_text_folder(folder / "test", train.classes)

    sources = [_require(folder / s, f"text folder {s!r}", "<path>/train/<class>/*.txt and "
                        "<path>/test/<class>/*.txt") for s in ("train", "test")]
    return load_text_splits("textfolder", sources, read, max_len, vocab_size, min_freq,
                            tokenizer)
