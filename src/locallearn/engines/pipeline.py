"""The pipeline engine: every rank trains a contiguous run of stages, activations flow forward only.

One rank (process) holds stages ``lo..hi``. Per batch it takes the input from the data
(rank 0) or from the previous rank, runs its stages exactly as the sequential engine
does (detached input, local loss, backward, optimizer step), and sends the detached
output with the targets to the next rank. Nothing travels backwards, so while rank
r+1 works on batch t, rank r already works on batch t+1 (SCPL's schedule)::

    time ->    1      2      3      4      5
    rank 0   [b1]   [b2]   [b3]   [b4]   [b5]
    rank 1          [b1]   [b2]   [b3]   [b4]
    rank 2                 [b1]   [b2]   [b3]

Every stage updates once per batch, with the input its predecessor computed before
its own update of that batch, so after N batches the parameters are those of
:class:`~locallearn.engines.sequential.LocalEngine` (synchronized updates).

Micro-batching (``micro_batches=m``) cuts a batch into m parts that travel on their
own, which shortens the fill and drain of the pipeline; each part's loss is weighted
by its share of the batch (``n_j / n``) and the gradients accumulate into one update,
which for per-sample losses averaged over the batch (cross-entropy) is the update of
the whole batch, up to float error. What couples the samples of a batch sees only
its micro-batch: BatchNorm statistics, and the positives and negatives of
contrastive losses (SupCon, NT-Xent), so those updates differ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from locallearn.distributed.comm import Inbox, Outbox, average_gradients, gather_siblings
from locallearn.distributed.wire import EVAL, STOP, TRAIN, Packet
from locallearn.engines.base import Losses, StageUpdate, stage_loss
from locallearn.groups import GroupNode
from locallearn.measure import StageClock
from locallearn.network import LocalNet
from locallearn.objectives.groups import find_group_objective
from locallearn.types import Activation, Masked, detach


def assign_stages(k: int, workers: int) -> list[range]:
    """Contiguous, near-equal runs of the ``k`` stages for ``workers`` ranks.

    Later ranks take the extra stage when ``k`` is not a multiple of ``workers``
    (rank 0 also reads and augments the data).

    Raises:
        ValueError: if there are more workers than stages.
    """
    if not 1 <= workers <= k:
        raise ValueError(f"engine.workers={workers} is not allowed with split.k={k}: each worker "
                         f"needs at least one stage, so use 1 to {k} workers (or raise split.k)")
    sizes = [k // workers + (r >= workers - k % workers) for r in range(workers)]
    starts = [sum(sizes[:r]) for r in range(workers)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def _split(a: Activation, parts: int) -> list[Activation]:
    """Cut a batch (a tensor or a tuple of tensors) into ``parts`` along dimension 0."""
    if isinstance(a, tuple):
        return [Masked(*p) for p in zip(*(t.tensor_split(parts) for t in a))]
    return list(a.tensor_split(parts))


@dataclass
class EvalTally:
    """Correct answers of one rank's stages and, on the last rank, of the ensembles."""

    correct: dict[int, int] = field(default_factory=dict)   # stage -> correct (absent: cannot predict)
    stages: list[int] = field(default_factory=list)
    ensembles: dict[str, int] = field(default_factory=lambda: {"ens_uniform": 0, "ens_weighted": 0})
    groups: dict[int, list[int]] = field(default_factory=dict)  # stage -> correct per group head
    n: int = 0


def merge_tallies(tallies: Sequence[EvalTally], k: int) -> dict[str, Any]:
    """The result of :func:`locallearn.evaluate.evaluate` from every rank's tally."""
    n = max(t.n for t in tallies)
    pct = lambda c: 100.0 * c / max(n, 1)  # noqa: E731
    acc: list[float | None] = [None] * k
    groups: list[list[float] | None] = [None] * k
    for t in tallies:
        for s in t.stages:
            acc[s] = pct(t.correct[s]) if s in t.correct else None
        for s, counts in t.groups.items():
            groups[s] = [pct(c) for c in counts]
    any_predicts = any(a is not None for a in acc)  # else (self-supervised) no ensemble
    # the first rank of the last stage scores the ensembles (its group siblings and
    # replicas count alike or nothing)
    last = next(t for t in tallies if k - 1 in t.stages)
    out: dict[str, Any] = {"stage_acc": acc, "final_acc": acc[-1], "n": n,
                           **{key: pct(v) if any_predicts else None
                              for key, v in last.ensembles.items()}}
    if any(g is not None for g in groups):
        out["group_acc"] = groups
    return out


def eval_packets(batches: Iterable[tuple[Activation, torch.Tensor]],
                 num_classes: int) -> Iterator[Packet]:
    """The test batches as evaluation packets with empty ensemble sums, then the end marker."""
    for x, y in batches:
        zeros = torch.zeros(len(y), num_classes, device=y.device)
        weights = torch.zeros(2, dtype=torch.float64, device=y.device)
        yield Packet(EVAL, x, y, [], [zeros, zeros.clone(), weights], len(y))
    yield Packet(EVAL)


def add_to_ensembles(extras: Sequence[torch.Tensor], prob: torch.Tensor,
                     k: int) -> list[torch.Tensor]:
    """The ensemble sums of an evaluation packet with stage ``k``'s class probabilities added."""
    ens_u, ens_w, weights = extras
    step = torch.tensor([1.0, 2.0 ** k], dtype=weights.dtype, device=weights.device)
    return [ens_u + prob, ens_w + 2.0 ** k * prob, weights + step]


def score_ensembles(tally: EvalTally, y: torch.Tensor, ens_u: torch.Tensor, ens_w: torch.Tensor,
                    weights: torch.Tensor) -> None:
    """Count the correct answers of the uniform and 2^k ensembles (on the last rank)."""
    if float(weights[0]) == 0:  # no stage can predict: no ensemble
        return
    for key, acc, w in (("ens_uniform", ens_u, weights[0]), ("ens_weighted", ens_w, weights[1])):
        tally.ensembles[key] += int(((acc / float(w)).argmax(1) == y).sum())


class PipelineEngine:
    """One node of the pipeline (``engine: pipeline``): the executor of every placement.

    A node is a contiguous run of whole stages (``placement=stages``), or the slice of
    one stage that width group g computes (``placement=groups``: ``node`` is its
    :class:`~locallearn.groups.GroupNode`). The placement is data: the peers a node
    receives from (``fan_in``: several are concatenated in group order, the channels of
    the previous stage's groups), the peers it sends every output to (``fan_out``), and
    for group nodes the siblings (the stage's other groups, which exchange the detached
    views and logits of their heads) and, on the first node, the siblings it hands each
    data batch to (``handoff``). Links are :class:`~locallearn.distributed.comm.Inbox`
    and :class:`~locallearn.distributed.comm.Outbox` (bounded asynchronous queues).

    Args:
        stages: the stage indices this node trains (contiguous; one for a group node).
        inbox: packets from the previous rank (``None`` on rank 0, which reads data);
            shorthand for ``fan_in=[inbox]``.
        outbox: packets to the next rank (``None`` on the last rank); shorthand for
            ``fan_out=[outbox]``.
        micro_batches: parts each batch is cut into on rank 0.
        downstream_needs: trail indices that stages after this rank read (context
            supply); other trail entries travel as ``None``.
        device: this rank's device (for exact timing on GPUs).
        update: the stage update (precision, scaling).
        comm: the control group, for MAN's weight sharing (:meth:`share_weights`).
        share_every: steps between two weight sharings.
        fan_in, fan_out, handoff: the links of the placement (see above).
        node: this rank's group node (group placement).
        siblings: the process group of the node's stage (group placement).
        wire: where tensors must be to travel (``cuda`` for NCCL; default the CPU).
        replicas: data-parallel copies of this node (``engine.replicas``): each trains on
            a shard of every batch, and their gradients are averaged over
            ``replica_group`` before every optimizer step.
        replica: which copy this is (0 reads, evaluates and saves).
        shard_out: on rank 0, the first nodes of the other replicas (a shard each).
        shard_in: on the first node of replica d > 0, the link its shard comes from.

    Attribute ``active`` (stage indices, or ``None`` for all) names the stages that
    train (dynamic layer accumulation), as for the sequential engine.
    """

    name = "pipeline"
    accumulates = True

    def __init__(self, stages: range, inbox: Inbox | None = None, outbox: Outbox | None = None,
                 micro_batches: int = 1, downstream_needs: Sequence[int] = (),
                 device: torch.device | str = "cpu", update: StageUpdate | None = None,
                 comm: Any = None, share_every: int = 1, *, fan_in: Sequence[Inbox] = (),
                 fan_out: Sequence[Outbox] = (), handoff: Sequence[Outbox] = (),
                 node: GroupNode | None = None, siblings: Any = None,
                 wire: torch.device | str | None = None, replicas: int = 1, replica: int = 0,
                 replica_group: Any = None, shard_out: Sequence[Outbox] = (),
                 shard_in: Inbox | None = None) -> None:
        if micro_batches < 1:
            raise ValueError(f"engine.micro_batches={micro_batches} must be at least 1")
        self.update = update or StageUpdate()
        self.comm, self.share_every = comm, share_every  # MAN: the control group (share_weights)
        self.stages = stages
        self.fan_in = [inbox] if inbox is not None else list(fan_in)
        self.fan_out = [outbox] if outbox is not None else list(fan_out)
        self.handoff = list(handoff)
        self.node, self.siblings = node, siblings
        self.replicas, self.replica, self.replica_group = replicas, replica, replica_group
        self.shard_out, self.shard_in = list(shard_out), shard_in
        self.micro_batches = micro_batches
        self.downstream_needs = set(downstream_needs)
        self.device = torch.device(device)
        self.wire = torch.device(wire) if wire is not None else torch.device("cpu")
        self.active: set[int] | None = None
        self.clock = StageClock(self.device)  # compute time per stage since reset

    @property
    def inbox(self) -> Inbox | None:
        """The one link from the previous rank (stage placement), if any."""
        return self.fan_in[0] if len(self.fan_in) == 1 else None

    @property
    def outbox(self) -> Outbox | None:
        """The one link to the next rank (stage placement), if any."""
        return self.fan_out[0] if len(self.fan_out) == 1 else None

    # -- which stages run ------------------------------------------------------------
    def owned(self, k: int) -> range:
        return self.stages

    def trains(self, k: int, net: LocalNet) -> bool:
        return k in self.stages and self._trains(k)

    def depth(self, net: LocalNet) -> int:
        """Stages that run this epoch: up to the deepest active one."""
        return net.k if self.active is None else max(self.active, default=-1) + 1

    def takes_part(self, net: LocalNet) -> bool:
        """True if this rank trains or feeds a trained stage this epoch."""
        return self.stages.start < self.depth(net)

    def _trains(self, k: int) -> bool:
        return self.active is None or k in self.active

    # -- the links -------------------------------------------------------------------
    def _receive(self, kind: int) -> Packet:
        """One packet from every peer of ``fan_in``; several are joined in group order."""
        packets = [inbox.get(kind) for inbox in self.fan_in]
        first = packets[0]
        if first.h is None or len(packets) == 1:
            return first
        return Packet(kind, torch.cat([p.h for p in packets], dim=1), first.y, list(first.trail),
                      first.extras, first.total)

    def _send(self, packet: Packet, links: Sequence[Outbox]) -> None:
        for link in links:
            link.put(packet)

    # -- training --------------------------------------------------------------------
    def step(self, net: LocalNet, optimizers: Sequence[torch.optim.Optimizer],
             x: Activation | None = None, y: torch.Tensor | None = None) -> Losses:
        """Train this node on one batch and pass it on; returns per-stage losses.

        Rank 0 gives the batch ``(x, y)``; later ranks receive it from their peers.
        Stages of other ranks (and stages that did not train) have loss NaN; a group
        node reports its share of its stage's loss (its own loss plus half of each of
        its diversity terms, since two nodes share each pair of heads), so the G shares
        add up to the loss :class:`~locallearn.engines.sequential.LocalEngine` reports.
        """
        losses: Losses = [math.nan] * net.k
        depth = self.depth(net)
        own = [k for k in self.stages if k < depth]
        if not own:
            return losses
        train = [k for k in own if self._trains(k)]
        for k in train:
            self.update.zero_grad(optimizers[k])
            losses[k] = 0.0
        sends = self.stages.stop < depth
        for packet in self._micro_batches(x, y):
            if self.node is not None:
                out = self._train_node(packet, train, losses)
            else:
                out = self._train_micro(net, packet, own, train, losses)
            if sends:
                self._send(out, self.fan_out)
        for k in train:
            with self.clock.time(k):
                if self.replicas > 1:  # the replicas' mean gradient: that of the whole batch
                    average_gradients(self.replica_group, optimizers[k], self.replicas)
                self.update.step(optimizers[k], k)
        if self.replicas > 1:  # each replica's share of the batch loss; the shares add up
            losses = [v / self.replicas for v in losses]
        return losses

    def _micro_batches(self, x: Activation | None, y: torch.Tensor | None) -> Iterator[Packet]:
        if self.shard_in is not None:  # the first node of replica d > 0: its shard of the batch
            shard = self.shard_in.get(TRAIN)
            x, y = shard.h, shard.y
        if not self.fan_in:  # rank 0 cuts its data batch (and hands it to its siblings)
            if x is None or y is None:
                raise ValueError("the first node (rank 0) needs the batch (x, y)")
            if self.shard_out:  # replica d takes the d-th of `replicas` shards
                shards = list(zip(_split(x, self.replicas), y.tensor_split(self.replicas)))
                for link, (xs, ys) in zip(self.shard_out, shards[1:]):
                    link.put(Packet(TRAIN, xs, ys, total=len(ys)))
                x, y = shards[0]
            parts = min(self.micro_batches, len(y))
            for xi, yi in zip(_split(x, parts), y.tensor_split(parts)):
                packet = Packet(TRAIN, xi, yi, total=len(y))
                self._send(packet, self.handoff)
                yield packet
            return
        seen = 0
        while True:  # later ranks take parts until the whole batch has arrived
            packet = self._receive(TRAIN)
            assert packet.y is not None  # a training packet carries its targets
            seen += len(packet.y)
            yield packet
            if seen >= packet.total:
                return

    def _train_micro(self, net: LocalNet, p: Packet, own: list[int], train: list[int],
                     losses: Losses) -> Packet:
        """Forward, local loss and backward of this rank's stages on one (micro-)batch."""
        h, trail, y = p.h, list(p.trail), p.y
        assert y is not None  # a training packet carries its targets
        share = len(y) / p.total  # the part's weight in the batch's mean loss
        for k in own:
            stage = net.stages[k]
            h = detach(h)
            if net.needs_trail:
                trail.append(h)
            with self.clock.time(k):
                if k in train:
                    with self.update.autocast():
                        out = stage(h, trail)
                        loss = stage_loss(stage, out, y)
                    self.update.backward(loss if share == 1 else loss * share, k)
                    losses[k] = losses[k] + loss.detach() * share  # stays on the device
                    h = out
                else:
                    with torch.no_grad(), self.update.autocast():
                        h = stage(h, trail)
        return Packet(TRAIN, detach(h), y, self._trail_out(trail), total=p.total)

    def _train_node(self, p: Packet, train: list[int], losses: Losses) -> Packet:
        """Forward, local loss (with the siblings' views and logits) and backward of this
        group node on one (micro-)batch."""
        node, k, y = self.node, self.stages.start, p.y
        assert node is not None and y is not None and isinstance(p.h, torch.Tensor)
        share = len(y) / p.total
        with self.clock.time(k):
            if k not in train:
                with torch.no_grad(), self.update.autocast():
                    return Packet(TRAIN, detach(node(p.h)), y, total=p.total)
            with self.update.autocast():
                out = node(detach(p.h))
                messages = self._gather(node.message(out))
                loss, logits = node.local_loss(out, y, messages)
                part = loss.detach()
                if logits is not None:
                    div = node.diversity(logits, y, self._gather(logits.detach()))
                    loss, part = loss + div, part + div.detach() / 2
            self.update.backward(loss if share == 1 else loss * share, k)
            losses[k] = losses[k] + part * share
        return Packet(TRAIN, detach(out), y, total=p.total)

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every sibling's ``t`` in group order (group nodes)."""
        assert self.node is not None
        return gather_siblings(self.siblings, t, self.node.groups, self.wire)

    def _trail_out(self, trail: list[Activation]) -> list[Activation | None]:
        """The trail entries later ranks read; the others travel as ``None``."""
        return [t if j in self.downstream_needs else None for j, t in enumerate(trail)]

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, net: LocalNet, batches: Iterable[tuple[Activation, torch.Tensor]] | None,
                 comm: Any) -> dict[str, Any] | None:
        """Test accuracy through the pipeline; the first rank gets the result of
        :func:`locallearn.evaluate.evaluate`, the others ``None``."""
        tally = EvalTally()
        heads = [find_group_objective(s.objective) for s in net.stages]
        if self.replica == 0:  # replica 0 evaluates; the copies hold the same weights
            self.evaluate_tally(net, tally, batches, heads)
            self.flush()
        tallies = comm.gather(tally)
        return merge_tallies(tallies, net.k) if tallies is not None else None

    @torch.no_grad()
    def evaluate_tally(self, net: Any, tally: EvalTally,
                       batches: Iterable[tuple[Activation, torch.Tensor]] | None = None,
                       group_heads: Sequence[Any] = ()) -> None:
        """Run the test batches through this node, counting correct answers.

        Rank 0 reads ``batches``; later ranks receive them until an empty packet marks
        the end. Ensemble sums of the softmax outputs travel with each batch and the
        last rank scores them as :func:`locallearn.evaluate.evaluate` does. Every node
        of a stage counts the stage's (identical) figures.
        """
        tally.stages = list(self.stages)
        node = self.node
        was = node.training if node is not None else False
        if node is not None:
            node.eval()
        try:
            for p in self._eval_packets(net, batches):
                if p.h is None:  # the end of the test set
                    self._send(p, self.fan_out)
                    return
                if node is not None:
                    self._eval_node(tally, p, net.k)
                else:
                    self._eval_batch(net, tally, p, group_heads)
        finally:
            if node is not None:
                node.train(was)

    def _eval_packets(self, net: Any,
                      batches: Iterable[tuple[Activation, torch.Tensor]] | None) -> Iterator[Packet]:
        if self.fan_in:
            while True:
                yield self._receive(EVAL)
        if batches is None:
            raise ValueError("the first node (rank 0) needs the test batches")
        for packet in eval_packets(batches, net.num_classes):
            self._send(packet, self.handoff)
            yield packet

    def _eval_batch(self, net: LocalNet, tally: EvalTally, p: Packet,
                    group_heads: Sequence[Any]) -> None:
        h, trail, y = p.h, list(p.trail), p.y
        assert y is not None  # an evaluation packet with a batch carries its targets
        ens_u, ens_w, weights = p.extras
        for k in self.stages:
            if net.needs_trail:
                trail.append(h)
            h = net.stages[k](h, trail)
            self._count_groups(tally, k, h, y, group_heads)
            logits = net.stages[k].predict(h)
            if logits is None:
                continue
            tally.correct[k] = tally.correct.get(k, 0) + int((logits.argmax(1) == y).sum())
            ens_u, ens_w, weights = add_to_ensembles((ens_u, ens_w, weights), logits.softmax(1), k)
        tally.n += len(y)
        if self.fan_out:
            self._send(Packet(EVAL, h, y, self._trail_out(trail), [ens_u, ens_w, weights],
                              p.total), self.fan_out)
            return
        score_ensembles(tally, y, ens_u, ens_w, weights)

    def _eval_node(self, tally: EvalTally, p: Packet, k_total: int) -> None:
        """A group node's figures: every group head, the group ensemble, the 2^k sums."""
        node, k, y = self.node, self.stages.start, p.y
        assert node is not None and y is not None  # an evaluation packet carries its targets
        out = node(p.h)
        logits = node.objective.predict(node.view(out, self._gather(node.message(out))))
        extras = list(p.extras)
        if logits is not None:  # heads that predict classes (not self-supervised ones)
            every = self._gather(logits)
            counts = tally.groups.setdefault(k, [0] * node.groups)
            for g, lg in enumerate(every):
                counts[g] += int((lg.argmax(1) == y).sum())
            prob = torch.stack([lg.softmax(1) for lg in every]).mean(0)  # the group ensemble
            tally.correct[k] = tally.correct.get(k, 0) + int((prob.argmax(1) == y).sum())
            extras = add_to_ensembles(extras, prob, k)
        tally.n += len(y)
        if self.fan_out:
            self._send(Packet(EVAL, out, y, [], extras, p.total), self.fan_out)
        else:
            score_ensembles(tally, y, *extras)

    @staticmethod
    def _count_groups(tally: EvalTally, k: int, out: Activation, y: torch.Tensor,
                      group_heads: Sequence[Any]) -> None:
        """Correct answers of every width-group head of stage ``k`` (if it has groups)."""
        head = group_heads[k] if k < len(group_heads) else None
        if head is None:
            return
        counts = tally.groups.setdefault(k, [0] * head.groups)
        for g, logits in enumerate(head.group_logits(out)):
            if logits is not None:
                counts[g] += int((logits.argmax(1) == y).sum())

    # -- bookkeeping -----------------------------------------------------------------
    def begin_epoch(self) -> None:
        self.reset_clock()

    def share_weights(self, net: LocalNet, step: int) -> None:
        """Every ``share_every`` steps, hand each rank's first block to the rank before it.

        Only for nets whose objectives follow the next stage (MAN): every rank sends the
        parameters and buffers of its first stage's first block (never gradients) through
        the control group, and the rank before loads them into its own copy of that
        block, which its momentum copy then follows. The exchange is a collective, so it
        happens after every rank's step ``step``: with ``share_every=1`` the copies see
        exactly the weights the sequential engine's do; larger intervals trade that
        freshness for fewer synchronisations (the copy follows weights up to
        ``share_every - 1`` steps old).
        """
        if self.comm is None or not net.follows_next or (step + 1) % self.share_every:
            return
        first = net.stages[self.stages.start]
        block = next(iter(first.body.children()))
        mine = (self.stages.start, {n: t.detach().cpu() for n, t in block.state_dict().items()})
        for start, state in self.comm.all_gather(mine):
            if start == self.stages.stop:  # the rank after this one
                after = next(iter(net.stages[start].body.children()))
                after.load_state_dict(state)

    def end_epoch(self) -> dict[str, Any]:
        self.flush()
        seconds = self.clock.seconds()  # on CUDA: the epoch's one sync for the clock
        return {"stage_seconds": {k: seconds.get(k, 0.0) for k in self.stages}}

    def reset_clock(self) -> None:
        """Start counting compute time per stage afresh (at the start of an epoch)."""
        self.clock.reset()
        links: list[Inbox | Outbox] = [*self.fan_in, *self.fan_out, *self.handoff,
                                       *self.shard_out]
        for link in links:
            link.wait_seconds = 0.0

    def flush(self) -> None:
        """Wait until every packet sent so far has left."""
        for link in [*self.fan_out, *self.handoff, *self.shard_out]:
            link.flush()

    def close(self) -> None:
        """Tell the peers the run is over, then wait for the receive threads to end."""
        self._send(Packet(STOP), [*self.handoff, *self.fan_out, *self.shard_out])
        self.flush()
        for link in [*self.fan_in, *([self.shard_in] if self.shard_in is not None else [])]:
            link.get(STOP)
            link.close()

