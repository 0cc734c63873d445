"""The pipeline engine in one process: wire format, stage assignment, synchronized updates.

Ranks are simulated by engines joined with an in-memory link (``helpers.ranks``) that
encodes and decodes every packet through the real wire format, so the per-rank logic
(detach, micro-batches, trails, evaluation sums) is checked against the sequential engine
in milliseconds. The multi-process runs are in ``test_pipeline_launch.py``.
"""

import copy

import pytest
import torch
from helpers import pipeline_step, ranks

from locallearn.config import ConfigError, load_config
from locallearn.distributed.faults import root_cause
from locallearn.distributed.wire import EVAL, STOP, TRAIN, Layout, Packet, WireError, encode
from locallearn.distributed.worker import data_spec, placeholder_data
from locallearn.engines import LocalEngine
from locallearn.engines.pipeline import EvalTally, assign_stages, merge_tallies
from locallearn.evaluate import evaluate
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.optim import build_optimizer
from locallearn.split import balanced_cuts, find_cuts
from locallearn.types import Masked

torch.set_num_threads(1)


def optimizers(net: LocalNet, name: str = "sgd"):
    return [build_optimizer(s.parameters(), name, 0.05, momentum=0.9, weight_decay=5e-4)
            for s in net.stages]


def batches(n: int, shape, classes: int = 10, batch: int = 12, seed: int = 1, tokens: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = (torch.randint(1, tokens, (batch, *shape), generator=g) if tokens
             else torch.randn(batch, *shape, generator=g))
        yield x, torch.randint(0, classes, (batch,), generator=g)


def mlp_net(k: int, batch_norm: bool = False) -> LocalNet:
    torch.manual_seed(0)
    backbone = build_model("mlp", (1, 8, 8), 10, hidden=[16, 16, 16, 16], batch_norm=batch_norm)
    return LocalNet.from_backbone(backbone, k, head="mlp")


def assert_same_params(a: LocalNet, b: LocalNet, atol: float = 1e-6) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=atol, msg=name)


# -- the wire format ------------------------------------------------------------------------

def test_a_packet_survives_the_wire():
    h = Masked(torch.randn(3, 5, 4), torch.rand(3, 5) > 0.5)  # a text activation (hidden, mask)
    trail = [torch.randint(0, 9, (3, 5)), None, torch.randn(3, 2).double()]
    p = Packet(TRAIN, h, torch.tensor([1, 0, 2]), trail, [torch.zeros(2, dtype=torch.float64)], 7)
    header, *tensors = encode(p)
    out = Layout.parse(header).packet(tensors)
    assert (out.kind, out.total, len(out.trail)) == (TRAIN, 7, 3)
    assert isinstance(out.h, Masked) and out.h.mask.dtype == torch.bool and torch.equal(out.h[1], h[1])
    assert torch.equal(out.h[0], h[0]) and torch.equal(out.y, p.y)
    assert out.trail[1] is None and torch.equal(out.trail[0], trail[0])
    assert out.trail[2].dtype == torch.float64 and len(out.extras) == 1


def test_stop_and_end_packets_carry_no_batch():
    for kind in (STOP, EVAL):
        header, *tensors = encode(Packet(kind))
        out = Layout.parse(header).packet(tensors)
        assert tensors == [] and out.kind == kind and out.h is None


def test_the_wire_refuses_what_it_cannot_send():
    with pytest.raises(WireError, match="dtype"):
        encode(Packet(TRAIN, torch.zeros(2, dtype=torch.complex64), torch.zeros(2)))
    with pytest.raises(WireError, match="header"):
        encode(Packet(TRAIN, torch.zeros(1), torch.zeros(1), [torch.zeros(1, 1, 1, 1)] * 300))
    with pytest.raises(WireError, match="protocol"):
        Layout.parse(torch.zeros(8, dtype=torch.int64))


# -- stage assignment and balance ----------------------------------------------------------

def test_stages_are_shared_out_in_contiguous_runs():
    assert assign_stages(3, 2) == [range(0, 1), range(1, 3)]
    assert assign_stages(4, 4) == [range(i, i + 1) for i in range(4)]
    assert assign_stages(7, 3) == [range(0, 2), range(2, 4), range(4, 7)]
    with pytest.raises(ValueError, match="engine.workers=3"):
        assign_stages(2, 3)


def test_balanced_cuts_count_the_head_at_the_end_of_each_stage():
    assert balanced_cuts([1, 1, 1, 1], 2) == [2]
    assert balanced_cuts([1, 1, 1, 1], 2, end_costs=[0, 5, 0, 0]) in ([1], [3])
    assert balanced_cuts([1, 1, 1, 1], 2, end_costs=[0, 0, 0, 3]) == [3]


def test_split_by_time_measures_heads_without_touching_model_or_random_state():
    torch.manual_seed(0)
    backbone = build_model("mlp", (1, 8, 8), 10, hidden=[16, 16, 16, 16], batch_norm=True)
    before = copy.deepcopy(torch.nn.Sequential(*backbone.blocks))
    state = torch.get_rng_state()
    from locallearn.objectives.base import build_objective

    def head(shape, last):
        return build_objective("ce", shape, 10, head="mlp")

    cuts = find_cuts(backbone, 2, "time", head=head)
    assert len(cuts) == 1 and 0 < cuts[0] < 4
    assert torch.equal(state, torch.get_rng_state())
    after = torch.nn.Sequential(*backbone.blocks)
    for a, b in zip(before.state_dict().values(), after.state_dict().values()):
        assert torch.equal(a, b)  # BatchNorm statistics untouched


# -- synchronized updates: the pipeline is the sequential engine ----------------------------

@pytest.mark.parametrize("k,workers", [(2, 2), (3, 3), (3, 2), (4, 1)])
def test_pipeline_updates_equal_the_sequential_engine(k, workers):
    a = mlp_net(k, batch_norm=True)
    b = copy.deepcopy(a)
    oa, ob = optimizers(a, "adam"), optimizers(b, "adam")
    engines = ranks(b, workers)
    for x, y in batches(4, (1, 8, 8)):
        la = LocalEngine().step(a, oa, x, y)
        lb = pipeline_step(engines, b, ob, x, y)
        assert lb == pytest.approx([float(v) for v in la], rel=1e-6)
    assert_same_params(a, b, atol=1e-7)


def test_micro_batches_accumulate_to_the_whole_batch_update():
    a = mlp_net(3)
    b = copy.deepcopy(a)
    oa, ob = optimizers(a), optimizers(b)
    engines = ranks(b, 2, micro=4)
    for x, y in batches(3, (1, 8, 8), batch=10):  # 10 samples in parts of 3, 3, 2, 2
        la = LocalEngine().step(a, oa, x, y)
        lb = pipeline_step(engines, b, ob, x, y)
        assert lb == pytest.approx([float(v) for v in la], rel=1e-5)
    assert_same_params(a, b, atol=1e-6)


def test_context_supply_trails_travel_with_the_batch():
    torch.manual_seed(0)
    a = LocalNet.from_backbone(build_model("resnet20", (3, 8, 8), 10, width=0.25), 4, head="0c1f",
                               context="R2E")
    b = copy.deepcopy(a)
    oa, ob = optimizers(a), optimizers(b)
    engines = ranks(b, 4)
    assert engines[0].downstream_needs  # x and earlier boundaries are read further down
    for x, y in batches(2, (3, 8, 8), batch=6):
        LocalEngine().step(a, oa, x, y)
        pipeline_step(engines, b, ob, x, y)
    assert_same_params(a, b)


def test_text_models_send_hidden_states_with_their_mask():
    torch.manual_seed(0)
    backbone = build_model("lstm", (6,), 3, vocab_size=20, embed_dim=8, hidden=8, layers=2)
    a = LocalNet.from_backbone(backbone, 3, head="linear")
    b = copy.deepcopy(a)
    oa, ob = optimizers(a), optimizers(b)
    engines = ranks(b, 3)
    for x, y in batches(2, (6,), classes=3, batch=5, tokens=20):
        x[:, 4:] = 0  # padding
        LocalEngine().step(a, oa, x, y)
        pipeline_step(engines, b, ob, x, y)
    assert_same_params(a, b)


def test_inactive_stages_do_not_train_and_deeper_ranks_idle():
    a = mlp_net(3)
    b = copy.deepcopy(a)
    oa, ob = optimizers(a), optimizers(b)
    local, engines = LocalEngine(), ranks(b, 3)
    local.active = {0}
    for e in engines:
        e.active = {0}
    x, y = next(batches(1, (1, 8, 8)))
    la = local.step(a, oa, x, y)
    lb = pipeline_step(engines, b, ob, x, y)
    assert lb[0] == pytest.approx(float(la[0])) and all(v != v for v in lb[1:])
    assert not engines[1].takes_part(b) and not engines[0].outbox.queue
    assert_same_params(a, b)


def test_pipelined_evaluation_equals_evaluate():
    net = mlp_net(3)
    net.eval()
    data = list(batches(3, (1, 8, 8), batch=9))
    engines = ranks(net, 2)
    tallies = [EvalTally(), EvalTally()]
    engines[0].evaluate_tally(net, tallies[0], data)
    engines[1].evaluate_tally(net, tallies[1])
    got = merge_tallies(tallies, net.k)
    want = evaluate(net, data)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)


def test_no_ensemble_when_no_stage_can_predict():
    tallies = [EvalTally(stages=[0]), EvalTally(stages=[1])]
    tallies[0].n = tallies[1].n = 5
    assert merge_tallies(tallies, 2)["ens_weighted"] is None


def test_workers_other_than_rank_0_hold_no_data():
    from locallearn.data import ArrayData, DataSplits

    split = ArrayData(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(20) % 10,
                      [str(i) for i in range(10)])
    data = DataSplits("tiny", split, split.subset(5), {"mean": [0.5], "std": [0.2]})
    fake = placeholder_data(data_spec(data))
    assert len(fake.train) == len(data.train) and fake.input_shape == data.input_shape
    assert fake.num_classes == data.num_classes and fake.train.x.stride() == (0, 0, 0, 0)
    assert len(fake.test) == 5 and fake.meta["mean"] == [0.5]


# -- failures are blamed on the right rank -------------------------------------------------

def test_root_cause_prefers_a_workers_own_error_then_a_silent_death_then_the_peer_named():
    err = {"rank": 2, "kind": "error", "message": "ValueError: bad", "time": 5.0, "peer": None}
    peer = {"rank": 0, "kind": "peer", "message": "rank 1 failed", "time": 1.0, "peer": 1,
            "timed_out": False}
    assert root_cause([1, 0, 1], {0: 1.0, 2: 5.0}, set(), {0: peer, 2: err}) == (2, "ValueError: bad")
    rank, why = root_cause([1, -9, 0], {0: 2.0, 1: 1.0}, set(), {0: peer})
    assert rank == 1 and "SIGKILL" in why
    hung = dict(peer, timed_out=True)
    rank, why = root_cause([1, -15], {0: 1.0, 1: 9.0}, {1}, {0: hung})
    assert rank == 1 and "stopped answering" in why


def test_pipeline_options_are_validated():
    cfg = load_config(None, ["engine=pipeline", "engine.micro_batches=4", "engine.devices=[cpu]"])
    assert cfg.engine.micro_batches == 4 and cfg.engine.devices == ("cpu",)
    with pytest.raises(ConfigError, match="engine.micro_batches"):
        load_config(None, ["engine.micro_batches=0"])
    with pytest.raises(ConfigError, match="auto, gloo, nccl"):
        load_config(None, ["engine.backend=mpi"])
    with pytest.raises(ConfigError, match="engine.timeout"):
        load_config(None, ["engine.timeout=0"])
