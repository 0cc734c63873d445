"""PredSim: pred (CE of a linear classifier on pooled features) and sim (similarity matching)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_pipeline_equals_sequential, cross_entropy_by_loop
from presets import run_preset

from locallearn.engines import LocalEngine
from locallearn.errors import ConfigError
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.objectives import build_objective
from locallearn.objectives.base import objective_options
from locallearn.objectives.predsim import pool_size


def _cos_matrix_by_loop(z):
    z = z.flatten(1)
    n = len(z)
    out = torch.empty(n, n)
    for i in range(n):
        for j in range(n):
            a, b = z[i] - z[i].mean(), z[j] - z[j].mean()
            out[i, j] = (a @ b) / (a.norm() * b.norm())
    return out


def test_sim_loss_matches_the_formula_with_the_closed_form_label_similarity():
    c = 5
    obj = build_objective("sim", (4, 6, 6), c)
    h, y = torch.randn(7, 4, 6, 6), torch.tensor([0, 1, 1, 2, 4, 4, 4])
    # one-hot rows centred on their mean: cos = (delta_ab - 1/C) / (1 - 1/C)
    same = (y.view(-1, 1) == y.view(1, -1)).float()
    label_sim = (same - 1 / c) / (1 - 1 / c)
    expected = ((_cos_matrix_by_loop(obj.sim_conv(h)) - label_sim) ** 2).mean()
    torch.testing.assert_close(obj.loss(h, y), expected, rtol=1e-5, atol=1e-6)
    assert obj.predict(h) is None  # sim alone has no classifier


def test_predsim_mixes_pred_and_sim_with_beta():
    obj = build_objective("predsim", (64, 16, 16), 10, beta=0.9)
    h, y = torch.randn(5, 64, 16, 16), torch.arange(5)
    assert pool_size((64, 16, 16), 2048) == 4  # 64 * 4 * 4 = 1024 <= 2048 < 64 * 8 * 8
    lin = obj.classifier[-1]
    logits = F.avg_pool2d(h, 4).flatten(1) @ lin.weight.t() + lin.bias
    pred = cross_entropy_by_loop(logits, y)
    same = (y.view(-1, 1) == y.view(1, -1)).float()
    sim = ((_cos_matrix_by_loop(obj.sim_conv(h)) - (same - 0.1) / 0.9) ** 2).mean()
    torch.testing.assert_close(obj.loss(h, y), 0.1 * pred + 0.9 * sim, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj.predict(h), logits)


def test_pred_alone_is_cross_entropy_and_flat_layers_skip_the_conv():
    obj = build_objective("pred", (32,), 4)
    h, y = torch.randn(6, 32), torch.arange(6) % 4
    torch.testing.assert_close(obj.loss(h, y), F.cross_entropy(obj.predict(h), y))
    flat = build_objective("predsim", (32,), 4)
    assert isinstance(flat.sim_conv, torch.nn.Identity)
    with pytest.raises(ValueError, match="beta"):
        build_objective("predsim", (32,), 4, beta=1.5)


@pytest.mark.parametrize("name", ["pred", "sim"])
def test_pred_and_sim_fix_beta_and_refuse_it_as_an_option(name):
    with pytest.raises(ConfigError, match=rf"unknown {name} option 'beta'.*accepts: "):
        build_objective(name, (32,), 4, beta=0.5)
    assert "beta" not in objective_options(name) and "beta" in objective_options("predsim")


def test_vgg8b_and_vgg11b_are_layer_wise_block_lists_with_the_paper_widths():
    b8, b11 = build_model("vgg8b", (3, 32, 32), 10), build_model("vgg11b", (3, 32, 32), 10)
    assert len(b8) == 7 and len(b11) == 10  # 6 / 9 convs and the FC-1024 layer
    assert [s[0] for s in b8.shapes[1:]] == [128, 256, 256, 512, 512, 512, 1024]
    assert [s[0] for s in b11.shapes[1:]] == [128, 128, 128, 256, 256, 512, 512, 512, 512, 1024]
    assert b8.shapes[-2] == (512, 2, 2) and b8.head == "linear"
    wide = build_model("vgg8b", (3, 32, 32), 10, width=2.0, dropout=0.1)
    assert wide.shapes[1] == (256, 32, 32) and wide.shapes[-1] == (2048,)
    assert any(isinstance(m, torch.nn.Dropout) for m in wide.blocks[0].modules())


def test_layer_wise_predsim_trains_every_layer_on_its_own_loss():
    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model("vgg8b", (3, 16, 16), 10, width=0.125), 7,
                                 objective="predsim", head="linear")
    assert net.k == 7 and all(len(s.body) == 1 for s in net.stages)
    opts = [torch.optim.Adam(s.parameters(), lr=1e-3) for s in net.stages]
    losses = LocalEngine().step(net, opts, torch.randn(8, 3, 16, 16), torch.arange(8) % 10)
    assert all(math.isfinite(v) for v in losses)


def test_pipeline_equals_the_sequential_engine():
    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model("vgg8b", (3, 8, 8), 10, width=0.125), 4,
                                 objective="predsim", head="linear")
    assert_pipeline_equals_sequential(net, 2, lambda p: torch.optim.Adam(p, lr=1e-3),
                                      (6, 3, 8, 8), 10)


def test_the_preset_trains_for_an_epoch(tmp_path):
    summary = run_preset("predsim_vgg8b_cifar10", tmp_path, "model.options={width: 0.125}")
    assert summary["k"] == 7 and math.isfinite(summary["final_acc"])
