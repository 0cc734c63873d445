"""LocalNet: a model as an ordered list of stages, each a body plus a local objective.

A :class:`Stage` owns a body (consecutive blocks), the objective that trains the body
and, optionally, a *predictor*: a classifier trained on the body's detached output
that answers for the stage without shaping its features (per-stage predictors of
DASCPL, or the auxiliary heads of a BP run). Engines decide how stages are run and
where gradients stop; a LocalNet itself is an ordinary ``nn.Module``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast, overload

import torch
from torch import nn

from locallearn.context import StageContext, build_context, find_cuts_with_context
from locallearn.groups import group_body
from locallearn.models.blocks import Activation, Backbone, infer_shapes
from locallearn.objectives.base import Objective, build_objective
from locallearn.objectives.groups import build_group_objective
from locallearn.objectives.reconstruct import ReconstructObjective, reconstruct_weights
from locallearn.split import StageRange, stage_ranges


def _stage_place(backbone: Backbone, ranges: Sequence[StageRange], i: int) -> dict[str, Any]:
    """Where stage ``i`` sits, for objectives that look beyond it (``objectives.base.STAGE_KEYS``).

    ``later_blocks`` lists ``(block, input shape)`` of every block after the stage; an
    objective must copy what it keeps (it must not own the next stages' parameters).
    """
    later = range(ranges[i].stop, len(backbone))
    return {"stage": i, "num_stages": len(ranges), "image_shape": backbone.shapes[0],
            "later_blocks": [(backbone.blocks[j], backbone.shapes[j]) for j in later]}


class Stage(nn.Module):
    """A body of consecutive blocks with its local objective (and optional predictor).

    Args:
        body: the blocks of this stage.
        objective: the local objective that trains ``body``.
        predictor: optional objective trained on the detached output of ``body``.
        in_shape, out_shape: activation shapes (without batch) at the boundaries.
    """

    def __init__(self, body: nn.Module, objective: Objective, predictor: Objective | None = None,
                 in_shape: tuple[int, ...] = (), out_shape: tuple[int, ...] = (),
                 context: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.objective = objective
        self.predictor = predictor
        self.context = context
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, h: Activation, trail: Sequence[Activation] = ()) -> Activation:
        """Run the body on ``h``, plus this stage's context of the earlier ``trail`` if it has one.

        ``trail`` holds the network input and the outputs of the earlier boundaries, in
        order (``trail[0]`` is the input). Context supply adds ``context(trail)`` to ``h``.
        """
        if self.context is not None:
            h = self.context(h, trail)
        return self.body(h)

    def predict(self, out: Activation) -> torch.Tensor | None:
        """Class logits of this stage for its body output ``out``."""
        if self.predictor is not None:
            return self.predictor.predict(out)
        return self.objective.predict(out)


if TYPE_CHECKING:
    class _StageList(nn.ModuleList):
        """What the type checker sees as :attr:`LocalNet.stages`: a ModuleList of Stage."""

        def __iter__(self) -> Iterator[Stage]: ...

        @overload
        def __getitem__(self, idx: slice) -> _StageList: ...

        @overload
        def __getitem__(self, idx: int) -> Stage: ...

        def __getitem__(self, idx: int | slice) -> Stage | _StageList: ...


class LocalNet(nn.Module):
    """The stages of a model in order. ``forward`` is plain inference: the last stage's logits."""

    def __init__(self, stages: Sequence[Stage], num_classes: int) -> None:
        super().__init__()
        self.stages = cast("_StageList", nn.ModuleList(stages))
        self.num_classes = num_classes

    @property
    def k(self) -> int:
        return len(self.stages)

    @property
    def needs_trail(self) -> bool:
        """True if some stage takes context from the input or earlier boundaries."""
        return any(s.context is not None for s in self.stages)

    def needs(self, k: int) -> list[int]:
        """Trail indices stage ``k`` reads besides its input (what a pipeline must send it)."""
        ctx = self.stages[k].context
        return (list(cast(StageContext, ctx).needs())
                if ctx is not None and hasattr(ctx, "needs") else [])

    @property
    def follows_next(self) -> bool:
        """True if some stage's objective follows the next stage's weights (MAN)."""
        return any(hasattr(s.objective, "update_momentum") for s in self.stages[:-1])

    @torch.no_grad()
    def update_momentum(self) -> None:
        """Move every momentum copy (MAN) towards the next stage's first block.

        The training loop calls this after every optimizer step; a stage whose objective
        has no ``update_momentum`` is left alone.
        """
        for stage, after in zip(self.stages[:-1], self.stages[1:]):
            update = getattr(stage.objective, "update_momentum", None)
            if update is not None:
                update(next(iter(after.body.children())))

    def forward(self, x: Activation) -> torch.Tensor:
        trail: list[Activation] = []
        for stage in self.stages:
            trail.append(x)
            x = stage(x, trail)
        logits = self.stages[-1].predict(x)
        assert logits is not None, "the last stage's objective must be able to predict"
        return logits

    def stage_logits(self, x: Activation, upto: int | None = None,
                     outputs: list[Activation] | None = None) -> list[torch.Tensor | None]:
        """Logits of every stage (``None`` where a stage cannot predict), up to stage ``upto``.

        If ``outputs`` is a list, every stage's body output is appended to it.
        """
        out = []
        trail: list[Activation] = []
        for stage in list(self.stages)[: upto]:
            trail.append(x)
            x = stage(x, trail)
            if outputs is not None:
                outputs.append(x)
            out.append(stage.predict(x))
        return out

    @classmethod
    def from_backbone(cls, backbone: Backbone, k: int = 1, *, by: str = "count",
                      cuts: Sequence[int] | None = None, objective: str = "ce",
                      head: str | Sequence[str] = "mlp", last_head: str | None = None,
                      predictor: str | None = None, objective_options: dict[str, Any] | None = None,
                      split_batch: int = 32, groups: int = 1,
                      group_options: dict[str, Any] | None = None, context: str = "none",
                      reconstruct: Sequence[float] = (),
                      context_options: dict[str, Any] | None = None) -> LocalNet:
        """Split ``backbone`` into ``k`` stages and give each its local objective.

        Args:
            backbone: the model's blocks and shapes.
            k: number of stages.
            by: how to choose the cuts (see :mod:`locallearn.split`).
            cuts: explicit cut indices (overrides ``by``).
            objective: registered objective name for every stage.
            head: head kind of the auxiliary heads, one for all or one per stage.
            last_head: head of the last stage (the task classifier); default the
                backbone's own head.
            predictor: head kind of an extra per-stage predictor trained with CE on the
                detached stage output (``None``: no predictors).
            objective_options: extra options for the objective builder.
            split_batch: batch size of the sample used by measured splits.
            groups: width groups per stage (:mod:`locallearn.groups`); 1 = none.
            group_options: ``detach_ratio``, ``diversity_weight``, ``temperature`` of the
                grouped objectives (:mod:`locallearn.objectives.groups`).
            context: context-supply mode (:mod:`locallearn.context`), e.g. ``R1E``.
            reconstruct: reconstruction weights (:func:`reconstruct_weights`).
            context_options: options of the context encoders (``recompute``).
        """
        cuts = find_cuts_with_context(backbone, k, by, list(cuts or []), split_batch, context)
        ranges = stage_ranges(cuts, len(backbone))
        trail_shapes = [backbone.shapes[r.start] for r in ranges]
        recon = reconstruct_weights(reconstruct, k)
        heads = [head] * k if isinstance(head, str) else list(head)
        if len(heads) != k:
            raise ValueError(f"objective.heads lists {len(heads)} heads for {k} stages")
        heads[-1] = last_head or backbone.head
        stages = []
        for i, (r, h) in enumerate(zip(ranges, heads)):
            out_shape = backbone.shapes[r.stop]
            opts = dict(objective_options or {})
            if i == k - 1:
                opts.update(backbone.head_options)
            body = nn.Sequential(*backbone.blocks[r.start:r.stop])
            group_body(body, groups, i, r.start)
            obj: Objective
            if groups > 1:
                obj = build_group_objective(objective, out_shape, backbone.num_classes, groups,
                                            head=h, last=i == k - 1, **opts,
                                            **(group_options or {}))
            else:
                obj = build_objective(objective, out_shape, backbone.num_classes, head=h,
                                      last=i == k - 1, **_stage_place(backbone, ranges, i),
                                      **opts)
            if recon[i]:
                obj = ReconstructObjective(obj, out_shape, backbone.shapes[0], recon[i])
            # an objective with set_target (a reconstruction term) receives the network input
            ctx = build_context(context, i, trail_shapes,
                                taps=[obj] if hasattr(obj, "set_target") else [],
                                **(context_options or {}))
            pred = None
            if predictor:
                pred = build_objective("ce", out_shape, backbone.num_classes, head=predictor,
                                       **(backbone.head_options if i == k - 1 else {}))
            stages.append(Stage(body, obj, pred, backbone.shapes[r.start], out_shape, ctx))
        return cls(stages, backbone.num_classes)

    @classmethod
    def from_blocks(cls, blocks: nn.Sequential | Sequence[nn.Module], input_shape: tuple[int, ...],
                    num_classes: int, k: int = 1, head: str = "0c1f", **kwargs: Any) -> LocalNet:
        """Wrap your own model (an ``nn.Sequential`` or a list of blocks) as a LocalNet.

        Example:
            >>> net = LocalNet.from_blocks(my_sequential, (3, 32, 32), 10, k=4, head="1c2f")
        """
        blocks = list(blocks)
        backbone = Backbone("custom", blocks, infer_shapes(blocks, input_shape), num_classes,
                            head=kwargs.pop("last_head", head))
        return cls.from_backbone(backbone, k, head=head, **kwargs)
