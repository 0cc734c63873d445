"""The training loop: builds a run from its config, trains it with an engine, records it.

The trainer knows nothing of the model: it asks the engine for one step per batch,
steps each stage's LR schedule, evaluates, and writes metrics and an atomic
checkpoint after every epoch. ``Trainer.fit`` is the whole run.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from locallearn import runs
from locallearn.accumulate import (
    build_schedule,
    compute_fraction,
    delay_lr_schedules,
    stage_train_costs,
)
from locallearn.config import RunConfig, to_dict
from locallearn.context import find_cuts_with_context
from locallearn.data import DataSplits, batches, load_data
from locallearn.data.strong_augment import build_augment
from locallearn.difficulty import apply_difficulty
from locallearn.engines import Engine, build_engine
from locallearn.evaluate import evaluate
from locallearn.groups import context_and_body, node_costs
from locallearn.measure import (
    SavedTensorsMeter,
    Timer,
    cuda_peak_bytes,
    macs,
    param_count,
    peak_rss_bytes,
)
from locallearn.models.blocks import Backbone, build_model
from locallearn.network import LocalNet
from locallearn.objectives.base import build_objective
from locallearn.optim import build_optimizer, build_scheduler
from locallearn.probe import is_self_supervised, probe_net, record_probe
from locallearn.split import find_cuts


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a loss became NaN); the last good checkpoint is kept."""


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


def build_net(cfg: RunConfig, data: DataSplits) -> LocalNet:
    """Build the configured model for ``data`` and split it into stages."""
    backbone = build_backbone(cfg, data)
    o = cfg.objective
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


class Trainer:
    """Trains ``net`` on ``data`` as ``cfg`` says, writing into ``run_dir`` (if given).

    Args:
        net: the stages to train.
        data: train and test splits.
        cfg: the resolved run configuration.
        run_dir: run folder for metrics and checkpoints (``None``: record nothing).
        engine: the engine (default: from ``cfg.engine``).
    """

    def __init__(self, net: LocalNet, data: DataSplits, cfg: RunConfig,
                 run_dir: Path | None = None, engine: Engine | None = None) -> None:
        self.cfg, self.data, self.run_dir = cfg, data, run_dir
        self.device = torch.device(cfg.engine.device)
        self.engine = engine or build_engine(cfg.engine.name, aux_heads=cfg.engine.aux_heads)
        self.net = self.place(net)
        self.steps_per_epoch = math.ceil(len(data.train) / cfg.data.batch_size)
        total = self.steps_per_epoch * cfg.train.epochs
        self.optimizers = [self.build_optimizer(s.parameters()) for s in net.stages]
        self.schedulers = [self.build_scheduler(opt) for opt in self.optimizers]
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.augment = build_augment(cfg.data.augment)
        self.views = max(getattr(s.objective, "views", 1) for s in net.stages)
        if self.views > 1 and self.augment is None:
            raise TrainingError(f"objective {cfg.objective.name} compares {self.views} augmented "
                                "views of each image: set data.augment=strong (or basic)")
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.schedule = build_schedule(cfg.train.accumulate, cfg.train.triggers, net.k,
                                       cfg.train.epochs)
        self._train_costs: list[tuple[int, int]] | None = None  # MACs per stage, for the log
        if self.schedule is not None:  # a stage that joins late gets a whole LR schedule
            delay_lr_schedules(self.schedulers, self.schedule, self.steps_per_epoch, total)

    def place(self, net: LocalNet) -> LocalNet:
        """Move what this process trains to its device (here: the whole net)."""
        return net.to(self.device)

    def build_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` (one per stage)."""
        o = self.cfg.optim
        return build_optimizer(params, o.name, o.lr, o.momentum, o.nesterov, o.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The configured LR schedule of ``optimizer``, stepped once per batch."""
        o, steps = self.cfg.optim, self.steps_per_epoch
        return build_scheduler(optimizer, steps * self.cfg.train.epochs, o.schedule,
                               round(o.warmup_epochs * steps), o.min_lr / o.lr,
                               round(o.step_epochs * steps), o.gamma)

    # -- data ------------------------------------------------------------------------
    def train_batches(self):
        """One epoch of training batches; with ``views`` > 1 (self-supervised objectives)
        each batch is ``[view1; view2; ...]`` of the same images, labels repeated alike."""
        augment = self.augment if self.views == 1 else stack_views(self.augment, self.views)
        out = batches(self.data.train, self.cfg.data.batch_size, shuffle=True,
                      generator=self.generator, device=self.device, augment=augment,
                      mean=self.data.meta.get("mean"), std=self.data.meta.get("std"))
        return out if self.views == 1 else ((x, y.repeat(self.views)) for x, y in out)

    def test_batches(self):
        return batches(self.data.test, max(256, self.cfg.data.batch_size), shuffle=False,
                       generator=None, device=self.device, mean=self.data.meta.get("mean"),
                       std=self.data.meta.get("std"))

    # -- one epoch -------------------------------------------------------------------
    def train_epoch(self) -> dict[str, Any]:
        """Train one epoch; returns mean per-stage loss, throughput and memory figures."""
        k = self.net.k
        sums, counts = [0.0] * k, [0] * k
        timer = Timer()
        saved_peak = 0
        bar = tqdm(self.train_batches(), total=self.steps_per_epoch, leave=False,
                   disable=not self.cfg.train.progress, desc=f"epoch {self.epoch + 1}")
        for i, (x, y) in enumerate(bar):
            if i == 0:  # one measured step per epoch: the hooks cost time on every saved tensor
                with SavedTensorsMeter(self.net) as meter:
                    losses = self.engine.step(self.net, self.optimizers, x, y)
                saved_peak = meter.peak_bytes
            else:
                losses = self.engine.step(self.net, self.optimizers, x, y)
            self.check_finite(losses)
            self.step_schedules()
            for j, v in enumerate(losses):
                if not math.isnan(v):
                    sums[j] += v
                    counts[j] += 1
            timer.add(len(y))
            bar.set_postfix_str(" ".join(f"{v:.3f}" for v in losses))
        return {"train_loss": [s / c if c else float("nan") for s, c in zip(sums, counts)],
                "epoch_seconds": timer.seconds, "samples_per_s": timer.rate,
                "saved_bytes_peak": saved_peak, "peak_rss": peak_rss_bytes(),
                "cuda_peak": cuda_peak_bytes(self.device),
                "lr": self.schedulers[-1].get_last_lr()[0]}

    def step_schedules(self) -> None:
        """Step every stage's LR schedule once, after a batch.

        A schedule follows the run, not its stage: it also steps when its optimizer did
        not (a stage waiting for its trigger, or in the pipeline a stage of another
        rank), so torch's warning about that order is silenced here (only here).
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            for s in self.schedulers:
                s.step()

    def check_finite(self, losses: list[float]) -> None:
        """Stop with an error naming the stage and epoch if a trained stage's loss is not finite."""
        for k, v in enumerate(losses):
            if not math.isfinite(v) and self._trained(k):
                raise TrainingError(
                    f"the loss of stage {k + 1} became {v} in epoch {self.epoch + 1}; "
                    f"lower optim.lr or check the data. The last good checkpoint is kept"
                    + (f" in {self.run_dir}" if self.run_dir else ""))

    def _trained(self, k: int) -> bool:
        active = getattr(self.engine, "active", None)
        aux = getattr(self.engine, "aux_heads", True)
        return (active is None or k in active) and (aux or k == self.net.k - 1)

    # -- the run ---------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs (from ``self.epoch`` on); returns the summary."""
        cfg = self.cfg
        if self.run_dir is not None and self.epoch == 0:
            runs.save_config(self.run_dir, cfg)
            runs.write_json(self.run_dir / "env.json",
                            runs.environment(str(self.device), torch.get_num_threads()))
        start = time.perf_counter()
        while self.epoch < cfg.train.epochs:
            schedule_row = self.apply_schedule()
            row = {"epoch": self.epoch + 1, **self.train_epoch(), **schedule_row}
            self.epoch += 1
            if self.epoch % cfg.train.eval_every == 0 or self.epoch == cfg.train.epochs:
                row.update(evaluate(self.net, self.test_batches()))
            self.history.append(row)
            self.record(row)
        return self.summary(time.perf_counter() - start)

    def apply_schedule(self) -> dict[str, Any]:
        """Set ``engine.active`` for this epoch (dynamic layer accumulation); the log fields."""
        if self.schedule is None:
            return {}
        if not hasattr(self.engine, "active"):
            raise TrainingError(f"engine {self.engine.name} cannot follow train.accumulate; "
                                "use engine=local or engine=pipeline")
        active = self.schedule.active(self.epoch)
        self.engine.active = active
        if self._train_costs is None:
            x, y = next(iter(self.test_batches()))
            self._train_costs = stage_train_costs(self.net, x[:32], y[:32])
        return {"stages_trained": sorted(k + 1 for k in active),
                "stages_run": self.schedule.depth(self.epoch),
                "train_macs_fraction": compute_fraction(self._train_costs, active)}

    def record(self, row: dict[str, Any]) -> None:
        if self.run_dir is None:
            return
        runs.append_metrics(self.run_dir, row)
        if self.cfg.train.checkpoint:
            runs.save_checkpoint(self.run_dir / runs.CHECKPOINT, self.state_dict())
        runs.plot_curves(self.run_dir)

    def summary(self, seconds: float) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        x = next(iter(self.test_batches()))[0][:2]  # a sample for the compute accounting
        out = {
            "name": self.run_dir.name if self.run_dir else "",
            "model": self.cfg.model.name, "engine": self.cfg.engine.name, "k": self.net.k,
            "data": self.cfg.data.name, "epochs": self.epoch,
            "final_acc": last.get("final_acc"), "stage_acc": last.get("stage_acc"),
            "ens_uniform": last.get("ens_uniform"), "ens_weighted": last.get("ens_weighted"),
            "train_seconds": sum(r["epoch_seconds"] for r in self.history),
            "wall_seconds": seconds,
            "samples_per_s": (sum(r["samples_per_s"] for r in self.history) / len(self.history))
            if self.history else None,
            "saved_bytes_peak": max((r["saved_bytes_peak"] for r in self.history), default=None),
            "peak_rss": peak_rss_bytes(), "stages": stage_costs(self.net, x),
            "threads": torch.get_num_threads(),
            "group_acc": last.get("group_acc"), **node_costs(self.net, x),
        }
        if self.run_dir is not None:
            runs.write_json(self.run_dir / "summary.json", out)
        return out

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "epoch": self.epoch, "net": self.net.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "generator": self.generator.get_state(), "rng": torch.get_rng_state(),
                "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], list(state["history"])


def run(cfg: RunConfig, resume: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """Run a whole training job from its config: data, model, engine, run folder.

    Args:
        cfg: the run configuration.
        resume: a run folder to continue from its last checkpoint (its saved config
            is used, except ``train.epochs``, which may be raised).

    Returns:
        The run summary and the run folder.
    """
    if _pipelined(cfg, resume):  # worker processes: see locallearn.distributed.launch
        from locallearn.distributed.launch import run_pipeline

        return run_pipeline(cfg, resume)
    state = runs.load_checkpoint(resume) if resume is not None else None
    cfg, run_dir = resolve_run(cfg, resume)
    if cfg.engine.threads:  # 0 keeps torch's default for a single process
        torch.set_num_threads(cfg.engine.threads)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    if "vocab" in data.meta:  # text: the encoder fitted on the train split, to encode new text
        runs.write_json(run_dir / "vocab.json", data.meta["vocab"])
    trainer = Trainer(build_net(cfg, data), data, cfg, run_dir)
    if state is not None:
        trainer.load_state_dict(state)
        runs.truncate_metrics(run_dir, trainer.epoch)
        runs.save_config(run_dir, cfg)
    summary = trainer.fit()
    if is_self_supervised(trainer.net):  # no classifier: judge the features by linear probes
        result = probe_net(trainer.net, data, device=trainer.device)
        summary.update(result)
        record_probe(run_dir, result)
    return summary, run_dir


def resolve_run(cfg: RunConfig, resume: str | Path | None = None) -> tuple[RunConfig, Path]:
    """The config and a fresh folder of a new run, or the run that ``resume`` continues.

    A resumed run keeps its saved config, except ``train.epochs`` (from ``cfg``).

    Raises:
        RunError: if ``resume`` is not a run folder with a checkpoint.
    """
    if resume is None:
        return cfg, runs.new_run_dir(cfg)
    run_dir = Path(resume)
    if not (run_dir / runs.CHECKPOINT).is_file():
        raise runs.RunError(f"cannot resume {run_dir}: it holds no {runs.CHECKPOINT} "
                            f"(a run folder holds one after its first epoch)")
    saved = runs.load_run_config(run_dir)
    return dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=cfg.train.epochs)), run_dir


def _pipelined(cfg: RunConfig, resume: str | Path | None) -> bool:
    """True if this run goes through the pipeline launcher (or this process is a torchrun worker)."""
    from locallearn.distributed import under_torchrun

    if cfg.engine.name == "pipeline" or under_torchrun():
        return True
    return resume is not None and runs.load_run_config(Path(resume)).engine.name == "pipeline"
