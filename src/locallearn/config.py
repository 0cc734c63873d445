"""Run configuration: frozen dataclasses with defaults, validation, YAML and dotted overrides.

A run is a :class:`RunConfig` made of sections (``model``, ``data``, ``split``,
``objective``, ``optim``, ``engine``, ``train``). YAML files hold runs; the CLI adds
overrides such as ``train.epochs=5 split.k=4``; a bare section name sets its
``name`` (``engine=pipeline`` is ``engine.name=pipeline``). An unknown key or a bad
value raises :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, cast

import yaml

from locallearn.errors import ConfigError

# train.compile: off, on (torch's default mode) or one of torch.compile's modes
COMPILE_MODES = ("false", "true", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"                     # a registered model (`locallearn list`)
    options: dict = field(default_factory=dict)  # builder options, e.g. {width: 0.5}


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"                  # a registered data set (`locallearn list`)
    data_dir: str | None = None     # root folder; default $LOCALLEARN_DATA_DIR or ./data
    batch_size: int = 64
    augment: Literal["none", "basic", "strong"] = "none"  # basic: crop + flip; strong: SimCLR (kornia)
    train_subset: int = 0                 # N training samples, stratified, seeded (0 = all)
    test_subset: int = 0                  # N test samples, stratified, seeded (0 = all)
    options: dict = field(default_factory=dict)  # reader options, e.g. {path: x.tar.gz}
    on_device: Literal["auto", "true", "false"] = "auto"  # hold the splits on engine.device
                                          # (auto: a CUDA device with room to spare); else pinned


@dataclass(frozen=True)
class SplitConfig:
    k: int = 4                            # number of stages
    by: Literal["count", "params", "macs", "memory", "time", "cuts"] = "count"
    cuts: tuple = ()                      # explicit cut indices (with by=cuts)
    groups: int = 1                       # width groups per stage (neuron groups, GN-DGL)


@dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "ce"                      # a registered objective
    head: str = "mlp"                     # head kind of the auxiliary heads
    heads: tuple = ()                     # one head kind per stage (overrides head)
    last_head: str = ""                   # task classifier head ("" = the model's own)
    predictor: str = ""                   # per-stage predictor head trained on detached output
    options: dict = field(default_factory=dict)  # objective options (e.g. hidden sizes)
    detach_ratio: float = 0.0             # groups: fraction of other groups' channels a head
                                          # sees, detached (0 = own channels only)
    diversity_weight: float = 0.0         # groups: weight of the diversity penalty (paper: 0.5)
    diversity_temperature: float = 3.0    # groups: its softmax temperature T
    reconstruct: tuple = ()               # reconstruction weight: [w], [first, last] or K-1 values
    difficulty: dict = field(default_factory=dict)  # per-stage objective options that grow
                                          # harder with depth (locallearn.difficulty)


@dataclass(frozen=True)
class ContextConfig:
    name: str = "none"                    # context supply: none, E, R1..Rn, RnE (e.g. R1E)
    recompute: bool = False               # checkpoint the encoders: keep only their inputs


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["constant", "cosine", "linear", "step"] = "cosine"
    min_lr: float = 0.0                   # final LR of cosine / linear decay
    warmup_epochs: float = 0.0
    step_epochs: float = 30.0             # step schedule: decay every this many epochs
    gamma: float = 0.1                    # step schedule: decay factor


@dataclass(frozen=True)
class EngineConfig:
    name: Literal["backprop", "local", "pipeline", "multiexit"] = "local"  # multiexit: BP of all exits
    aux_heads: bool = True                # backprop: also train stage heads on detached features
    checkpoint: Literal["none", "blocks", "stages"] = "none"  # backprop: keep only block / stage
                                          # inputs for backward, recompute the rest
    workers: int = 2                      # pipeline: processes on this machine
    placement: Literal["stages", "groups"] = "stages"  # pipeline: a worker per run of stages, or
                                          # (groups) one per (stage, group) node: K x G workers
    threads: int = 0                      # torch threads per process (0 = cores // workers)
    device: str = "cpu"                   # e.g. cpu, cuda, cuda:1
    devices: tuple = ()                   # pipeline: device per worker, or one for all
                                          # (empty: cuda:<local rank> if CUDA is available, else cpu)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # pipeline: auto = nccl if every rank has a GPU
    micro_batches: int = 1                # pipeline: parts per batch (gradients accumulate, one update)
    max_restarts: int = 0                 # pipeline: restarts of the workers after a failure (torch's
                                          # elastic agent; each continues from the last checkpoint)
    replicas: int = 1                     # pipeline: data-parallel copies of every worker, each on
                                          # a shard of the batch (world = workers x replicas)
    share_every: int = 1                  # pipeline: steps between sending each rank's first block
                                          # to the rank before (MAN's momentum copies; 1 = exact)
    queue: int = 2                        # pipeline: packets in flight per link (send and receive)
    timeout: float = 300.0                # pipeline: seconds a worker waits for a peer before failing


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    seed: int = 0
    out_dir: str = "runs"
    name: str = ""                        # run folder name ("" = model-engine-timestamp)
    progress: bool = True                 # progress bar with per-stage losses
    checkpoint: bool = True               # save a checkpoint after every epoch
    eval_every: int = 1                   # evaluate every N epochs (and after the last)
    accumulate: Literal["none", "grow", "shrink"] = "none"  # dynamic layer accumulation (DASCPL)
    triggers: tuple = ()                  # K-1 epochs: grow: stage i+1 joins after triggers[i-1];
                                          # shrink: stage i stops training after triggers[i-1]
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # autocast of every stage's
                                          # forward and loss; auto: bf16 where the hardware has it
                                          # natively (CUDA bf16, CPU AVX512-BF16/AMX), else fp32
    channels_last: Literal["auto", "true", "false"] = "auto"  # model and 4-D inputs channels-last
                                          # (auto: where auto precision picks bf16)
    compile: str = "false"                # torch.compile each stage: false, true or a mode


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Coerce ``value`` to the annotation ``hint`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if isinstance(value, bool) and (hint is str or origin is Literal and str(value).lower()
                                    in typing.get_args(hint)):
        value = str(value).lower()  # YAML reads `true` as a bool: a string key takes its name
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {choices}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        if isinstance(value, (int, str)):
            return (value,)
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    elif hint is dict and value is None:
        return {}
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {getattr(hint, '__name__', hint)}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; "
                              f"{'keys of ' + prefix.rstrip('.') if prefix else 'sections'} are: "
                              f"{', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                value = {"name": value}  # `engine: pipeline` means engine.name
            kwargs[key] = _build(cast(type, hint), value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def from_dict(data: dict | None) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig` (missing keys take defaults)."""
    cfg = _build(RunConfig, data or {}, "")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that a single type cannot express."""
    positive = {"split.k": cfg.split.k, "data.batch_size": cfg.data.batch_size,
                "train.epochs": cfg.train.epochs, "engine.workers": cfg.engine.workers,
                "engine.micro_batches": cfg.engine.micro_batches, "engine.queue": cfg.engine.queue,
                "engine.share_every": cfg.engine.share_every, "engine.replicas": cfg.engine.replicas,
                "split.groups": cfg.split.groups}
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key}={v} is not allowed: it must be at least 1")
    if cfg.train.compile not in COMPILE_MODES:
        raise ConfigError(f"train.compile={cfg.train.compile!r} is not allowed; choose one of: "
                          f"{', '.join(COMPILE_MODES)}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} is not allowed: it must be positive")
    if cfg.engine.max_restarts < 0:
        raise ConfigError(f"engine.max_restarts={cfg.engine.max_restarts} is not allowed: it must "
                          f"be 0 or more")
    if cfg.engine.timeout <= 0:
        raise ConfigError(f"engine.timeout={cfg.engine.timeout} is not allowed: it must be positive")
    if cfg.train.accumulate != "none" or cfg.train.triggers:
        from locallearn.accumulate import check_config  # lazy: it needs torch and the models

        check_config(cfg)
    _validate_groups_context(cfg)
    if cfg.engine.placement == "groups":
        _validate_group_placement(cfg)
    if cfg.objective.difficulty:
        from locallearn.difficulty import check_config as check_difficulty

        check_difficulty(cfg)
    if cfg.engine.checkpoint != "none" and cfg.engine.name != "backprop":
        raise ConfigError(f"engine.checkpoint={cfg.engine.checkpoint} recomputes activations of "
                          f"end-to-end BP: use it with engine=backprop (not {cfg.engine.name})")
    if cfg.objective.options.get("momentum_aux"):
        from locallearn.objectives.momentum import check_config as check_momentum

        check_momentum(cfg)
    if cfg.objective.name == "simclr" and cfg.engine.micro_batches > 1:
        raise ConfigError("objective=simclr pairs the two halves of a batch ([view1; view2]); "
                          "micro-batches would split the pairs: set engine.micro_batches=1")
    if cfg.objective.heads and len(cfg.objective.heads) != cfg.split.k:
        raise ConfigError(f"objective.heads lists {len(cfg.objective.heads)} heads but "
                          f"split.k={cfg.split.k}")


def _validate_group_placement(cfg: RunConfig) -> None:
    """``engine.placement=groups``: one worker per (stage, group) node; the one rule for what
    that placement cannot run (what reads every group of a stage)."""
    e, k, g = cfg.engine, cfg.split.k, cfg.split.groups
    if e.name != "pipeline":
        raise ConfigError(f"engine.placement=groups places nodes on pipeline workers: set "
                          f"engine=pipeline (not {e.name})")
    if g < 2:
        raise ConfigError("engine.placement=groups puts the width groups of a stage on separate "
                          "workers: set split.groups=G with G >= 2")
    if e.workers != k * g:
        raise ConfigError(f"engine.placement=groups needs one worker per (stage, group) node: "
                          f"set engine.workers={k * g} (split.k={k} x split.groups={g})")
    unsupported = {"engine.replicas": e.replicas != 1,
                   "context.name": cfg.context.name != "none",
                   "objective.predictor": bool(cfg.objective.predictor),
                   "objective.reconstruct": bool(cfg.objective.reconstruct)}
    for key, used in unsupported.items():
        if used:
            raise ConfigError(f"engine.placement=groups does not support {key} (it reads every "
                              f"group of a stage): drop {key} or use engine.placement=stages")


def _validate_groups_context(cfg: RunConfig) -> None:
    o = cfg.objective
    if not 0.0 <= o.detach_ratio <= 1.0:
        raise ConfigError(f"objective.detach_ratio={o.detach_ratio} is not allowed: it must be in [0, 1]")
    if o.diversity_weight < 0 or o.diversity_temperature <= 0:
        raise ConfigError("objective.diversity_weight must be >= 0 and "
                          "objective.diversity_temperature > 0")
    if o.reconstruct and len(o.reconstruct) not in (1, 2, cfg.split.k - 1):
        raise ConfigError(f"objective.reconstruct lists {len(o.reconstruct)} weights; give 1, 2 "
                          f"(first, last) or split.k-1={cfg.split.k - 1}")
    if not re.fullmatch(r"none|E|R[1-9][0-9]*E?", str(cfg.context.name)):
        raise ConfigError(f"context.name={cfg.context.name!r} is not allowed; choose one of: "
                          f"none, E, R1 .. Rn, R1E .. RnE")


def to_dict(cfg: RunConfig) -> dict:
    """The config as plain data (tuples as lists), ready for YAML."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML (quote the whole "
                          f"override in the shell, e.g. 'model.options={{width: 0.5}}'): "
                          f"{str(e).splitlines()[0]}") from e
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted overrides into a nested dict (``split.k=4``, ``engine=pipeline``)."""
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in {f.name for f in dataclasses.fields(RunConfig)}:
            path = [path[0], "name"]
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line saying where a YAML error is and what it is: ``line 3, column 7: ...``."""
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else str(what)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                **sections: Any) -> RunConfig:
    """Read a YAML run file (optional), set sections from Python values, apply dotted
    overrides, validate.

    Example: ``load_config(engine="pipeline", train={"epochs": 5}, split={"k": 4})``; a
    section given a plain value sets its ``name`` (``engine="pipeline"``), a dict sets the
    keys it names over the file's.

    Raises:
        ConfigError: for a missing or malformed file, an unknown key or a bad value.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {yaml_problem(e)}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    for section, value in sections.items():
        given = value if isinstance(value, dict) else {"name": value}
        current = data.get(section)
        current = current if isinstance(current, dict) else (
            {"name": current} if current is not None else {})
        data[section] = {**current, **given}
    return from_dict(apply_overrides(data, overrides or []))
