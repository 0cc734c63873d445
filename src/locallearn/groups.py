"""Width groups (neuron groups, GN-DGL): every stage split by width into G groups of channels.

Design. Models are built ungrouped; the split (which knows the cut points) rewrites
each stage's convolutions in place with :func:`group_body`:

* a conv that reads the *stage input* stays ungrouped (``groups=1``): the first conv
  after every boundary, and in a ResNet block the projection shortcut beside it. Its
  output channels are still split into groups: group g owns output rows g of it.
* every other conv becomes a grouped conv (``groups=G``), so inside the stage group
  g's channels depend only on group g's channels. BatchNorm, ReLU and pooling act per
  channel and need no change; an option-A (zero-padding) shortcut pads per group.

So the groups mix once per stage, at its first conv, and every parameter of a stage
belongs to exactly one group: a (stage, group) *node* is a slice of output channels
of every layer plus its own head. Doing the rewrite at split time keeps the model
builders free of cut points and works for any K.

Compute accounting (:func:`node_costs`): a node's MACs are its share (1/G) of the
stage's body, context encoders and shared objective parts, plus its own head. The
largest node is the critical path when every node has its own device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from locallearn.measure import macs
from locallearn.models.blocks import first_tensor
from locallearn.models.layers import ConvBNReLU
from locallearn.models.resnet import BasicBlock, PadShortcut
from locallearn.objectives.groups import find_group_objective

if TYPE_CHECKING:
    from locallearn.network import LocalNet


class GroupError(ValueError):
    """Width groups cannot be applied: G does not divide a width, or a block is not groupable."""


def _grouped(conv: nn.Conv2d, groups: int, where: str) -> nn.Conv2d:
    """A fresh conv like ``conv`` but with ``groups`` groups (Kaiming init, as the models use)."""
    for side, c in (("input", conv.in_channels), ("output", conv.out_channels)):
        if c % groups:
            raise GroupError(f"split.groups={groups} does not divide the {side} width {c} of "
                             f"{where} ({conv.in_channels} -> {conv.out_channels} channels); "
                             f"choose a G that divides every width, or build the model with "
                             f"model.options.channel_multiple={groups}")
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, groups=groups, bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    return new.to(conv.weight.device)


def _check_output(conv: nn.Conv2d, groups: int, where: str) -> None:
    if conv.out_channels % groups:
        raise GroupError(f"split.groups={groups} does not divide the output width "
                         f"{conv.out_channels} of {where}; choose a G that divides every "
                         f"width, or build the model with model.options.channel_multiple={groups}")


def _group_block(block: nn.Module, groups: int, first: bool, where: str) -> None:
    """Regroup one block in place; ``first``: the block reads the stage input."""
    if isinstance(block, ConvBNReLU):
        if first:
            _check_output(block.conv, groups, f"{where} conv")
        else:
            block.conv = _grouped(block.conv, groups, f"{where} conv")
    elif isinstance(block, BasicBlock):
        if first:
            _check_output(block.conv1, groups, f"{where} conv1")
        else:
            block.conv1 = _grouped(block.conv1, groups, f"{where} conv1")
        block.conv2 = _grouped(block.conv2, groups, f"{where} conv2")
        _group_shortcut(block, groups, first, where)
    else:
        raise GroupError(f"split.groups={groups}: {where} is a {type(block).__name__}, which "
                         f"cannot be split into width groups (VGG and ResNet models can); "
                         f"use split.groups=1 for this model")


def _group_shortcut(block: BasicBlock, groups: int, first: bool, where: str) -> None:
    sc = block.shortcut
    if first:  # it reads the stage input, like conv1: may mix groups
        return
    if isinstance(sc, PadShortcut):
        if sc.extra_channels % groups:
            raise GroupError(f"split.groups={groups} does not divide the {sc.extra_channels} "
                             f"padded channels of the {where} shortcut")
        sc.groups = groups
    elif isinstance(sc, nn.Sequential):
        sc[0] = _grouped(sc[0], groups, f"{where} shortcut")


def group_body(blocks: Sequence[nn.Module], groups: int, stage: int = 0,
               first_block: int = 0) -> None:
    """Split the blocks of one stage into ``groups`` width groups, in place (see module doc).

    Args:
        blocks: the stage's blocks in order (block 0 reads the stage input).
        groups: G, the number of width groups (1: nothing changes).
        stage: index of the stage, for error messages.
        first_block: backbone index of ``blocks[0]``, for error messages.

    Raises:
        GroupError: if G does not divide a width (the message names the stage, the block,
            the layer and its widths) or a block type cannot be grouped.
    """
    if groups < 1:
        raise GroupError(f"split.groups must be at least 1, got {groups}")
    if groups == 1:
        return
    for j, block in enumerate(blocks):
        where = f"stage {stage + 1}, block {first_block + j} ({type(block).__name__})"
        _group_block(block, groups, j == 0, where)


# -- compute accounting ------------------------------------------------------------------

def _context_and_body(stage: nn.Module, h: Any, trail: list) -> tuple[int, int, Any]:
    ctx_macs = 0
    if stage.context is not None:
        ctx_macs = macs(lambda: stage.context(h, trail))
        h = stage.context(h, trail)
    body_macs = macs(lambda: stage.body(h))
    return ctx_macs, body_macs, stage.body(h)


def _objective_macs(stage: nn.Module, out: Any, y: torch.Tensor) -> tuple[int, list[int]]:
    """MACs of the stage's whole objective (+ predictor) and of each group's own head."""
    total = macs(lambda: stage.objective.loss(out, y))
    if stage.predictor is not None:
        total += macs(lambda: stage.predictor.loss(out, y))
    group = find_group_objective(stage.objective)
    if group is None:
        return total, [0]
    return total, [macs(lambda g=g: group.group_loss(out, y, g)) for g in range(group.groups)]


@torch.no_grad()
def node_costs(net: LocalNet, sample: Any) -> dict[str, Any]:
    """MACs per sample of every (stage, group) node including its head, the largest, the total.

    Args:
        net: the stages (run in eval mode here; the training mode is restored).
        sample: an input batch (at least one sample; two is plenty).

    Returns:
        ``{"nodes": [{"stage", "group", "body_macs", "head_macs", "macs"}, ...],
        "largest_node_macs", "largest_node", "total_macs"}``; ``body_macs`` is the
        node's share of the stage's body, context encoders and shared objective parts.
    """
    was = net.training
    net.eval()
    first = first_tensor(sample)
    n = len(first)
    y = torch.zeros(n, dtype=torch.long, device=first.device)
    nodes, trail, h = [], [], sample
    for s, stage in enumerate(net.stages):
        trail.append(h)
        ctx, body, out = _context_and_body(stage, h, trail)
        obj_total, heads = _objective_macs(stage, out, y)
        shared = ctx + body + obj_total - sum(heads)
        for g, head in enumerate(heads):
            own = shared / len(heads) + head
            nodes.append({"stage": s + 1, "group": g + 1, "body_macs": round(shared / len(heads) / n),
                          "head_macs": round(head / n), "macs": round(own / n)})
        h = out
    net.train(was)
    largest = max(nodes, key=lambda r: r["macs"])
    return {"nodes": nodes, "largest_node_macs": largest["macs"],
            "largest_node": [largest["stage"], largest["group"]],
            "total_macs": sum(r["macs"] for r in nodes)}


# -- per-group accuracy ------------------------------------------------------------------

class GroupAccuracy:
    """Counts correct answers of every group head of every grouped stage during evaluation.

    Args:
        net: the stages; stages without width groups are reported as ``None``.
    """

    def __init__(self, net: LocalNet) -> None:
        self.objectives = [find_group_objective(s.objective) for s in net.stages]
        self.correct = [[0] * o.groups if o is not None else None for o in self.objectives]
        self.n = 0

    @property
    def any(self) -> bool:
        """True if some stage has width groups."""
        return any(o is not None for o in self.objectives)

    def update(self, outputs: Sequence[Any], y: torch.Tensor) -> None:
        """Add one batch, given every stage's body output."""
        for obj, counts, out in zip(self.objectives, self.correct, outputs):
            if obj is None:
                continue
            for g, logits in enumerate(obj.group_logits(out)):
                if logits is not None:
                    counts[g] += int((logits.argmax(1) == y).sum())
        self.n += len(y)

    def result(self) -> list[list[float] | None]:
        """Accuracy (%) of every group head, per stage (``None`` for ungrouped stages)."""
        n = max(self.n, 1)
        return [None if c is None else [100.0 * v / n for v in c] for c in self.correct]
