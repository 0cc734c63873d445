"""SupCon: loss and gradient against a loop-based reference, limits, projectors, SCPL nets,
per-stage predictors (DASCPL) and the BP-with-predictors baseline."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from locallearn.engines import BackpropEngine, LocalEngine, stage_loss
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.objectives import build_objective
from locallearn.objectives.projectors import build_projector
from locallearn.objectives.supcon import SupConObjective, supcon_loss
from locallearn.optim import build_optimizer

torch.set_num_threads(1)


def reference_supcon(z: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    """Khosla et al. eq. 2 written as plain loops over anchors and positives."""
    terms = []
    n = len(y)
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denom = sum(torch.exp(z[i] @ z[a] / t) for a in range(n) if a != i)
        terms.append(-sum(torch.log(torch.exp(z[i] @ z[p] / t) / denom) for p in positives)
                     / len(positives))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_loss_and_gradient_match_loop_reference(t):
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 1, 2, 4])  # classes 3 and 4 are singletons
    a = raw.clone().requires_grad_()
    b = raw.clone().requires_grad_()
    la = supcon_loss(F.normalize(a, dim=1), y, t)
    lb = reference_supcon(F.normalize(b, dim=1), y, t)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(a.grad, b.grad)


def test_separated_clusters_reach_the_lower_bound():
    # 4 classes x 4 samples on orthogonal unit vectors: each anchor's 3 positives sit on it
    y = torch.arange(4).repeat_interleave(4)
    z = F.one_hot(y, 4).double()
    loss = supcon_loss(z, y, 0.1).item()
    assert loss == pytest.approx(math.log(3), abs=1e-3)  # -log(1/|P|) is the minimum
    random = supcon_loss(F.normalize(torch.randn(16, 4, dtype=torch.float64), dim=1), y, 0.1)
    assert random.item() > loss + 1.0


def test_singletons_are_finite():
    z = F.normalize(torch.randn(5, 3), dim=1).requires_grad_()
    loss = supcon_loss(z, torch.arange(5), 0.1)  # no class has a second member
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()
    one = torch.randn(1, 3, requires_grad=True)
    assert torch.isfinite(supcon_loss(one, torch.tensor([2]), 0.1))


def test_loss_is_stable_at_low_temperature():
    z = F.normalize(torch.randn(8, 4), dim=1)
    loss = supcon_loss(z, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 1e-4)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind,pool,shape,out", [
    ("identity", "avg", (6, 4, 4), 6), ("identity", "none", (6, 4, 4), 96),
    ("linear", "avg", (6, 4, 4), 16), ("mlp", "none", (6, 4, 4), 16), ("mlp", "avg", (10,), 16)])
def test_projector_shapes(kind, pool, shape, out):
    proj = build_projector(kind, shape, dim=16, hidden=8, pool=pool)
    assert proj(torch.randn(3, *shape)).shape == (3, out)


def test_projector_on_sequences_uses_the_mask():
    proj = build_projector("linear", (5, 4), dim=3)
    h, mask = torch.randn(2, 5, 4), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).bool()
    changed = h.clone()
    changed[0, 3] += 100.0  # a padded position must not matter
    torch.testing.assert_close(proj((h, mask)), proj((changed, mask)))


def test_bad_options_name_the_choices():
    with pytest.raises(ValueError, match="identity, linear, mlp"):
        build_projector("conv", (4,))
    with pytest.raises(ValueError, match="temperature"):
        build_objective("supcon", (4,), 3, temperature=0.0)
    with pytest.raises(ValueError, match="last, all, none"):
        build_objective("supcon", (4,), 3, classifier="first")


def _scpl(k: int = 3, predictor: str | None = None) -> LocalNet:
    torch.manual_seed(0)
    backbone = build_model("vgg8", (3, 16, 16), 4, width=0.0625)
    return LocalNet.from_backbone(backbone, k, objective="supcon", predictor=predictor,
                                  objective_options={"proj_dim": 8, "proj_hidden": 16})


def test_scpl_net_has_a_classifier_only_on_the_last_stage():
    net = _scpl()
    assert all(isinstance(s.objective, SupConObjective) for s in net.stages)
    assert [s.objective.classifier is not None for s in net.stages] == [False, False, True]
    logits = net.stage_logits(torch.randn(2, 3, 16, 16))
    assert logits[0] is None and logits[1] is None and logits[2].shape == (2, 4)


def test_scpl_trains_with_the_local_engine():
    net = _scpl(predictor="linear")
    opts = [build_optimizer(s.parameters(), "adam", 1e-3) for s in net.stages]
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    first = LocalEngine().step(net, opts, x, y)
    for _ in range(4):
        last = LocalEngine().step(net, opts, x, y)
    assert all(math.isfinite(v) for v in first) and sum(last) < sum(first)
    assert all(lg is not None for lg in net.stage_logits(x))  # DASCPL: every prefix classifies


def _body_grads(stage, x, y):
    stage.zero_grad(set_to_none=True)
    stage_loss(stage, stage(x), y).backward()
    return [p.grad.clone() for p in stage.body.parameters()]


def test_predictor_loss_leaves_the_body_gradient_unchanged():
    with_pred = _scpl(predictor="mlp").stages[0]
    without = copy.deepcopy(with_pred)
    without.predictor = None
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for a, b in zip(_body_grads(with_pred, x, y), _body_grads(without, x, y)):
        torch.testing.assert_close(a, b)
    assert any(p.grad is not None for p in with_pred.predictor.parameters())


def test_backprop_with_predictors_keeps_the_trunk_gradients_of_plain_backprop():
    """Baseline "BP + per-stage predictors on detached features" equals BP on the trunk."""
    torch.manual_seed(0)
    backbone = build_model("mlp", (1, 4, 4), 3, hidden=[8, 8, 8])
    a = LocalNet.from_backbone(backbone, 3, predictor="linear")
    b = copy.deepcopy(a)
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    lr = [build_optimizer(s.parameters(), "sgd", 0.1, momentum=0.0) for s in a.stages]
    BackpropEngine(aux_heads=True).step(a, lr, x, y)
    lr = [build_optimizer(s.parameters(), "sgd", 0.1, momentum=0.0) for s in b.stages]
    BackpropEngine(aux_heads=False).step(b, lr, x, y)
    for sa, sb in zip(a.stages, b.stages):
        for pa, pb in zip(sa.body.parameters(), sb.body.parameters()):
            torch.testing.assert_close(pa, pb)
    assert not torch.equal(a.stages[0].predictor.head[-1].weight,
                           b.stages[0].predictor.head[-1].weight)


def test_scpl_on_a_text_model_pools_over_real_tokens():
    torch.manual_seed(0)
    backbone = build_model("lstm", (6,), 2, vocab_size=20, embed_dim=8, hidden=8, layers=2)
    net = LocalNet.from_backbone(backbone, 3, objective="supcon", predictor="linear",
                                 objective_options={"proj_dim": 4, "proj_hidden": 8})
    ids = torch.randint(1, 20, (8, 6))
    ids[:4, 4:] = 0  # padding
    opts = [build_optimizer(s.parameters(), "adam", 1e-3) for s in net.stages]
    losses = LocalEngine().step(net, opts, ids, torch.tensor([0, 1] * 4))
    assert all(math.isfinite(v) for v in losses)
    assert all(lg.shape == (8, 2) for lg in net.stage_logits(ids))


@pytest.mark.parametrize("name", ["scpl_vgg8", "scpl_resnet18", "dascpl_vgg8", "dascpl_resnet18"])
def test_presets_build_the_scpl_stages(name):
    from pathlib import Path

    from locallearn.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert cfg.optim.name == "adam" and cfg.optim.lr == 1e-3 and cfg.optim.min_lr == 1e-5
    o = cfg.objective
    backbone = build_model(cfg.model.name, (3, 16, 16), 10, width=0.0625)
    net = LocalNet.from_backbone(backbone, cfg.split.k, by=cfg.split.by, cuts=list(cfg.split.cuts),
                                 objective=o.name, predictor=o.predictor or None,
                                 objective_options=dict(o.options))
    can = [lg is not None for lg in net.stage_logits(torch.randn(2, 3, 16, 16))]
    assert can == ([True] * 4 if name.startswith("dascpl") else [False, False, False, True])
