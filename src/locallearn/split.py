"""Cut a backbone's blocks into K contiguous stages.

Splitting is data: a split is a list of cut indices (the first block of every stage
after the first), chosen by

==========  ===============================================================
``cuts``     explicit cut indices
``count``    equal number of blocks per stage
``params``   balanced parameter count
``macs``     balanced multiply-accumulates
``memory``   balanced activation memory (bytes saved for backward, measured)
``time``     balanced measured forward + backward time (plus, given a head
             builder, the time of the local objective at each possible cut)
==========  ===============================================================

Balancing picks the contiguous partition that minimises the largest stage cost
(exact dynamic programme; models have at most a few hundred blocks). Measuring runs
on copies of the blocks with a forked random state, so it changes neither the
model (BatchNorm statistics, gradients) nor the random numbers of the run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from locallearn.errors import ConfigError
from locallearn.measure import SavedTensorsMeter, macs, param_count
from locallearn.models.blocks import Backbone
from locallearn.types import Activation, first_tensor, map_tensors

SPLIT_BY = ("count", "params", "macs", "memory", "time", "cuts")


def _sample(shape: tuple[int, ...], batch: int) -> torch.Tensor:
    return torch.randn(batch, *shape)


def _block_inputs(backbone: Backbone, batch: int, sample: Activation | None) -> list[Activation]:
    """The input of every block for one sample batch (eval mode, no grad)."""
    h: Activation = sample if sample is not None else _sample(backbone.shapes[0], batch)
    inputs = []
    with torch.no_grad():
        for block in backbone.blocks:
            inputs.append(h)
            was = block.training
            h = block.eval()(h)
            block.train(was)
    return inputs


def _requires_grad(h: Activation) -> Activation:
    return map_tensors(lambda t: t.detach().requires_grad_(t.is_floating_point()), h)


def _sum(h: Activation) -> torch.Tensor:
    return first_tensor(h).sum()


def block_costs(backbone: Backbone, by: str, batch: int = 32,
                sample: Activation | None = None, repeats: int = 3) -> list[float]:
    """Cost of each block under measure ``by`` (``params``, ``macs``, ``memory``, ``time``).

    ``memory`` is the peak bytes saved for backward by one block on a batch of
    ``batch`` samples; ``time`` the median forward + backward seconds on that batch.

    Raises:
        ValueError: for an unknown measure.
    """
    if by == "count":
        return [1.0] * len(backbone.blocks)
    if by == "params":
        return [float(param_count(b)) for b in backbone.blocks]
    inputs = _block_inputs(backbone, batch, sample)
    costs = []
    for block, x in zip(backbone.blocks, inputs):
        twin = copy.deepcopy(block)  # measuring in train mode would update BatchNorm statistics
        if by == "macs":
            costs.append(float(macs(lambda: twin(x))) / batch)
        elif by == "memory":
            with SavedTensorsMeter(twin) as meter:
                _sum(twin(_requires_grad(x))).backward()
            costs.append(float(meter.peak_bytes))
        elif by == "time":
            costs.append(_median_seconds(lambda: _sum(twin(_requires_grad(x))).backward(), repeats))
        else:
            raise ConfigError(f"unknown split measure {by!r}; choose one of: {', '.join(SPLIT_BY)}")
    return costs


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocators and kernels
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


HeadBuilder = Callable[[tuple[int, ...], bool], Any]  # (output shape, is last) -> objective


def head_costs(backbone: Backbone, make_head: HeadBuilder, batch: int = 32,
               sample: Activation | None = None, repeats: int = 3) -> list[float]:
    """Median seconds of forward + backward of the local objective after each block.

    Entry i is what a stage ending at block i pays for its objective; ``make_head``
    builds the objective for an output shape (and whether it is the last stage's).
    """
    inputs = _block_inputs(backbone, batch, sample)
    with torch.no_grad():
        last = backbone.blocks[-1].eval()(inputs[-1])
        backbone.blocks[-1].train()
    outputs = [*inputs[1:], last]
    y = torch.randint(backbone.num_classes, (batch,))
    costs = []
    for i, out in enumerate(outputs):
        head = make_head(tuple(backbone.shapes[i + 1]), i == len(outputs) - 1)
        costs.append(_median_seconds(lambda: head.loss(_requires_grad(out), y).backward(), repeats))
    return costs


def balanced_cuts(costs: Sequence[float], k: int, end_costs: Sequence[float] | None = None,
                  start_costs: Sequence[float] | None = None) -> list[int]:
    """Cut indices of the contiguous K-partition of ``costs`` with the smallest maximum part.

    A part that ends at block i also pays ``end_costs[i]`` (e.g. its head), and a part
    that starts at block i pays ``start_costs[i]`` (e.g. its context encoders), if given.

    Raises:
        ValueError: if ``k`` is not between 1 and ``len(costs)``.
    """
    n = len(costs)
    check_k(k, n)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    ends = list(end_costs) if end_costs is not None else [0.0] * n
    starts = list(start_costs) if start_costs is not None else [0.0] * n

    def part(start: int, stop: int) -> float:
        return prefix[stop] - prefix[start] + ends[stop - 1] + starts[start]

    @cache
    def best(start: int, parts: int) -> tuple[float, tuple[int, ...]]:
        if parts == 1:
            return part(start, n), ()
        options = []
        for cut in range(start + 1, n - parts + 2):
            rest, cuts = best(cut, parts - 1)
            options.append((max(part(start, cut), rest), (cut, *cuts)))
        return min(options)

    return list(best(0, k)[1])


def check_k(k: int, n_blocks: int) -> None:
    """Raise a clear error unless 1 <= k <= number of blocks."""
    if not 1 <= k <= n_blocks:
        raise ConfigError(f"split.k={k} is not allowed: the model has {n_blocks} blocks, "
                         f"so k must be between 1 and {n_blocks}")


def check_cuts(cuts: list[int], n_blocks: int) -> list[int]:
    """Validate explicit cut indices (strictly increasing, inside 1..n_blocks-1)."""
    cuts = [int(c) for c in cuts]
    if any(b <= a for a, b in zip(cuts, cuts[1:])) or any(not 0 < c < n_blocks for c in cuts):
        raise ConfigError(f"split.cuts={cuts} is not allowed: cut indices must be strictly "
                         f"increasing and between 1 and {n_blocks - 1}")
    return cuts


def find_cuts(backbone: Backbone, k: int, by: str = "count", cuts: list[int] | None = None,
              batch: int = 32, sample: Activation | None = None,
              head: HeadBuilder | None = None) -> list[int]:
    """Cut indices for ``k`` stages of ``backbone`` chosen by ``by`` (see module doc).

    With ``by="time"`` and a ``head`` builder, each stage's cost includes the measured
    time of its local objective.
    """
    n = len(backbone.blocks)
    if by == "cuts" or cuts:
        chosen = check_cuts(list(cuts or []), n)
        if by != "cuts" and len(chosen) != k - 1:
            raise ConfigError(f"split.cuts has {len(chosen)} cut(s) but split.k={k} needs {k - 1}")
        return chosen
    if by not in SPLIT_BY:
        raise ConfigError(f"unknown split.by {by!r}; choose one of: {', '.join(SPLIT_BY)}")
    if by == "count":  # as equal as possible, the larger stages first
        check_k(k, n)
        return [sum(n // k + (j < n % k) for j in range(i)) for i in range(1, k)]
    with torch.random.fork_rng(devices=[]):  # measuring must not shift the run's random numbers
        costs = block_costs(backbone, by, batch, sample)
        ends = head_costs(backbone, head, batch, sample) if by == "time" and head else None
    return balanced_cuts(costs, k, ends)


@dataclass
class StageRange:
    """Blocks ``start`` (inclusive) to ``stop`` (exclusive) of a backbone."""

    start: int
    stop: int


def stage_ranges(cuts: list[int], n_blocks: int) -> list[StageRange]:
    """Turn cut indices into the block range of every stage."""
    edges = [0, *cuts, n_blocks]
    return [StageRange(a, b) for a, b in zip(edges, edges[1:])]
