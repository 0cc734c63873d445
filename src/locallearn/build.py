"""Building a run's objects from its config: data, model blocks, cut points, the net.

Each component checks its own options where it is built; this module only composes
them. It sits below the training loop and knows no engine or process.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from locallearn.config import RunConfig
from locallearn.context import find_cuts_with_context
from locallearn.data import DataSplits, load_data
from locallearn.difficulty import apply_difficulty
from locallearn.errors import ConfigError
from locallearn.groups import context_and_body
from locallearn.measure import macs, param_count
from locallearn.models.blocks import Backbone, build_model
from locallearn.network import LocalNet
from locallearn.objectives.base import STAGE_KEYS, build_objective
from locallearn.split import find_cuts


def build_data(cfg: RunConfig) -> DataSplits:
    """Load the configured data set, cut to the configured subsets."""
    data = load_data(cfg.data.name, cfg.data.data_dir, **cfg.data.options)
    if cfg.data.train_subset:
        data = dataclasses.replace(data, train=data.train.subset(cfg.data.train_subset))
    if cfg.data.test_subset:
        data = dataclasses.replace(data, test=data.test.subset(cfg.data.test_subset))
    return data


def build_backbone(cfg: RunConfig, data: DataSplits) -> Backbone:
    """Build the configured model's blocks for ``data``."""
    options = dict(cfg.model.options)
    if "vocab_size" in data.meta:  # text models take their vocabulary from the data
        options.setdefault("vocab_size", data.meta["vocab_size"])
    return build_model(cfg.model.name, data.input_shape, data.num_classes, **options)


def split_cuts(cfg: RunConfig, data: DataSplits, backbone: Backbone | None = None) -> list[int]:
    """The cut indices of the configured split, measured here for measured splits.

    ``by=time`` times every block's forward and backward and the local objective a
    stage ending at that block would carry. Measuring changes neither the random
    state nor ``backbone`` (a fresh one is built if none is given).
    """
    with torch.random.fork_rng(devices=[]):
        backbone = backbone if backbone is not None else build_backbone(cfg, data)
        if cfg.split.by == "time":
            return find_cuts(backbone, cfg.split.k, "time", list(cfg.split.cuts),
                             head=_head_builder(cfg, backbone))
        return find_cuts_with_context(backbone, cfg.split.k, cfg.split.by, list(cfg.split.cuts),
                                      mode=cfg.context.name)


def _head_builder(cfg: RunConfig, backbone: Backbone) -> Any:
    o = cfg.objective

    def make(shape: tuple[int, ...], last: bool) -> Any:
        options = {**o.options, **(backbone.head_options if last else {})}
        return build_objective(o.name, shape, backbone.num_classes, last=last,
                               head=(o.last_head or backbone.head) if last else o.head, **options)
    return make


def check_user_options(options: dict[str, Any]) -> None:
    """Refuse ``objective.options`` keys the library sets itself (they would clash)."""
    for key in options:
        if key == "head":
            raise ConfigError("objective.options.head clashes with the head the library passes "
                              "each stage; set objective.head instead (objective.last_head for "
                              "the last stage)")
        if key == "last" or key in STAGE_KEYS:
            raise ConfigError(f"objective.options.{key} is set by the library from the split "
                              "(each stage's position and shapes); remove it from "
                              "objective.options")


def build_net(cfg: RunConfig, data: DataSplits) -> LocalNet:
    """Build the configured model for ``data`` and split it into stages."""
    backbone = build_backbone(cfg, data)
    o = cfg.objective
    check_user_options(dict(o.options))
    cuts = list(cfg.split.cuts)
    if cfg.split.by == "time" and not cuts:  # the split's own measure leaves out head time
        cuts = split_cuts(cfg, data, backbone)
    net = LocalNet.from_backbone(
        backbone, cfg.split.k, by=cfg.split.by, cuts=cuts,
        objective=o.name, head=list(o.heads) if o.heads else o.head,
        last_head=o.last_head or None, predictor=o.predictor or None,
        objective_options=dict(o.options), groups=cfg.split.groups,
        group_options={"detach_ratio": o.detach_ratio, "diversity_weight": o.diversity_weight,
                       "temperature": o.diversity_temperature},
        context=cfg.context.name, reconstruct=list(o.reconstruct),
        context_options={"recompute": cfg.context.recompute})
    if o.difficulty:  # per-stage objective options (a schedule harder with depth)
        apply_difficulty(net, o.name, dict(o.options), dict(o.difficulty), o.head)
    return net


def stack_views(augment: Any, views: int) -> Any:
    """An augmentation returning ``views`` independent augmentations of a batch, stacked
    along the batch dimension ([view1; view2; ...]): the input of self-supervised objectives."""
    def many(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.cat([augment(x, generator) for _ in range(views)])
    return many


@torch.no_grad()
def stage_costs(net: LocalNet, sample: Any) -> list[dict[str, int]]:
    """Parameters and MACs per sample of every stage's body and objective.

    ``macs`` and ``params`` include the stage's context encoders (context supply), which
    run at inference too; ``context_macs`` is their share.
    """
    rows, trail, h, n = [], [], sample, len(sample)
    net.eval()
    for stage in net.stages:
        trail.append(h)
        ctx_macs, body_macs, out = context_and_body(stage, h, trail)
        head_macs = macs(lambda: stage.objective.predict(out)) // n
        ctx_params = param_count(stage.context) if stage.context is not None else 0
        rows.append({"params": param_count(stage.body) + ctx_params,
                     "head_params": param_count(stage.objective),
                     "macs": (body_macs + ctx_macs) // n, "context_macs": ctx_macs // n,
                     "head_macs": head_macs})
        h = out
    net.train()
    return rows
