"""Tests of the vision and MLP model builders: blocks, shapes, sizes, options, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locallearn.models import MODELS, Backbone, build_model
from locallearn.models.layers import scale_channels

torch.set_num_threads(1)

NAMES = ["mlp", "vgg6a", "vgg8", "vgg11", "resnet20", "resnet32", "resnet56", "resnet110",
         "resnet18"]
SHAPES = [(3, 32, 32), (1, 28, 28), (1, 8, 8)]


def n_params(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def conv_channels(backbone: Backbone) -> list[int]:
    return [m.out_channels for b in backbone.blocks for m in b.modules()
            if isinstance(m, nn.Conv2d)]


def test_all_models_are_registered_with_help() -> None:
    assert set(NAMES) <= set(MODELS)
    for name in NAMES:
        assert MODELS[name][1].strip()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_recorded_shapes_are_the_real_outputs(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    backbone = build_model(name, shape, num_classes=10)
    assert backbone.name == name and backbone.num_classes == 10
    assert backbone.shapes[0] == shape and len(backbone.shapes) == len(backbone) + 1
    h = torch.randn(2, *shape)
    for block, expected in zip(backbone.blocks, backbone.shapes[1:]):
        h = block(h)  # train mode: BatchNorm uses batch statistics
        assert tuple(h.shape[1:]) == expected


@pytest.mark.parametrize("name, blocks, last", [
    ("mlp", 4, (256,)), ("vgg6a", 4, (512, 4, 4)), ("vgg8", 6, (512, 2, 2)),
    ("vgg11", 8, (512, 1, 1)), ("resnet20", 10, (64, 8, 8)), ("resnet32", 16, (64, 8, 8)),
    ("resnet56", 28, (64, 8, 8)), ("resnet110", 55, (64, 8, 8)), ("resnet18", 9, (512, 4, 4)),
])
def test_block_counts_and_cifar_output_shapes(name: str, blocks: int,
                                              last: tuple[int, ...]) -> None:
    backbone = build_model(name, (3, 32, 32))
    assert len(backbone) == blocks
    assert backbone.shapes[-1] == last


def test_downsampling_stops_at_one_pixel() -> None:
    # 8x8 input: vgg11 has five pools but only three can halve 8 -> 1.
    shapes = build_model("vgg11", (1, 8, 8)).shapes
    assert [s[1] for s in shapes] == [8, 4, 2, 2, 1, 1, 1, 1, 1]
    assert build_model("resnet20", (3, 1, 1)).shapes[-1] == (64, 1, 1)
    assert build_model("resnet18", (1, 8, 8)).shapes[-1] == (512, 1, 1)


def test_cifar_resnet_parameter_counts_match_he_et_al() -> None:
    # Published counts (option A shortcuts, incl. the 64 -> 10 FC): 0.27M and 0.46M.
    fc = nn.Linear(64, 10)
    assert n_params(build_model("resnet20", shortcut="A").blocks + [fc]) == 269_722
    assert n_params(build_model("resnet32", shortcut="A").blocks + [fc]) == 464_154
    # Projection shortcuts (default) add 1x1 convs + BN at the two stage changes only.
    assert n_params(build_model("resnet20").blocks + [fc]) == 269_722 + 2_752
    assert n_params(build_model("resnet32").blocks + [fc]) == 464_154 + 2_752


def test_resnet18_parameter_count() -> None:
    assert n_params(build_model("resnet18").blocks + [nn.Linear(512, 10)]) == 11_173_962


def test_width_multiplier_scales_channels() -> None:
    assert conv_channels(build_model("vgg11", width=0.5)) == [32, 64, 128, 128, 256, 256,
                                                               256, 256]
    assert build_model("resnet20", width=2.0).shapes[-1] == (128, 8, 8)
    assert build_model("resnet18", width=0.25).shapes[-1] == (128, 4, 4)


def test_channel_multiple_keeps_widths_divisible() -> None:
    assert scale_channels(64, 0.3, 8) == 16  # 19.2 -> nearest multiple of 8
    assert scale_channels(16, 0.01, 4) == 4  # never below one multiple
    for name in ("vgg6a", "vgg8", "resnet20"):
        channels = conv_channels(build_model(name, width=0.3, channel_multiple=6))
        assert all(c % 6 == 0 for c in channels)


def test_heads_are_named_and_fit_the_last_shape() -> None:
    from locallearn.objectives.heads import build_head

    assert build_model("vgg6a").head_options == {"hidden": [1024]}
    assert build_model("resnet32").head == "0c1f"
    for name in ("mlp", "vgg6a", "vgg8", "vgg11", "resnet20"):
        backbone = build_model(name, (1, 8, 8), num_classes=7, width=0.125) if name != "mlp" \
            else build_model(name, (1, 8, 8), num_classes=7, hidden=[16])
        head = build_head(backbone.head, backbone.shapes[-1], 7, **backbone.head_options)
        h = torch.randn(2, *backbone.shapes[-1])
        assert head(h).shape == (2, 7)


def test_mlp_options() -> None:
    backbone = build_model("mlp", (1, 8, 8), hidden=[32, 16], batch_norm=True)
    assert backbone.shapes == [(1, 8, 8), (32,), (16,)]
    assert any(isinstance(m, nn.BatchNorm1d) for m in backbone.blocks[0].modules())
    assert backbone.head == "linear"


@pytest.mark.parametrize("call, message", [
    (lambda: build_model("resnet21"), "choose one of"),
    (lambda: build_model("vgg8", depth=3), "bad option"),
    (lambda: build_model("vgg8", width=0), "width must be a positive"),
    (lambda: build_model("resnet20", channel_multiple=0), "channel_multiple"),
    (lambda: build_model("resnet20", shortcut="C"), "unknown shortcut"),
    (lambda: build_model("vgg11", (784,)), "(C, H, W)"),
    (lambda: build_model("mlp", hidden=[]), "non-empty list"),
])
def test_bad_input_errors_name_the_problem(call, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_vgg6a_trains_a_little() -> None:
    torch.manual_seed(0)
    backbone = build_model("vgg6a", (3, 16, 16), num_classes=10, width=0.125)
    c, h, w = backbone.shapes[-1]
    net = nn.Sequential(*backbone.blocks, nn.Flatten(), nn.Linear(c * h * w, 10))
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_every_block_takes_a_leaf_input_that_requires_grad(name: str) -> None:
    # Stage inputs are detached leaves that require grad: no block may modify its input.
    torch.manual_seed(0)
    options = {"hidden": [8, 8]} if name == "mlp" else {"width": 0.125}
    backbone = build_model(name, (1, 8, 8), **options)
    for block, shape in zip(backbone.blocks, backbone.shapes[:-1]):
        x = torch.randn(2, *shape, requires_grad=True)
        block(x).sum().backward()
        assert x.grad is not None
