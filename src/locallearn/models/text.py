"""Text classifiers as block lists: an LSTM and a Transformer encoder.

Activations are :class:`~locallearn.types.Masked` ``(h, mask)``: ``h`` float (N, L, D) and ``mask`` bool (N, L),
True for a real token. The first block (the embedding) takes token ids (N, L) int64
and derives ``mask = ids != 0`` (id 0 is padding, see :mod:`locallearn.data.tokenize`);
every later block takes and returns ``(h, mask)``. Padding never changes an output
at a real position nor a pooled value: LSTM layers run on packed sequences,
Transformer layers get the mask as ``src_key_padding_mask``, and every block writes
zeros at padded positions. A sequence without any real token gives zeros, not NaN.

Heads convention: a text :class:`~locallearn.models.blocks.Backbone` has
``head="linear"`` and ``head_options={"pool": <mode>}``; the head builder
(:func:`locallearn.objectives.heads.build_head`) turns a (L, D) stage output into
``nn.Sequential(SequencePool(pool), <linear or MLP>)``.

The real tokens of a sequence must be a prefix (right padding), as the encoders in
:mod:`locallearn.data.tokenize` produce them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils import flop_counter

from locallearn.layers import POOL_MODES
from locallearn.models.blocks import Backbone, infer_shapes, register_model
from locallearn.types import Masked

POSITIONAL = ("sinusoidal", "learned")

Seq = Masked


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(dim=1)


def _embedding(vocab_size: int, dim: int, weights: torch.Tensor | None,
               freeze: bool) -> nn.Embedding:
    emb = nn.Embedding(vocab_size, dim, padding_idx=0)
    if weights is not None:
        emb.weight.data.copy_(weights)
        emb.weight.requires_grad_(not freeze)
    return emb


class TokenEmbedding(nn.Module):
    """Block 0 of the LSTM: ids (N, L) -> ``(embeddings, ids != 0)``."""

    def __init__(self, vocab_size: int, dim: int, weights: torch.Tensor | None = None,
                 freeze: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = _embedding(vocab_size, dim, weights, freeze)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> Seq:
        mask = ids != 0
        return Masked(self.drop(self.embed(ids)) * mask.unsqueeze(-1), mask)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position encodings of Vaswani et al., shape (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, :dim // 2]
    return pe


class PositionalEmbedding(nn.Module):
    """Block 0 of the Transformer: token + position embeddings, optional CLS token.

    With ``cls_token`` a learned vector is put in front of every sequence (always a
    real position), so outputs have length L + 1 and ``SequencePool("cls")`` reads it.
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, positional: str = "sinusoidal",
                 cls_token: bool = False, dropout: float = 0.0,
                 weights: torch.Tensor | None = None, freeze: bool = False) -> None:
        super().__init__()
        if positional not in POSITIONAL:
            raise ValueError(f"unknown positional encoding {positional!r}; "
                             f"choose one of: {', '.join(POSITIONAL)}")
        self.embed = _embedding(vocab_size, dim, weights, freeze)
        self.max_len = max_len + int(cls_token)
        if positional == "learned":
            self.pos = nn.Parameter(torch.randn(self.max_len, dim) * 0.02)
        else:
            self.register_buffer("pos", sinusoidal_positions(self.max_len, dim), persistent=False)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if cls_token else None
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> Seq:
        mask = ids != 0
        h = self.embed(ids)
        if self.cls is not None:
            h = torch.cat([self.cls.expand(h.shape[0], 1, -1), h], dim=1)
            mask = torch.cat([mask.new_ones(h.shape[0], 1), mask], dim=1)
        if h.shape[1] > self.max_len:
            raise ValueError(f"sequence length {h.shape[1]} exceeds the Transformer's "
                             f"max_len {self.max_len}; build the model with a larger max_len")
        h = self.drop(h + self.pos[:h.shape[1]])
        return Masked(h * mask.unsqueeze(-1), mask)


def _lstm_layer_flops(input_shape: tuple[int, ...], w_ih: tuple[int, ...],
                      w_hh: tuple[int, ...], *args: object, **kwargs: object) -> int:
    """FLOPs of one oneDNN LSTM layer: a (4H, in) and a (4H, H) product per token."""
    tokens = 1
    for s in input_shape[:-1]:  # (tokens, in) when packed, else (L, N, in) or (N, L, in)
        tokens *= s
    return 2 * tokens * (w_ih[0] * w_ih[1] + w_hh[0] * w_hh[1])


# PyTorch's FLOP counter (locallearn.measure.macs) has no formula for the CPU LSTM kernel
# and would count an LSTM layer as free; stage costs and early-exit savings need it
_MKLDNN_RNN = getattr(torch.ops.aten, "mkldnn_rnn_layer", None)
if _MKLDNN_RNN is not None and _MKLDNN_RNN not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(_MKLDNN_RNN)(_lstm_layer_flops)


class LSTMLayer(nn.Module):
    """One LSTM layer over the real tokens only (packed), zeros at padded positions."""

    def __init__(self, in_dim: int, hidden: int, bidirectional: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(in_dim, hidden, batch_first=True, bidirectional=bidirectional)

    def forward(self, x: Seq) -> Seq:
        h, mask = x
        # an empty sequence runs over one (padded) step instead; its output is masked out
        lengths = _lengths(mask).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.drop(h), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=h.shape[1])
        return Masked(out * mask.unsqueeze(-1), mask)


class TransformerLayer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` that attends to real tokens only."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float = 0.1,
                 norm_first: bool = False) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, batch_first=True,
                                                norm_first=norm_first)

    def forward(self, x: Seq) -> Seq:
        h, mask = x
        ignore = ~mask
        # a row with every key ignored makes softmax NaN: let empty rows attend to position 0
        ignore[:, 0] &= mask.any(dim=1)
        out = self.layer(h, src_key_padding_mask=ignore)
        return Masked(out * mask.unsqueeze(-1), mask)


def _seq_len(input_shape: tuple[int, ...], model: str) -> int:
    if len(input_shape) != 1:
        raise ValueError(f"model {model!r} takes token ids: input_shape must be (max_len,), "
                         f"got {input_shape}")
    return int(input_shape[0])


def _vocab_and_dim(model: str, vocab_size: int | None, dim: int | None,
                   weights: torch.Tensor | None, dim_option: str) -> tuple[int, int]:
    """Resolve the vocabulary size and embedding width from options and pretrained weights."""
    if weights is not None:
        if weights.dim() != 2:
            raise ValueError(f"model {model!r}: embedding_weights must be (vocab_size, dim), "
                             f"got shape {tuple(weights.shape)}")
        if vocab_size is not None and vocab_size != weights.shape[0]:
            raise ValueError(f"model {model!r}: vocab_size={vocab_size} but embedding_weights "
                             f"has {weights.shape[0]} rows")
        if dim is not None and dim != weights.shape[1]:
            raise ValueError(f"model {model!r}: {dim_option}={dim} but embedding_weights has "
                             f"{weights.shape[1]} columns")
        return int(weights.shape[0]), int(weights.shape[1])
    if vocab_size is None:
        raise ValueError(f"model {model!r} needs the option vocab_size "
                         "(the data set's meta['vocab_size'])")
    return int(vocab_size), int(dim if dim is not None else 300)


def _backbone(name: str, blocks: list[nn.Module], length: int, num_classes: int,
              pool: str) -> Backbone:
    if pool not in POOL_MODES:
        raise ValueError(f"model {name!r}: unknown pool {pool!r}; "
                         f"choose one of: {', '.join(POOL_MODES)}")
    shapes = infer_shapes(blocks, (length,), sample=torch.ones(2, length, dtype=torch.long))
    return Backbone(name, blocks, shapes, num_classes, head="linear",
                    head_options={"pool": pool})


@register_model("lstm", "LSTM text classifier: embedding block + one block per LSTM layer")
def lstm(input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None = None,
         embed_dim: int | None = None, hidden: int = 300, layers: int = 4,
         bidirectional: bool = False, dropout: float = 0.0,
         embedding_weights: torch.Tensor | None = None, freeze_embedding: bool = False,
         pool: str = "mean") -> Backbone:
    """Build the LSTM classifier: ``1 + layers`` blocks.

    Args:
        input_shape: ``(max_len,)``.
        num_classes: number of classes.
        vocab_size: number of token ids (required unless ``embedding_weights`` is given).
        embed_dim: embedding width (default 300, or the width of ``embedding_weights``).
        hidden: LSTM hidden size per direction.
        layers: number of LSTM layers (one block each).
        bidirectional: run each layer in both directions (output width ``2 * hidden``).
        dropout: dropout on the embeddings and on each LSTM layer's input.
        embedding_weights: pretrained (vocab_size, embed_dim) vectors, e.g. from
            :func:`locallearn.data.tokenize.load_glove`.
        freeze_embedding: keep ``embedding_weights`` fixed.
        pool: sequence pooling of the heads (see :class:`SequencePool`).

    Raises:
        ValueError: for a missing ``vocab_size``, a bad ``input_shape`` or inconsistent
            sizes.
    """
    length = _seq_len(input_shape, "lstm")
    vocab_size, embed_dim = _vocab_and_dim("lstm", vocab_size, embed_dim, embedding_weights,
                                           "embed_dim")
    if layers < 1:
        raise ValueError(f"model 'lstm': layers must be >= 1, got {layers}")
    blocks: list[nn.Module] = [TokenEmbedding(vocab_size, embed_dim, embedding_weights,
                                              freeze_embedding, dropout)]
    width = embed_dim
    for i in range(layers):
        blocks.append(LSTMLayer(width, hidden, bidirectional, dropout if i > 0 else 0.0))
        width = hidden * (2 if bidirectional else 1)
    return _backbone("lstm", blocks, length, num_classes, pool)


@register_model("transformer", "Transformer encoder text classifier: embedding + one block "
                               "per encoder layer")
def transformer(input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None = None,
                dim: int | None = None, heads: int = 4, ff: int = 1024, layers: int = 4,
                dropout: float = 0.1, max_len: int | None = None,
                positional: str = "sinusoidal", cls_token: bool = False,
                norm_first: bool = False, embedding_weights: torch.Tensor | None = None,
                freeze_embedding: bool = False, pool: str | None = None) -> Backbone:
    """Build the Transformer encoder classifier: ``1 + layers`` blocks.

    Args:
        input_shape: ``(L,)``, the data set's sequence length.
        num_classes: number of classes.
        vocab_size: number of token ids (required unless ``embedding_weights`` is given).
        dim: model width (default 300, or the width of ``embedding_weights``).
        heads: attention heads; must divide ``dim``.
        ff: width of the feed-forward sublayer.
        layers: number of encoder layers (one block each).
        dropout: dropout of the embedding and of every encoder layer.
        max_len: longest sequence the positions cover (default ``L``).
        positional: ``sinusoidal`` (fixed) or ``learned`` position embeddings.
        cls_token: put a learned CLS vector in front of every sequence.
        norm_first: pre-LayerNorm encoder layers (often steadier to train).
        embedding_weights: pretrained (vocab_size, dim) token vectors.
        freeze_embedding: keep ``embedding_weights`` fixed.
        pool: sequence pooling of the heads (default ``cls`` with a CLS token, else
            ``mean``).

    Raises:
        ValueError: for a missing ``vocab_size``, ``heads`` not dividing ``dim``, or
            other inconsistent sizes.
    """
    length = _seq_len(input_shape, "transformer")
    vocab_size, dim = _vocab_and_dim("transformer", vocab_size, dim, embedding_weights, "dim")
    if dim % heads:
        raise ValueError(f"model 'transformer': heads={heads} must divide dim={dim}; "
                         "change heads or dim")
    if layers < 1:
        raise ValueError(f"model 'transformer': layers must be >= 1, got {layers}")
    max_len = max_len if max_len is not None else length
    if max_len < length:
        raise ValueError(f"model 'transformer': max_len={max_len} is shorter than the "
                         f"input length {length}")
    blocks: list[nn.Module] = [PositionalEmbedding(vocab_size, dim, max_len, positional,
                                                   cls_token, dropout, embedding_weights,
                                                   freeze_embedding)]
    blocks += [TransformerLayer(dim, heads, ff, dropout, norm_first) for _ in range(layers)]
    return _backbone("transformer", blocks, length, num_classes,
                     pool or ("cls" if cls_token else "mean"))
