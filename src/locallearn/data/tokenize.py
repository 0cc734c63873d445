"""Text to token ids: a word tokenizer with a vocabulary, an optional subword tokenizer.

Both encoders turn a list of texts into an int64 tensor (N, max_len), truncated and
right-padded with id 0 (``<pad>``); id 1 is ``<unk>``. Text models derive their mask
as ``ids != 0``, so id 0 must only ever mean padding.

An encoder is built from the *training split only* and saved with the run as JSON
(:meth:`Vocab.to_dict` / :func:`encoder_from_dict`), so test data and later
predictions are encoded exactly as during training.

========  =====================================================================
``word``  :class:`WordTokenizer` + :class:`Vocab` (most frequent words)
``bpe``   :class:`SubwordEncoder`: byte-pair encoding trained with Hugging Face
          ``tokenizers`` (``pip install tokenizers``)
========  =====================================================================
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1

#: Maximum sequence lengths per data set, as in the SCPL papers.
DEFAULT_MAX_LEN: dict[str, int] = {"sst2": 15, "ag_news": 60, "imdb": 350, "dbpedia": 400}

TOKENIZERS = ("word", "bpe")

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)  # IMDB reviews keep their HTML line breaks
# a word (with inner apostrophes: "don't"), a clitic ("'ve" as SST-2 splits it), or one
# punctuation character
_TOKEN = re.compile(r"\w+(?:'\w+)*|'\w+|[^\w\s]")


class TextEncoder(Protocol):
    """What data sets need from a tokenizer: texts in, padded id tensor out."""

    kind: str

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


class WordTokenizer:
    """Lowercase, drop ``<br />`` breaks, split into words and punctuation marks."""

    def __call__(self, text: str) -> list[str]:
        return _TOKEN.findall(_BREAK.sub(" ", text).lower())


def pad_batch(id_lists: Iterable[Sequence[int]], max_len: int) -> torch.Tensor:
    """Truncate each id list to ``max_len`` and right-pad with :data:`PAD_ID`."""
    rows = [ids[:max_len] for ids in id_lists]
    return _scatter(rows, list(chain.from_iterable(rows)), max_len)


def _scatter(rows: Sequence[Sequence[Any]], flat_ids: list[int], max_len: int) -> torch.Tensor:
    """Place ``flat_ids`` (the rows' ids one after another) at the start of each row."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), max_len), PAD_ID, dtype=np.int64)
    # one vectorized write instead of a numpy call per row (25k IMDB reviews)
    out[np.arange(max_len) < lengths[:, None]] = flat_ids
    return torch.from_numpy(out)


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")


class Vocab:
    """Word vocabulary: ``itos[i]`` is the word of id ``i``; ids 0/1 are pad/unk.

    Build it with :meth:`build` (or :meth:`from_texts`) on the training split.
    """

    kind = "word"

    def __init__(self, itos: Sequence[str]) -> None:
        if list(itos[:2]) != [PAD, UNK]:
            raise ValueError(f"a vocabulary must start with {PAD!r}, {UNK!r}; got {list(itos[:2])}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.tokenizer = WordTokenizer()

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], max_size: int = 30000,
              min_freq: int = 1) -> Vocab:
        """Keep the most frequent tokens.

        Args:
            token_lists: tokenized training texts.
            max_size: size of the vocabulary including ``<pad>`` and ``<unk>``.
            min_freq: tokens seen fewer times are left out (they become ``<unk>``).

        Raises:
            ValueError: if ``max_size < 3`` or ``min_freq < 1``.
        """
        if max_size < 3 or min_freq < 1:
            raise ValueError(f"need vocab_size >= 3 and min_freq >= 1, got {max_size}, {min_freq}")
        counts = Counter(chain.from_iterable(token_lists))
        for special in (PAD, UNK):
            counts.pop(special, None)
        # ties are broken alphabetically so the vocabulary does not depend on text order
        kept = sorted((w for w, c in counts.items() if c >= min_freq),
                      key=lambda w: (-counts[w], w))
        return cls([PAD, UNK] + kept[:max_size - 2])

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_size: int = 30000, min_freq: int = 1) -> Vocab:
        """:meth:`build` on texts tokenized with :class:`WordTokenizer`."""
        tok = WordTokenizer()
        return cls.build((tok(t) for t in texts), max_size, min_freq)

    def __len__(self) -> int:
        return len(self.itos)

    def lookup(self, tokens: Sequence[str]) -> list[int]:
        """Ids of ``tokens`` (unknown words get :data:`UNK_ID`)."""
        get = self.stoi.get
        return [get(t, UNK_ID) for t in tokens]

    def encode_tokens(self, token_lists: Iterable[Sequence[str]], max_len: int) -> torch.Tensor:
        """Encode tokenized texts as an int64 tensor (N, max_len), truncated and padded."""
        _check_max_len(max_len)
        rows = [t[:max_len] for t in token_lists]
        flat = list(map(self.stoi.get, chain.from_iterable(rows), repeat(UNK_ID)))
        return _scatter(rows, flat, max_len)

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Tokenize and encode raw texts as an int64 tensor (N, max_len)."""
        return self.encode_tokens((self.tokenizer(t) for t in texts), max_len)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``, padding dropped."""
        return [self.itos[i] for i in ids if i != PAD_ID]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (see :func:`encoder_from_dict`)."""
        return {"kind": self.kind, "itos": self.itos}

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Read a vocabulary written by :meth:`save`."""
        enc = load_encoder(path)
        if isinstance(enc, Vocab):
            return enc
        raise ValueError(f"{path} holds a {enc.kind!r} tokenizer, not a word vocabulary")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("the 'bpe' tokenizer needs Hugging Face tokenizers: "
                          "pip install tokenizers") from e
    return tokenizers


class SubwordEncoder:
    """Byte-pair encoding from Hugging Face ``tokenizers``, trained offline on texts.

    Normalization matches :class:`WordTokenizer` (lowercase, ``<br />`` removed);
    ``<pad>`` is id 0 and ``<unk>`` id 1 as for words.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 30000,
              min_freq: int = 1) -> SubwordEncoder:
        """Learn a BPE vocabulary of at most ``vocab_size`` entries from ``texts``."""
        tk = _import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE(unk_token=UNK))
        tok.normalizer = tk.normalizers.Sequence([
            tk.normalizers.Replace(tk.Regex(_BREAK.pattern), " "), tk.normalizers.Lowercase()])
        tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_freq,
                                         special_tokens=[PAD, UNK], show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: Sequence[str], max_len: int) -> torch.Tensor:
        """Encode raw texts as an int64 tensor (N, max_len), truncated and padded."""
        _check_max_len(max_len)
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return pad_batch((e.ids for e in encodings), max_len)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Subword pieces of ``ids``, padding dropped."""
        return [self.tokenizer.id_to_token(i) for i in ids if i != PAD_ID]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (see :func:`encoder_from_dict`)."""
        return {"kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())}

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")


def build_encoder(kind: str, texts: Sequence[str], vocab_size: int = 30000,
                  min_freq: int = 1) -> TextEncoder:
    """Fit a ``word`` or ``bpe`` encoder on (training) texts.

    Raises:
        ValueError: for an unknown ``kind`` (the message lists the choices).
    """
    if kind == "word":
        return Vocab.from_texts(texts, vocab_size, min_freq)
    if kind == "bpe":
        return SubwordEncoder.train(texts, vocab_size, min_freq)
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TOKENIZERS)}")


def encoder_from_dict(d: dict[str, Any]) -> TextEncoder:
    """Rebuild an encoder from its :meth:`to_dict` description."""
    kind = d.get("kind")
    if kind == "word":
        return Vocab(d["itos"])
    if kind == "bpe":
        tk = _import_tokenizers()
        return SubwordEncoder(tk.Tokenizer.from_str(json.dumps(d["tokenizer"])))
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of: {', '.join(TOKENIZERS)}")


def load_encoder(path: str | Path) -> TextEncoder:
    """Read an encoder saved as JSON by ``save``."""
    return encoder_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def load_glove(path: str | Path, vocab: Vocab | Sequence[str], seed: int = 0) -> torch.Tensor:
    """Embedding matrix for ``vocab`` from a GloVe-format text file.

    Each line of the file is a word followed by its vector's numbers, separated by
    spaces. Words of the vocabulary missing from the file get small random vectors
    (std 0.1, seeded by ``seed``); ``<pad>`` gets zeros.

    Args:
        path: the vectors file, e.g. ``glove.6B.300d.txt``.
        vocab: a :class:`Vocab` or the list of its words (id order).
        seed: seed for the vectors of missing words.

    Returns:
        A float tensor (len(vocab), dim), for the models' ``embedding_weights`` option.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is empty or its lines have different dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe vectors file not found: {path}")
    itos = vocab.itos if isinstance(vocab, Vocab) else list(vocab)
    stoi = {w: i for i, w in enumerate(itos)}
    found: dict[int, list[float]] = {}
    dim = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or (n == 1 and len(line.split()) == 2):
                continue  # blank line, or the "count dim" header of word2vec text files
            dim = dim or len(line.split()) - 1
            # split from the right: a few GloVe words contain spaces
            parts = line.rstrip().rsplit(" ", dim)
            i = stoi.get(parts[0])
            if i is None:
                continue
            try:
                found[i] = [float(v) for v in parts[1:]]
            except ValueError:
                found[i] = []
            if len(found[i]) != dim:
                raise ValueError(f"{path} line {n}: expected a word and {dim} numbers")
    if not dim:
        raise ValueError(f"GloVe vectors file is empty: {path}")
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(itos), dim, generator=gen) * 0.1
    for i, vec in found.items():
        weights[i] = torch.tensor(vec)
    weights[PAD_ID] = 0.0
    return weights
