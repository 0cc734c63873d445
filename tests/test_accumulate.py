"""Dynamic layer accumulation: schedules, the local engine growing the net, the run log."""

import copy
import math

import pytest
import torch

from locallearn import runs
from locallearn.accumulate import StageSchedule, build_schedule, compute_fraction
from locallearn.config import ConfigError, load_config
from locallearn.engines import LocalEngine
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.optim import build_optimizer
from locallearn.train import run

torch.set_num_threads(1)


def _table(s: StageSchedule, epochs: int, k: int) -> list[str]:
    """Rows like the module docstring: T trains, f forward only, . not run."""
    rows = []
    for stage in range(k):
        marks = ["T" if stage in s.active(e) else "f" if stage < s.depth(e) else "."
                 for e in range(epochs)]
        rows.append("".join(marks))
    return rows


def test_grow_and_shrink_tables():
    assert _table(build_schedule("grow", (2, 4), 3, 6), 6, 3) == ["TTTTTT", "..TTTT", "....TT"]
    assert _table(build_schedule("shrink", (2, 4), 3, 6), 6, 3) == ["TTffff", "TTTTff", "TTTTTT"]
    assert build_schedule("none", (), 3, 6) is None


@pytest.mark.parametrize("kind,triggers,match", [
    ("grow", (2,), "needs K-1=2"), ("grow", (3, 2), "must not decrease"),
    ("grow", (2, 6), r"\[1, 5\]"), ("shrink", (0, 2), r"\[1, 6\]"), ("none", (1, 2), "drop"),
    ("bloom", (1, 2), "grow, shrink")])
def test_bad_schedules_name_the_problem(kind, triggers, match):
    with pytest.raises(ConfigError, match=match):
        build_schedule(kind, triggers, 3, 6)


def test_config_rejects_a_schedule_the_engine_cannot_follow():
    with pytest.raises(ConfigError, match="needs engine local or pipeline"):
        load_config(None, ["split.k=2", "train.accumulate=grow", "train.triggers=[1]",
                           "engine=backprop"])
    cfg = load_config(None, ["split.k=2", "train.accumulate=grow", "train.triggers=[1]"])
    assert cfg.train.triggers == (1,)


def test_compute_fraction_counts_train_forward_and_skipped_stages():
    costs = [(10, 2), (20, 4), (30, 6)]  # (body, loss) MACs per stage
    full = 3 * (12 + 24 + 36)
    assert compute_fraction(costs, None) == 1.0
    assert compute_fraction(costs, {0}) == pytest.approx(3 * 12 / full)  # stages 2-3 not run
    assert compute_fraction(costs, {2}) == pytest.approx((10 + 20 + 3 * 36) / full)


def _net() -> LocalNet:
    torch.manual_seed(0)
    return LocalNet.from_backbone(build_model("mlp", (1, 4, 4), 3, hidden=[8, 8, 8]), 3)


def test_local_engine_does_not_run_stages_beyond_the_deepest_active_one():
    net = _net()
    before = copy.deepcopy(net)
    calls = [0, 0, 0]
    for i, s in enumerate(net.stages):
        s.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    engine = LocalEngine()
    engine.active = {1}
    opts = [build_optimizer(s.parameters(), "sgd", 0.1) for s in net.stages]
    losses = engine.step(net, opts, torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    assert calls == [1, 1, 0]
    assert [math.isnan(v) for v in losses] == [True, False, True]
    changed = [any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
               for a, b in zip(net.stages, before.stages)]
    assert changed == [False, True, False]


def test_a_growing_run_logs_the_stages_and_the_compute_saved(tiny_cfg, tmp_path):
    cfg = load_config(None, tiny_cfg + ["split.k=3", "model.options={hidden: [32, 32, 32]}",
                                        "train.epochs=3", "train.accumulate=grow",
                                        "train.triggers=[1, 2]", "train.name=g"])
    run(cfg)
    rows = runs.read_metrics(tmp_path / "g")
    assert [r["stages_trained"] for r in rows] == [[1], [1, 2], [1, 2, 3]]
    assert [r["stages_run"] for r in rows] == [1, 2, 3]
    fractions = [r["train_macs_fraction"] for r in rows]
    assert fractions[0] < fractions[1] < fractions[2] == 1.0
    assert all(math.isnan(v) for v in rows[0]["train_loss"][1:])  # stages 2-3 did not train


def test_a_shrinking_run_stops_the_shallow_stages(tiny_cfg, tmp_path):
    cfg = load_config(None, tiny_cfg + ["split.k=2", "model.options={hidden: [32, 32]}",
                                        "train.epochs=2", "train.accumulate=shrink",
                                        "train.triggers=[1]", "train.name=s"])
    run(cfg)
    rows = runs.read_metrics(tmp_path / "s")
    assert [r["stages_trained"] for r in rows] == [[1, 2], [2]]
    assert [r["stages_run"] for r in rows] == [2, 2]
    assert rows[1]["train_macs_fraction"] < 1.0


def test_the_pipeline_engine_reads_the_same_active_set():
    from locallearn.engines.pipeline import PipelineEngine

    net, engine = _net(), PipelineEngine(range(0, 3))
    assert engine.active is None and engine.depth(net) == 3
    engine.active = {0}  # what the trainer sets from the schedule, on every rank
    assert engine.depth(net) == 1


@pytest.mark.slow
def test_a_growing_pipeline_run_logs_the_stages(tiny_cfg, tmp_path):
    """Real worker processes (about a minute on a busy machine): run with -m slow."""
    cfg = load_config(None, tiny_cfg + ["split.k=3", "model.options={hidden: [32, 32, 32]}",
                                        "train.epochs=3", "train.accumulate=grow",
                                        "train.triggers=[1, 2]", "train.name=gp",
                                        "engine=pipeline", "engine.workers=2"])
    run(cfg)
    rows = runs.read_metrics(tmp_path / "gp")
    assert [r["stages_trained"] for r in rows] == [[1], [1, 2], [1, 2, 3]]
    assert [math.isnan(v) for v in rows[0]["train_loss"]] == [False, True, True]
    assert rows[0]["train_macs_fraction"] < rows[1]["train_macs_fraction"] < 1.0


def _lrs(start: int, steps: int = 30, per_epoch: int = 10, run: int = 30):
    """LRs of a cosine schedule over ``steps`` delayed to epoch ``start``, stepped ``run`` times."""
    from locallearn.accumulate import delay_lr_schedules
    from locallearn.optim import build_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, steps, "cosine", min_factor=0.01)
    delay_lr_schedules([sched], StageSchedule((start,), (None,)), per_epoch, steps)
    lrs = []
    for _ in range(run):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs, sched


def test_a_late_stage_gets_the_whole_lr_schedule_in_its_own_epochs():
    run_lrs, _ = _lrs(0)
    late, _ = _lrs(2)  # joins after 2 of 3 epochs: the cosine squeezed into the last 10 steps
    assert late[:21] == pytest.approx([1.0] * 21)
    assert late[20:] == pytest.approx(run_lrs[::3][:10], abs=1e-9)
    assert late[-1] < 0.05


def test_delayed_schedules_survive_a_checkpoint():
    _, sched = _lrs(1, run=25)
    fresh_lrs, fresh = _lrs(1, run=0)  # rebuilt as the trainer does, then restored
    fresh.load_state_dict(sched.state_dict())
    assert fresh.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert fresh.lr_lambdas[0](27) == pytest.approx(sched.lr_lambdas[0](27))
