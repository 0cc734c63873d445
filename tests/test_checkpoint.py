"""Checkpointed BP: the gradients of plain BP, fewer saved bytes, BatchNorm updated once."""

import pytest
import torch

import locallearn as ll
from locallearn.engines.backprop import BackpropEngine
from locallearn.measure import SavedTensorsMeter
from locallearn.models import build_model
from locallearn.network import LocalNet


def _net() -> LocalNet:
    torch.manual_seed(0)
    return LocalNet.from_backbone(build_model("resnet20", (3, 16, 16), 10, width=0.5), 3,
                                  head="0c1f", context="E")


def _grads_after_one_step(net: LocalNet, engine: BackpropEngine, x, y):
    class Keep(torch.optim.Optimizer):  # records the gradients instead of stepping
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            pass

    opts = [Keep(s.parameters()) for s in net.stages]
    with SavedTensorsMeter(net) as meter:
        engine.step(net, opts, x, y)
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, meter


@pytest.mark.parametrize("mode", ["blocks", "stages"])
def test_checkpointed_bp_gives_exactly_the_gradients_of_plain_bp_with_fewer_saved_bytes(mode):
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    plain, ckpt = _net(), _net()
    ga, ma = _grads_after_one_step(plain, BackpropEngine(), x, y)
    engine = BackpropEngine(checkpoint=mode)
    gb, mb = _grads_after_one_step(ckpt, engine, x, y)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name
    assert mb.peak_bytes < ma.peak_bytes  # the kept inputs count; the recomputation is not seen
    for a, b in zip(plain.buffers(), ckpt.buffers()):  # BatchNorm statistics updated once
        assert torch.equal(a, b)


def test_engine_checkpoint_is_a_config_key_and_the_engine_is_built_from_it():
    cfg = ll.load_config(None, ["engine=backprop", "engine.checkpoint=blocks"])
    assert cfg.engine.checkpoint == "blocks"
    assert ll.build_engine("backprop", checkpoint="blocks").checkpoint == "blocks"
    with pytest.raises(ValueError, match="engine.checkpoint"):
        ll.load_config(None, ["engine.checkpoint=layers"])
    with pytest.raises(ValueError, match="choose one of"):
        BackpropEngine(checkpoint="layers")


def test_checkpointed_training_matches_plain_training_over_steps():
    nets = [_net(), _net()]
    for net, mode in zip(nets, ["none", "blocks"]):
        opts = [torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.9) for s in net.stages]
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
            BackpropEngine(checkpoint=mode).step(net, opts, x, y)
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_preset_trains_for_an_epoch(tmp_path):
    import math

    from presets import run_preset

    summary = run_preset("bp_resnet32_checkpoint", tmp_path, "model.options={width: 0.25}")
    assert summary["engine"] == "backprop" and math.isfinite(summary["final_acc"])
