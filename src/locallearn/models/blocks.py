"""A model is an ordered list of blocks plus the tensor shapes between them.

Every model builder in :mod:`locallearn.models` returns a :class:`Backbone`; a split
(:mod:`locallearn.split`) turns its blocks into stages. No model is written per K.

An *activation* flowing between blocks is a tensor of any rank, or a
:class:`~locallearn.types.Masked` sequence (text models pass ``Masked(hidden, mask)``);
anything else is refused when the shapes are inferred. Shapes never include the batch
dimension; for a masked sequence the shape is that of its hidden states.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from locallearn.errors import ConfigError, options_of
from locallearn.types import Activation, check_activation, first_tensor

ModelBuilder = Callable[..., "Backbone"]
MODELS: dict[str, tuple[ModelBuilder, str]] = {}


@dataclass
class Backbone:
    """The blocks of a model in order, and the shape of every activation between them.

    Attributes:
        name: model name as registered.
        blocks: the blocks, applied one after another.
        shapes: ``shapes[0]`` is the input shape, ``shapes[i + 1]`` the output shape of
            ``blocks[i]`` (without the batch dimension).
        num_classes: number of classes of the task.
        head: the head kind that turns the last block's output into class logits
            (see :mod:`locallearn.objectives.heads`).
        head_options: keyword options for that head (e.g. hidden sizes).
    """

    name: str
    blocks: list[nn.Module]
    shapes: list[tuple[int, ...]]
    num_classes: int
    head: str = "0c1f"
    head_options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.blocks)


@torch.no_grad()
def infer_shapes(blocks: list[nn.Module], input_shape: tuple[int, ...],
                 sample: Activation | None = None) -> list[tuple[int, ...]]:
    """Run a dummy batch through ``blocks`` and record each output shape.

    Args:
        blocks: the blocks in order.
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)``.
        sample: optional ready-made input batch (needed when inputs are not float,
            e.g. token ids); by default a zero float batch of two samples.

    Raises:
        ValueError: if a block cannot take the previous block's output, or returns
            something that is neither a tensor nor a Masked sequence; the message names
            the block and the shapes.
    """
    h: Activation = sample if sample is not None else torch.zeros(2, *input_shape)
    shapes = [tuple(input_shape)]
    for i, block in enumerate(blocks):
        was_training = block.training
        block.eval()  # BatchNorm in train mode would need more than one value per channel
        try:
            h = block(h)
        except RuntimeError as e:
            raise ValueError(
                f"block {i} ({type(block).__name__}) cannot take input of shape {shapes[-1]}: {e}"
            ) from e
        finally:
            block.train(was_training)
        check_activation(h, f"block {i} ({type(block).__name__})")
        shapes.append(tuple(first_tensor(h).shape[1:]))
    return shapes


def register_model(name: str, help: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator that registers a model builder under ``name`` with a one-line help."""

    def wrap(fn: ModelBuilder) -> ModelBuilder:
        MODELS[name] = (fn, help)
        return fn

    return wrap


def build_model(name: str, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
                **options: Any) -> Backbone:
    """Build a registered model as a :class:`Backbone`.

    Args:
        name: a registered model name (``locallearn list`` shows them).
        input_shape: shape of one input sample, e.g. ``(3, 32, 32)`` or ``(1, 8, 8)``.
        num_classes: number of output classes.
        **options: builder options (e.g. ``width`` for VGG/ResNet).

    Raises:
        ConfigError: for an unknown model name (the message lists the choices), an
            option the builder does not take or rejects, or text data for an image model.
    """
    from locallearn import models as _  # noqa: F401  (importing registers the builders)

    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))} "
                          "(pipeline workers rebuild models by name: register your own at "
                          "module level of an importable module, not under __main__)")
    fn, _help = MODELS[name]
    if "vocab_size" in options and "vocab_size" not in inspect.signature(fn).parameters:
        raise ConfigError(f"model {name!r} takes images, but the data is text or tabular (token "
                          f"ids of shape {tuple(input_shape)}): choose a text model, e.g. "
                          "model=lstm or model=transformer")
    with options_of(f"model {name!r}"):
        try:
            return fn(input_shape=tuple(input_shape), num_classes=num_classes, **options)
        except TypeError as e:
            raise ConfigError(f"model {name!r}: bad option ({e})") from e
