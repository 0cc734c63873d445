"""Measurement: saved-activation bytes worked out by hand, MACs, balanced splits."""

import torch
from torch import nn

from locallearn.measure import SavedTensorsMeter, macs, param_count
from locallearn.models import build_model
from locallearn.split import balanced_cuts, block_costs, find_cuts, stage_ranges


def test_saved_bytes_match_hand_count():
    # Linear(4, 8) saves its input x: 2*4 floats = 32 B. ReLU saves its output: 2*8 floats
    # = 64 B. Linear(8, 3) saves its input, the same ReLU output storage: counted once.
    # Weights are parameters, not activations. Total 96 B; all freed after backward.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    with SavedTensorsMeter(model) as meter:
        loss = model(x).sum()
        assert meter.current_bytes == 96
        loss.backward()
    assert meter.peak_bytes == 96
    assert meter.current_bytes == 0


def test_saved_bytes_of_a_conv():
    # Conv2d(1, 2, 3) on a (1, 1, 4, 4) input that requires grad saves the input (16 floats
    # = 64 B); the following ReLU saves its (1, 2, 2, 2) output (8 floats = 32 B).
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with SavedTensorsMeter(model) as meter:
        model(torch.randn(1, 1, 4, 4, requires_grad=True)).sum().backward()
    assert meter.peak_bytes == 64 + 32


def test_macs_and_params():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert macs(lambda: model(torch.randn(2, 4))) == 2 * (4 * 8 + 8 * 3)
    assert param_count(model) == 4 * 8 + 8 + 8 * 3 + 3


def test_balanced_cuts_minimise_the_largest_stage():
    assert balanced_cuts([1] * 8, 4) == [2, 4, 6]
    assert balanced_cuts([8, 1, 1, 1, 1, 1, 1, 1], 2) == [1]
    assert balanced_cuts([1, 1, 1, 1, 4], 2) == [4]
    costs = [3, 1, 4, 1, 5, 9, 2, 6]
    cuts = balanced_cuts(costs, 3)
    parts = [sum(costs[r.start:r.stop]) for r in stage_ranges(cuts, len(costs))]

    best = min(max(sum(costs[:a]), sum(costs[a:b]), sum(costs[b:]))
               for a in range(1, 7) for b in range(a + 1, 8))
    assert max(parts) == best


def test_memory_split_puts_fewer_early_blocks_together():
    backbone = build_model("resnet20", (3, 32, 32), 10, width=0.5)
    mem = block_costs(backbone, "memory", batch=2)
    assert mem[1] > mem[-1]  # early blocks hold larger feature maps than late ones
    ranges = stage_ranges(find_cuts(backbone, 4, "memory", batch=2), len(backbone))
    assert ranges[0].stop - ranges[0].start < ranges[-1].stop - ranges[-1].start
    assert find_cuts(backbone, 4, "count") == [3, 6, 8]


def test_explicit_cuts_and_errors():
    backbone = build_model("resnet20", (3, 32, 32), 10)
    assert find_cuts(backbone, 3, "cuts", [2, 5]) == [2, 5]
    for bad in ([5, 2], [0, 3], [3, 10]):
        try:
            find_cuts(backbone, 3, "cuts", bad)
        except ValueError as e:
            assert "cut indices" in str(e)
        else:
            raise AssertionError("bad cuts accepted")
    try:
        find_cuts(backbone, 11, "count")
    except ValueError as e:
        assert "split.k=11" in str(e) and "10 blocks" in str(e)
    else:
        raise AssertionError("k larger than the number of blocks accepted")
