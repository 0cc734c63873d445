"""Group-parallel pipeline: K=2 stages x G=2 groups on 4 ranks (threads joined by gloo) equal the sequential engine."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from locallearn.engines import LocalEngine
from locallearn.engines.group_pipeline import GroupPipelineEngine, node_rank
from locallearn.groups import group_nodes
from locallearn.models import build_model
from locallearn.network import LocalNet

torch.set_num_threads(1)

SHAPE, K, G = (3, 8, 8), 2, 2


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def run_ranks(nodes: list[list], data: list) -> list[float]:
    """Train every node on its own thread and gloo rank; the last losses of every rank."""
    store = dist.HashStore()
    losses = [0.0] * (K * G)
    errors: list[BaseException] = []

    def rank(k: int, g: int) -> None:
        try:
            r, wait = node_rank(k, g, G), timedelta(seconds=30)
            world = dist.ProcessGroupGloo(dist.PrefixStore("world", store), r, K * G, wait)
            siblings = dist.ProcessGroupGloo(dist.PrefixStore(f"stage{k}", store), g, G, wait)
            engine = GroupPipelineEngine(nodes[k][g], k, K, world, siblings)
            opts = [sgd(nodes[k][g].parameters()) if j == k else None for j in range(K)]
            for x, y in data:  # only rank 0 reads the data
                out = engine.step(None, opts, x, y) if r == 0 else engine.step(None, opts)
                losses[r] = out[k]
        except BaseException as e:  # re-raised by the test thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(k, g)) for k in range(K) for g in range(G)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return losses


MIXED = {"detach_ratio": 0.5, "diversity_weight": 0.5}  # both sibling messages travel
OWN = {"detach_ratio": 0.0, "diversity_weight": 0.0}    # no sibling message at all


@pytest.mark.parametrize("model,options,groups", [("vgg6a", {"width": 0.125}, MIXED),
                                                  ("vgg6a", {"width": 0.125}, OWN),
                                                  ("resnet20", {"width": 0.5, "shortcut": "B"}, MIXED)])
def test_group_parallel_ranks_match_the_sequential_engine(model: str, options: dict,
                                                          groups: dict) -> None:
    torch.manual_seed(0)
    backbone = build_model(model, SHAPE, 10, **options)
    net = LocalNet.from_backbone(backbone, K, head="0c1f", groups=G, group_options=groups)
    nodes = [group_nodes(stage) for stage in net.stages]  # copies taken before any update
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, *SHAPE, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(3)]
    opts = [sgd(s.parameters()) for s in net.stages]
    for x, y in data:
        LocalEngine().step(net, opts, x, y)
    losses = run_ranks(nodes, data)
    assert all(loss == loss and loss > 0 for loss in losses)  # every rank trained
    net.eval()
    h = torch.randn(4, *SHAPE, generator=gen)
    for stage, stage_nodes in zip(net.stages, nodes):
        for n in stage_nodes:
            n.eval()
        out = stage(h)
        gathered = torch.cat([n(h) for n in stage_nodes], dim=1)
        torch.testing.assert_close(gathered, out, rtol=1e-4, atol=1e-5)  # weights and BN stats
        for g, n in enumerate(stage_nodes):
            for a, b in zip(n.objective.parameters(), stage.objective.objectives[g].parameters()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the group's own head
        h = out


def test_a_first_stage_node_without_the_batch_is_an_error() -> None:
    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model("vgg6a", SHAPE, 10, width=0.125), K, head="0c1f",
                                 groups=G)
    engine = GroupPipelineEngine(group_nodes(net.stages[0])[0], 0, K, world=None, siblings=None)
    with pytest.raises(ValueError, match="rank 0.* needs the batch"):
        engine.step(net, [sgd(engine.node.parameters())])
