"""InfoPro: lambda1 * reconstruction + lambda2 * task loss, against the formula, per stage."""

import math

import pytest
import torch
from helpers import assert_pipeline_equals_sequential, cross_entropy_by_loop, resnet20_net
from presets import run_preset

from locallearn.engines import LocalEngine
from locallearn.network import LocalNet
from locallearn.objectives import build_objective
from locallearn.objectives.infopro import stage_weight
from locallearn.objectives.supcon import supcon_loss


def _net(k: int = 4, **options) -> LocalNet:
    return resnet20_net(k, "infopro", "1c2f", **options)


def _reference(obj, h, x, y, lam_recon, lam_task, task_loss):
    """lambda1 * (1/(N*P)) sum_i sum_p (dec(h)_ip - x_ip)^2 + lambda2 * task, by a loop."""
    dec = obj.decoder(h)
    sq = sum(((dec[i] - x[i]) ** 2).sum() for i in range(len(x)))
    return lam_recon * sq / x.numel() + lam_task * task_loss


def test_softmax_loss_is_weighted_reconstruction_plus_cross_entropy():
    obj = build_objective("infopro", (4, 8, 8), 10, head="1c2f", stage=1, num_stages=4,
                          image_shape=(3, 8, 8))
    h, x, y = torch.randn(6, 4, 8, 8), torch.randn(6, 3, 8, 8), torch.arange(6) % 3
    obj.set_target(x)
    ce = cross_entropy_by_loop(obj.inner.inner.head(h), y)
    lam_recon, lam_task = 1.0 + (0.2 - 1.0) * 1 / 2, 0.5 + (1.0 - 0.5) * 1 / 2  # stage 2 of 3 local
    torch.testing.assert_close(obj.loss(h, y), _reference(obj, h, x, y, lam_recon, lam_task, ce))


def test_contrast_loss_is_weighted_reconstruction_plus_supcon_on_a_projection():
    obj = build_objective("infopro", (4, 8, 8), 10, stage=0, num_stages=3, image_shape=(3, 8, 8),
                          variant="contrast", recon_weights=[2.0], task_weights=[0.3])
    h, x, y = torch.randn(6, 4, 8, 8), torch.randn(6, 3, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    obj.set_target(x)
    z = obj.inner.inner.embed(h)
    assert obj.inner.inner.temperature == 0.07
    expected = _reference(obj, h, x, y, 2.0, 0.3, supcon_loss(z, y, 0.07))
    torch.testing.assert_close(obj.loss(h, y), expected)
    assert obj.predict(h) is None  # SupCon stages have no classifier


def test_reconstruction_weight_falls_and_task_weight_rises_with_depth():
    net = _net(5)
    recon = [s.objective.weight for s in net.stages[:-1]]
    task = [s.objective.inner.weight for s in net.stages[:-1]]
    assert recon == pytest.approx([1.0, 1.0 - 0.8 / 3, 1.0 - 1.6 / 3, 0.2])
    assert task == pytest.approx([0.5, 0.5 + 0.5 / 3, 0.5 + 1.0 / 3, 1.0])
    assert type(net.stages[-1].objective).__name__ == "HeadCE"  # the last stage: the task alone
    assert stage_weight([3.0, 2.0, 1.0], 1, 3, "w") == 2.0
    with pytest.raises(ValueError, match="recon_weights"):
        _net(4, recon_weights=[1.0, 0.5, 0.2, 0.1])
    with pytest.raises(ValueError, match="variant"):
        _net(4, variant="softmin")


def test_every_local_stage_receives_the_network_input_as_its_target():
    net = _net(3)
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in net.stages]
    LocalEngine().step(net, opts, x, y)
    for stage in net.stages[:-1]:
        assert torch.equal(stage.objective._target, x)
    assert net.needs(1) == [0]  # so a pipeline sends x to every stage


@pytest.mark.parametrize("variant", ["softmax", "contrast"])
def test_pipeline_equals_the_sequential_engine(variant):
    assert_pipeline_equals_sequential(_net(3, variant=variant), 3,
                                      lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                      (6, 3, 8, 8), 3)


@pytest.mark.parametrize("variant", ["softmax", "contrast"])
def test_the_preset_trains_for_an_epoch(variant, tmp_path):
    summary = run_preset(f"infopro_resnet32_{variant}", tmp_path, "model.options={width: 0.25}")
    assert summary["k"] == 4 and math.isfinite(summary["final_acc"])
