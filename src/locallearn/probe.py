"""Linear probes and effective rank of every stage's frozen features.

A self-supervised net has no classifier, so its features are judged the standard way:
freeze the net, pool each stage's output into a vector, fit a linear classifier on the
training split's features (full-batch L-BFGS on standardised features, a small L2
penalty) and report its test accuracy. A probe per stage shows where task-relevant
information survives or collapses along the depth.

Pooling: conv features (C, H, W) are average-pooled to a ``grid`` x ``grid`` map and
flattened (``grid=1`` is global average pooling; a small grid keeps some layout, which
early stages with few channels need to be probed fairly); text ``(h, mask)`` is
averaged over real tokens; flat features are used as they are.

Effective rank (Roy & Vetterli 2007) of the centred train features with singular values
``s``: ``exp(H(p))`` with ``p = s / sum(s)`` and ``H`` the Shannon entropy. It runs from
1 (everything on one direction: collapse) to the feature dimension (isotropic).

Results go to ``probe.json`` and ``probe.png`` in the run folder and into its
``summary.json`` (keys ``probe_acc``, ``effective_rank``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from locallearn.data import DataSplits, batches
from locallearn.types import Activation, Masked


def pool_features(h: Activation, grid: int = 2) -> torch.Tensor:
    """One stage output as an (N, D) matrix: conv maps pooled to ``grid`` x ``grid``.

    Raises:
        ValueError: for a grid smaller than 1.
    """
    if grid < 1:
        raise ValueError(f"probe grid must be at least 1, got {grid}")
    if isinstance(h, Masked):  # text: mask True on real tokens
        seq, mask = h.h, h.mask.to(h.h.dtype).unsqueeze(-1)
        return (seq * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if h.dim() == 4:
        return F.adaptive_avg_pool2d(h, min(grid, h.shape[-1])).flatten(1)
    return h.flatten(1)


@torch.no_grad()
def stage_features(net: Any, data: Iterable[tuple[Activation, torch.Tensor]],
                   grid: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled features of every stage of ``net`` (in eval mode) and the labels, on the CPU."""
    was = net.training
    net.eval()
    feats: list[list[torch.Tensor]] = [[] for _ in range(net.k)]
    labels = []
    for x, y in data:
        trail: list[Activation] = []
        for k, stage in enumerate(net.stages):
            trail.append(x)
            x = stage(x, trail)
            feats[k].append(pool_features(x, grid).float().cpu())
        labels.append(y.cpu())
    net.train(was)
    return [torch.cat(f) for f in feats], torch.cat(labels)


def effective_rank(x: torch.Tensor) -> float:
    """Effective rank ``exp(entropy(s / sum(s)))`` of the centred rows of ``x`` (N, D)."""
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    if float(s.sum()) == 0.0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     weight_decay: float = 1e-4, max_iter: int = 100
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a multinomial logistic regression on standardised ``x`` with full-batch L-BFGS.

    Returns:
        ``(mean, std, weight, bias)``: predict with ``((x - mean) / std) @ weight.T + bias``.
    """
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.t() + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, w.detach(), b.detach()


def probe_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                   num_classes: int, weight_decay: float = 1e-4, max_iter: int = 100) -> float:
    """Test accuracy (%) of a linear probe fitted on ``train`` features and labels."""
    mean, std, w, b = fit_linear_probe(*train, num_classes, weight_decay, max_iter)
    pred = (((test[0] - mean) / std) @ w.t() + b).argmax(1)
    return 100.0 * float((pred == test[1]).float().mean())


def probe_net(net: Any, data: DataSplits, *, grid: int = 2, batch_size: int = 500,
              weight_decay: float = 1e-4, max_iter: int = 100,
              device: torch.device | str = "cpu") -> dict[str, Any]:
    """Linear-probe accuracy and effective rank of every stage of ``net`` on ``data``.

    The features are those of un-augmented, normalised images of the whole train and
    test splits of ``data`` (subset them first for speed).

    Returns:
        ``{"probe_acc": [...], "effective_rank": [...], "feature_dim": [...], "grid",
        "n_train", "n_test", "weight_decay"}`` with one value per stage.
    """
    mean, std = data.meta.get("mean"), data.meta.get("std")
    train_f, train_y = stage_features(net, batches(data.train, batch_size, shuffle=False, generator=None,
                                                   device=device, mean=mean, std=std), grid)
    test_f, test_y = stage_features(net, batches(data.test, batch_size, shuffle=False, generator=None,
                                                 device=device, mean=mean, std=std), grid)
    acc = [probe_accuracy((a, train_y), (b, test_y), data.num_classes, weight_decay, max_iter)
           for a, b in zip(train_f, test_f)]
    return {"probe_acc": acc, "effective_rank": [effective_rank(f) for f in train_f],
            "feature_dim": [f.shape[1] for f in train_f], "grid": grid,
            "n_train": len(train_y), "n_test": len(test_y), "weight_decay": weight_decay}


def plot_probe(results: Mapping[str, Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Probe accuracy and effective rank per stage, one line per labelled result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_rank) = plt.subplots(1, 2, figsize=(9, 3.5))
    for label, r in results.items():
        stages = range(1, len(r["probe_acc"]) + 1)
        ax_acc.plot(stages, r["probe_acc"], marker="o", label=label)
        ax_rank.plot(stages, r["effective_rank"], marker="o", label=label)
    ax_acc.set(xlabel="stage", ylabel="linear-probe test accuracy (%)")
    ax_rank.set(xlabel="stage", ylabel="effective rank of features", yscale="log")
    for ax in (ax_acc, ax_rank):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def record_probe(run_dir: Path, result: dict[str, Any]) -> None:
    """Write ``probe.json`` and ``probe.png`` into a run folder and merge into its summary."""
    from locallearn import runs

    run_dir = Path(run_dir)
    runs.write_json(run_dir / "probe.json", result)
    plot_probe({run_dir.name: result}, run_dir / "probe.png", title=run_dir.name)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary.update({k: result[k] for k in ("probe_acc", "effective_rank")})
        runs.write_json(summary_path, summary)


def probe_run(run: str | Path, *, data_dir: str | None = None, train_subset: int | None = None,
              test_subset: int | None = None, **options: Any) -> dict[str, Any]:
    """Probe the checkpoint of a finished run folder and record the result in it.

    Args:
        run: a run folder (or its checkpoint file).
        data_dir: data root, if not the one the run was trained with.
        train_subset, test_subset: samples to probe on (``None``: the run's own subsets).
        **options: passed to :func:`probe_net` (``grid``, ``weight_decay``, ``max_iter``).

    Raises:
        RunError: if the run folder has no readable checkpoint.
    """
    from locallearn import runs
    from locallearn.build import build_data, build_net
    from locallearn.config import apply_overrides, from_dict

    state = runs.load_checkpoint(run)
    overrides = [f"data.data_dir={data_dir}"] if data_dir else []
    overrides += [f"data.train_subset={train_subset}"] if train_subset is not None else []
    overrides += [f"data.test_subset={test_subset}"] if test_subset is not None else []
    cfg = from_dict(apply_overrides(state["config"], overrides))
    data = build_data(cfg)
    net = build_net(cfg, data)
    net.load_state_dict(state["net"])
    result = probe_net(net, data, **options)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    record_probe(run_dir, result)
    return result


def is_self_supervised(net: Any) -> bool:
    """True if some stage's objective asks for several views (it learns without labels)."""
    return any(getattr(s.objective, "views", 1) > 1 for s in net.stages)


__all__ = ["effective_rank", "fit_linear_probe", "is_self_supervised", "plot_probe", "pool_features",
           "probe_accuracy", "probe_net", "probe_run", "record_probe", "stage_features"]
