"""The local-objective interface and its registry.

An objective is a small module that scores a stage's output: ``loss(h, y)`` returns
a scalar to minimise and, where it can, ``predict(h)`` returns class logits. The
engine decides which inputs are detached; objectives never detach for gradient
isolation. Config names map to builders through :data:`OBJECTIVES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from locallearn.errors import ConfigError, options_of
from locallearn.models.blocks import Activation
from locallearn.objectives.heads import build_head


class Objective(nn.Module):
    """Base class of local objectives."""

    def loss(self, h: Activation, y: torch.Tensor) -> torch.Tensor:
        """The scalar local loss of stage output ``h`` for targets ``y``."""
        raise NotImplementedError

    def predict(self, h: Activation) -> torch.Tensor | None:
        """Class logits for ``h``, or ``None`` if this objective cannot classify."""
        return None


ObjectiveBuilder = Callable[..., Objective]
OBJECTIVES: dict[str, tuple[ObjectiveBuilder, str]] = {}


def register_objective(name: str, help: str) -> Callable[[ObjectiveBuilder], ObjectiveBuilder]:
    """Register ``builder(in_shape, num_classes, *, head, last, **options) -> Objective``."""

    def wrap(fn: ObjectiveBuilder) -> ObjectiveBuilder:
        OBJECTIVES[name] = (fn, help)
        return fn

    return wrap


# Options that wrap any objective: option name -> builder(name, in_shape, num_classes,
# **options) of the wrapped objective (MAN's `momentum_aux`, registered by its module).
WRAPPERS: dict[str, ObjectiveBuilder] = {}


# Where a stage sits, passed by LocalNet.from_backbone; a builder receives a key only if it
# names it as a parameter (objectives that look beyond their own stage: InfoPro, AugLocal, MAN).
STAGE_KEYS = ("stage", "num_stages", "image_shape", "later_blocks")
# Keywords the library itself passes to every builder; not objective.options of the user.
_LIBRARY_KEYS = ("head", "last", *STAGE_KEYS)


def _keywords(fn: Callable[..., Any], skip: int) -> tuple[list[str], bool]:
    """The keyword names of ``fn`` after its first ``skip`` parameters, and whether it also
    takes ``**kwargs``."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def objective_options(name: str) -> tuple[str, ...]:
    """The ``objective.options`` keys registered objective ``name`` accepts, sorted.

    They are its builder's keywords, the head's (``hidden``, ``pool``) when the builder
    passes ``**options`` on to :func:`~locallearn.objectives.heads.build_head`, and the
    wrapper options (``momentum_aux``) that apply to every objective.
    """
    names, forwards = _keywords(OBJECTIVES[name][0], 2)  # after (in_shape, num_classes)
    if forwards:
        names += _keywords(build_head, 3)[0]  # after (kind, in_shape, num_classes)
    return tuple(sorted({*names, *WRAPPERS} - set(_LIBRARY_KEYS)))


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse option keys objective ``name`` does not read (a typo would be ignored).

    Raises:
        ConfigError: naming the unknown keys, the objective and the options it accepts.
    """
    known = objective_options(name)
    unknown = [k for k in options if k not in known and k not in _LIBRARY_KEYS]
    if unknown:
        keys = ", ".join(repr(k) for k in unknown)
        raise ConfigError(f"unknown {name} option{'s' * (len(unknown) > 1)} {keys} "
                          f"(objective.options); objective {name!r} accepts: {', '.join(known)}")


def build_objective(name: str, in_shape: tuple[int, ...], num_classes: int,
                    **options: Any) -> Objective:
    """Build a registered objective for a stage whose output has shape ``in_shape``.

    Options named in :data:`STAGE_KEYS` reach only builders that take them. Option
    ``momentum_aux`` (m > 0) puts an EMA copy of the next stage's first block before
    the objective (MAN, :mod:`locallearn.objectives.momentum`).

    Raises:
        ConfigError: for an unknown name (the message lists the choices), an option the
            objective does not read (:func:`check_options`) or one its builder rejects.
    """
    # the builders are registered by importing locallearn.objectives, which runs before
    # this module is imported (a package's __init__ runs before its submodules)
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    check_options(name, options)
    for option, wrap in WRAPPERS.items():
        if options.get(option):
            return wrap(name, in_shape, num_classes, **options)
        options.pop(option, None)
    fn = OBJECTIVES[name][0]
    takes = inspect.signature(fn).parameters
    options = {k: v for k, v in options.items() if k not in STAGE_KEYS or k in takes}
    with options_of(f"objective {name!r}"):  # a bad option value is the user's to fix
        return fn(in_shape, num_classes, **options)
