"""The engines: K=1 local is BP, no gradient crosses a boundary, local saves less memory."""

import copy

import pytest
import torch
from helpers import floats
from torch import nn

from locallearn.engines import BackpropEngine, LocalEngine
from locallearn.measure import SavedTensorsMeter
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.optim import build_optimizer


def _net(k: int, model: str = "mlp", shape=(1, 8, 8), **opts) -> LocalNet:
    torch.manual_seed(0)
    backbone = build_model(model, shape, 10, **opts)
    return LocalNet.from_backbone(backbone, k, head="mlp")


def _train(net: LocalNet, engine, steps: int = 5, lr: float = 0.1, name: str = "sgd") -> list:
    opts = [build_optimizer(s.parameters(), name, lr, momentum=0.9) for s in net.stages]
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        losses.append(floats(engine.step(net, opts, x, y)))
    return losses


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_k1_local_equals_backprop(opt):
    a = _net(1, hidden=[16, 16, 16])
    b = copy.deepcopy(a)
    la = _train(a, LocalEngine(), name=opt)
    lb = _train(b, BackpropEngine(), name=opt)
    assert sum(la, []) == pytest.approx(sum(lb, []), rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_local_differs_from_backprop_for_k_above_1():
    """A check that the equivalence test above can fail: with K=2 the updates differ."""
    a = _net(2, hidden=[16, 16, 16])
    b = copy.deepcopy(a)
    _train(a, LocalEngine())
    _train(b, BackpropEngine())
    assert any(not torch.allclose(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


def test_no_gradient_crosses_a_stage_boundary():
    net = _net(3, hidden=[16, 16, 16, 16, 16, 16])
    opts = [build_optimizer(s.parameters(), "sgd", 0.01) for s in net.stages]
    current = {"loss": -1}  # the stage whose local loss was computed last (and runs backward)
    received: dict[int, set[int]] = {k: set() for k in range(3)}
    for k, stage in enumerate(net.stages):
        for p in stage.parameters():
            p.register_hook(lambda g, k=k: received[k].add(current["loss"]))
        loss_fn = stage.objective.loss
        stage.objective.loss = (lambda f, k: lambda out, y: (current.update(loss=k), f(out, y))[1])(
            loss_fn, k)
    LocalEngine().step(net, opts, torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    assert received == {0: {0}, 1: {1}, 2: {2}}


def test_gradient_check_detects_crossing():
    """The same hooks under BP see the last loss reach every stage: the check can fail."""
    net = _net(2, hidden=[16, 16])
    opts = [build_optimizer(s.parameters(), "sgd", 0.01) for s in net.stages]
    received: set[int] = set()
    for p in net.stages[0].body.parameters():
        p.register_hook(lambda g: received.add(1))
    BackpropEngine(aux_heads=False).step(net, opts, torch.randn(8, 1, 8, 8),
                                         torch.randint(0, 10, (8,)))
    assert received == {1}


def test_stage_input_is_detached():
    """The input a stage receives carries no graph back into the previous stage."""
    net = _net(2, hidden=[16, 16])
    inputs = []
    net.stages[1].body.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    opts = [build_optimizer(s.parameters(), "sgd", 0.1) for s in net.stages]
    LocalEngine().step(net, opts, torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    assert inputs[0].grad_fn is None and not inputs[0].requires_grad


def test_backprop_aux_heads_do_not_change_trunk_gradients():
    a = _net(3, hidden=[16, 16, 16])
    b = copy.deepcopy(a)
    _train(a, BackpropEngine(aux_heads=True))
    _train(b, BackpropEngine(aux_heads=False))
    for sa, sb in zip(a.stages, b.stages):
        for pa, pb in zip(sa.body.parameters(), sb.body.parameters()):
            torch.testing.assert_close(pa, pb)


def _saved_bytes(net: LocalNet, engine) -> int:
    opts = [build_optimizer(s.parameters(), "sgd", 0.01) for s in net.stages]
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    with SavedTensorsMeter(net) as meter:
        engine.step(net, opts, x, y)
    return meter.peak_bytes


def test_local_k4_saves_fewer_bytes_than_backprop():
    torch.manual_seed(0)
    backbone = build_model("resnet20", (3, 32, 32), 10, width=0.5)
    bp = LocalNet.from_backbone(backbone, 4, head="0c1f", by="memory", split_batch=4)
    local = copy.deepcopy(bp)
    b_bp = _saved_bytes(bp, BackpropEngine(aux_heads=False))
    b_local = _saved_bytes(local, LocalEngine())
    assert b_local < 0.5 * b_bp, (b_local, b_bp)


def test_from_blocks_wraps_a_sequential():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1),
                        nn.ReLU())
    net = LocalNet.from_blocks(seq, (1, 8, 8), 10, k=2, head="0c1f")
    assert net.k == 2 and net.stages[1].out_shape == (8, 8, 8)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
