"""NT-Xent: loss and gradient against a loop-based reference, negative sampling, the
SimCLR objective, two-view batches in the trainer, and the engines on a SimCLR net."""

import math

import pytest
import torch
import torch.nn.functional as F

from locallearn.config import load_config
from locallearn.data import ArrayData, DataSplits
from locallearn.engines import BackpropEngine, LocalEngine
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.objectives import OBJECTIVES, build_objective
from locallearn.objectives.simclr import SimCLRObjective, negative_mask, nt_xent, positive_index
from locallearn.optim import build_optimizer
from locallearn.train import Trainer, TrainingError, stack_views

torch.set_num_threads(1)


def reference_loss_and_grad(z: torch.Tensor, t: float, keep: torch.Tensor | None = None):
    """NT-Xent and its analytic gradient in z, written as loops over anchors.

    For anchor i with positive p(i) and candidate set A(i) (positive + kept negatives),
    loss_i = -s_ip/t + log sum_{a in A(i)} exp(s_ia/t), P_ia its softmax. The mean over
    2N anchors has gradient, for row j:
      (1/2Nt) [ -z_p(j) + sum_{a in A(j)} P_ja z_a + sum_{i: j in A(i)} (P_ij - [j = p(i)]) z_i ].
    """
    z = z.detach().double()
    n2 = len(z)
    pos = [(i + n2 // 2) % n2 for i in range(n2)]
    cand = [[a for a in range(n2) if a != i and (a == pos[i] or keep is None or bool(keep[i, a]))]
            for i in range(n2)]
    loss, prob = 0.0, {}
    for i in range(n2):
        e = {a: math.exp(float(z[i] @ z[a]) / t) for a in cand[i]}
        total = sum(e.values())
        loss += -math.log(e[pos[i]] / total)
        prob.update({(i, a): v / total for a, v in e.items()})
    grad = torch.zeros_like(z)
    for j in range(n2):
        grad[j] -= z[pos[j]]
        for a in cand[j]:
            grad[j] += prob[(j, a)] * z[a]
        for i in range(n2):
            if j in cand[i]:
                grad[j] += (prob[(i, j)] - (1.0 if j == pos[i] else 0.0)) * z[i]
    return loss / n2, grad / (n2 * t)


@pytest.mark.parametrize("t", [0.1, 0.5, 2.0])
def test_loss_and_gradient_match_the_loop_reference(t):
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    loss = nt_xent(z, t)
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(z, t)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    torch.testing.assert_close(z.grad, ref_grad)


def test_loss_and_gradient_with_sampled_negatives_match_the_reference():
    g = torch.Generator().manual_seed(2)
    z = F.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    keep = negative_mask(12, 0.3, torch.Generator().manual_seed(5))
    loss = nt_xent(z, 0.4, keep)
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(z, 0.4, keep)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    torch.testing.assert_close(z.grad, ref_grad)


def test_gradient_through_normalisation_matches_gradcheck():
    raw = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: nt_xent(F.normalize(r, dim=1), 0.5), (raw,))


def test_identical_orthogonal_views_give_the_closed_form_minimum():
    # 4 images on orthogonal unit vectors, both views equal: s_pos = 1, every negative 0
    z = torch.eye(4, dtype=torch.float64).repeat(2, 1)
    t = 0.5
    expected = math.log(1 + 6 * math.exp(-1 / t))  # 2N-2 = 6 negatives at similarity 0
    assert nt_xent(z, t).item() == pytest.approx(expected)
    scrambled = torch.cat([torch.eye(4), torch.eye(4).roll(1, 0)]).double()
    assert nt_xent(scrambled, t).item() > expected + 1.0


def test_negative_mask_keeps_the_asked_number_of_true_negatives():
    n2 = 20
    pos = positive_index(n2)
    keep = negative_mask(n2, 0.25, torch.Generator().manual_seed(0))
    assert keep.sum(1).tolist() == [round(0.25 * 18)] * n2
    assert not keep.diagonal().any()
    assert not keep[torch.arange(n2), pos].any()
    again = negative_mask(n2, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    full = negative_mask(n2, 1.0)
    assert full.sum(1).tolist() == [18] * n2
    assert negative_mask(n2, 1e-6, torch.Generator()).sum(1).tolist() == [1] * n2  # at least one


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="even number of rows"):
        nt_xent(torch.randn(5, 3), 0.5)
    with pytest.raises(ValueError, match="neg_fraction"):
        negative_mask(8, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        build_objective("simclr", (8,), 10, temperature=0.0)
    with pytest.raises(ValueError, match="unknown simclr option"):
        build_objective("simclr", (8,), 10, temprature=0.1)


def test_objective_has_its_own_projector_and_declares_two_views():
    assert "simclr" in OBJECTIVES
    net = LocalNet.from_backbone(build_model("mlp", (1, 8, 8), 10, hidden=[16, 16]), k=2,
                                 objective="simclr", objective_options={"proj_dim": 8})
    objs = [s.objective for s in net.stages]
    assert all(isinstance(o, SimCLRObjective) and o.views == 2 for o in objs)
    assert objs[0].projector is not objs[1].projector
    assert objs[0].predict(torch.randn(4, 16)) is None
    h = torch.randn(6, 16)
    assert objs[0].loss(h, torch.zeros(6, dtype=torch.long)).item() > 0


def test_stack_views_makes_independent_views_of_the_same_images():
    def jitter(x, generator=None):
        return x + torch.rand(x.shape, generator=generator)

    x = torch.zeros(3, 1, 2, 2)
    two = stack_views(jitter, 2)(x, torch.Generator().manual_seed(0))
    assert two.shape == (6, 1, 2, 2)
    assert not torch.equal(two[:3], two[3:])  # two different augmentations
    again = stack_views(jitter, 2)(x, torch.Generator().manual_seed(0))
    assert torch.equal(two, again)


def _images(n: int = 16) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 2
    data = ArrayData(x, y, ["a", "b"])
    return DataSplits("toy", data, data, {"mean": [0.5] * 3, "std": [0.25] * 3})


def _cfg(*extra: str):
    return load_config(None, ["model=mlp", "model.options={hidden: [16, 16]}", "split.k=2",
                              "objective=simclr", "data.batch_size=4", "train.progress=false",
                              *extra])


def test_trainer_feeds_two_views_with_labels_repeated():
    cfg = _cfg("data.augment=basic")
    data = _images()
    trainer = Trainer(LocalNet.from_backbone(build_model("mlp", (3, 8, 8), 2, hidden=[16, 16]), 2,
                                             objective="simclr"), data, cfg)
    assert trainer.views == 2
    x, y = next(iter(trainer.train_batches()))
    assert x.shape == (8, 3, 8, 8) and torch.equal(y[:4], y[4:])
    assert not torch.equal(x[:4], x[4:])
    row = trainer.train_epoch()
    assert all(math.isfinite(v) for v in row["train_loss"])


def test_trainer_without_augmentation_refuses_a_two_view_objective():
    net = LocalNet.from_backbone(build_model("mlp", (3, 8, 8), 2, hidden=[16, 16]), 2,
                                 objective="simclr")
    with pytest.raises(TrainingError, match="data.augment=strong"):
        Trainer(net, _images(), _cfg())


def _simclr_net(k: int) -> LocalNet:
    torch.manual_seed(0)
    return LocalNet.from_backbone(build_model("mlp", (1, 4, 4), 2, hidden=[8, 8]), k,
                                  objective="simclr", objective_options={"proj_dim": 4,
                                                                         "proj_hidden": 8})


def test_k1_local_equals_backprop_with_nt_xent():
    x, y = torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    nets = [_simclr_net(1), _simclr_net(1)]
    for net, engine in zip(nets, (LocalEngine(), BackpropEngine(aux_heads=False))):
        opts = [build_optimizer(s.parameters(), "sgd", 0.1) for s in net.stages]
        engine.step(net, opts, x, y)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)


def test_end_to_end_baseline_trains_early_stages_only_through_the_last_loss():
    net = _simclr_net(2)
    before = [p.clone() for p in net.parameters()]
    opts = [build_optimizer(s.parameters(), "sgd", 0.1) for s in net.stages]
    BackpropEngine(aux_heads=False).step(net, opts, torch.randn(8, 1, 4, 4),
                                         torch.zeros(8, dtype=torch.long))
    changed = {n for (n, p), b in zip(net.named_parameters(), before) if not torch.equal(p, b)}
    assert any(n.startswith("stages.0.body") for n in changed)  # BP reaches stage 1's body
    assert not any(n.startswith("stages.0.objective") for n in changed)  # its projector is idle
    assert any(n.startswith("stages.1.objective") for n in changed)


def test_pipeline_with_nt_xent_equals_the_sequential_engine():
    import copy

    from helpers import floats, pipeline_step, ranks  # the in-memory ranks of the pipeline tests

    a = _simclr_net(2)
    b = copy.deepcopy(a)
    oa, ob = ([build_optimizer(s.parameters(), "adam", 0.01) for s in n.stages] for n in (a, b))
    engines = ranks(b, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 1, 4, 4, generator=g), torch.zeros(8, dtype=torch.long)
        assert pipeline_step(engines, b, ob, x, y) == pytest.approx(floats(LocalEngine().step(a, oa, x, y)))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_micro_batches_are_refused_for_nt_xent():
    from locallearn.config import ConfigError

    with pytest.raises(ConfigError, match="micro_batches=1"):
        load_config(None, ["objective=simclr", "engine=pipeline", "engine.micro_batches=2"])
