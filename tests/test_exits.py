"""Forward shortcuts and early exit (scores, costs, real early stopping, report files),
and the end-to-end early-exit baseline engine."""

import copy
import json
import math

import pytest
import torch

from locallearn.cli import main
from locallearn.engines import MultiExitEngine, build_engine, stage_loss
from locallearn.exits import (
    ExitCosts,
    collect_stage_logits,
    confidence,
    early_exit_predict,
    early_exit_report,
    fixed_exit,
    forward_shortcut,
    measure_exit_costs,
    threshold_exit,
)
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.optim import build_optimizer

torch.set_num_threads(1)


def _net(predictor: str | None = "linear", objective: str = "ce") -> LocalNet:
    torch.manual_seed(0)
    backbone = build_model("mlp", (1, 4, 4), 3, hidden=[8, 8, 8])
    net = LocalNet.from_backbone(backbone, 3, head="linear", predictor=predictor,
                                 objective=objective, objective_options={"proj_dim": 4}
                                 if objective == "supcon" else None)
    return net.eval()


def _data(n: int = 64):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_confidence_of_uniform_and_certain_logits():
    uniform, certain = torch.zeros(1, 4), torch.tensor([[50.0, 0, 0, 0]])
    assert confidence(uniform, "max").item() == pytest.approx(0.25)
    assert confidence(uniform, "entropy").item() == pytest.approx(0.0, abs=1e-6)
    assert confidence(certain, "max").item() == pytest.approx(1.0)
    assert confidence(certain, "entropy").item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="max, entropy"):
        confidence(uniform, "margin")


def test_costs_are_the_mlp_matmuls():
    costs = measure_exit_costs(_net(), torch.randn(5, 1, 4, 4))
    assert costs.body == (16 * 8, 8 * 8, 8 * 8)
    assert costs.head == (8 * 3, 8 * 3, 8 * 3)  # linear predictors answer for every stage
    assert costs.full == 16 * 8 + 2 * 64 + 24
    assert costs.shortcut(0) == 128 + 24 and costs.early_exit(1) == 128 + 64 + 48


def test_stages_without_predictor_cannot_be_exits():
    net = _net(predictor=None, objective="supcon")
    costs = measure_exit_costs(net, torch.randn(5, 1, 4, 4))
    assert costs.head[:2] == (None, None) and costs.head[2] > 0
    with pytest.raises(ValueError, match="predictor"):
        forward_shortcut(net, torch.randn(2, 1, 4, 4), 1)
    with pytest.raises(ValueError, match="out of range"):
        forward_shortcut(net, torch.randn(2, 1, 4, 4), 4)


def test_forward_shortcut_is_the_stage_logits():
    net, (x, _) = _net(), _data(8)
    torch.testing.assert_close(forward_shortcut(net, x, 2), net.stage_logits(x)[1])


def test_threshold_extremes():
    net, (x, y) = _net(), _data()
    logits, labels = collect_stage_logits(net, [(x[:32], y[:32]), (x[32:], y[32:])])
    costs = measure_exit_costs(net, x)
    everyone_first = threshold_exit(logits, labels, costs, 0.0)
    assert everyone_first["exit_share"] == [1.0, 0.0, 0.0]
    assert everyone_first["acc"] == pytest.approx(fixed_exit(logits, labels, costs, 1)["acc"])
    assert everyone_first["macs_fraction"] == pytest.approx(costs.early_exit(0) / costs.full)
    no_one = threshold_exit(logits, labels, costs, 1.01)
    assert no_one["exit_share"] == [0.0, 0.0, 1.0] and no_one["macs_fraction"] > 1.0
    assert no_one["acc"] == pytest.approx(fixed_exit(logits, labels, costs, 3)["acc"])


@pytest.mark.parametrize("kind", ["max", "entropy"])
def test_real_early_exit_matches_the_scored_one(kind):
    net, (x, y) = _net(), _data()
    with torch.no_grad():
        t = float(confidence(net.stage_logits(x)[0], kind).median())  # about half leave at stage 1
    answer, where = early_exit_predict(net, x, t, kind)
    logits, labels = collect_stage_logits(net, [(x, y)])
    scored = threshold_exit(logits, labels, measure_exit_costs(net, x), t, kind)
    assert 0 < (where == 1).float().mean() < 1
    shares = [(where == k + 1).float().mean().item() for k in range(3)]
    assert shares == pytest.approx(scored["exit_share"])
    assert 100.0 * (answer.argmax(1) == y).float().mean().item() == pytest.approx(scored["acc"])
    for k in range(3):  # each sample's answer is its exit stage's logits
        torch.testing.assert_close(answer[where == k + 1], logits[k][where == k + 1])


def test_report_writes_json_and_plot(tmp_path):
    net, (x, y) = _net(), _data()
    report = early_exit_report(net, [(x, y)], thresholds=(0.0, 0.5, 0.9), out_dir=tmp_path)
    saved = json.loads((tmp_path / "exit_curve.json").read_text())
    assert (tmp_path / "exit_curve.png").stat().st_size > 1000
    assert len(saved["curve"]) == 3 and len(saved["fixed"]) == 3
    assert saved["full_acc"] == report["full_acc"] == report["fixed"][-1]["acc"]
    assert report["fixed"][-1]["macs_fraction"] == 1.0


def test_eval_cli_exit_options(tiny_cfg, tmp_path, capsys):
    assert main(["train", *tiny_cfg, "train.name=e", "train.epochs=1", "objective.predictor=linear"]) == 0
    capsys.readouterr()
    d = tmp_path / "e"
    assert main(["eval", str(d), "--exit", "--confidence", "entropy"]) == 0
    out = capsys.readouterr().out
    assert "MACs" in out and (d / "exit_curve.png").is_file() and (d / "exit_curve.json").is_file()
    assert main(["eval", str(d), "--exit-stage", "2"]) == 0
    assert "stage 2" in capsys.readouterr().out
    assert main(["eval", str(d), "--threshold", "0.9"]) == 0
    assert "threshold 0.9" in capsys.readouterr().out
    assert main(["eval", str(d), "--exit-stage", "9"]) == 2


def test_multiexit_engine_backpropagates_every_exit_into_the_trunk():
    net = _net(predictor=None).train()
    ref = copy.deepcopy(net)
    x, y = _data(16)
    opts = [build_optimizer(s.parameters(), "sgd", 0.1, momentum=0.0) for s in net.stages]
    losses = MultiExitEngine().step(net, opts, x, y)
    # reference: autograd of the plain sum of the three exits' losses, no detach anywhere
    h, total = x, 0.0
    for stage in ref.stages:
        h = stage(h)
        total = total + stage_loss(stage, h, y)
    total.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_multiexit_differs_from_backprop_with_detached_aux_heads():
    a, x, y = _net(predictor=None).train(), *_data(16)
    b = copy.deepcopy(a)
    for net, engine in ((a, build_engine("multiexit")), (b, build_engine("backprop"))):
        engine.step(net, [build_optimizer(s.parameters(), "sgd", 0.1) for s in net.stages], x, y)
    assert not torch.allclose(a.stages[0].body[0][1].weight, b.stages[0].body[0][1].weight)
    with pytest.raises(ValueError, match="2 exit weights for 3 stages"):
        MultiExitEngine([1.0, 1.0]).step(a, [], x, y)


def test_inference_helpers_do_not_touch_batchnorm_statistics():
    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model("mlp", (1, 4, 4), 3, hidden=[8, 8], batch_norm=True),
                                 2, head="linear", predictor="linear").train()
    before = copy.deepcopy(net.state_dict())
    x, y = _data(8)
    forward_shortcut(net, x[:1], 1)
    early_exit_predict(net, x, 0.5)
    early_exit_report(net, [(x, y)], thresholds=(0.5,))
    assert net.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_multiexit_with_only_the_last_exit_weighted_is_plain_backprop():
    a, x, y = _net(predictor=None).train(), *_data(16)
    b = copy.deepcopy(a)
    for net, engine in ((a, MultiExitEngine([0.0, 0.0, 1.0])), (b, build_engine("backprop",
                                                                                aux_heads=False))):
        opts = [build_optimizer(s.parameters(), "sgd", 0.1, momentum=0.0) for s in net.stages]
        engine.step(net, opts, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_auto_thresholds_fill_the_curve_between_its_ends():
    from locallearn.exits import auto_thresholds, exit_curve

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=g)
    logits = [0.5 * torch.randn(200, 3, generator=g) for _ in range(3)]  # rarely confident
    costs = ExitCosts((10, 10, 10), (1, 1, 1))
    assert len(auto_thresholds(logits)) > 20
    shares = [p["exit_share"][0] for p in exit_curve(logits, y, costs)["curve"]]
    assert sum(0.2 < s < 0.8 for s in shares) >= 5
