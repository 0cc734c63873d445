"""Group-parallel placement: the K x G (stage, group) nodes of a grouped net on K x G ranks.

``engine=pipeline engine.placement=groups`` with ``split.groups=G`` and
``engine.workers=K*G``. Rank ``k * G + g`` holds :class:`~locallearn.groups.GroupNode` g
of stage k. Per batch::

    rank 0 ──(the data batch)──► the other nodes of stage 0
    stage k-1 nodes ──(their output channels, every node to every node)──► stage k node g
    stage k node g:  input = the G slices concatenated in group order, detached
                     out = node(input); all_gather the nodes' messages within stage k
                     (stop-gradient view), local loss; all_gather the detached logits
                     (diversity penalty); backward; optimizer step; send out onward

Nothing travels backwards and no gradient crosses a rank, so every node updates once
per batch with the input of the previous stage's update of that batch: after N
batches the nodes hold the slices of :class:`~locallearn.engines.sequential.LocalEngine`'s
parameters (synchronized updates, as in :mod:`locallearn.engines.pipeline`).

Evaluation runs through the nodes the same way: every node of stage k gathers its
siblings' logits, so each holds the stage's group ensemble, the per-group accuracy and
the running 2^k ensemble sums, which travel on with the activations.

Communication goes through process-group objects directly (``pg.send``, ``pg.recv``,
``pg.allgather``): ``world`` joins all K x G ranks (rank numbers as above), ``siblings``
the G ranks of one stage (group rank g). Both ``dist.new_group`` groups and
``dist.ProcessGroupGloo`` objects built by hand (ranks as threads, in the tests) work.
Packets use the pipeline's wire format (:mod:`locallearn.distributed.wire`); sends are
synchronous, so a node runs at most one batch ahead of the next stage.

Not supported (the launcher says so): micro-batching, dynamic layer accumulation,
context supply, predictors and the reconstruction term (they read every group).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from locallearn.distributed.comm import guard
from locallearn.distributed.wire import (
    EVAL,
    HEADER_LEN,
    KIND_NAMES,
    TRAIN,
    Layout,
    Packet,
    WireError,
    encode,
)
from locallearn.engines.base import StageUpdate
from locallearn.engines.pipeline import (
    EvalTally,
    add_to_ensembles,
    eval_packets,
    merge_tallies,
    score_ensembles,
)
from locallearn.groups import GroupNode
from locallearn.types import Activation, detach


def node_rank(stage: int, group: int, groups: int) -> int:
    """The rank that holds node ``(stage, group)``."""
    return stage * groups + group


def _peers(ranks: list[int]) -> tuple[str, int | None]:
    """How a failure names ``ranks``, and the one peer to blame if there is only one."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}", ranks[0]
    return "ranks " + ", ".join(map(str, ranks)), None


def _wait(works: list[Any]) -> None:
    for w in works:
        w.wait()


def send_packets(world: Any, packet: Packet, dsts: list[int], wire: torch.device | str = "cpu") -> None:
    """Send ``packet`` to every rank in ``dsts`` (all sends posted before any wait).

    Raises:
        PeerError: if a receiver failed or did not answer within the group's timeout.
    """
    tensors = encode(packet, wire)
    names, peer = _peers(dsts)
    guard(f"sending to {names}", peer,
          lambda: _wait([world.send([t], dst, 0) for dst in dsts for t in tensors]))


def recv_packets(world: Any, srcs: list[int], wire: torch.device | str = "cpu",
                 device: torch.device | str = "cpu") -> list[Packet]:
    """One packet from every rank in ``srcs`` (all receives posted before any wait).

    Raises:
        PeerError: if a sender failed or sent nothing within the group's timeout.
    """
    names, peer = _peers(srcs)
    headers = [torch.empty(HEADER_LEN, dtype=torch.int64, device=wire) for _ in srcs]
    guard(f"receiving from {names}", peer,
          lambda: _wait([world.recv([h], src, 0) for h, src in zip(headers, srcs)]))
    layouts = [Layout.parse(h.cpu()) for h in headers]
    buffers = [layout.buffers(wire) for layout in layouts]
    guard(f"receiving from {names}", peer,
          lambda: _wait([world.recv([b], src, 0) for bs, src in zip(buffers, srcs) for b in bs]))
    return [layout.packet(bs, device) for layout, bs in zip(layouts, buffers)]


def all_gather(siblings: Any, t: torch.Tensor, groups: int,
               wire: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Every sibling's ``t`` (same shape on all), in group order, on ``t``'s device.

    Raises:
        PeerError: if a sibling failed or did not answer within the group's timeout.
    """
    if t.numel() == 0:  # nothing to exchange (the node sees only its own channels)
        return [t] * groups
    sent = t.detach().to(wire).contiguous()
    outs = [torch.empty_like(sent) for _ in range(groups)]
    guard("exchanging with the other nodes of this stage", None,
          lambda: siblings.allgather([outs], [sent]).wait())
    return [o.to(t.device) for o in outs]


class GroupPipelineEngine:
    """One rank of the group-parallel pipeline: node ``(stage, group)`` of a K-stage net.

    It has the interface of :class:`~locallearn.engines.pipeline.PipelineEngine` that
    the pipeline trainer uses (``stages``, ``step``, ``evaluate``, ...); the trainer's
    optimizer of stage k must hold this node's parameters.

    Args:
        node: this rank's node (from :func:`locallearn.groups.group_nodes`).
        stage: its stage index k.
        k: number of stages.
        world: process group of all K x G ranks (rank ``k * G + g`` holds node (k, g)).
        siblings: process group of the G ranks of stage k (group rank = g).
        wire: where tensors must be to be sent (``cuda`` for NCCL, ``cpu`` for gloo).
        device: this node's compute device.
    """

    name = "group_pipeline"
    accumulates = False

    def __init__(self, node: GroupNode, stage: int, k: int, world: Any, siblings: Any,
                 wire: torch.device | str = "cpu", device: torch.device | str = "cpu",
                 update: StageUpdate | None = None) -> None:
        self.update = update or StageUpdate()
        self.node, self.stage, self.k = node, stage, k
        self.world, self.siblings = world, siblings
        self.groups, self.g = node.groups, node.g
        self.wire, self.device = torch.device(wire), torch.device(device)
        self.stages = range(stage, stage + 1)
        self.active: set[int] | None = None  # all stages train (no layer accumulation)
        self.stage_seconds = {stage: 0.0}

    def owned(self, k: int) -> range:
        return self.stages

    def trains(self, k: int, net: Any) -> bool:
        return k == self.stage

    def _ranks(self, stage: int) -> list[int]:
        return [node_rank(stage, g, self.groups) for g in range(self.groups)]

    def _input(self, given: Packet | None, kind: int) -> Packet:
        """This node's input: rank 0 has it (and hands it to its siblings), the rest receive it."""
        if self.stage == 0 and self.g == 0:
            if given is None:
                raise ValueError("the node of stage 1, group 1 (rank 0) needs the batch (x, y)")
            if self.groups > 1:
                send_packets(self.world, given, self._ranks(0)[1:], self.wire)
            return given
        srcs = [0] if self.stage == 0 else self._ranks(self.stage - 1)
        packets = recv_packets(self.world, srcs, self.wire, self.device)
        for p in packets:
            if p.kind != kind:
                raise WireError(f"expected a {KIND_NAMES[kind]} packet, got a {KIND_NAMES[p.kind]} "
                                f"packet: the ranks disagree on the schedule")
        first = packets[0]
        if first.h is None or len(packets) == 1:
            return first
        return Packet(kind, torch.cat([p.h for p in packets], dim=1), first.y, [], first.extras,
                      first.total)

    def _send_on(self, packet: Packet) -> None:
        if self.stage + 1 < self.k:
            send_packets(self.world, packet, self._ranks(self.stage + 1), self.wire)

    # -- training --------------------------------------------------------------------
    def step(self, net: Any, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation | None = None, y: torch.Tensor | None = None) -> list[float]:
        """Train this node on one batch and send its output on.

        Rank 0 gives the batch ``(x, y)``; the other nodes receive it. ``net`` is not
        used (the node holds its own parameters); ``optimizers[stage]`` updates them.

        Returns:
            Per-stage losses: NaN except this node's stage, which holds the node's share
            of the stage loss (its own loss plus half its diversity terms, since each
            pair of heads is shared by two nodes), so the G shares add up to the loss
            :class:`~locallearn.engines.sequential.LocalEngine` reports.
        """
        given = Packet(TRAIN, x, y, total=len(y)) if x is not None and y is not None else None
        p = self._input(given, TRAIN)
        assert p.y is not None  # a training packet carries its targets
        start = time.perf_counter()
        node, u = self.node, self.update
        with u.autocast():
            out = node(detach(p.h))
            messages = all_gather(self.siblings, node.message(out), self.groups, self.wire)
            loss, logits = node.local_loss(out, p.y, messages)
            share = loss.detach()
            if logits is not None:
                sent = all_gather(self.siblings, logits.detach(), self.groups, self.wire)
                div = node.diversity(logits, p.y, sent)
                loss, share = loss + div, share + div.detach() / 2
        optimizer = optimizers[self.stage]
        u.zero_grad(optimizer)
        u.backward(loss, self.stage)
        u.step(optimizer, self.stage)
        self.stage_seconds[self.stage] += time.perf_counter() - start
        self._send_on(Packet(TRAIN, out.detach(), p.y, total=p.total))
        losses = [math.nan] * self.k
        losses[self.stage] = float(share)
        return losses

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, net: Any, batches: Iterable[tuple[Activation, torch.Tensor]] | None,
                 comm: Any) -> dict[str, Any] | None:
        """Test accuracy through the nodes; the first rank gets the result of
        :func:`locallearn.evaluate.evaluate`, the others ``None``."""
        tally = EvalTally()
        self.evaluate_tally(net, tally, batches)
        tallies = comm.gather(tally)
        return merge_tallies(tallies, self.k) if tallies is not None else None

    @torch.no_grad()
    def evaluate_tally(self, net: Any, tally: EvalTally,
                       batches: Iterable[tuple[Activation, torch.Tensor]] | None = None,
                       group_heads: Sequence[Any] = ()) -> None:
        """Run the test batches through the nodes, counting correct answers.

        Rank 0 reads ``batches``; the other nodes receive them until an empty packet
        marks the end. Every node of a stage counts the stage's (identical) figures.
        """
        tally.stages = [self.stage]
        was = self.node.training
        self.node.eval()
        try:
            self._evaluate(net, tally, batches)
        finally:
            self.node.train(was)

    def _evaluate(self, net: Any, tally: EvalTally,
                  batches: Iterable[tuple[Activation, torch.Tensor]] | None) -> None:
        source = None
        if self.stage == 0 and self.g == 0:
            if batches is None:
                raise ValueError("rank 0 needs the test batches")
            source = eval_packets(batches, net.num_classes)
        while True:
            p = self._input(next(source) if source is not None else None, EVAL)
            if p.h is None:  # the end of the test set
                self._send_on(p)
                return
            self._eval_batch(tally, p)

    def _eval_batch(self, tally: EvalTally, p: Packet) -> None:
        node, k, y = self.node, self.stage, p.y
        assert y is not None  # an evaluation packet with a batch carries its targets
        out = node(p.h)
        messages = all_gather(self.siblings, node.message(out), self.groups, self.wire)
        logits = node.objective.predict(node.view(out, messages))
        extras = list(p.extras)
        if logits is not None:  # heads that predict classes (not self-supervised ones)
            every = all_gather(self.siblings, logits, self.groups, self.wire)
            counts = tally.groups.setdefault(k, [0] * self.groups)
            for g, lg in enumerate(every):
                counts[g] += int((lg.argmax(1) == y).sum())
            prob = torch.stack([lg.softmax(1) for lg in every]).mean(0)  # the group ensemble
            tally.correct[k] = tally.correct.get(k, 0) + int((prob.argmax(1) == y).sum())
            extras = add_to_ensembles(extras, prob, k)
        tally.n += len(y)
        if self.stage + 1 < self.k:
            self._send_on(Packet(EVAL, out, y, [], extras, p.total))
        else:
            score_ensembles(tally, y, *extras)

    # -- bookkeeping -----------------------------------------------------------------
    def begin_epoch(self) -> None:
        self.reset_clock()

    def share_weights(self, net: Any, step: int) -> None:
        """Nothing to send: momentum copies are refused with width groups (config)."""

    def end_epoch(self) -> dict[str, Any]:
        return {"stage_seconds": dict(self.stage_seconds)}

    def reset_clock(self) -> None:
        """Start counting compute time afresh (at the start of an epoch)."""
        self.stage_seconds = {self.stage: 0.0}

    def flush(self) -> None:
        """Nothing to wait for: every send completes before ``step`` returns."""

    def close(self) -> None:
        """Nothing to close: no background threads."""
