"""Tests of the diversity penalty between group heads: against a direct loop, invariances, gradient."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from locallearn.objectives.diversity import diversity_penalty, wrong_class_vectors

torch.set_num_threads(1)


def loop_penalty(logits: list[torch.Tensor], y: torch.Tensor, t: float) -> float:
    """The penalty written out sample by sample, pair by pair, in plain Python floats."""
    def vector(z: list[float], true: int) -> list[float]:
        e = [math.exp(v / t) for v in z]
        p = [v / sum(e) for v in e]
        p[true] = 0.0
        p = [v / sum(p) for v in p]
        norm = math.sqrt(sum(v * v for v in p))
        return [v / norm for v in p]

    total, pairs = 0.0, 0
    for i, j in itertools.combinations(range(len(logits)), 2):
        for b in range(len(y)):
            u = vector(logits[i][b].tolist(), int(y[b]))
            v = vector(logits[j][b].tolist(), int(y[b]))
            total += sum(a * c for a, c in zip(u, v))
        pairs += 1
    return total / (pairs * len(y))


@pytest.mark.parametrize("heads,temperature", [(2, 3.0), (3, 3.0), (4, 1.0), (5, 0.5)])
def test_penalty_matches_a_direct_loop(heads: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(heads)
    logits = [torch.randn(6, 7, generator=g, dtype=torch.float64) * 2 for _ in range(heads)]
    y = torch.randint(0, 7, (6,), generator=g)
    got = diversity_penalty(logits, y, temperature).item()
    assert got == pytest.approx(loop_penalty(logits, y, temperature), abs=1e-10)


def test_single_head_has_no_pairs_and_keeps_the_graph() -> None:
    z = torch.randn(4, 5, requires_grad=True)
    p = diversity_penalty([z], torch.zeros(4, dtype=torch.long))
    assert p.item() == 0.0
    p.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_identical_heads_give_one_and_the_true_class_logit_does_not_matter() -> None:
    torch.manual_seed(0)
    z = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    assert diversity_penalty([z, z.clone()], y).item() == pytest.approx(1.0, abs=1e-6)
    other = torch.randn(8, 10)
    moved = other.clone()
    moved[torch.arange(8), y] += 5.0  # only the true class changes: its probability is zeroed
    assert diversity_penalty([z, other], y).item() == pytest.approx(
        diversity_penalty([z, moved], y).item(), abs=1e-6)


def test_vectors_are_unit_length_and_zero_at_the_true_class() -> None:
    z = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    v = wrong_class_vectors(z, y, 3.0)
    assert torch.allclose(v.norm(dim=1), torch.ones(5))
    assert torch.all(v[torch.arange(5), y] == 0)


def test_gradient_per_head_is_that_of_its_pairs_with_the_others_fixed() -> None:
    torch.manual_seed(1)
    logits = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 6, (4,))
    diversity_penalty(logits, y).backward()
    full = [z.grad.clone() for z in logits]
    n_pairs = 3
    for g, z in enumerate(logits):
        z.grad = None
        local = sum(diversity_penalty([z, other.detach()], y) for j, other in enumerate(logits)
                    if j != g) / n_pairs
        local.backward()
        assert torch.allclose(z.grad, full[g], atol=1e-7)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least one head"):
        diversity_penalty([], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be positive"):
        diversity_penalty([torch.randn(2, 3)] * 2, torch.zeros(2, dtype=torch.long), 0.0)
