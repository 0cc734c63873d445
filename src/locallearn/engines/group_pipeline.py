"""Group-parallel placement: the K x G (stage, group) nodes of a grouped net on K x G ranks.

Rank ``k * G + g`` holds :class:`~locallearn.groups.GroupNode` g of stage k. Per batch::

    stage k-1 nodes ──(their output channels, every node to every node)──► stage k node g
    stage k node g:  input = the G slices concatenated in group order, detached
                     out = node(input); all_gather the nodes' messages within stage k
                     (stop-gradient view), local loss; all_gather the detached logits
                     (diversity penalty); backward; optimizer step; send out onward

Nothing travels backwards and no gradient crosses a rank, so every node updates once
per batch with the input of the previous stage's update of that batch: after N
batches the nodes hold the slices of :class:`~locallearn.engines.sequential.LocalEngine`'s
parameters (synchronized updates, as in :mod:`locallearn.engines.pipeline`). The nodes
of stage 0 each read the same data batch.

Communication goes through process-group objects directly (``pg.send``, ``pg.recv``,
``pg.allgather``): ``world`` joins all K x G ranks (rank numbers as above), ``siblings``
the G ranks of one stage (group rank g). Both ``dist.new_group`` groups and
``dist.ProcessGroupGloo`` objects built by hand (ranks as threads, in the tests) work.
Packets use the pipeline's wire format (:mod:`locallearn.distributed.wire`).

Not done: micro-batching, dynamic layer accumulation, context supply, and the launcher
(``locallearn train`` does not start K x G workers yet); evaluation runs on the
gathered net, not on the nodes.
"""

from __future__ import annotations

from typing import Any

import torch

from locallearn.distributed.wire import HEADER_LEN, TRAIN, Layout, Packet, encode
from locallearn.engines.base import detach
from locallearn.groups import GroupNode


def node_rank(stage: int, group: int, groups: int) -> int:
    """The rank that holds node ``(stage, group)``."""
    return stage * groups + group


def send_packets(world: Any, packet: Packet, dsts: list[int]) -> None:
    """Send ``packet`` to every rank in ``dsts`` (all sends posted before any wait)."""
    tensors = encode(packet)
    works = [world.send([t], dst, 0) for dst in dsts for t in tensors]
    for w in works:
        w.wait()


def recv_packets(world: Any, srcs: list[int]) -> list[Packet]:
    """One packet from every rank in ``srcs`` (all receives posted before any wait)."""
    headers = [torch.empty(HEADER_LEN, dtype=torch.int64) for _ in srcs]
    for w in [world.recv([h], src, 0) for h, src in zip(headers, srcs)]:
        w.wait()
    layouts = [Layout.parse(h) for h in headers]
    buffers = [layout.buffers() for layout in layouts]
    works = [world.recv([b], src, 0) for bs, src in zip(buffers, srcs) for b in bs]
    for w in works:
        w.wait()
    return [layout.packet(bs) for layout, bs in zip(layouts, buffers)]


def all_gather(siblings: Any, t: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """Every sibling's ``t`` (same shape on all), in group order."""
    if t.numel() == 0:  # nothing to exchange (the node sees only its own channels)
        return [t] * groups
    t = t.contiguous()
    outs = [torch.empty_like(t) for _ in range(groups)]
    siblings.allgather([outs], [t]).wait()
    return outs


class GroupPipelineEngine:
    """One rank of the group-parallel pipeline: node ``(stage, group)`` of a K-stage net.

    Args:
        node: this rank's node (from :func:`locallearn.groups.group_nodes`).
        stage: its stage index k.
        k: number of stages.
        world: process group of all K x G ranks (rank ``k * G + g`` holds node (k, g)).
        siblings: process group of the G ranks of stage k (group rank = g).
    """

    name = "group_pipeline"

    def __init__(self, node: GroupNode, stage: int, k: int, world: Any, siblings: Any) -> None:
        self.node, self.stage, self.k = node, stage, k
        self.world, self.siblings = world, siblings
        self.groups = node.groups

    def _ranks(self, stage: int) -> list[int]:
        return [node_rank(stage, g, self.groups) for g in range(self.groups)]

    def _input(self, x: torch.Tensor | None,
               y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stage == 0:
            if x is None or y is None:
                raise ValueError("the nodes of stage 0 need the batch (x, y)")
            return x, y
        packets = recv_packets(self.world, self._ranks(self.stage - 1))
        return torch.cat([p.h for p in packets], dim=1), packets[0].y

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor | None = None,
             y: torch.Tensor | None = None) -> float:
        """Train this node on one batch and send its output on; returns its local loss.

        Stage-0 nodes give the batch ``(x, y)``; the others receive it.
        """
        h, y = self._input(x, y)
        node = self.node
        out = node(detach(h))
        messages = all_gather(self.siblings, node.message(out), self.groups)
        loss, logits = node.local_loss(out, y, messages)
        if logits is not None:
            sent = all_gather(self.siblings, logits.detach(), self.groups)
            loss = loss + node.diversity(logits, y, sent)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if self.stage + 1 < self.k:
            send_packets(self.world, Packet(TRAIN, out.detach(), y, total=len(y)),
                         self._ranks(self.stage + 1))
        return float(loss.item())
