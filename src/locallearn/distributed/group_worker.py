"""One worker of ``engine.placement=groups``: a (stage, group) node on its own rank.

The run is that of :mod:`locallearn.distributed.worker` (rank 0 reads the data and
writes the run folder, every epoch ends with an evaluation through the ranks and a
checkpoint); what differs is what a rank trains and saves:

* rank ``k * G + g`` trains :class:`~locallearn.groups.GroupNode` g of stage k (its
  slice of every layer of the stage, and its own head) with the engine
  :class:`~locallearn.engines.group_pipeline.GroupPipelineEngine`;
* its shard ``ranks/rank<r>.pt`` holds the node's own state dict and optimizer state;
* rank 0 writes each slice back into its place in the whole network
  (:func:`locallearn.groups.node_state_map`), so ``checkpoint.pt`` is the standard
  single-process checkpoint that ``locallearn eval`` and ``--resume`` read; on resume
  it cuts every missing node's part out of that checkpoint again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from locallearn.config import ConfigError, RunConfig, to_dict
from locallearn.data import DataSplits
from locallearn.distributed.comm import Control
from locallearn.distributed.worker import PipelineTrainer, Session, Setup, placeholder_data
from locallearn.engines.group_pipeline import GroupPipelineEngine
from locallearn.engines.pipeline import PipelineEngine
from locallearn.groups import (
    GroupNode,
    merge_optimizer_states,
    node_optimizer_state,
    node_part,
    node_state_map,
    write_node_part,
)
from locallearn.train import Trainer, TrainingError, build_net


def node_ranges(k: int, groups: int) -> list[range]:
    """The stage of every rank: rank ``s * groups + g`` holds a node of stage s."""
    return [range(r // groups, r // groups + 1) for r in range(k * groups)]


class GroupPipelineTrainer(PipelineTrainer):
    """Trains one (stage, group) node; rank 0 also records the run (see the module doc)."""

    engine: GroupPipelineEngine  # type: ignore[assignment]

    def __init__(self, net: Any, data: DataSplits, cfg: RunConfig, run_dir: Path,
                 session: Session, engine: GroupPipelineEngine) -> None:
        # duck-typed: a GroupPipelineEngine has the interface of PipelineEngine the trainer uses
        super().__init__(net, data, cfg, run_dir, session, cast(PipelineEngine, engine))
        k = engine.stage  # stage k's optimizer and schedule update this node, not the stage
        self.optimizers[k] = self.build_optimizer(engine.node.parameters())
        self.schedulers[k] = self.build_scheduler(self.optimizers[k])
        self._layouts: dict[tuple[int, int], GroupNode] = {}

    def place(self, net: Any) -> Any:
        return net  # the node holds its own copies of its slices; the net stays on the CPU

    def layout(self, k: int, g: int) -> GroupNode:
        """A node (k, g) built from the whole network: where its state lives there."""
        if (k, g) not in self._layouts:
            self._layouts[k, g] = GroupNode(self.net.stages[k], g)
        return self._layouts[k, g]

    def rank_place(self) -> dict[str, Any]:
        return {"group": self.engine.g + 1}

    # -- shards ------------------------------------------------------------------------
    def own_weights(self) -> dict[str, Any]:
        return {"group": self.engine.g,
                "node": {n: t.detach().cpu() for n, t in self.engine.node.state_dict().items()}}

    def shard_fits(self, shard: dict[str, Any]) -> bool:
        return super().shard_fits(shard) and shard.get("group") == self.engine.g

    def merged_state(self, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The single-process checkpoint: every node's slices written into the whole network."""
        state = Trainer.state_dict(self)
        net = {n: t.detach().cpu().clone() for n, t in state["net"].items()}
        parts: dict[int, list[tuple[GroupNode, dict[str, Any]]]] = {}
        for sh in shards:
            k, g = sh["stages"][0], sh["group"]
            node = self.layout(k, g)
            write_node_part(net, sh["node"], node_state_map(self.net.stages[k], node), f"stages.{k}.")
            parts.setdefault(k, []).append((node, sh["optimizers"][0]))
            state["schedulers"][k] = sh["schedulers"][0]
        for k, pairs in parts.items():
            state["optimizers"][k] = merge_optimizer_states(self.net.stages[k], pairs)
        state["net"], state["config"] = net, to_dict(self.run_cfg)
        return state

    def part_of(self, state: dict[str, Any], rank: int) -> dict[str, Any]:
        k, g = divmod(rank, self.run_cfg.split.groups)
        stage, node = self.net.stages[k], self.layout(k, g)
        return {"node": node_part(state["net"], node_state_map(stage, node), f"stages.{k}."),
                "optimizers": [node_optimizer_state(stage, node, state["optimizers"][k])],
                "schedulers": [state["schedulers"][k]],
                "rng": state["rng"], "generator": state["generator"]}

    def load_weights(self, part: dict[str, Any]) -> None:
        node = self.engine.node
        try:
            node.load_state_dict({n: t.to(self.session.device) for n, t in part["node"].items()})
        except (KeyError, RuntimeError) as e:
            raise TrainingError(f"the checkpoint does not fit node (stage {self.engine.stage + 1}, "
                                f"group {self.engine.g + 1}): {str(e).splitlines()[0]}") from None


def build_group_trainer(setup: Setup, data: DataSplits | None, rank: int, world: int,
                        device: torch.device, threads: int, backend: str, control: Control,
                        data_group: Any, timeout: timedelta) -> GroupPipelineTrainer:
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
    engine = GroupPipelineEngine(node, stage, k, data_group, siblings[stage], wire, device)
    session = Session(rank, world, device, threads, backend, control, node_ranges(k, groups))
    return GroupPipelineTrainer(net, data, cfg, Path(setup.run_dir), session, engine)
