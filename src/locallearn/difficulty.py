"""Per-stage difficulty schedules: local objectives that get harder with depth.

Local self-supervised learning suffers *information collapse*: an early stage trained
on the full contrastive task with little capacity throws away what it cannot make
invariant, and later stages never see it again. The remedy studied here gives early
stages an easier task and makes it harder stage by stage. A schedule sets, per stage,
options of the stage's objective (``objective.difficulty`` in a run config):

===============  =============  ==========================================================
knob             harder when     why
===============  =============  ==========================================================
``temperature``  smaller        a sharp softmax weighs the hardest negatives most and asks
                                for a uniform, finely separated embedding; a soft one (large
                                t) tolerates near neighbours and mostly asks for alignment
``neg_fraction`` larger          each anchor must pick its positive among more negatives
                                (a random subset of the 2N-2 in the batch; 1 = all): more
                                distractors, a harder instance-discrimination task
``proj_hidden``  smaller         a wide projector can absorb the invariances the loss asks
                                for, so the stage's own features may keep the rest; a narrow
                                one pushes the invariance into the features themselves
``projector``    identity        ``mlp`` > ``linear`` > ``identity`` in capacity (as above);
                 < linear < mlp  a list or a constant only
===============  =============  ==========================================================

Each knob is given as one of::

    temperature: 0.5                                    # constant
    temperature: [1.0, 0.8, 0.6, 0.5]                   # one value per stage (K values)
    temperature: {rule: geometric, first: 1.0, last: 0.5}   # or rule: linear / constant
    temperature: {rule: constant, value: 0.5}

For stage ``i`` of ``K`` (0-based), with ``s = i / (K - 1)`` (``s = 1`` when K = 1, so a
single stage takes ``last``): linear ``first + s (last - first)``, geometric
``first (last / first) ** s``. ``proj_hidden`` is rounded to an integer. The values
override ``objective.options`` stage by stage. View strength is not a knob: the two
views are made once per batch and flow through every stage, so a per-stage view
strength would need the earlier stages to run again on other views.
"""

from __future__ import annotations

from typing import Any

from locallearn.errors import ConfigError

KNOBS = ("temperature", "neg_fraction", "proj_hidden", "projector")
RULES = ("constant", "linear", "geometric")
PROJECTORS = ("identity", "linear", "mlp")


def knob_values(name: str, spec: Any, k: int) -> list[Any]:
    """The per-stage values of one knob for ``k`` stages.

    Raises:
        ConfigError: for an unknown knob, a bad rule, a list of the wrong length or a
            value out of range.
    """
    key = f"objective.difficulty.{name}"
    if name not in KNOBS:
        raise ConfigError(f"unknown difficulty knob {key!r}; choose among: {', '.join(KNOBS)}")
    if isinstance(spec, (list, tuple)):
        if len(spec) != k:
            raise ConfigError(f"{key} lists {len(spec)} values but split.k={k}")
        values = list(spec)
    elif isinstance(spec, dict):
        values = _rule_values(key, spec, k)
    else:
        values = [spec] * k
    return [_check(key, v, name) for v in values]


def _rule_values(key: str, spec: dict, k: int) -> list[Any]:
    rule = spec.get("rule")
    allowed = {"rule", "value"} if rule == "constant" else {"rule", "first", "last"}
    if rule not in RULES:
        raise ConfigError(f"{key}.rule={rule!r} is not allowed; choose one of: {', '.join(RULES)}")
    if set(spec) != allowed:
        raise ConfigError(f"{key} with rule {rule} takes exactly the keys {', '.join(sorted(allowed))}"
                          f", got {', '.join(sorted(spec))}")
    if rule == "constant":
        return [spec["value"]] * k
    first, last = spec["first"], spec["last"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (first, last)):
        raise ConfigError(f"{key}: rule {rule} needs numbers for first and last, got {first!r}, {last!r}")
    if rule == "geometric" and (first <= 0 or last <= 0):
        raise ConfigError(f"{key}: rule geometric needs positive first and last, got {first}, {last}")
    steps = [i / (k - 1) if k > 1 else 1.0 for i in range(k)]
    if rule == "linear":
        return [first + s * (last - first) for s in steps]
    return [first * (last / first) ** s for s in steps]


def _check(key: str, v: Any, name: str) -> Any:
    """Coerce and range-check one value of knob ``name``."""
    if name == "projector":
        if v not in PROJECTORS:
            raise ConfigError(f"{key}={v!r} is not allowed; choose one of: {', '.join(PROJECTORS)}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key}={v!r} has the wrong type: expected a number")
    if name == "proj_hidden":
        if round(v) < 1:
            raise ConfigError(f"{key}={v} is not allowed: it must be at least 1")
        return int(round(v))
    if name == "neg_fraction" and not 0 < v <= 1:
        raise ConfigError(f"{key}={v} is not allowed: it must be in (0, 1]")
    if name == "temperature" and v <= 0:
        raise ConfigError(f"{key}={v} is not allowed: it must be positive")
    return float(v)


def stage_options(difficulty: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """The objective options each of ``k`` stages gets from a difficulty schedule.

    Raises:
        ConfigError: for a bad schedule (see :func:`knob_values`).
    """
    per_knob = {name: knob_values(name, spec, k) for name, spec in difficulty.items()}
    return [{name: values[i] for name, values in per_knob.items()} for i in range(k)]


def check_config(cfg: Any) -> None:
    """Check ``cfg.objective.difficulty`` against the rest of a :class:`RunConfig`.

    Raises:
        ConfigError: for a bad schedule, or one combined with width groups or
            reconstruction (their objectives wrap the stage objective; not supported).
    """
    stage_options(dict(cfg.objective.difficulty), cfg.split.k)
    if cfg.split.groups > 1 or cfg.objective.reconstruct:
        raise ConfigError("objective.difficulty cannot be combined with split.groups > 1 or "
                          "objective.reconstruct; drop one of them")


def apply_difficulty(net: Any, name: str, options: dict[str, Any], difficulty: dict[str, Any],
                     head: str = "mlp") -> list[dict[str, Any]]:
    """Give every stage of ``net`` a fresh objective ``name`` with its scheduled options.

    Call it right after building the net, before optimizers exist: the old objectives
    are replaced. Returns the per-stage options applied.

    Args:
        net: a :class:`~locallearn.network.LocalNet`.
        name: the registered objective (e.g. ``simclr``).
        options: the run's ``objective.options``, which the schedule overrides.
        difficulty: the schedule (see the module docstring).
        head: head kind passed to the objective builder.
    """
    from locallearn.objectives import build_objective

    per_stage = stage_options(difficulty, net.k)
    for i, (stage, knobs) in enumerate(zip(net.stages, per_stage)):
        stage.objective = build_objective(name, stage.out_shape, net.num_classes, head=head,
                                          last=i == net.k - 1, **{**options, **knobs})
    return per_stage
