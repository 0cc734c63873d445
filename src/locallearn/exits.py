"""Forward shortcuts and early exit: answer with an earlier stage's predictor.

When every stage can classify (per-stage predictors, DASCPL), any prefix of the
network is a complete, cheaper model:

* **forward shortcut**: stop after stage k and answer with its predictor
  (:func:`forward_shortcut`, :func:`fixed_exit`);
* **early exit**: per sample, answer at the first stage whose confidence passes a
  threshold (:func:`early_exit_predict` really stops computing for the samples that
  left; :func:`threshold_exit` scores a threshold from stored logits).

Confidence is the maximum softmax probability (``max``) or the normalised negative
entropy ``1 - H(p) / log C`` (``entropy``), both in [0, 1]; a sample exits where the
confidence is at least the threshold.

Compute is counted in MACs per sample (:func:`locallearn.measure.macs`): exiting at
stage k costs the bodies of stages 1..k plus every predictor evaluated on the way
(an early-exit pass looks at each predicting stage's logits; a fixed shortcut only at
stage k's). The reference is the plain network: all bodies plus the last stage's
classifier, so an early-exit pass that never exits costs a little more than 1.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from locallearn.measure import macs
from locallearn.network import LocalNet, Stage
from locallearn.types import Activation, first_tensor, map_tensors

CONFIDENCES = ("max", "entropy")
THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def confidence(logits: torch.Tensor, kind: str = "max") -> torch.Tensor:
    """Per-sample confidence in [0, 1] of ``logits`` (N, C).

    Raises:
        ValueError: for an unknown kind (the message lists the choices).
    """
    if kind not in CONFIDENCES:
        raise ValueError(f"unknown confidence {kind!r}; choose one of: {', '.join(CONFIDENCES)}")
    logp = logits.float().log_softmax(1)
    if kind == "max":
        return logp.max(1).values.exp()
    entropy = -(logp.exp() * logp).sum(1)
    return 1.0 - entropy / max(torch.log(torch.tensor(float(logits.shape[1]))).item(), 1e-12)


@dataclass(frozen=True)
class ExitCosts:
    """MACs per sample of every stage's body and predictor (``None``: cannot predict)."""

    body: tuple[int, ...]
    head: tuple[int | None, ...]

    @property
    def full(self) -> int:
        """The plain network: every body and the last classifier."""
        return sum(self.body) + (self.head[-1] or 0)

    def shortcut(self, k: int) -> int:
        """Stop after stage ``k`` (0-based) and answer with its predictor."""
        return sum(self.body[: k + 1]) + (self.head[k] or 0)

    def early_exit(self, k: int) -> int:
        """Leave at stage ``k`` after evaluating every predictor up to it."""
        return sum(self.body[: k + 1]) + sum(h for h in self.head[: k + 1] if h is not None)


def _take(h: Activation, idx: torch.Tensor) -> Activation:
    """The samples ``idx`` of an activation (a tensor or a tuple of tensors)."""
    return map_tensors(lambda t: t[idx], h)


def _stages(net: LocalNet) -> list[Stage]:
    return list(net.stages)


def _batch_size(h: Activation) -> int:
    return int(first_tensor(h).shape[0])


@contextmanager
def _eval_mode(net: LocalNet) -> Iterator[None]:
    """Inference mode for the block (BatchNorm must not learn from test batches), then back."""
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


@torch.no_grad()
def measure_exit_costs(net: LocalNet, sample: Activation) -> ExitCosts:
    """Measure per-sample MACs of each stage's body and predictor on ``sample`` (eval mode)."""
    with _eval_mode(net):
        return _measure(net, sample)


def _measure(net: LocalNet, sample: Activation) -> ExitCosts:
    n = _batch_size(sample)
    body, head = [], []
    trail: list[Activation] = []
    h = sample
    for stage in _stages(net):
        trail.append(h)
        inp = h
        body.append(macs(lambda: stage(inp, trail)) // n)  # noqa: B023 (called right here)
        h = stage(inp, trail)
        out = h
        can = stage.predict(out) is not None
        head.append(macs(lambda: stage.predict(out)) // n if can else None)  # noqa: B023
    return ExitCosts(tuple(body), tuple(head))


@torch.no_grad()
def forward_shortcut(net: LocalNet, x: Activation, stage: int) -> torch.Tensor:
    """Logits of stage ``stage`` (1-based), running only stages 1..stage.

    Raises:
        ValueError: for a stage out of range or one that cannot predict.
    """
    _check_stage(net, stage)
    with _eval_mode(net):
        logits = net.stage_logits(x, upto=stage)[-1]
    if logits is None:
        raise ValueError(f"stage {stage} has no predictor; train with objective.predictor=linear "
                         "(or mlp) to give every stage one")
    return logits


def _check_stage(net: LocalNet, stage: int) -> None:
    if not 1 <= stage <= net.k:
        raise ValueError(f"exit stage {stage} is out of range: the network has stages 1..{net.k}")


@torch.no_grad()
def early_exit_predict(net: LocalNet, x: Activation, threshold: float,
                       kind: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample early exit that really stops computing for the samples that left.

    Returns:
        ``(logits, stage)``: the answering logits (N, C) and the 1-based exit stage (N,).
    """
    with _eval_mode(net):
        return _early_exit(net, x, threshold, kind)


def _early_exit(net: LocalNet, x: Activation, threshold: float,
                kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = _batch_size(x)
    result: torch.Tensor | None = None
    where = torch.full((n,), net.k, dtype=torch.long)
    alive = torch.arange(n)
    h, trail = x, []
    for k, stage in enumerate(_stages(net)):
        trail.append(h)
        h = stage(h, trail)
        logits = stage.predict(h)
        if logits is None:
            continue
        if result is None:
            result = logits.new_zeros(n, logits.shape[1])
        leave = confidence(logits, kind) >= threshold
        if k == net.k - 1:
            leave = torch.ones_like(leave)
        gone = alive[leave.cpu()]
        result[gone.to(result.device)] = logits[leave]
        where[gone] = k + 1
        keep = (~leave).nonzero().flatten()
        alive = alive[keep.cpu()]
        if len(alive) == 0:
            break
        h, trail = _take(h, keep), [_take(t, keep) for t in trail]
    assert result is not None
    return result, where


@torch.no_grad()
def collect_stage_logits(net: LocalNet, batches: Iterable[tuple[Activation, torch.Tensor]]
                         ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """Every stage's logits (``None`` where a stage cannot predict) and the labels of a data set."""
    with _eval_mode(net):
        return _collect(net, batches)


def _collect(net: LocalNet, batches: Iterable[tuple[Activation, torch.Tensor]]
             ) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    per_stage: list[list[torch.Tensor]] = [[] for _ in range(net.k)]
    silent: set[int] = set()  # stages that cannot predict
    labels = []
    for x, y in batches:
        for k, lg in enumerate(net.stage_logits(x)):
            if lg is None:
                silent.add(k)
            else:
                per_stage[k].append(lg.float().cpu())
        labels.append(y.cpu())
    return ([None if k in silent or not p else torch.cat(p) for k, p in enumerate(per_stage)],
            torch.cat(labels))


def fixed_exit(logits: Sequence[torch.Tensor | None], y: torch.Tensor, costs: ExitCosts,
               stage: int) -> dict[str, Any]:
    """Accuracy (%) and MACs fraction of answering with stage ``stage`` (1-based) for every sample."""
    lg = logits[stage - 1]
    if lg is None:
        raise ValueError(f"stage {stage} has no predictor; train with objective.predictor=linear")
    acc = 100.0 * (lg.argmax(1) == y).float().mean().item()
    return {"stage": stage, "acc": acc, "macs_fraction": costs.shortcut(stage - 1) / costs.full}


def threshold_exit(logits: Sequence[torch.Tensor | None], y: torch.Tensor, costs: ExitCosts,
                   threshold: float, kind: str = "max") -> dict[str, Any]:
    """Score per-sample early exit at ``threshold`` from every stage's stored logits.

    Returns:
        ``threshold``, ``acc`` (%), ``macs_fraction`` (mean over samples, relative to the
        plain network) and ``exit_share`` (fraction of samples leaving at each stage).
    """
    n, k = len(y), len(logits)
    answer = torch.zeros(n, dtype=torch.long)
    spent = torch.zeros(n, dtype=torch.float64)
    share = [0.0] * k
    left = torch.ones(n, dtype=torch.bool)
    for i, lg in enumerate(logits):
        if lg is None:
            continue
        leave = left & ((confidence(lg, kind) >= threshold) if i < k - 1 else torch.ones_like(left))
        answer[leave] = lg[leave].argmax(1)
        spent[leave] = costs.early_exit(i)
        share[i] = leave.float().mean().item()
        left &= ~leave
    return {"threshold": threshold, "acc": 100.0 * (answer == y).float().mean().item(),
            "macs_fraction": spent.mean().item() / costs.full, "exit_share": share}


def auto_thresholds(logits: Sequence[torch.Tensor | None], kind: str = "max") -> list[float]:
    """:data:`THRESHOLDS` plus the 5%, 10%, ..., 95% quantiles of the early exits' confidences.

    A briefly trained net is rarely confident, so a fixed grid can jump from "everyone
    leaves" to "no one leaves"; quantiles of the observed confidences fill the gap.
    """
    early = [lg for lg in logits[:-1] if lg is not None]
    if not early:
        return list(THRESHOLDS)
    conf = torch.cat([confidence(lg, kind) for lg in early])
    quantiles = torch.quantile(conf, torch.linspace(0.05, 0.95, 19)).tolist()
    return sorted({*THRESHOLDS, *(round(q, 4) for q in quantiles)})


def exit_curve(logits: Sequence[torch.Tensor | None], y: torch.Tensor, costs: ExitCosts,
               thresholds: Sequence[float] | None = None, kind: str = "max") -> dict[str, Any]:
    """Accuracy against compute: every fixed shortcut and early exit at every threshold.

    ``thresholds`` default to :func:`auto_thresholds`.
    ``best_within_1pt`` is the cheapest early-exit point within one point of the full
    network's accuracy (``None`` if there is none).
    """
    full = fixed_exit(logits, y, costs, len(logits))["acc"]
    fixed = [fixed_exit(logits, y, costs, k + 1) for k, lg in enumerate(logits) if lg is not None]
    if thresholds is None:
        thresholds = auto_thresholds(logits, kind)
    curve = [threshold_exit(logits, y, costs, t, kind) for t in thresholds]
    ok = [p for p in curve if p["acc"] >= full - 1.0]
    best = min(ok, key=lambda p: p["macs_fraction"]) if ok else None
    return {"confidence": kind, "n": len(y), "full_acc": full,
            "costs": asdict(costs), "fixed": fixed, "curve": curve, "best_within_1pt": best}


def plot_exit_curve(report: dict[str, Any], path: Path) -> None:
    """Draw accuracy against the fraction of MACs spent into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    curve = sorted(report["curve"], key=lambda p: p["macs_fraction"])
    ax.plot([p["macs_fraction"] for p in curve], [p["acc"] for p in curve], "o-", ms=3,
            label=f"early exit ({report['confidence']} confidence)")
    ax.plot([p["macs_fraction"] for p in report["fixed"]], [p["acc"] for p in report["fixed"]],
            "s", label="fixed shortcut at stage k")
    for p in report["fixed"]:
        ax.annotate(str(p["stage"]), (p["macs_fraction"], p["acc"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    ax.axhline(report["full_acc"] - 1.0, color="grey", ls="--", lw=0.8, label="full - 1 point")
    ax.set_xlabel("fraction of the full network's MACs")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def early_exit_report(net: LocalNet, batches: Iterable[tuple[Activation, torch.Tensor]], *,
                      thresholds: Sequence[float] | None = None, kind: str = "max",
                      out_dir: Path | None = None) -> dict[str, Any]:
    """Collect logits, measure costs and compute the exit curve; write
    ``exit_curve.json`` and ``exit_curve.png`` into ``out_dir`` if given.

    Raises:
        ValueError: if the data is empty or the last stage cannot predict.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("early exit needs at least one test batch")
    costs = measure_exit_costs(net, first[0])
    logits, y = collect_stage_logits(net, _chain(first, batches))
    report = exit_curve(logits, y, costs, thresholds, kind)
    if out_dir is not None:
        Path(out_dir, "exit_curve.json").write_text(json.dumps(report, indent=2))
        plot_exit_curve(report, Path(out_dir, "exit_curve.png"))
    return report


def _chain(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest
