"""AugLocal: auxiliary nets of fresh copies of uniformly picked later blocks, pyramidal depth."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_pipeline_equals_sequential, cross_entropy_by_loop, resnet20_net
from presets import run_preset

from locallearn.network import LocalNet
from locallearn.objectives.auglocal import adapter, aux_depth, uniform_picks


def _net(k: int = 4, **options) -> LocalNet:
    return resnet20_net(k, "auglocal", "0c1f", **options)


def test_depth_falls_linearly_from_the_first_to_the_last_local_stage():
    assert [aux_depth(k, 5, 4, 1) for k in range(4)] == [4, 3, 2, 1]
    assert [aux_depth(k, 4, 3, 2) for k in range(3)] == [3, 2, 2]  # 2.5 rounds to even
    assert uniform_picks(10, 4) == [0, 3, 6, 9] and uniform_picks(3, 5) == [0, 1, 2]
    assert uniform_picks(5, 1) == [0]


def test_aux_nets_are_fresh_copies_of_later_blocks_with_adapters_where_shapes_change():
    net = _net(4, depth=3, min_depth=1)
    body_params = {p.data_ptr() for s in net.stages for p in s.body.parameters()}
    aux0 = net.stages[0].objective.aux
    assert all(p.data_ptr() not in body_params for p in aux0.parameters())
    names = [type(m).__name__ for m in aux0]
    assert names.count("BasicBlock") == 3 and "Sequential" in names  # an adapter at a stride
    assert len([m for m in net.stages[2].objective.aux if type(m).__name__ == "BasicBlock"]) == 1
    fit = adapter((8, 8, 8), (16, 4, 4))
    assert fit(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    assert adapter((16, 4, 4), (16, 4, 4)) is None


def test_loss_is_cross_entropy_of_the_head_after_the_aux_blocks():
    obj = _net(3).stages[0].objective
    h, y = torch.randn(5, 4, 8, 8), torch.arange(5)
    z = h
    for m in obj.aux:
        z = m(z)
    ce = cross_entropy_by_loop(obj.classifier.head(z), y)
    torch.testing.assert_close(obj.loss(h, y), ce)
    torch.testing.assert_close(F.cross_entropy(obj.predict(h), y), ce)


def test_stage_k_loss_trains_only_its_body_and_its_own_copies():
    net = _net(4)
    h = net.stages[0](torch.randn(4, 3, 8, 8))
    net.stages[0].objective.loss(h, torch.arange(4)).backward()
    assert all(p.grad is None for s in net.stages[1:] for p in s.parameters())
    assert all(p.grad is not None for p in net.stages[0].objective.aux.parameters())
    with pytest.raises(ValueError, match="min_depth"):
        _net(4, depth=1, min_depth=2)


def test_pipeline_equals_the_sequential_engine():
    assert_pipeline_equals_sequential(
        _net(3), 3, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), (6, 3, 8, 8), 10)


def test_the_preset_trains_for_an_epoch(tmp_path):
    summary = run_preset("auglocal_resnet32_cifar10", tmp_path, "model.options={width: 0.25}")
    assert summary["k"] == 8 and math.isfinite(summary["final_acc"])
