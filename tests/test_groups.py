"""Tests of width groups (GN-DGL): grouped stages, node isolation, stop-gradient views, evaluation, costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locallearn.cli import main
from locallearn.config import ConfigError, load_config
from locallearn.evaluate import evaluate
from locallearn.groups import GroupError, group_body, node_costs
from locallearn.measure import macs
from locallearn.models import build_model
from locallearn.models.resnet import PadShortcut
from locallearn.network import LocalNet
from locallearn.objectives.groups import GroupObjective, build_group_objective, group_view

torch.set_num_threads(1)

SHAPE = (3, 8, 8)


def grouped_net(model: str = "resnet20", k: int = 2, groups: int = 2, width: float = 0.5,
                **options) -> LocalNet:
    backbone = build_model(model, SHAPE, 10, width=width, **options)
    return LocalNet.from_backbone(backbone, k, head="0c1f", groups=groups,
                                  group_options={"detach_ratio": 1.0})


def convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("model", ["vgg6a", "resnet20"])
@pytest.mark.parametrize("groups", [2, 4])
def test_first_conv_of_every_stage_is_ungrouped_and_the_others_grouped(model: str, groups: int) -> None:
    net = grouped_net(model, k=2, groups=groups, width=0.25 if model == "vgg6a" else 0.5)
    for stage in net.stages:
        first = stage.body[0]
        first_convs = [first.conv] if hasattr(first, "conv") else [first.conv1]
        for conv in convs(stage.body):
            reads_stage_input = conv in first_convs or (
                conv in convs(first) and conv.kernel_size == (1, 1))  # block 0's projection
            assert conv.groups == (1 if reads_stage_input else groups)
    out = net(torch.randn(2, *SHAPE))  # shapes are unchanged by grouping
    assert out.shape == (2, 10)


def owner_rows(p: torch.Tensor, g: int, groups: int) -> slice:
    n = p.shape[0] // groups
    return slice(g * n, (g + 1) * n)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_a_group_loss_trains_only_that_groups_parameters(shortcut: str) -> None:
    # K=1: one stage holding all of ResNet-20, with width changes (and shortcuts) inside it.
    net = grouped_net("resnet20", k=1, groups=2, shortcut=shortcut)
    stage = net.stages[0]
    y = torch.randint(0, 10, (4,))
    for g in range(2):
        stage.zero_grad(set_to_none=True)
        out = stage(torch.randn(4, *SHAPE))
        stage.objective.group_loss(out, y, g).backward()
        for name, p in stage.body.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            rows = owner_rows(p, g, 2)
            outside = torch.cat([grad[: rows.start], grad[rows.stop:]])
            assert torch.count_nonzero(outside) == 0, f"group {g} loss reached {name} of another group"
            assert torch.count_nonzero(grad[rows]) > 0, f"group {g} loss did not train {name}"
        other = stage.objective.objectives[1 - g]
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in other.parameters())


def test_summed_stage_loss_gives_each_group_its_own_gradient() -> None:
    net = grouped_net("vgg6a", k=2, groups=2, width=0.125)
    stage, y = net.stages[1], torch.randint(0, 10, (4,))
    h = torch.randn(4, *stage.in_shape)
    stage.objective.loss(stage(h), y).backward()
    total = [p.grad.clone() for p in stage.body.parameters()]
    for g in range(2):
        stage.zero_grad(set_to_none=True)
        stage.objective.group_loss(stage(h), y, g).backward()
        for p, full in zip(stage.body.parameters(), total):
            rows = owner_rows(p, g, 2)
            assert torch.allclose(p.grad[rows], full[rows], atol=1e-6)


@pytest.mark.parametrize("ratio,width", [(0.0, 4), (0.5, 10), (1.0, 16)])
def test_view_sees_own_channels_with_gradient_and_others_detached(ratio: float, width: int) -> None:
    h = torch.randn(2, 16, 3, 3, requires_grad=True)
    v = group_view(h, 4, 1, ratio)
    assert v.shape[1] == width
    v.sum().backward()
    touched = h.grad.abs().sum(dim=(0, 2, 3)) > 0
    assert touched.tolist() == [4 <= c < 8 for c in range(16)]  # only group 1's own channels


def test_group_objective_builds_heads_for_the_view_and_predicts_the_mean_softmax() -> None:
    obj = build_group_objective("ce", (8, 4, 4), 5, 4, detach_ratio=0.5, head="0c1f")
    assert isinstance(obj, GroupObjective) and obj.groups == 4
    assert obj.objectives[0].head[-1].in_features == 2 + 3 * 1  # own 2 + 1 of each other group
    h = torch.randn(3, 8, 4, 4)
    mean = torch.stack([lg.softmax(1) for lg in obj.group_logits(h)]).mean(0)
    assert torch.allclose(obj.predict(h).softmax(1), mean, atol=1e-6)


def test_diversity_weight_adds_the_penalty_to_the_group_losses() -> None:
    from locallearn.objectives.diversity import diversity_penalty

    plain = build_group_objective("ce", (4, 2, 2), 3, 2, head="0c1f")
    diverse = build_group_objective("ce", (4, 2, 2), 3, 2, head="0c1f", diversity_weight=0.5)
    diverse.load_state_dict(plain.state_dict())
    h, y = torch.randn(5, 4, 2, 2), torch.randint(0, 3, (5,))
    expected = plain.loss(h, y) + 0.5 * diversity_penalty(plain.group_logits(h), y, 3.0)
    assert diverse.loss(h, y).item() == pytest.approx(expected.item(), abs=1e-6)


def test_pad_shortcut_pads_every_group_on_its_own() -> None:
    x = torch.arange(4.0).reshape(1, 4, 1, 1)
    out = PadShortcut(extra_channels=4, stride=1, groups=2)(x)
    assert out.flatten().tolist() == [0, 1, 0, 0, 2, 3, 0, 0]


def test_a_g_that_does_not_divide_a_width_names_the_layer() -> None:
    backbone = build_model("vgg6a", SHAPE, 10, width=0.25)  # widths 32 64 128 128
    with pytest.raises(GroupError, match=r"split.groups=3 .* width 32 of stage 1, block 0"):
        LocalNet.from_backbone(backbone, 2, head="0c1f", groups=3)
    with pytest.raises(GroupError, match="Linear.*cannot be split"):
        group_body([nn.Linear(4, 4), nn.Linear(4, 4)], 2)


def test_evaluate_adds_group_accuracy_and_keeps_its_other_keys() -> None:
    net = grouped_net("vgg6a", k=2, groups=2, width=0.125)
    batches = [(torch.randn(6, *SHAPE), torch.randint(0, 10, (6,)))]
    result = evaluate(net, batches)
    assert {"stage_acc", "final_acc", "ens_uniform", "ens_weighted", "n"} <= set(result)
    assert len(result["group_acc"]) == 2 and all(len(a) == 2 for a in result["group_acc"])
    plain = LocalNet.from_backbone(build_model("vgg6a", SHAPE, 10, width=0.125), 2, head="0c1f")
    assert "group_acc" not in evaluate(plain, batches)


def test_node_costs_split_the_body_evenly_and_add_each_head() -> None:
    net = grouped_net("vgg6a", k=2, groups=2, width=0.125)
    x = torch.randn(2, *SHAPE)
    costs = node_costs(net, x)
    assert len(costs["nodes"]) == 4
    body = macs(lambda: net.stages[0].body.eval()(x)) // 2
    first = costs["nodes"][0]
    assert first["body_macs"] == pytest.approx(body / 2, abs=1)
    assert first["macs"] == first["body_macs"] + first["head_macs"]
    assert costs["largest_node_macs"] == max(r["macs"] for r in costs["nodes"])
    assert costs["total_macs"] == sum(r["macs"] for r in costs["nodes"])
    ungrouped = LocalNet.from_backbone(build_model("vgg6a", SHAPE, 10, width=0.125), 2, head="0c1f")
    assert node_costs(ungrouped, x)["largest_node_macs"] > costs["largest_node_macs"]


def test_config_validates_group_options() -> None:
    assert load_config(overrides=["split.groups=4", "objective.detach_ratio=1"]).split.groups == 4
    with pytest.raises(ConfigError, match="split.groups=0"):
        load_config(overrides=["split.groups=0"])
    with pytest.raises(ConfigError, match="detach_ratio"):
        load_config(overrides=["objective.detach_ratio=1.5"])


def test_cli_split_prints_nodes_and_rejects_a_bad_g(capsys: pytest.CaptureFixture) -> None:
    args = ["split", "--model", "vgg6a", "--k", "2", "--width", "0.125", "--input-shape", "3,8,8",
            "--head", "0c1f", "--batch", "4"]
    assert main([*args, "--groups", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 2     | 2     |" in out and "largest node" in out and "total" in out
    assert main([*args, "--groups", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_every_run_summary_holds_node_costs_and_group_accuracy(tmp_path) -> None:
    from locallearn.train import run

    cfg = load_config(overrides=[
        "model.name=vgg6a", "model.options={width: 0.125}", "data.name=digits",
        "data.train_subset=64", "data.test_subset=32", "split.k=2", "split.groups=2",
        "objective.head=0c1f", "objective.diversity_weight=0.5", "objective.detach_ratio=1",
        "train.epochs=1", "train.progress=false", f"train.out_dir={tmp_path}"])
    summary, _ = run(cfg)
    assert len(summary["nodes"]) == 4 and summary["largest_node_macs"] > 0
    assert summary["total_macs"] == sum(r["macs"] for r in summary["nodes"])
    assert len(summary["group_acc"]) == 2


def train_nodes(nodes: list[list], opts: list[list], x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of every (stage, group) node on its own, as group-parallel ranks would do it.

    Per stage: every node runs on the (detached) gathered input; nodes swap their
    detached messages (view channels, then logits); each steps its own optimizer.
    """
    h = x
    for stage_nodes, stage_opts in zip(nodes, opts):
        h = h.detach()  # the boundary: the gathered output of the previous stage's nodes
        outs = [node(h) for node in stage_nodes]
        messages = [node.message(o) for node, o in zip(stage_nodes, outs)]
        results = [node.local_loss(o, y, messages) for node, o in zip(stage_nodes, outs)]
        sent = [lg.detach() if lg is not None else None for _, lg in results]
        for node, opt, (loss, logits) in zip(stage_nodes, stage_opts, results):
            if logits is not None:
                loss = loss + node.diversity(logits, y, sent)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        h = torch.cat(outs, dim=1)


@pytest.mark.parametrize("model,options", [("vgg6a", {"width": 0.125}),
                                           ("resnet20", {"width": 0.5, "shortcut": "A"}),
                                           ("resnet20", {"width": 0.5, "shortcut": "B"})])
def test_group_nodes_trained_apart_match_the_sequential_engine(model: str, options: dict) -> None:
    from locallearn.engines import LocalEngine
    from locallearn.groups import group_nodes

    backbone = build_model(model, SHAPE, 10, **options)
    net = LocalNet.from_backbone(backbone, 2, head="0c1f", groups=2, group_options={
        "detach_ratio": 0.5, "diversity_weight": 0.5})
    nodes = [group_nodes(stage) for stage in net.stages]
    make = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)  # noqa: E731
    opts = [make(s.parameters()) for s in net.stages]
    node_opts = [[make(n.parameters()) for n in stage_nodes] for stage_nodes in nodes]
    for _ in range(3):
        x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
        LocalEngine().step(net, opts, x, y)
        train_nodes(nodes, node_opts, x, y)
    net.eval()
    x = torch.randn(4, *SHAPE)
    h = x
    for stage, stage_nodes in zip(net.stages, nodes):
        for n in stage_nodes:
            n.eval()
        out = stage(h)
        gathered = torch.cat([n(h) for n in stage_nodes], dim=1)
        assert torch.allclose(gathered, out, atol=1e-5)  # weights and BN statistics agree
        messages = [n.message(o) for n, o in zip(stage_nodes, gathered.chunk(2, dim=1))]
        for g, n in enumerate(stage_nodes):
            view = torch.cat([o if j == g else m for j, (o, m) in
                              enumerate(zip(gathered.chunk(2, dim=1), messages))], dim=1)
            assert torch.allclose(n.objective.predict(view),
                                  stage.objective.group_logits(out)[g], atol=1e-5)
        h = out
