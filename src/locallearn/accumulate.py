"""Dynamic layer accumulation: which stages train in which epoch (DASCPL).

A schedule is data: for every stage the first epoch it trains and the epoch it stops.
Engines read only the set of active stages (``engine.active``) and run the network
up to the deepest active stage: stages below it that do not train run forward
without a graph (they feed the deeper ones), stages beyond it do not run at all.

``grow`` with triggers (2, 4) on K=3, 6 epochs (``T`` trains, ``f`` forward only,
``.`` not run)::

    epoch    1  2  3  4  5  6
    stage 1  T  T  T  T  T  T
    stage 2  .  .  T  T  T  T
    stage 3  .  .  .  .  T  T

``shrink`` (the reverse: shallow stages stop early) with the same triggers::

    epoch    1  2  3  4  5  6
    stage 1  T  T  f  f  f  f
    stage 2  T  T  T  T  f  f
    stage 3  T  T  T  T  T  T

Compute saved is counted in MACs per sample: a training stage costs about three
forward passes of its body and objective (backward is about twice the forward),
a forward-only stage one pass of its body, a stage that does not run nothing. The
fraction is relative to training every stage.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from locallearn.engines.base import stage_loss
from locallearn.errors import ConfigError
from locallearn.measure import macs
from locallearn.network import LocalNet
from locallearn.types import Activation, first_tensor, map_tensors

if TYPE_CHECKING:  # type-only: the config layer calls this module's checks
    from locallearn.config import RunConfig

ACCUMULATE = ("none", "grow", "shrink")
SCHEDULED_ENGINES = ("local", "pipeline")  # engines that read `active`
BACKWARD_FACTOR = 2.0  # backward of a layer costs about twice its forward


@dataclass(frozen=True)
class StageSchedule:
    """Epochs (0-based) in which each stage trains: ``start[k] <= epoch < stop[k]``.

    ``stop[k]`` is ``None`` for a stage that trains to the end.
    """

    start: tuple[int, ...]
    stop: tuple[int | None, ...]

    def active(self, epoch: int) -> set[int]:
        """The (0-based) stages that train in ``epoch`` (0-based)."""
        return {k for k, (a, b) in enumerate(zip(self.start, self.stop))
                if a <= epoch and (b is None or epoch < b)}

    def depth(self, epoch: int) -> int:
        """How many stages run in ``epoch``: up to the deepest active one."""
        active = self.active(epoch)
        return max(active) + 1 if active else 0


def build_schedule(kind: str, triggers: Sequence[int], k: int, epochs: int) -> StageSchedule | None:
    """The schedule of ``train.accumulate`` with ``train.triggers`` (``None`` for ``none``).

    Args:
        kind: ``none``, ``grow`` (stage i+1 joins after ``triggers[i - 1]`` epochs) or
            ``shrink`` (stage i stops after ``triggers[i - 1]`` epochs).
        triggers: K-1 non-decreasing epoch counts.
        k: number of stages.
        epochs: length of the run.

    Raises:
        ConfigError: for an unknown kind or triggers that do not fit.
    """
    if kind not in ACCUMULATE:
        raise ConfigError(f"train.accumulate={kind!r}; choose one of: {', '.join(ACCUMULATE)}")
    if kind == "none":
        if triggers:
            raise ConfigError("train.triggers is set but train.accumulate=none; set "
                              "train.accumulate=grow or shrink, or drop the triggers")
        return None
    t = [int(v) for v in triggers]
    if len(t) != k - 1:
        raise ConfigError(f"train.accumulate={kind} needs K-1={k - 1} train.triggers (epochs), "
                          f"got {len(t)}: {list(triggers)}")
    if any(b < a for a, b in itertools.pairwise(t)):
        raise ConfigError(f"train.triggers must not decrease, got {t}")
    low, high = (1, epochs - 1) if kind == "grow" else (1, epochs)
    if t and not (low <= t[0] and t[-1] <= high):
        raise ConfigError(f"train.triggers {t} must lie in [{low}, {high}] for "
                          f"train.accumulate={kind} with train.epochs={epochs}")
    if kind == "grow":
        return StageSchedule((0, *t), (None,) * k)
    return StageSchedule((0,) * k, (*t, None))


def check_config(cfg: RunConfig) -> None:
    """Validate ``train.accumulate`` / ``train.triggers`` against the run.

    Raises:
        ConfigError: for bad triggers, or a schedule with an engine that cannot follow it.
    """
    build_schedule(cfg.train.accumulate, cfg.train.triggers, cfg.split.k, cfg.train.epochs)
    if cfg.train.accumulate != "none" and cfg.engine.name not in SCHEDULED_ENGINES:
        raise ConfigError(f"train.accumulate={cfg.train.accumulate} needs engine "
                          f"{' or '.join(SCHEDULED_ENGINES)}, not {cfg.engine.name}")


def delay_lr_schedules(schedulers: Sequence[LambdaLR], schedule: StageSchedule,
                       steps_per_epoch: int, total_steps: int) -> None:
    """Fit each stage's LR schedule into the epochs from its start to the end of the run.

    A stage that joins late would otherwise start at the tail of a decayed schedule:
    its schedule is the run's, compressed in time into its own span (and flat at the
    start value before it). The schedulers still step every step, so checkpoints and
    resume are unchanged.
    """
    for sched, start in zip(schedulers, schedule.start):
        offset = start * steps_per_epoch
        if offset == 0:
            continue
        sched.lr_lambdas = [_compressed(sched.lr_lambdas[0], offset, total_steps)]
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * sched.lr_lambdas[0](sched.last_epoch)


def _compressed(factor: Callable[[int], float], offset: int, total: int) -> Callable[[int], float]:
    """``factor`` over ``total`` steps, squeezed into the steps from ``offset`` to ``total``."""
    span = max(1, total - offset)

    def shifted(step: int) -> float:
        return factor(max(0, step - offset) * total // span)

    return shifted


@torch.no_grad()
def stage_train_costs(net: LocalNet, x: Activation, y: torch.Tensor) -> list[tuple[int, int]]:
    """Per-sample MACs of each stage's body forward and its local loss (objective + predictor).

    Each stage runs where its parameters are (a pipeline rank keeps only its own stages
    on its device), so the activations follow it there.
    """
    n = len(y)
    was = net.training
    net.eval()
    rows = []
    trail: list[Activation] = []
    h = x
    for stage in net.stages:
        param = next(stage.parameters(), None)
        device = param.device if param is not None else first_tensor(h).device
        h, y = _to(h, device), y.to(device)
        trail = [_to(t, device) for t in trail]
        trail.append(h)
        inp = h
        body = macs(lambda: stage(inp, trail)) // n  # noqa: B023 (called right here)
        h = stage(inp, trail)
        out = h
        rows.append((body, macs(lambda: stage_loss(stage, out, y)) // n))  # noqa: B023
    net.train(was)
    return rows


def _to(a: Activation, device: torch.device) -> Activation:
    return map_tensors(lambda t: t.to(device), a)


def compute_fraction(costs: Sequence[tuple[int, int]], active: set[int] | None) -> float:
    """Training MACs of one step with ``active`` stages, relative to training all stages."""
    def train(body: int, loss: int) -> float:
        return (1.0 + BACKWARD_FACTOR) * (body + loss)

    full = sum(train(b, lo) for b, lo in costs)
    if active is None:
        return 1.0
    depth = max(active) + 1 if active else 0
    spent = sum(train(b, lo) if i in active else float(b)
                for i, (b, lo) in enumerate(costs[:depth]))
    return spent / full if full else 1.0
