"""One worker of ``engine.placement=groups``: a (stage, group) node on its own rank.

The run is the one training loop (:class:`locallearn.loop.Trainer`: rank 0 reads the
data and writes the run folder, every epoch ends with an evaluation through the ranks
and a checkpoint); what differs is the :class:`GroupPlacement` handed to it, which says
what a rank trains and saves:

* rank ``k * G + g`` trains :class:`~locallearn.groups.GroupNode` g of stage k (its
  slice of every layer of the stage, and its own head) with the pipeline executor
  :class:`~locallearn.engines.pipeline.PipelineEngine` given that node, its peers
  (fan-in from every node of the stage before, fan-out to every node of the next) and its
  siblings;
* its shard ``ranks/rank<r>.pt`` holds the node's own state dict and optimizer state;
* rank 0 writes each slice back into its place in the whole network
  (:func:`locallearn.groups.node_state_map`), so ``checkpoint.pt`` is the standard
  single-process checkpoint that ``locallearn eval`` and ``--resume`` read; on resume
  it cuts every missing node's part out of that checkpoint again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from locallearn.build import build_net
from locallearn.data import DataSplits
from locallearn.distributed.comm import Control, Inbox, Outbox
from locallearn.distributed.worker import Setup, placeholder_data
from locallearn.engines.base import StageUpdate
from locallearn.engines.pipeline import PipelineEngine
from locallearn.errors import ConfigError, TrainingError
from locallearn.groups import (
    GroupNode,
    merge_optimizer_states,
    node_optimizer_state,
    node_part,
    node_state_map,
    write_node_part,
)
from locallearn.loop import Placement, Trainer
from locallearn.network import LocalNet
from locallearn.precision import resolve_config


def node_rank(stage: int, group: int, groups: int) -> int:
    """The rank that holds node ``(stage, group)``."""
    return stage * groups + group


def node_ranges(k: int, groups: int) -> list[range]:
    """The stage of every rank: rank ``s * groups + g`` holds a node of stage s."""
    return [range(r // groups, r // groups + 1) for r in range(k * groups)]


class GroupPlacement(Placement):
    """Rank ``k * G + g`` owns node g of stage k; its shard is the node's own state.

    Args:
        node: this rank's node (it holds its own copies of its slices).
        stage: its stage index k.
        groups: G.
        k: number of stages.
    """

    def __init__(self, node: GroupNode, stage: int, groups: int, k: int) -> None:
        super().__init__(range(stage, stage + 1), node_ranges(k, groups))
        self.node, self.g, self.groups = node, node.g, groups
        self._layouts: dict[tuple[int, int], GroupNode] = {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "group": self.g + 1}

    def place(self, net: LocalNet, device: torch.device) -> None:
        """Nothing to move: the node holds its own copies; the net stays on the CPU."""

    def parameters(self, net: LocalNet, k: int) -> Iterator[torch.nn.Parameter]:
        """Stage k's optimizer updates this node on its rank (the rest of the net is idle)."""
        return self.node.parameters() if k in self.stages else net.stages[k].parameters()

    def layout(self, net: LocalNet, k: int, g: int) -> GroupNode:
        """A node (k, g) built from the whole network: where its state lives there."""
        if (k, g) not in self._layouts:
            self._layouts[k, g] = GroupNode(net.stages[k], g)
        return self._layouts[k, g]

    def weights(self, net: LocalNet) -> dict[str, Any]:
        return {"group": self.g,
                "node": {n: t.detach().cpu() for n, t in self.node.state_dict().items()}}

    def fits(self, shard: dict[str, Any]) -> bool:
        return super().fits(shard) and shard.get("group") == self.g

    def merge(self, state: dict[str, Any], shards: Sequence[dict[str, Any]],
              net: LocalNet) -> dict[str, Any]:
        """The single-process checkpoint: every node's slices written into the whole network."""
        weights = {n: t.detach().cpu().clone() for n, t in state["net"].items()}
        parts: dict[int, list[tuple[GroupNode, dict[str, Any]]]] = {}
        for sh in shards:
            k, g = sh["stages"][0], sh["group"]
            node = self.layout(net, k, g)
            write_node_part(weights, sh["node"], node_state_map(net.stages[k], node), f"stages.{k}.")
            parts.setdefault(k, []).append((node, sh["optimizers"][0]))
            state["schedulers"][k] = sh["schedulers"][0]
        for k, pairs in parts.items():
            state["optimizers"][k] = merge_optimizer_states(net.stages[k], pairs)
        state["net"] = weights
        return state

    def part_of(self, state: dict[str, Any], rank: int, net: LocalNet) -> dict[str, Any]:
        k, g = divmod(rank, self.groups)
        stage, node = net.stages[k], self.layout(net, k, g)
        return {"node": node_part(state["net"], node_state_map(stage, node), f"stages.{k}."),
                "optimizers": [node_optimizer_state(stage, node, state["optimizers"][k])],
                "schedulers": [state["schedulers"][k]],
                "rng": state["rng"], "generator": state["generator"]}

    def load_weights(self, net: LocalNet, part: dict[str, Any], device: torch.device) -> None:
        try:
            self.node.load_state_dict({n: t.to(device) for n, t in part["node"].items()})
        except (KeyError, RuntimeError) as e:
            raise TrainingError(f"the checkpoint does not fit node (stage {self.stages.start + 1}, "
                                f"group {self.g + 1}): {str(e).splitlines()[0]}") from None


def build_group_trainer(setup: Setup, data: DataSplits | None, rank: int, world: int,
                        device: torch.device, backend: str, control: Control,
                        data_group: Any, timeout: timedelta) -> Trainer:
    """Build this rank's node, sibling groups, engine and trainer (every rank calls it).

    Args:
        data_group: the data process group of all ranks (node-to-node sends).

    Raises:
        ConfigError: if the number of ranks is not ``split.k * split.groups``.
    """
    cfg = setup.cfg
    k, groups = cfg.split.k, cfg.split.groups
    if world != k * groups:
        raise ConfigError(f"engine.placement=groups needs {k * groups} workers (split.k={k} x "
                          f"split.groups={groups}), but {world} were started")
    stage, g = divmod(rank, groups)
    torch.set_rng_state(setup.rng)  # every rank initialises the net as a single process would
    data = data if data is not None else placeholder_data(setup.data)
    net = build_net(cfg, data)  # a model that cannot be grouped fails here, on every rank alike
    node = GroupNode(net.stages[stage], g).to(device)
    siblings = [dist.new_group(ranks=[s * groups + j for j in range(groups)], backend=backend,
                               timeout=timeout) for s in range(k)]  # every rank makes all of them
    wire = device if backend == "nccl" else torch.device("cpu")
    e = cfg.engine

    def inbox(src: int) -> Inbox:
        return Inbox(src, data_group, wire, device, e.queue, e.timeout)

    def outbox(dst: int) -> Outbox:
        return Outbox(dst, data_group, wire, e.queue, e.timeout)

    fan_in = [inbox(node_rank(stage - 1, j, groups)) for j in range(groups)] if stage else (
        [inbox(0)] if g else [])
    fan_out = [outbox(node_rank(stage + 1, j, groups)) for j in range(groups)] \
        if stage + 1 < k else []
    handoff = [outbox(node_rank(0, j, groups)) for j in range(1, groups)] if rank == 0 else []
    update = StageUpdate(resolve_config(cfg.train, device))
    engine = PipelineEngine(range(stage, stage + 1), micro_batches=e.micro_batches, device=device,
                            update=update, fan_in=fan_in, fan_out=fan_out, handoff=handoff,
                            node=node, siblings=siblings[stage], wire=wire)
    return Trainer(net, data, cfg, Path(setup.run_dir), engine, comm=control,
                   placement=GroupPlacement(node, stage, groups, k), device=device)
