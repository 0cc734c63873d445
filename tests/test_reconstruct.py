"""Tests of the InfoPro-style reconstruction term: weights per stage, loss, wiring into stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from locallearn.config import ConfigError, load_config
from locallearn.engines import LocalEngine
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.objectives import OBJECTIVES, build_objective
from locallearn.objectives.groups import GroupObjective
from locallearn.objectives.reconstruct import (
    ReconstructError,
    ReconstructObjective,
    reconstruct_weights,
)

torch.set_num_threads(1)

SHAPE = (3, 8, 8)


def test_weights_constant_interpolated_or_explicit_and_never_on_the_last_stage() -> None:
    assert reconstruct_weights([], 4) == [0.0] * 4
    assert reconstruct_weights([0.5], 4) == [0.5, 0.5, 0.5, 0.0]
    assert reconstruct_weights([1.0, 0.0], 5) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0, 0.0])
    assert reconstruct_weights([0.3, 0.2, 0.1], 4) == [0.3, 0.2, 0.1, 0.0]
    assert reconstruct_weights([1.0], 1) == [0.0]
    with pytest.raises(ReconstructError, match="give 1 .* 2 .* or 4 values"):
        reconstruct_weights([1, 2, 3], 5)
    with pytest.raises(ReconstructError, match=">= 0"):
        reconstruct_weights([-1.0], 3)
    with pytest.raises(ConfigError, match="objective.reconstruct"):
        load_config(overrides=["split.k=5", "objective.reconstruct=[1, 2, 3]"])


def test_loss_is_inner_loss_plus_weighted_mse_and_predict_is_the_inner_ones() -> None:
    inner = build_objective("ce", (4, 2, 2), 5, head="0c1f")
    obj = ReconstructObjective(inner, (4, 2, 2), SHAPE, weight=0.3)
    h, y, x = torch.randn(2, 4, 2, 2), torch.randint(0, 5, (2,)), torch.randn(2, *SHAPE)
    with pytest.raises(ReconstructError, match="no target"):
        obj.loss(h, y)
    obj.set_target(x)
    expected = inner.loss(h, y) + 0.3 * F.mse_loss(obj.decoder(h), x)
    assert obj.loss(h, y).item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.equal(obj.predict(h), inner.predict(h))
    assert obj.decoder(h).shape == (2, *SHAPE)


@pytest.mark.parametrize("groups", [1, 2])
def test_stages_get_the_input_through_their_context_and_train_the_decoder(groups: int) -> None:
    backbone = build_model("resnet20", SHAPE, 10, width=0.5)
    net = LocalNet.from_backbone(backbone, 3, head="0c1f", groups=groups, reconstruct=[1.0, 0.5],
                                 context="R1")
    objs = [s.objective for s in net.stages]
    assert [type(o).__name__ for o in objs] == ["ReconstructObjective"] * 2 + [
        "GroupObjective" if groups > 1 else "HeadCE"]
    assert [o.weight for o in objs[:2]] == [1.0, 0.5]
    assert groups == 1 or isinstance(objs[0].inner, GroupObjective)
    assert net.needs(0) == [0] and net.needs(1) == [0] and net.needs(2) == [1]
    before = [p.clone() for p in objs[0].decoder.parameters()]
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in net.stages]
    LocalEngine().step(net, opts, x, y)
    assert torch.equal(objs[0]._target, x)
    assert all(not torch.equal(a, b) for a, b in zip(before, objs[0].decoder.parameters()))


@pytest.mark.skipif("supcon" not in OBJECTIVES, reason="the supcon objective is not registered")
def test_works_with_another_local_objective() -> None:
    backbone = build_model("vgg6a", SHAPE, 10, width=0.125)
    net = LocalNet.from_backbone(backbone, 2, objective="supcon", head="linear", reconstruct=[0.5])
    x, y = torch.randn(6, *SHAPE), torch.randint(0, 3, (6,))
    opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in net.stages]
    losses = LocalEngine().step(net, opts, x, y)
    assert all(torch.isfinite(torch.tensor(losses)))
