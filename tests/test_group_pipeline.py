"""Group-parallel pipeline: K=2 stages x G=2 groups on 4 worker processes (the pipeline
executor given (stage, group) nodes, real links and sibling groups) equal the sequential
engine, in training, evaluation and the merged checkpoint; node <-> stage state maps."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from locallearn.distributed.comm import Inbox, Outbox
from locallearn.distributed.group_worker import node_rank
from locallearn.engines import LocalEngine
from locallearn.engines.pipeline import EvalTally, PipelineEngine, merge_tallies
from locallearn.evaluate import evaluate
from locallearn.groups import (
    group_nodes,
    merge_optimizer_states,
    node_optimizer_state,
    node_part,
    node_state_map,
    write_node_part,
)
from locallearn.models import build_model
from locallearn.network import LocalNet

torch.set_num_threads(1)

SHAPE, K, G = (3, 8, 8), 2, 2


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def node_worker(r: int, init: str, nodes: list[list], data: list, test: list, out: str) -> None:
    """Rank ``r`` of K x G worker processes: node (k, g) with its real links and siblings."""
    torch.set_num_threads(1)
    world = K * G
    dist.init_process_group("gloo", init_method=init, rank=r, world_size=world,
                            timeout=timedelta(seconds=60))
    k, g = divmod(r, G)
    siblings = [dist.new_group([s * G + j for j in range(G)]) for s in range(K)]
    wire, here = torch.device("cpu"), torch.device("cpu")
    fan_in = [Inbox(node_rank(k - 1, j, G), None, wire, here, 2, 60) for j in range(G)] if k \
        else ([Inbox(0, None, wire, here, 2, 60)] if g else [])
    fan_out = [Outbox(node_rank(k + 1, j, G), None, wire, 2, 60) for j in range(G)] \
        if k + 1 < K else []
    handoff = [Outbox(node_rank(0, j, G), None, wire, 2, 60) for j in range(1, G)] if r == 0 else []
    engine = PipelineEngine(range(k, k + 1), fan_in=fan_in, fan_out=fan_out, handoff=handoff,
                            node=nodes[k][g], siblings=siblings[k])
    opts = [sgd(nodes[k][g].parameters()) if j == k else None for j in range(K)]
    loss, net = 0.0, SimpleNamespace(num_classes=10, k=K)  # a node holds its own parameters
    for x, y in data:  # only rank 0 reads the data
        loss = (engine.step(net, opts, x, y) if r == 0 else engine.step(net, opts))[k]
    tally = EvalTally()
    engine.evaluate_tally(net, tally, test if r == 0 else None)
    engine.close()
    torch.save({"loss": loss, "state": opts[k].state_dict(), "tally": tally,
                "node": nodes[k][g].state_dict()}, f"{out}/rank{r}.pt")
    dist.destroy_process_group()


def run_ranks(nodes: list[list], data: list, test: list, tmp: Path) -> tuple[list, list, list]:
    """Train every node in its own worker process (gloo), then evaluate through the nodes.

    Returns:
        Every rank's last loss, optimizer state dict and evaluation tally; the trained
        nodes are loaded back into ``nodes``.
    """
    init = f"file://{tmp / 'rendezvous'}"
    mp.start_processes(node_worker, args=(init, nodes, data, test, str(tmp)), nprocs=K * G,
                       start_method="spawn")
    done = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(K * G)]
    for r, d in enumerate(done):
        k, g = divmod(r, G)
        nodes[k][g].load_state_dict(d["node"])
    return [d["loss"] for d in done], [d["state"] for d in done], [d["tally"] for d in done]


MIXED = {"detach_ratio": 0.5, "diversity_weight": 0.5}  # both sibling messages travel
OWN = {"detach_ratio": 0.0, "diversity_weight": 0.0}    # no sibling message at all


@pytest.mark.parametrize("model,options,groups", [("vgg6a", {"width": 0.125}, MIXED),
                                                  ("vgg6a", {"width": 0.125}, OWN),
                                                  ("resnet20", {"width": 0.5, "shortcut": "B"}, MIXED)])
def test_group_parallel_ranks_match_the_sequential_engine(model: str, options: dict,
                                                          groups: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = build_model(model, SHAPE, 10, **options)
    net = LocalNet.from_backbone(backbone, K, head="0c1f", groups=G, group_options=groups)
    nodes = [group_nodes(stage) for stage in net.stages]  # copies taken before any update
    layouts = [group_nodes(stage) for stage in net.stages]  # where each node's state lives
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, *SHAPE, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(3)]
    test = [(torch.randn(6, *SHAPE, generator=gen), torch.randint(0, 10, (6,), generator=gen))
            for _ in range(2)]
    opts = [sgd(s.parameters()) for s in net.stages]
    for x, y in data:
        losses = LocalEngine().step(net, opts, x, y)
    shares, states, tallies = run_ranks(nodes, data, test, tmp_path)
    for k in range(K):  # the G nodes' shares add up to the stage loss
        assert sum(shares[k * G: (k + 1) * G]) == pytest.approx(float(losses[k]), rel=1e-5)
    # evaluation through the nodes gives what evaluate() gives on the whole net
    want, got = evaluate(net, test), merge_tallies(tallies, K)
    for key in ("stage_acc", "final_acc", "ens_uniform", "ens_weighted", "group_acc", "n"):
        assert got[key] == want[key], key
    # the node slices written back are the whole net's weights, buffers and optimizer states
    merged = {n: torch.zeros_like(t) for n, t in net.state_dict().items()}
    for k, stage in enumerate(net.stages):
        for g, node in enumerate(nodes[k]):
            write_node_part(merged, node.state_dict(), node_state_map(stage, layouts[k][g]),
                            f"stages.{k}.")
        pairs = [(layouts[k][g], states[node_rank(k, g, G)]) for g in range(G)]
        opt = merge_optimizer_states(stage, pairs)
        want_opt = opts[k].state_dict()
        assert opt["param_groups"] == want_opt["param_groups"]
        assert sorted(opt["state"]) == sorted(want_opt["state"])
        for i, st in want_opt["state"].items():
            torch.testing.assert_close(opt["state"][i]["momentum_buffer"], st["momentum_buffer"],
                                       rtol=1e-4, atol=1e-6)
        back = node_optimizer_state(stage, layouts[k][1], opt)  # and cut out again
        for i, st in states[node_rank(k, 1, G)]["state"].items():
            torch.testing.assert_close(back["state"][i]["momentum_buffer"], st["momentum_buffer"])
    for name, t in net.state_dict().items():
        torch.testing.assert_close(merged[name], t, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model,options", [("vgg6a", {"width": 0.125}),
                                           ("resnet20", {"width": 0.5, "shortcut": "B"}),
                                           ("resnet20", {"width": 0.5, "shortcut": "A"})])
def test_the_nodes_state_maps_cover_every_entry_of_the_stage_exactly_once(model: str,
                                                                           options: dict) -> None:
    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model(model, SHAPE, 10, **options), K, head="0c1f",
                                 groups=G, group_options=MIXED)
    for stage in net.stages:
        full = stage.state_dict()
        covered = {n: torch.zeros_like(t, dtype=torch.int64) for n, t in full.items()}
        rebuilt = {n: torch.zeros_like(t) for n, t in full.items()}
        for node in group_nodes(stage):
            key_map = node_state_map(stage, node)
            assert set(key_map) == set(node.state_dict())
            part = node_part(full, key_map)
            for n, t in node.state_dict().items():
                assert torch.equal(part[n], t), n  # the node holds exactly its slices
            write_node_part(rebuilt, node.state_dict(), key_map)
            write_node_part(covered, {n: torch.ones_like(t, dtype=torch.int64)
                                      for n, t in node.state_dict().items()}, key_map)
            for sk, rows in key_map.values():  # counters are written by every node alike
                if rows is None and full[sk].dim() == 0:
                    covered[sk] -= 1
        for n, t in full.items():
            assert torch.equal(rebuilt[n], t), n
            assert int(covered[n].min()) >= (0 if full[n].dim() == 0 else 1), n
            assert int(covered[n].max()) <= 1, n


def test_a_first_stage_node_without_the_batch_is_an_error() -> None:
    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model("vgg6a", SHAPE, 10, width=0.125), K, head="0c1f",
                                 groups=G)
    node = group_nodes(net.stages[0])[0]
    engine = PipelineEngine(range(0, 1), node=node)
    with pytest.raises(ValueError, match="rank 0.* needs the batch"):
        engine.step(net, [sgd(node.parameters())])


def test_a_node_whose_head_cannot_predict_refuses_the_diversity_penalty() -> None:
    from locallearn.objectives.groups import GroupObjectiveError

    torch.manual_seed(0)
    net = LocalNet.from_backbone(build_model("vgg6a", SHAPE, 10, width=0.125), K,
                                 objective="supcon", head="0c1f", groups=G,
                                 group_options={"diversity_weight": 0.5})
    node = group_nodes(net.stages[0])[0]
    out = node(torch.randn(4, *SHAPE))
    with pytest.raises(GroupObjectiveError, match="diversity_weight=0.5 needs heads that predict"):
        node.local_loss(out, torch.tensor([0, 1, 0, 1]), [node.message(out)] * G)
