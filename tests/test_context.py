"""Tests of context supply: modes, encoders, trail needs, isolation, inference, memory-balanced cuts."""

from __future__ import annotations

import itertools

import pytest
import torch

from locallearn.config import ConfigError, load_config
from locallearn.context import (
    ContextError,
    StageContext,
    build_context,
    find_cuts_with_context,
    parse_mode,
    stage_memory,
)
from locallearn.engines import LocalEngine
from locallearn.models import build_model
from locallearn.network import LocalNet
from locallearn.split import balanced_cuts, find_cuts

torch.set_num_threads(1)

SHAPE = (3, 8, 8)


def context_net(mode: str, k: int = 3, seed: int = 0) -> LocalNet:
    torch.manual_seed(seed)
    backbone = build_model("resnet20", SHAPE, 10, width=0.25)
    return LocalNet.from_backbone(backbone, k, head="0c1f", context=mode)


@pytest.mark.parametrize("mode,expected", [("none", (0, False)), ("E", (0, True)),
                                           ("R1", (1, False)), ("R3", (3, False)),
                                           ("R1E", (1, True)), ("R12E", (12, True))])
def test_modes_parse(mode: str, expected: tuple[int, bool]) -> None:
    parsed = parse_mode(mode)
    assert (parsed.previous, parsed.input) == expected


@pytest.mark.parametrize("mode", ["R0", "ER1", "e", "R", "R1R2", ""])
def test_bad_modes_name_the_choices(mode: str) -> None:
    with pytest.raises(ContextError, match="choose none, E, Rn or RnE"):
        parse_mode(mode)
    with pytest.raises(ConfigError, match="context.name"):
        load_config(overrides=[f"context.name={mode or 'x'}"])


def test_sources_and_needs_of_each_mode() -> None:
    shapes = [(3, 8, 8), (4, 8, 8), (8, 4, 4), (8, 4, 4)]
    assert StageContext(3, shapes, "R2E").sources == [0, 1, 2]
    assert StageContext(3, shapes, "R1").needs() == [2]
    assert StageContext(1, shapes, "R2").sources == [0]  # x is h_0: the only earlier boundary
    assert StageContext(2, shapes, "E").needs() == [0]
    assert build_context("R1E", 0, shapes) is None  # the first stage has no context
    assert build_context("none", 2, shapes) is None
    assert StageContext(2, shapes, "none", taps=[object()]).needs() == [0]


def test_context_adds_encoded_trail_to_h_with_h_shape() -> None:
    shapes = [(3, 8, 8), (4, 8, 8), (8, 4, 4)]
    ctx = StageContext(2, shapes, "R1E").eval()
    trail = [torch.randn(2, *s) for s in shapes]
    h = trail[2]
    out = ctx(h, trail)
    expected = h + ctx.encoders[0](trail[0]) + ctx.encoders[1](trail[1])
    assert out.shape == h.shape and torch.allclose(out, expected)


def test_only_the_needed_trail_entries_are_read() -> None:
    net = context_net("R1", k=3).eval()
    x = torch.randn(2, *SHAPE)
    h1 = net.stages[0](x)
    h2 = net.stages[1](h1, [x, h1])
    full = net.stages[2](h2, [x, h1, h2])
    needs = net.needs(2)
    sparse = [t if i in needs else None for i, t in enumerate([x, h1, h2])]  # what a pipeline sends
    assert needs == [1] and torch.equal(net.stages[2](h2, sparse), full)


def test_encoders_belong_to_the_next_stage_and_are_used_at_inference() -> None:
    net = context_net("R1E").eval()
    stage = net.stages[1]
    enc_params = {id(p) for p in stage.context.parameters()}
    assert enc_params and enc_params <= {id(p) for p in stage.parameters()}
    x = torch.randn(2, *SHAPE)
    before = net(x)
    with torch.no_grad():
        for p in stage.context.parameters():
            p.add_(0.5)
    assert not torch.allclose(before, net(x))


def test_local_training_with_context_trains_the_encoders_and_sends_no_gradient_back() -> None:
    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    plain, fed = context_net("none"), context_net("R1E")  # same seed: same stage 1 at start
    enc_before = [p.clone() for p in fed.stages[2].context.parameters()]
    for net in (plain, fed):
        opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in net.stages]
        LocalEngine().step(net, opts, x, y)
    for p, q in zip(plain.stages[0].parameters(), fed.stages[0].parameters()):
        # A gradient leaking back through the context would have added to stage 1's .grad
        # after its update; equal grads and weights mean it learned from its own loss only.
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    assert any(not torch.equal(a, b) for a, b in zip(enc_before, fed.stages[2].context.parameters()))


def test_context_needs_image_activations() -> None:
    with pytest.raises(ContextError, match="context.name=none"):
        StageContext(1, [(16,), (16,)], "R1")


def test_start_cost_balancing_is_exact_on_small_cases() -> None:
    gen = torch.Generator().manual_seed(3)
    costs = torch.rand(7, generator=gen).tolist()
    assert balanced_cuts(costs, 3, start_costs=[0.0] * 7) == balanced_cuts(costs, 3)
    start = [0.0, *torch.rand(6, generator=gen).tolist()]

    def worst(cuts: tuple[int, ...]) -> float:
        edges = [0, *cuts, 7]
        return max(sum(costs[a:b]) + start[a] for a, b in zip(edges, edges[1:]))

    best = min(worst(c) for c in itertools.combinations(range(1, 7), 2))
    assert worst(tuple(balanced_cuts(costs, 3, start_costs=start))) == pytest.approx(best)


def test_memory_cuts_with_context_count_the_encoders() -> None:
    backbone = build_model("resnet20", SHAPE, 10, width=0.25)
    assert find_cuts_with_context(backbone, 3, "memory", batch=4) == find_cuts(
        backbone, 3, "memory", batch=4)
    cuts = find_cuts_with_context(backbone, 3, "memory", batch=4, mode="R1E")
    with_ctx, without = stage_memory(backbone, cuts, "R1E", 4), stage_memory(backbone, cuts, "none", 4)
    assert with_ctx[0] == without[0] and all(a > b for a, b in zip(with_ctx[1:], without[1:]))
    assert find_cuts_with_context(backbone, 3, "count", mode="R1E") == find_cuts(backbone, 3)


def test_recomputed_encoders_train_identically_with_less_saved_memory() -> None:
    from locallearn.engines import stage_loss
    from locallearn.measure import SavedTensorsMeter

    x, y = torch.randn(4, *SHAPE), torch.randint(0, 10, (4,))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        backbone = build_model("resnet20", SHAPE, 10, width=0.25)
        net = LocalNet.from_backbone(backbone, 3, head="0c1f", context="R1E",
                                     context_options={"recompute": recompute})
        opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in net.stages]
        for _ in range(2):
            LocalEngine().step(net, opts, x, y)
        floats = [t.clone() for t in [*net.parameters(), *net.buffers()] if t.is_floating_point()]
        with torch.no_grad():
            h1 = net.stages[0](x)
            h2 = net.stages[1](h1, [x, h1])
        with SavedTensorsMeter(net) as meter:  # the last stage alone: blocks + encoders
            stage_loss(net.stages[2], net.stages[2](h2, [x, h1, h2]), y).backward()
        results.append((meter.peak_bytes, floats))
    (plain_bytes, plain), (lean_bytes, lean) = results
    assert lean_bytes < plain_bytes
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, lean))  # incl. BN running stats


def test_stage_costs_count_the_context_encoders() -> None:
    from locallearn.measure import macs, param_count
    from locallearn.train import stage_costs

    plain, ctx = context_net("none"), context_net("R1E")
    x = torch.randn(2, *SHAPE)
    a, b = stage_costs(plain, x), stage_costs(ctx, x)
    assert a[0] == b[0]  # the first stage gets no context
    for k in (1, 2):
        enc = ctx.stages[k].context
        assert b[k]["context_macs"] > 0 and a[k]["context_macs"] == 0
        assert b[k]["macs"] == a[k]["macs"] + b[k]["context_macs"]
        assert b[k]["params"] == a[k]["params"] + param_count(enc)
    assert macs(lambda: plain.stages[1].body(torch.randn(2, *plain.stages[1].in_shape))) // 2 == a[1]["macs"]
