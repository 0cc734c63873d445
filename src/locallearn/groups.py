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

Group nodes (:class:`GroupNode`): node (k, g) as a module of its own, holding copies of
its slices, so the K x G nodes can live in different places. It maps the full input of
stage k to group g's output channels; its local loss needs two messages from its
sibling nodes, both detached: the first channels of their outputs (stop-gradient view)
and their logits (diversity penalty). The next stage's input is the concatenation of
the G outputs. Training the nodes apart gives the updates of the whole stage.

Compute accounting (:func:`node_costs`): a node's MACs are its share (1/G) of the
stage's body, context encoders and shared objective parts, plus its own head. The
largest node is the critical path when every node has its own device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from locallearn.measure import macs
from locallearn.models.blocks import first_tensor
from locallearn.models.layers import ConvBNReLU
from locallearn.models.resnet import BasicBlock, PadShortcut
from locallearn.objectives.base import Objective
from locallearn.objectives.diversity import diversity_penalty
from locallearn.objectives.groups import (
    GroupObjective,
    find_group_objective,
    head_loss_and_logits,
    view_width,
)

if TYPE_CHECKING:
    from locallearn.network import LocalNet, Stage

_Pair = tuple[int, int]  # nn.Conv2d's kernel_size, stride and padding (stored as tuple[int, ...])


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
    new = nn.Conv2d(conv.in_channels, conv.out_channels, cast(_Pair, conv.kernel_size),
                    cast(_Pair, conv.stride), cast("str | _Pair", conv.padding), groups=groups,
                    bias=conv.bias is not None)
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
        sc[0] = _grouped(cast(nn.Conv2d, sc[0]), groups, f"{where} shortcut")


def group_body(blocks: nn.Sequential | Sequence[nn.Module], groups: int, stage: int = 0,
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


# -- group nodes: one (stage, group) as a module of its own ------------------------------

def _rows(n: int, groups: int, g: int) -> slice:
    size = n // groups
    return slice(g * size, (g + 1) * size)


@torch.no_grad()
def _node_conv(conv: nn.Conv2d, groups: int, g: int) -> nn.Conv2d:
    """Group g's output rows of ``conv``; it reads every channel if ``conv`` is ungrouped, else group g's."""
    rows = _rows(conv.out_channels, groups, g)
    c_in = conv.in_channels if conv.groups == 1 else conv.in_channels // groups
    new = nn.Conv2d(c_in, rows.stop - rows.start, cast(_Pair, conv.kernel_size),
                    cast(_Pair, conv.stride), cast("str | _Pair", conv.padding),
                    bias=conv.bias is not None).to(conv.weight.device)
    new.weight.copy_(conv.weight[rows])
    if conv.bias is not None:
        assert new.bias is not None  # built with bias=True
        new.bias.copy_(conv.bias[rows])
    return new


@torch.no_grad()
def _node_bn(bn: nn.BatchNorm2d, groups: int, g: int) -> nn.BatchNorm2d:
    rows = _rows(bn.num_features, groups, g)
    new = nn.BatchNorm2d(rows.stop - rows.start, bn.eps, bn.momentum, bn.affine,
                         bn.track_running_stats).to(bn.weight.device)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(bn, name) is not None:
            getattr(new, name).copy_(getattr(bn, name)[rows])
    if bn.num_batches_tracked is not None:
        assert new.num_batches_tracked is not None  # same track_running_stats as bn
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


class _Rows(nn.Module):
    """``module(x)`` restricted to output channels ``rows`` (a shortcut that reads the stage input)."""

    def __init__(self, module: nn.Module, rows: slice) -> None:
        super().__init__()
        self.module, self.rows = module, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[:, self.rows]


class _NodeBasicBlock(nn.Module):
    """Group g's slice of a :class:`BasicBlock` (same computation on its channels)."""

    def __init__(self, block: BasicBlock, groups: int, g: int, first: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = _node_conv(block.conv1, groups, g), _node_bn(block.bn1, groups, g)
        self.conv2, self.bn2 = _node_conv(block.conv2, groups, g), _node_bn(block.bn2, groups, g)
        sc, rows = block.shortcut, _rows(block.conv2.out_channels, groups, g)
        self.shortcut: nn.Module
        if isinstance(sc, nn.Sequential):
            self.shortcut = nn.Sequential(_node_conv(cast(nn.Conv2d, sc[0]), groups, g),
                                          _node_bn(cast(nn.BatchNorm2d, sc[1]), groups, g))
        elif isinstance(sc, PadShortcut) and sc.groups == groups:
            self.shortcut = PadShortcut(sc.extra_channels // groups, sc.stride)
        else:  # reads the whole stage input: compute it, keep group g's channels
            self.shortcut = _Rows(copy.deepcopy(sc), rows) if first else nn.Identity()

    forward = BasicBlock.forward


def _node_block(block: nn.Module, groups: int, g: int, first: bool) -> nn.Module:
    if isinstance(block, ConvBNReLU):
        parts = [_node_conv(block.conv, groups, g), _node_bn(block.bn, groups, g), nn.ReLU()]
        if hasattr(block, "pool"):
            parts.append(copy.deepcopy(block.pool))
        return nn.Sequential(*parts)
    if isinstance(block, BasicBlock):
        return _NodeBasicBlock(block, groups, g, first)
    raise GroupError(f"a {type(block).__name__} cannot be split into group nodes")


class GroupNode(nn.Module):
    """Node (stage, g) of a stage with width groups: its slice of every layer and its head.

    Args:
        stage: a stage built with width groups (its objective a :class:`GroupObjective`,
            without context, reconstruction term or predictor, which read the whole map).
        g: the group (0-based).

    Raises:
        GroupError: if the stage has no width groups or has a part that is not per group.
    """

    def __init__(self, stage: Stage, g: int) -> None:
        super().__init__()
        obj = stage.objective
        if not isinstance(obj, GroupObjective) or stage.context is not None or stage.predictor:
            raise GroupError("group nodes need a stage with width groups and no context, "
                             "reconstruction term or predictor (those read every group)")
        self.g, self.groups = g, obj.groups
        self.ratio, self.weight, self.temperature = (obj.detach_ratio, obj.diversity_weight,
                                                     obj.temperature)
        self.body = nn.Sequential(*[_node_block(b, obj.groups, g, j == 0)
                                    for j, b in enumerate(cast(nn.Sequential, stage.body))])
        self.objective = cast(Objective, copy.deepcopy(obj.objectives[g]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Group g's output channels, from the full stage input ``h``."""
        return self.body(h)

    def message(self, out: torch.Tensor) -> torch.Tensor:
        """What sibling heads see of this node's output: its first channels, detached."""
        _, seen = view_width(out.shape[1] * self.groups, self.groups, self.ratio)
        return out[:, :seen].detach()

    def view(self, out: torch.Tensor, messages: Sequence[torch.Tensor]) -> torch.Tensor:
        """What this node's head reads: its own output and its siblings' messages, in group order."""
        parts = [out if j == self.g else m for j, m in enumerate(messages)
                 if j == self.g or m.shape[1]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def local_loss(self, out: torch.Tensor, y: torch.Tensor,
                   messages: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This node's loss on its view, and its logits when the diversity penalty needs them.

        Args:
            out: this node's output.
            y: targets.
            messages: every node's :meth:`message`, in group order (this node's is unused).
        """
        return head_loss_and_logits(self.objective, self.view(out, messages), y, self.weight)

    def diversity(self, logits: torch.Tensor, y: torch.Tensor,
                  siblings: Sequence[torch.Tensor]) -> torch.Tensor:
        """This node's share of the stage's diversity penalty, siblings' logits held fixed.

        Its gradient equals that of the stage penalty with respect to this node's logits.
        """
        pairs = self.groups * (self.groups - 1) / 2
        # a Tensor, not sum()'s start 0: a grouped stage has G >= 2, so a sibling
        total = cast(torch.Tensor, sum(diversity_penalty([logits, s.detach()], y, self.temperature)
                                       for j, s in enumerate(siblings) if j != self.g))
        return self.weight * total / pairs


def group_nodes(stage: Stage) -> list[GroupNode]:
    """The G :class:`GroupNode` of a stage with width groups (copies of its slices)."""
    obj = find_group_objective(stage.objective)
    if obj is None:
        raise GroupError("this stage has no width groups (build it with split.groups > 1)")
    return [GroupNode(stage, g) for g in range(obj.groups)]


# -- node <-> stage state: checkpoints of nodes that trained apart -----------------------

def _state_pairs(stage: Stage, g: int, groups: int) -> list[tuple[str, str, slice | None]]:
    """(node prefix, stage prefix, output rows) of every module of node g that holds state."""
    pairs: list[tuple[str, str, slice | None]] = [("objective.", f"objective.objectives.{g}.", None)]
    for j, block in enumerate(cast(nn.Sequential, stage.body)):
        if isinstance(block, ConvBNReLU):
            rows = _rows(block.conv.out_channels, groups, g)
            pairs += [(f"body.{j}.0.", f"body.{j}.conv.", rows), (f"body.{j}.1.", f"body.{j}.bn.", rows)]
        elif isinstance(block, BasicBlock):
            rows = _rows(block.conv2.out_channels, groups, g)
            pairs += [(f"body.{j}.{m}.", f"body.{j}.{m}.", rows)
                      for m in ("conv1", "bn1", "conv2", "bn2", "shortcut.0", "shortcut.1")]
    return pairs


def node_state_map(stage: Stage, node: GroupNode) -> dict[str, tuple[str, slice | None]]:
    """Where every entry of ``node.state_dict()`` lives in ``stage.state_dict()``.

    Returns:
        ``{node key: (stage key, rows)}``: the node's tensor is ``stage_tensor[rows]``
        (``rows`` is ``None`` for a tensor the node holds whole: its head, counters).

    Raises:
        GroupError: for a node entry that has no place in the stage.
    """
    pairs = _state_pairs(stage, node.g, node.groups)
    out: dict[str, tuple[str, slice | None]] = {}
    for key, t in node.state_dict().items():
        for node_prefix, stage_prefix, rows in pairs:
            if key.startswith(node_prefix):
                out[key] = (stage_prefix + key[len(node_prefix):], rows if t.dim() else None)
                break
        else:
            raise GroupError(f"node {node.g + 1}'s state entry {key} has no place in its stage")
    return out


def node_part(stage_state: dict[str, torch.Tensor], key_map: dict[str, tuple[str, slice | None]],
              prefix: str = "") -> dict[str, torch.Tensor]:
    """A node's state dict cut from its stage's (keys of the stage state start with ``prefix``)."""
    return {nk: (stage_state[prefix + sk] if rows is None else stage_state[prefix + sk][rows]).clone()
            for nk, (sk, rows) in key_map.items()}


@torch.no_grad()
def write_node_part(stage_state: dict[str, torch.Tensor], node_state: dict[str, torch.Tensor],
                    key_map: dict[str, tuple[str, slice | None]], prefix: str = "") -> None:
    """Write a node's state dict into its rows of the stage state (in place)."""
    for nk, (sk, rows) in key_map.items():
        target = stage_state[prefix + sk]
        (target if rows is None else target[rows]).copy_(node_state[nk])


def _param_links(stage: Stage, node: GroupNode) -> list[tuple[int, int, slice | None]]:
    """(node parameter index, stage parameter index, rows): optimizer states are indexed so."""
    key_map = node_state_map(stage, node)
    index = {name: i for i, (name, _) in enumerate(stage.named_parameters())}
    return [(i, index[key_map[name][0]], key_map[name][1])
            for i, (name, _) in enumerate(node.named_parameters())]


def merge_optimizer_states(stage: Stage, parts: Sequence[tuple[GroupNode, dict[str, Any]]]
                           ) -> dict[str, Any]:
    """The state dict of one optimizer over ``stage.parameters()`` from its nodes' optimizers.

    Per-parameter buffers (momentum, Adam moments) are placed in the node's rows; scalars
    (Adam's step count, the same on every node) are taken as they are.
    """
    shapes = [p.shape for p in stage.parameters()]
    state: dict[int, dict[str, Any]] = {}
    for node, opt in parts:
        for i, j, rows in _param_links(stage, node):
            if i not in opt["state"]:
                continue
            merged = state.setdefault(j, {})
            for key, v in opt["state"][i].items():
                if isinstance(v, torch.Tensor) and rows is not None and v.dim():
                    if key not in merged:
                        merged[key] = v.new_zeros(shapes[j])
                    merged[key][rows] = v
                else:
                    merged[key] = v
    groups = [dict(g, params=list(range(len(shapes)))) for g in parts[0][1]["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def node_optimizer_state(stage: Stage, node: GroupNode, opt: dict[str, Any]) -> dict[str, Any]:
    """A node's optimizer state dict cut from the state dict of its stage's optimizer."""
    links = _param_links(stage, node)
    state = {i: {key: v[rows].clone() if isinstance(v, torch.Tensor) and rows is not None and v.dim()
                 else v for key, v in opt["state"][j].items()}
             for i, j, rows in links if j in opt["state"]}
    groups = [dict(g, params=list(range(len(links)))) for g in opt["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- compute accounting ------------------------------------------------------------------

def context_and_body(stage: Stage, h: Any, trail: list) -> tuple[int, int, Any]:
    """MACs of a stage's context encoders and of its body on ``h``, and the body's output."""
    ctx_macs = 0
    context = stage.context
    if context is not None:
        ctx_macs = macs(lambda: context(h, trail))
        h = context(h, trail)
    body_macs = macs(lambda: stage.body(h))
    return ctx_macs, body_macs, stage.body(h)


def _objective_macs(stage: Stage, out: Any, y: torch.Tensor) -> tuple[int, list[int]]:
    """MACs of the stage's whole objective (+ predictor) and of each group's own head."""
    total = macs(lambda: stage.objective.loss(out, y))
    predictor = stage.predictor
    if predictor is not None:
        total += macs(lambda: predictor.loss(out, y))
    group = find_group_objective(stage.objective)
    if group is None:  # one node: its head is the whole objective
        return total, [total]
    # the cast: mypy cannot infer a lambda with a default argument against Callable[[], Any]
    return total, [macs(cast("Callable[[], Any]", lambda g=g: group.group_loss(out, y, g)))
                   for g in range(group.groups)]


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
        ctx, body, out = context_and_body(stage, h, trail)
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
            assert counts is not None  # None exactly for the stages without a group objective
            for g, logits in enumerate(obj.group_logits(out)):
                if logits is not None:
                    counts[g] += int((logits.argmax(1) == y).sum())
        self.n += len(y)

    def result(self) -> list[list[float] | None]:
        """Accuracy (%) of every group head, per stage (``None`` for ungrouped stages)."""
        n = max(self.n, 1)
        return [None if c is None else [100.0 * v / n for v in c] for c in self.correct]
