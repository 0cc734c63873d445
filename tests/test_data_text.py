"""Text data: readers on small files written here, tokenizers, vocabularies, errors."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from locallearn.data import text as _text  # noqa: F401  (registers the text data sets)
from locallearn.data.core import DataError, load_data
from locallearn.data.text import read_csv, read_glue_tsv, read_imdb
from locallearn.data.tokenize import (
    DEFAULT_MAX_LEN,
    Vocab,
    WordTokenizer,
    build_encoder,
    encoder_from_dict,
    load_encoder,
    load_glove,
)

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALLEARN_CACHE_DIR", str(tmp_path / "cache"))


# --- helpers that write small data sets -------------------------------------------------

REVIEWS = {
    ("train", "pos"): ["A great film.<br /><br />Loved it", "great acting , great story"],
    ("train", "neg"): ["Awful. Just awful", "boring and too long"],
    ("test", "pos"): ["great fun"],
    ("test", "neg"): ["awful plot , unknownword"],
}


def write_imdb(root: Path) -> Path:
    for (split, cls), texts in REVIEWS.items():
        folder = root / "aclImdb" / split / cls
        folder.mkdir(parents=True)
        for i, t in enumerate(texts):
            (folder / f"{i}_7.txt").write_text(t, encoding="utf-8")
    return root / "aclImdb"


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


AG_TRAIN = ('"3","Wall St. Bears","Short-sellers, Wall Street\'s dwindling band"\n'
            '"4","New chip","Intel, the chip maker, said ..."\n'
            '"2","Final","The team won the final"\n')
AG_TEST = '"1","Talks","Leaders meet in Geneva"\n'


# --- tokenizer and vocabulary -----------------------------------------------------------


def test_word_tokenizer() -> None:
    tok = WordTokenizer()
    assert tok("It's GREAT!<br /><br />Don't miss it") == \
        ["it's", "great", "!", "don't", "miss", "it"]
    assert tok("you 've seen it , right ?") == ["you", "'ve", "seen", "it", ",", "right", "?"]


def test_vocab_min_freq_and_max_size() -> None:
    tokens = [["b", "a", "a", "c"], ["a", "b", "d"]]
    vocab = Vocab.build(tokens, max_size=10, min_freq=2)
    assert vocab.itos == ["<pad>", "<unk>", "a", "b"]
    assert Vocab.build(tokens, max_size=4).itos == ["<pad>", "<unk>", "a", "b"]
    # ties broken alphabetically, independent of the order of texts
    assert Vocab.build(tokens[::-1]).itos == Vocab.build(tokens).itos == \
        ["<pad>", "<unk>", "a", "b", "c", "d"]
    with pytest.raises(ValueError, match="min_freq >= 1"):
        Vocab.build(tokens, min_freq=0)


def test_encode_truncates_pads_and_round_trips(tmp_path: Path) -> None:
    vocab = Vocab.from_texts(["the cat sat", "the dog"])
    x = vocab.encode(["the cat sat on the mat", "dog", ""], max_len=4)
    assert x.dtype == torch.int64 and x.shape == (3, 4)
    assert vocab.decode(x[0].tolist()) == ["the", "cat", "sat", "<unk>"]
    assert x[1].tolist() == [vocab.stoi["dog"], 0, 0, 0] and x[2].tolist() == [0, 0, 0, 0]
    vocab.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json")
    assert again.itos == vocab.itos
    assert torch.equal(encoder_from_dict(vocab.to_dict()).encode(["the cat"], 3),
                       vocab.encode(["the cat"], 3))
    with pytest.raises(ValueError, match="max_len must be a positive integer"):
        vocab.encode(["a"], 0)


def test_bpe_encoder_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers", reason="the bpe tokenizer needs `pip install tokenizers`")
    texts = ["the cat sat on the mat", "the dog ate the cat food"] * 5
    enc = build_encoder("bpe", texts, vocab_size=60)
    assert len(enc) <= 60 and enc.decode([1]) == ["<unk>"]
    x = enc.encode(["the cat<br />sat", "THE DOG"], max_len=12)
    assert x.shape == (2, 12) and (x[:, -1] == 0).all() and (x[:, 0] > 1).all()
    enc.save(tmp_path / "bpe.json")
    assert torch.equal(load_encoder(tmp_path / "bpe.json").encode(["the cat"], 5),
                       enc.encode(["the cat"], 5))
    with pytest.raises(ValueError, match="not a word vocabulary"):
        Vocab.load(tmp_path / "bpe.json")


def test_load_glove(tmp_path: Path) -> None:
    path = write(tmp_path / "vec.txt", "2 3\nthe 1 2 3\ncat 0.5 0 -1\nzebra 9 9 9\n")
    vocab = Vocab(["<pad>", "<unk>", "the", "cat", "dog"])
    w = load_glove(path, vocab)
    assert w.shape == (5, 3)
    assert w[2].tolist() == [1, 2, 3] and w[3].tolist() == [0.5, 0, -1]
    assert (w[0] == 0).all() and w[4].abs().max() < 1
    with pytest.raises(FileNotFoundError, match="GloVe vectors file not found"):
        load_glove(tmp_path / "missing.txt", vocab)
    with pytest.raises(ValueError, match="line 2: expected a word and 3 numbers"):
        load_glove(write(tmp_path / "bad.txt", "cat 1 2 3\nthe 1 2\n"), vocab)


def test_default_max_lengths() -> None:
    assert DEFAULT_MAX_LEN == {"sst2": 15, "ag_news": 60, "imdb": 350, "dbpedia": 400}


# --- readers and registered data sets ---------------------------------------------------


def test_imdb_folder_and_archive_agree(tmp_path: Path) -> None:
    folder = write_imdb(tmp_path / "dir")
    raw = read_imdb(folder)
    assert raw["train"].classes == ["neg", "pos"] and raw["train"].labels == [0, 0, 1, 1]
    (tmp_path / "tar").mkdir()
    with tarfile.open(tmp_path / "tar" / "aclImdb-text.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="aclImdb")
    from_dir = load_data("imdb", tmp_path / "dir", max_len=6)
    from_tar = load_data("imdb", tmp_path / "tar", max_len=6)
    assert from_dir.train.x.shape == (4, 6) and from_dir.test.x.shape == (2, 6)
    for a, b in ((from_dir.train, from_tar.train), (from_dir.test, from_tar.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    vocab = encoder_from_dict(from_dir.meta["vocab"])
    assert "<br" not in vocab.itos and "great" in vocab.itos  # type: ignore[attr-defined]
    assert from_dir.meta["vocab_size"] == len(vocab) and from_dir.meta["max_len"] == 6
    # the vocabulary comes from the training split only
    assert "unknownword" not in vocab.itos  # type: ignore[attr-defined]
    assert from_dir.input_shape == (6,) and from_dir.num_classes == 2


def test_imdb_missing_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"IMDB not found under .*aclImdb/\{train,test\}"):
        load_data("imdb", tmp_path)


def test_sst2_columns_found_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "SST-2"
    write(folder / "train.tsv", "sentence\tlabel\nit 's a \"charming\" film\t1\ndull\t0\n")
    write(folder / "dev.tsv", "label\tsentence\n1\tcharming\n")
    write(folder / "test.tsv", "label\tcontent\n0\tdull , dull\n1\tfilm\n")
    raw = read_glue_tsv(folder / "train.tsv")
    assert raw.texts == ['it \'s a "charming" film', "dull"] and raw.labels == [1, 0]
    data = load_data("sst2", tmp_path)
    assert data.train.x.shape == (2, 15) and data.test.y.tolist() == [1]
    assert data.train.classes == ["negative", "positive"]
    test = load_data("sst2", tmp_path, test_split="test", max_len=4)
    assert test.test.y.tolist() == [0, 1] and test.test.x.shape == (2, 4)
    with pytest.raises(DataError, match="test_split must be 'dev' or 'test'"):
        load_data("sst2", tmp_path, test_split="val")


def test_ag_news_csv(tmp_path: Path) -> None:
    folder = tmp_path / "ag_news_csv"
    write(folder / "train.csv", AG_TRAIN)
    write(folder / "test.csv", AG_TEST)
    raw = read_csv(folder / "train.csv", 0, (1, 2), label_base=1,
                   classes=["World", "Sports", "Business", "Sci/Tech"])
    assert raw.labels == [2, 3, 1]
    assert raw.texts[0] == "Wall St. Bears Short-sellers, Wall Street's dwindling band"
    data = load_data("ag_news", tmp_path)
    assert data.train.classes == ["World", "Sports", "Business", "Sci/Tech"]
    assert data.train.x.shape == (3, 60) and data.test.y.tolist() == [0]
    write(folder / "classes.txt", "W\nS\nB\nT\n")
    assert load_data("ag_news", tmp_path).train.classes == ["W", "S", "B", "T"]


def test_label_out_of_range_names_file_line_and_range(tmp_path: Path) -> None:
    folder = tmp_path / "ag_news_csv"
    write(folder / "train.csv", AG_TRAIN + '"5","Oops","bad label"\n')
    write(folder / "test.csv", AG_TEST)
    with pytest.raises(DataError, match=r"train\.csv line 4: label 5 out of range; allowed 1\.\.4"):
        load_data("ag_news", tmp_path)


def test_generic_csv_with_header_and_names(tmp_path: Path) -> None:
    write(tmp_path / "d" / "train.csv", "text,topic,extra\nhello world,greet,x\nbye,leave,y\n")
    write(tmp_path / "d" / "test.csv", "text,topic,extra\nhello,greet,z\n")
    data = load_data("csv", tmp_path, path="d", label_column="topic", text_columns="text",
                     has_header=True, max_len=3)
    assert data.train.classes == ["greet", "leave"] and data.train.y.tolist() == [0, 1]
    assert data.test.y.tolist() == [0]
    with pytest.raises(DataError, match="no column 'body' .*columns found: text, topic, extra"):
        load_data("csv", tmp_path, path="d", label_column="topic", text_columns=["body"],
                  has_header=True)
    write(tmp_path / "e" / "train.csv", "hello,greet\n")
    write(tmp_path / "e" / "test.csv", "bye,leave\n")
    with pytest.raises(DataError, match=r"test\.csv line 1: label 'leave' out of range; "
                                        "allowed: greet"):
        load_data("csv", tmp_path, path="e", label_column=1, text_columns=[0])
    with pytest.raises(DataError, match=r"line 1: 2 columns, but column 2 is needed"):
        load_data("csv", tmp_path, path="e", label_column=1, text_columns=[0, 2])


def test_empty_file(tmp_path: Path) -> None:
    write(tmp_path / "SST-2" / "train.tsv", "label\tsentence\n")
    write(tmp_path / "SST-2" / "dev.tsv", "label\tsentence\n1\tgood\n")
    with pytest.raises(DataError, match=r"train\.tsv is empty"):
        load_data("sst2", tmp_path)
    write(tmp_path / "c" / "train.csv", "")
    write(tmp_path / "c" / "test.csv", "")
    with pytest.raises(DataError, match=r"train\.csv is empty"):
        load_data("csv", tmp_path, path="c")


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"SST-2 folder not found: .*SST-2.*train\.tsv"):
        load_data("sst2", tmp_path)
    with pytest.raises(DataError, match=r"dbpedia folder not found: .*dbpedia_csv.*1-based"):
        load_data("dbpedia", tmp_path)
    with pytest.raises(DataError, match="no text column .*columns found: label, id"):
        read_glue_tsv(write(tmp_path / "x.tsv", "label\tid\n1\t2\n"))


def test_text_folder(tmp_path: Path) -> None:
    for split, cls, t in [("train", "sports", "goal !"), ("train", "tech", "new chip"),
                          ("train", "tech", "chip chip"), ("test", "tech", "chip")]:
        write(tmp_path / "tf" / split / cls / f"{len(t)}.txt", t)
    data = load_data("textfolder", tmp_path, path="tf", max_len=5, min_freq=2)
    assert data.train.classes == ["sports", "tech"] and data.train.y.tolist() == [0, 1, 1]
    assert data.meta["vocab"]["itos"] == ["<pad>", "<unk>", "chip"]
    write(tmp_path / "tf" / "test" / "music" / "a.txt", "la la")
    with pytest.raises(DataError, match="class folder.* music out of range; allowed: sports, tech"):
        load_data("textfolder", tmp_path, path="tf")


def test_bad_options_and_cache(tmp_path: Path) -> None:
    write_imdb(tmp_path)
    with pytest.raises(DataError, match="unknown tokenizer 'chars'"):
        load_data("imdb", tmp_path, tokenizer="chars")
    with pytest.raises(DataError, match="vocab_size must be an integer >= 3"):
        load_data("imdb", tmp_path, vocab_size=1)
    first = load_data("imdb", tmp_path, max_len=5)
    assert len(list((tmp_path / "cache").glob("text-imdb-*.npz"))) == 1
    again = load_data("imdb", tmp_path, max_len=5)
    assert torch.equal(first.train.x, again.train.x) and again.meta["vocab"] == first.meta["vocab"]
    assert again.meta["vocab_size"] == first.meta["vocab_size"]


def test_real_sst2() -> None:
    if not (SHARED_DATA / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"real SST-2 not found at {SHARED_DATA / 'SST-2'}")
    data = load_data("sst2", SHARED_DATA)
    assert len(data.train) == 67349 and len(data.test) == 872
    assert data.train.x.shape == (67349, 15) and data.train.y.unique().tolist() == [0, 1]
