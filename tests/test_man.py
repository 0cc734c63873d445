"""MAN: an EMA copy of the next stage's first block, with a learnable scale and bias."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import cross_entropy_by_loop, resnet20_net
from presets import run_preset

import locallearn as ll
from locallearn import runs
from locallearn.engines import LocalEngine
from locallearn.objectives.momentum import MomentumAux, check_config


def _net(k: int = 3, m: float = 0.9) -> ll.LocalNet:
    return resnet20_net(k, "ce", "0c1f", momentum_aux=m)


def test_local_stages_read_their_output_through_a_copy_of_the_next_first_block():
    net = _net(3)
    obj = net.stages[0].objective
    assert isinstance(obj, MomentumAux) and not isinstance(net.stages[-1].objective, MomentumAux)
    for a, b in zip(obj.ema.state_dict().values(), net.stages[1].body[0].state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    h, y = torch.randn(5, 4, 8, 8), torch.arange(5)
    obj.scale.data.uniform_(0.5, 1.5)
    obj.bias.data.normal_()
    z = obj.ema(h) * obj.scale.view(1, -1, 1, 1) + obj.bias.view(1, -1, 1, 1)
    ce = cross_entropy_by_loop(obj.inner.head(z), y)
    torch.testing.assert_close(obj.loss(h, y), ce)
    torch.testing.assert_close(F.cross_entropy(obj.predict(h), y), ce)


def test_the_ema_copy_gets_no_gradient_but_the_stage_and_the_scale_and_bias_do():
    net = _net(3)
    stage = net.stages[0]
    out = stage(torch.randn(4, 3, 8, 8))
    stage.objective.loss(out, torch.arange(4)).backward()
    assert all(p.grad is None and not p.requires_grad for p in stage.objective.ema.parameters())
    assert stage.objective.scale.grad is not None and stage.objective.bias.grad is not None
    assert all(p.grad is not None for p in stage.body.parameters())
    assert all(p.grad is None for s in net.stages[1:] for p in s.parameters())


def test_the_ema_tracks_the_next_stage_by_p_ema_equals_m_p_ema_plus_one_minus_m_p():
    m = 0.9
    net = _net(3, m)
    opts = [torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9) for s in net.stages]
    g = torch.Generator().manual_seed(0)
    ema = net.stages[0].objective.ema
    expected = [p.clone() for p in ema.parameters()]
    for _ in range(3):
        x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
        LocalEngine().step(net, opts, x, y)
        net.update_momentum()
        source = list(net.stages[1].body[0].parameters())
        expected = [m * e + (1 - m) * p for e, p in zip(expected, source)]
    for e, p in zip(expected, ema.parameters()):
        torch.testing.assert_close(p, e)
    assert not torch.equal(expected[0], source[0])  # it lags behind the weights it follows


def test_bad_momentum_and_width_groups_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="momentum_aux"):
        _net(3, 1.5)
    with pytest.raises(ValueError, match="momentum_aux.*split.groups=1"):
        ll.load_config(None, ["split.groups=2", "objective.options={momentum_aux: 0.99}"])
    for engine in ("local", "pipeline"):
        check_config(ll.load_config(None, [f"engine={engine}", "objective.options={momentum_aux: 0.99}"]))


def test_man_on_the_pipeline_sends_weights_and_equals_the_sequential_engine(tmp_path):
    """Stage 2's first block travels to stage 1's rank after every step (parameters only):
    the momentum copies, and so every weight, are those of engine=local."""
    args = ["model=resnet20", "model.options={width: 0.25}", "split.k=2", "objective.head=0c1f",
            "objective.options={momentum_aux: 0.9}", "data.train_subset=128",
            "data.test_subset=64", "data.batch_size=32", "train.epochs=1", "train.progress=false",
            "engine.threads=1", f"train.out_dir={tmp_path}"]
    _, piped = ll.run(ll.load_config(None, [*args, "engine=pipeline", "engine.workers=2",
                                            "train.name=pipe"]))
    _, local = ll.run(ll.load_config(None, [*args, "engine=local", "train.name=local"]))
    a, b = runs.load_checkpoint(piped)["net"], runs.load_checkpoint(local)["net"]
    assert any("ema" in name for name in a)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_preset_trains_for_an_epoch(tmp_path):
    summary = run_preset("man_resnet32_cifar10", tmp_path, "model.options={width: 0.25}")
    assert summary["k"] == 8 and math.isfinite(summary["final_acc"])


def test_the_trainer_moves_the_ema_after_every_step(tmp_path):
    cfg = ll.load_config(None, ["model=resnet20", "model.options={width: 0.25}", "split.k=3",
                                "objective.head=0c1f", "objective.options={momentum_aux: 0.9}",
                                "data=digits", "data.batch_size=32", "train.epochs=1",
                                "train.progress=false", f"train.out_dir={tmp_path}"])
    data = ll.load_data("digits")
    data = dataclasses.replace(data, train=data.train.subset(64), test=data.test.subset(32))
    net = ll.build_net(cfg, data)
    before = [p.clone() for p in net.stages[0].objective.ema.parameters()]
    ll.Trainer(net, data, cfg).fit()
    moved = any(not torch.equal(a, b) for a, b in zip(before, net.stages[0].objective.ema.parameters()))
    assert moved, "the training loop calls LocalNet.update_momentum() after every step"


def test_man_composes_with_infopro_whose_decoder_still_receives_the_input():
    net = resnet20_net(3, "infopro", "1c2f", momentum_aux=0.9)
    x = torch.randn(4, 3, 8, 8)
    opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in net.stages]
    losses = LocalEngine().step(net, opts, x, torch.arange(4))
    assert all(math.isfinite(v) for v in losses)
    assert torch.equal(net.stages[0].objective.inner._target, x)
