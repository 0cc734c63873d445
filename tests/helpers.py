"""Set-up shared by the test modules: simulated pipeline ranks, tiny nets, references.

Import it as ``helpers`` (pytest puts ``tests/`` on ``sys.path``; so do the worker processes
the pipeline tests spawn, which is how they unpickle :class:`PatchEmbed`).

- :func:`ranks` / :func:`pipeline_step`: pipeline engines in one process, joined by an
  in-memory link through the real wire format (:class:`Loopback`);
- :func:`assert_pipeline_equals_sequential`: the equivalence check of every method's tests;
- :func:`resnet20_net`: the tiny ResNet-20 the method tests split into stages;
- :func:`cross_entropy_by_loop`: the reference a head's loss is checked against;
- :class:`PatchEmbed` / :func:`vit_blocks`: a user's own ViT-like block list.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch import nn

from locallearn.distributed.wire import Layout, Packet, encode
from locallearn.engines import LocalEngine
from locallearn.engines.pipeline import PipelineEngine, assign_stages
from locallearn.models import build_model
from locallearn.network import LocalNet

# -- the pipeline in one process ----------------------------------------------------------------


class Loopback:
    """Outbox and Inbox in one: every packet is encoded, copied into fresh buffers, decoded."""

    def __init__(self) -> None:
        self.queue: deque = deque()
        self.wait_seconds = 0.0

    def put(self, packet: Packet) -> None:
        header, *tensors = encode(packet)
        layout = Layout.parse(header.clone())
        buffers = layout.buffers()
        for b, t in zip(buffers, tensors):
            b.copy_(t)
        self.queue.append(layout.packet(buffers))

    def get(self, kind: int) -> Packet:
        packet = self.queue.popleft()
        assert packet.kind == kind
        return packet

    def flush(self) -> None:
        pass


def ranks(net: LocalNet, workers: int, micro: int = 1) -> list[PipelineEngine]:
    """Engines for ``workers`` simulated ranks joined by loopback links."""
    ranges = assign_stages(net.k, workers)
    links = [Loopback() for _ in range(workers - 1)]
    engines = []
    for r, mine in enumerate(ranges):
        needs = {j for k in range(mine.stop, net.k) for j in net.needs(k)}
        engines.append(PipelineEngine(mine, links[r - 1] if r else None,
                                      links[r] if r < workers - 1 else None, micro, sorted(needs)))
    return engines


def floats(losses) -> list[float]:
    """A step's per-stage losses (0-d tensors, NaN floats) as floats, for ``pytest.approx``
    (which refuses tensors)."""
    return [float(v) for v in losses]


def pipeline_step(engines, net, opts, x, y) -> list[float]:
    """One batch through every rank in turn; the merged per-stage losses."""
    losses = engines[0].step(net, opts, x, y)
    for e in engines[1:]:
        for k, v in enumerate(e.step(net, opts)):
            if k in e.stages:
                losses[k] = v
    return floats(losses)


def assert_pipeline_equals_sequential(
        net: LocalNet, workers: int,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        x_shape: tuple[int, ...], classes: int, steps: int = 2, **close: Any) -> None:
    """Train ``net`` with the sequential engine and a copy of it on ``workers`` simulated
    ranks, ``steps`` random batches of ``x_shape`` with labels below ``classes``: every step's
    losses are equal and so are the weights at the end (``close``: tolerances of
    ``torch.testing.assert_close``)."""
    twin = copy.deepcopy(net)
    oa, ob = ([optimizer(s.parameters()) for s in n.stages] for n in (net, twin))
    engines = ranks(twin, workers)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(*x_shape, generator=g)
        y = torch.randint(0, classes, (x_shape[0],), generator=g)
        assert pipeline_step(engines, twin, ob, x, y) == pytest.approx(
            floats(LocalEngine().step(net, oa, x, y)))
    for pa, pb in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(pa, pb, **close)


# -- tiny nets and references -------------------------------------------------------------------


def resnet20_net(k: int, objective: str, head: str, **options: Any) -> LocalNet:
    """A quarter-width ResNet-20 for (3, 8, 8) inputs and 10 classes in ``k`` stages, each
    with ``objective`` (``options``: its ``objective.options``), from seed 0."""
    torch.manual_seed(0)
    return LocalNet.from_backbone(build_model("resnet20", (3, 8, 8), 10, width=0.25), k,
                                  objective=objective, head=head, objective_options=options)


def cross_entropy_by_loop(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean of -log softmax(logits_i)[y_i], one sample at a time."""
    return -sum(torch.log_softmax(logits[i], 0)[y[i]] for i in range(len(y))) / len(y)


class PatchEmbed(nn.Module):
    """(B, 1, 8, 8) images -> (B, 16, dim) tokens of 2x2 patches (a user's own module)."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def vit_blocks(depth: int = 3, dim: int = 12) -> list[nn.Module]:
    """A ViT-like block list a user writes: :class:`PatchEmbed`, then ``depth`` encoder layers."""
    layers = [nn.TransformerEncoderLayer(dim, 2, 24, dropout=0.0, batch_first=True)
              for _ in range(depth)]
    return [PatchEmbed(dim), *layers]
