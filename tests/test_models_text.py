"""Text models: block shapes, padding masks, sequence pooling and option errors."""

from __future__ import annotations

import pytest
import torch

from locallearn.layers import POOL_MODES, SequencePool
from locallearn.models.blocks import build_model
from locallearn.models.text import lstm, transformer

torch.set_num_threads(1)

VOCAB, LENGTH = 40, 9
CONFIGS = {
    "lstm": {"name": "lstm", "embed_dim": 8, "hidden": 6, "layers": 2},
    "bilstm": {"name": "lstm", "embed_dim": 8, "hidden": 6, "layers": 2, "bidirectional": True},
    "transformer": {"name": "transformer", "dim": 8, "heads": 2, "ff": 16, "layers": 2},
    "transformer_cls": {"name": "transformer", "dim": 8, "heads": 2, "ff": 16, "layers": 2,
                        "cls_token": True, "positional": "learned"},
}


def _build(key: str, length: int = LENGTH):
    opts = dict(CONFIGS[key])
    name = opts.pop("name")
    return build_model(name, (length,), 3, vocab_size=VOCAB, **opts)


def _ids(length: int = LENGTH) -> torch.Tensor:
    """Four right-padded sequences: lengths 9, 5, 1 and 0 (all padding)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (4, length), generator=g)
    for row, n in enumerate((length, 5, 1, 0)):
        ids[row, n:] = 0
    return ids


def _run(blocks, x):
    """Outputs of every block, in eval mode (no dropout)."""
    outs = []
    for block in blocks:
        block.eval()
        x = block(x)
        outs.append(x)
    return outs


def _assert_same_at_real(a, b) -> None:
    (ha, ma), (hb, mb) = a, b
    assert torch.equal(ma, mb)
    torch.testing.assert_close(ha[ma], hb[mb], rtol=0, atol=1e-5)
    for mode in POOL_MODES:
        torch.testing.assert_close(SequencePool(mode)(a), SequencePool(mode)(b), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_shapes_match_outputs(key: str) -> None:
    torch.manual_seed(0)
    model = _build(key)
    outs = _run(model.blocks, _ids())
    assert len(model.blocks) == 3 and len(model.shapes) == 4
    assert model.shapes[0] == (LENGTH,)
    for shape, (h, mask) in zip(model.shapes[1:], outs):
        assert tuple(h.shape[1:]) == shape and mask.shape == h.shape[:2]
    assert model.head == "linear" and model.head_options["pool"] in POOL_MODES


@pytest.mark.parametrize("key", list(CONFIGS))
def test_padding_content_never_reaches_real_positions(key: str) -> None:
    torch.manual_seed(0)
    model = _build(key)
    ids = _ids()
    ref = _run(model.blocks, ids)
    # every later block: noise at padded positions of its input changes nothing real
    for i in range(1, len(model.blocks)):
        h, mask = ref[i - 1]
        noisy = h + 5 * torch.randn_like(h) * (~mask).unsqueeze(-1)
        _assert_same_at_real(model.blocks[i]((noisy, mask)), ref[i])
    # the pad embedding itself: outputs of all blocks unchanged
    with torch.no_grad():
        model.blocks[0].embed.weight[0] = 3.0
    for a, b in zip(_run(model.blocks, ids), ref):
        _assert_same_at_real(a, b)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_extra_padding_changes_nothing(key: str) -> None:
    torch.manual_seed(0)
    model = _build(key, length=LENGTH + 4)
    ids = _ids()
    longer = torch.cat([ids, torch.zeros(4, 4, dtype=torch.long)], dim=1)
    short, long = _run(model.blocks, ids)[-1], _run(model.blocks, longer)[-1]
    n = short[0].shape[1]
    _assert_same_at_real(short, (long[0][:, :n], long[1][:, :n]))


@pytest.mark.parametrize("key", list(CONFIGS))
def test_empty_sequence_is_finite_with_finite_gradients(key: str) -> None:
    torch.manual_seed(0)
    model = _build(key)
    x = _ids()
    for block in model.blocks:
        x = block(x)  # train mode: dropout on
    pooled = SequencePool("mean")(x)
    assert torch.isfinite(pooled).all()
    pooled.sum().backward()
    for p in (p for b in model.blocks for p in b.parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_sequence_pool_modes() -> None:
    h = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    x = (h, mask)
    torch.testing.assert_close(SequencePool("mean")(x)[0], h[0, :2].mean(0))
    torch.testing.assert_close(SequencePool("last")(x)[0], h[0, 1])
    torch.testing.assert_close(SequencePool("cls")(x)[0], h[0, 0])
    torch.testing.assert_close(SequencePool("bilast")(x)[0], torch.cat([h[0, 1, :2], h[0, 0, 2:]]))
    for mode in POOL_MODES:  # no real token: zeros
        assert torch.equal(SequencePool(mode)(x)[1], torch.zeros(4))
    with pytest.raises(ValueError, match="choose one of: mean"):
        SequencePool("max")


def test_bidirectional_last_state_summarizes_both_directions() -> None:
    torch.manual_seed(0)
    model = _build("bilstm")
    ids = _ids()
    ref = SequencePool("bilast")(_run(model.blocks, ids)[-1])
    changed = ids.clone()
    changed[1, 0] = 1  # the first token of a sequence: the forward final state sees it
    out = SequencePool("bilast")(_run(model.blocks, changed)[-1])
    assert not torch.allclose(out[1, :6], ref[1, :6]) and not torch.allclose(out[1, 6:], ref[1, 6:])


def test_pretrained_embedding_weights() -> None:
    weights = torch.randn(VOCAB, 6)
    model = lstm((LENGTH,), 2, embedding_weights=weights, freeze_embedding=True, hidden=4,
                 layers=1)
    emb = model.blocks[0].embed.weight
    assert torch.equal(emb, weights) and not emb.requires_grad
    assert model.shapes[1] == (LENGTH, 6)
    with pytest.raises(ValueError, match="embed_dim=5 but embedding_weights has 6 columns"):
        lstm((LENGTH,), 2, embedding_weights=weights, embed_dim=5)
    with pytest.raises(ValueError, match="vocab_size=7 but embedding_weights has 40 rows"):
        transformer((LENGTH,), 2, vocab_size=7, embedding_weights=weights, heads=2)


def test_option_errors() -> None:
    with pytest.raises(ValueError, match="needs the option vocab_size"):
        build_model("lstm", (LENGTH,), 2)
    with pytest.raises(ValueError, match="heads=4 must divide dim=10"):
        build_model("transformer", (LENGTH,), 2, vocab_size=VOCAB, dim=10, heads=4)
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("lstm", (3, 32, 32), 2, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        build_model("lstm", (LENGTH,), 2, vocab_size=VOCAB, pool="max", embed_dim=4, hidden=4)
    with pytest.raises(ValueError, match="unknown positional"):
        build_model("transformer", (LENGTH,), 2, vocab_size=VOCAB, dim=8, positional="rope")
    model = _build("transformer")
    with pytest.raises(ValueError, match="exceeds the Transformer's max_len 9"):
        model.blocks[0](torch.ones(1, LENGTH + 1, dtype=torch.long))


def test_default_sizes_follow_the_paper() -> None:
    m = lstm((15,), 2, vocab_size=50)
    assert len(m.blocks) == 5 and m.shapes[-1] == (15, 300)
    t = transformer((15,), 2, vocab_size=50)
    assert len(t.blocks) == 5 and t.shapes[-1] == (15, 300)
    assert t.blocks[1].layer.self_attn.num_heads == 4
