"""The training loop: one :class:`Trainer` for every engine, in one process or on any rank.

The trainer knows nothing of the model: it asks the engine for one step per batch,
steps each stage's LR schedule, evaluates, and writes metrics and an atomic
checkpoint after every epoch. What differs between the ranks of a pipeline is state
handed to it, never a subclass:

* a :class:`Comm` (gather, broadcast, barrier; :class:`SingleProcess` is the identity),
* a :class:`Placement` (which stages this rank owns, what its checkpoint shard holds and
  how rank 0 merges the shards into the standard checkpoint),
* the engine (:class:`locallearn.engines.base.Engine`), which this rank steps.

Rank 0 (the first rank) reads the data, logs and writes the run folder; every rank
saves its own shard when there are several. ``Trainer.fit`` is the whole run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from locallearn import precision, runs
from locallearn.accumulate import (
    build_schedule,
    compute_fraction,
    delay_lr_schedules,
    stage_train_costs,
)
from locallearn.build import stack_views, stage_costs
from locallearn.config import RunConfig, to_dict
from locallearn.data import DataSplits, batches
from locallearn.data.core import place_data
from locallearn.data.strong_augment import build_augment
from locallearn.engines import Engine, StageUpdate, build_engine
from locallearn.errors import TrainingError
from locallearn.groups import node_costs
from locallearn.log import epoch_line
from locallearn.measure import LossTally, SavedTensorsMeter, cuda_peak_bytes, peak_rss_bytes
from locallearn.network import LocalNet
from locallearn.optim import build_optimizer, build_scheduler
from locallearn.probe import is_self_supervised, probe_net, record_probe
from locallearn.types import Activation, map_tensors

log = logging.getLogger("locallearn")
FAULT_ENV = "LOCALLEARN_FAULT"  # tests: "rank:step:kind" with kind exit, raise or hang
# The step losses (detached device tensors) are summed on their device (measure.LossTally)
# and read every LOG_EVERY steps and at the end of an epoch: the progress bar and the check
# for a non-finite loss follow those reads.
LOG_EVERY = 20
EXPLODED = 1e12  # a weight this large means training diverged, even while losses stay finite
Batches = Iterable[tuple[Activation, torch.Tensor]]


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT (delivered on leaving) in the main thread, so a write pair is not split."""
    main = (threading.current_thread() is threading.main_thread()
            and hasattr(signal, "pthread_sigmask"))
    if main:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Comm(Protocol):
    """What the loop needs from the other ranks (see :class:`SingleProcess`)."""

    rank: int
    world: int

    def barrier(self) -> None: ...
    def broadcast(self, obj: Any = None) -> Any: ...
    def gather(self, obj: Any) -> list[Any] | None: ...
    def all_gather(self, obj: Any) -> list[Any]: ...
    def scatter(self, objs: list[Any] | None) -> Any: ...


class SingleProcess:
    """The :class:`Comm` of a run in one process: every collective is the identity."""

    rank, world = 0, 1

    def barrier(self) -> None:
        """Nothing to wait for."""

    def broadcast(self, obj: Any = None) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def scatter(self, objs: list[Any] | None) -> Any:
        assert objs is not None
        return objs[0]


class Placement:
    """Which stages a rank owns and what its checkpoint shard holds.

    This form owns a contiguous run of whole stages (every stage in one process); the
    group placement (:mod:`locallearn.distributed.group_worker`) owns one (stage, group)
    node and overrides the shard methods.

    Args:
        stages: the stages this rank trains.
        ranges: the stages of every rank (``[stages]`` in one process).
        saves: False for a data-parallel copy (``engine.replicas``): it holds what replica 0
            holds, so it writes no shard of its own.
    """

    def __init__(self, stages: range, ranges: Sequence[range] | None = None,
                 saves: bool = True) -> None:
        self.stages, self.ranges, self.saves = stages, list(ranges or [stages]), saves

    def describe(self) -> dict[str, Any]:
        """What this rank holds, for env.json."""
        return {"stages": [k + 1 for k in self.stages]}

    def place(self, net: LocalNet, device: torch.device) -> None:
        """Move what this rank trains to ``device``; the rest of the net stays untouched."""
        for k in self.stages:
            net.stages[k].to(device)

    def parameters(self, net: LocalNet, k: int) -> Iterator[torch.nn.Parameter]:
        """The parameters stage ``k``'s optimizer updates on this rank."""
        return net.stages[k].parameters()

    def weights(self, net: LocalNet) -> dict[str, Any]:
        """This rank's trained weights, as saved in its shard."""
        prefixes = tuple(f"stages.{k}." for k in self.stages)
        return {"net": {n: t.detach().cpu() for n, t in net.state_dict().items()
                        if n.startswith(prefixes)}}

    def fits(self, shard: dict[str, Any]) -> bool:
        """True if a saved shard holds what this rank trains."""
        return shard.get("stages") == list(self.stages)

    def merge(self, state: dict[str, Any], shards: Sequence[dict[str, Any]],
              net: LocalNet) -> dict[str, Any]:
        """The standard checkpoint ``state`` with every rank's shard written into it."""
        weights: dict[str, torch.Tensor] = {}
        for sh in (s for s in shards if s is not None):  # replicas write none
            weights.update(sh["net"])
            for k, opt, sched in zip(sh["stages"], sh["optimizers"], sh["schedulers"]):
                state["optimizers"][k], state["schedulers"][k] = opt, sched
        state["net"] = {name: weights.get(name, t) for name, t in state["net"].items()}
        return state

    def part_of(self, state: dict[str, Any], rank: int, net: LocalNet) -> dict[str, Any]:
        """The shard of rank ``rank`` cut from a standard checkpoint."""
        stages = self.ranges[rank]
        prefixes = tuple(f"stages.{k}." for k in stages)
        return {"net": {n: t for n, t in state["net"].items() if n.startswith(prefixes)},
                "optimizers": [state["optimizers"][k] for k in stages],
                "schedulers": [state["schedulers"][k] for k in stages],
                "rng": state["rng"], "generator": state["generator"]}

    def load_weights(self, net: LocalNet, part: dict[str, Any], device: torch.device) -> None:
        """Load the weights of a shard into what this rank trains.

        Raises:
            TrainingError: if the shard does not fit this rank's stages.
        """
        result = net.load_state_dict(part["net"], strict=False)
        own = tuple(f"stages.{k}." for k in self.stages)
        lost = [n for n in result.missing_keys if n.startswith(own)]
        if lost or result.unexpected_keys:
            raise TrainingError(f"the checkpoint does not fit stages {list(self.stages)}: "
                                f"missing {lost[:3]}, unexpected {result.unexpected_keys[:3]}")


def inject_fault(rank: int, step: int) -> None:
    """Fail on purpose where ``$LOCALLEARN_FAULT`` says (``rank:step:kind``), for fault tests."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return  # (a worker restarted by the elastic agent does not fail again)
    r, s, kind = spec.split(":")
    if int(r) != rank or int(s) != step:
        return
    if kind == "exit":
        os._exit(13)
    if kind == "hang":
        time.sleep(10**6)
    raise RuntimeError(f"fault injected by ${FAULT_ENV} at step {step}")


class Trainer:
    """Trains ``net`` on ``data`` as ``cfg`` says, writing into ``run_dir`` (if given).

    Args:
        net: the stages to train (every rank holds the whole net; it trains its own).
        data: train and test splits (on other ranks than the first: a placeholder of
            their shape).
        cfg: the resolved run configuration.
        run_dir: run folder for metrics and checkpoints (``None``: record nothing).
        engine: the engine (default: from ``cfg.engine``).
        optimizers: one optimizer per stage (default: ``cfg.optim`` for each stage).
        train_data: an iterable of ``(x, y)`` batches (e.g. a ``DataLoader``) read anew
            every epoch, instead of ``data.train`` with ``cfg.data.batch_size``.
        comm: the other ranks (default: none, :class:`SingleProcess`).
        placement: what this rank owns (default: every stage).
        device: this rank's device (default: ``cfg.engine.device``).

    Raises:
        TrainingError: for a self-supervised objective without augmentation, or a number
            of optimizers that is not one per stage.
    """

    def __init__(self, net: LocalNet, data: DataSplits, cfg: RunConfig,
                 run_dir: Path | None = None, engine: Engine | None = None, *,
                 optimizers: Sequence[torch.optim.Optimizer] | None = None,
                 train_data: Batches | None = None, comm: Comm | None = None,
                 placement: Placement | None = None, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.comm: Comm = comm or SingleProcess()
        self.first = self.comm.rank == 0
        self.folder = Path(run_dir) if run_dir is not None else None  # every rank's shards
        self.run_dir = self.folder if self.first else None          # metrics, summary: rank 0
        self.device = device or torch.device(cfg.engine.device)
        # the splits on the device when they fit (data.on_device); only the first rank reads
        self.data = place_data(data, self.device, cfg.data.on_device) if self.first else data
        self.choice = precision.resolve_config(cfg.train, self.device)
        self.engine: Engine = engine or build_engine(
            cfg.engine.name, aux_heads=cfg.engine.aux_heads, checkpoint=cfg.engine.checkpoint,
            update=StageUpdate(self.choice))
        self.placement = placement or Placement(self.engine.owned(net.k))
        self.net = net
        self.placement.place(net, self.device)
        precision.prepare(net, self.choice, list(self.placement.stages))
        self.train_data = train_data
        self.steps_per_epoch = (len(train_data) if train_data is not None  # type: ignore[arg-type]
                                else math.ceil(len(data.train) / cfg.data.batch_size))
        total = self.steps_per_epoch * cfg.train.epochs
        if optimizers is not None and len(optimizers) != net.k:
            raise TrainingError(f"{len(optimizers)} optimizers given for {net.k} stages: "
                                f"give one per stage")
        self.optimizers = list(optimizers) if optimizers is not None else [
            self.build_optimizer(self.placement.parameters(net, k)) for k in range(net.k)]
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
        if self.schedule is not None and not self.engine.accumulates:
            raise TrainingError(f"engine {self.engine.name} cannot follow train.accumulate; "
                                "use engine=local or engine=pipeline")
        self._train_costs: list[tuple[int, int]] | None = None  # MACs per stage, for the log
        if self.schedule is not None:  # a stage that joins late gets a whole LR schedule
            delay_lr_schedules(self.schedulers, self.schedule, self.steps_per_epoch, total)

    @property
    def progress(self) -> bool:
        """Show progress (bars, epoch lines): on the first rank, if configured."""
        return self.first and self.cfg.train.progress

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
    def train_batches(self) -> Batches:
        """One epoch of training batches; with ``views`` > 1 (self-supervised objectives)
        each batch is ``[view1; view2; ...]`` of the same images, labels repeated alike."""
        if self.train_data is not None:
            return ((map_tensors(lambda t: t.to(self.device), x), y.to(self.device))
                    for x, y in self.train_data)
        augment = self.augment if self.views == 1 else stack_views(self.augment, self.views)
        out = batches(self.data.train, self.cfg.data.batch_size, shuffle=True,
                      generator=self.generator, device=self.device, augment=augment,
                      mean=self.data.meta.get("mean"), std=self.data.meta.get("std"))
        return out if self.views == 1 else ((x, y.repeat(self.views)) for x, y in out)

    def test_batches(self) -> Batches:
        return batches(self.data.test, max(256, self.cfg.data.batch_size), shuffle=False,
                       generator=None, device=self.device, mean=self.data.meta.get("mean"),
                       std=self.data.meta.get("std"))

    # -- one epoch -------------------------------------------------------------------
    def train_epoch(self) -> dict[str, Any]:
        """Train one epoch on this rank; the first rank returns the epoch's figures of all."""
        engine, comm = self.engine, self.comm
        comm.barrier()  # start together, so that the ranks' wall times compare
        engine.begin_epoch()
        start = time.perf_counter()
        data = iter(self.train_batches()) if self.first else None
        tally = LossTally(self.net.k)
        saved_peak, data_seconds, samples = 0, 0.0, 0
        bar = tqdm(range(self.steps_per_epoch), leave=False, disable=not self.progress,
                   desc=f"epoch {self.epoch + 1}")
        for i in bar:
            x = y = None
            if data is not None:
                t = time.perf_counter()
                x, y = next(data)
                x = engine.update.input(x)  # the run's memory format (channels-last)
                data_seconds += time.perf_counter() - t
                samples += len(y)
            inject_fault(comm.rank, self.epoch * self.steps_per_epoch + i)
            if i == 0:  # one measured step per epoch: the hooks cost time on every saved tensor
                with SavedTensorsMeter(self.net) as meter:
                    losses = engine.step(self.net, self.optimizers, x, y)
                saved_peak = meter.peak_bytes
            else:
                losses = engine.step(self.net, self.optimizers, x, y)
            for j, v in enumerate(losses):
                tally.add(j, v)
            if (i + 1) % LOG_EVERY == 0 or i + 1 == self.steps_per_epoch:
                self.read_losses(tally, bar)
            engine.share_weights(self.net, self.epoch * self.steps_per_epoch + i)
            self.net.update_momentum()  # momentum copies of the next stage (MAN) follow it
            self.step_schedules()
        figures = engine.end_epoch()
        self.check_weights()
        mine = {"losses": tally.epoch(),
                "stage_seconds": figures.get("stage_seconds", {}),
                "wall": time.perf_counter() - start, "data_seconds": data_seconds,
                "samples": samples, "saved": saved_peak, "rss": peak_rss_bytes(),
                "cuda": cuda_peak_bytes(self.device)}
        parts = comm.gather(mine)
        return self._epoch_row(parts) if parts is not None else {}

    def _epoch_row(self, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The metrics row of an epoch from every rank's figures (first rank)."""
        k = self.net.k
        loss = [math.nan] * k
        seconds = [0.0] * k
        for p in parts:  # one rank per stage, or (group placement) G ranks: their shares add up
            for j, v in p["losses"].items():
                loss[j] = v if math.isnan(loss[j]) else loss[j] + v
            for j, v in p["stage_seconds"].items():
                seconds[j] = max(seconds[j], v)
        wall = max(max(p["wall"] for p in parts), 1e-9)
        cuda = [p["cuda"] for p in parts if p["cuda"] is not None]
        row = {"train_loss": loss, "epoch_seconds": wall,
               "samples_per_s": parts[0]["samples"] / wall,
               "saved_bytes_peak": max(p["saved"] for p in parts),
               "peak_rss": max(p["rss"] for p in parts), "cuda_peak": max(cuda) if cuda else None,
               "lr": self.schedulers[-1].get_last_lr()[0]}
        if any(p["stage_seconds"] for p in parts):  # the pipeline times its stages
            busy_stages = sum(sum(p["stage_seconds"].values()) for p in parts)
            busy = [sum(p["stage_seconds"].values()) + p["data_seconds"] for p in parts]
            row.update(stage_seconds=seconds, stage_idle=[1 - t / wall for t in seconds],
                       worker_busy=[b / wall for b in busy],
                       pipeline_efficiency=busy_stages / (len(parts) * wall))
        return row

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

    def _kept(self) -> str:
        """What a failure message says about the run folder's last checkpoint."""
        if self.folder is None or not self.cfg.train.checkpoint:
            return ""
        if self.epoch == 0:
            return f"; no epoch had finished, so {self.folder} holds no checkpoint"
        return f"; the checkpoint of epoch {self.epoch} is kept in {self.folder}"

    def read_losses(self, tally: LossTally, bar: Any) -> None:
        """Read the losses summed on the device since the last read (one transfer): stop if
        one is not finite, show them on the progress bar."""
        losses = tally.read()
        self.check_finite(losses)
        if self.progress:
            bar.set_postfix_str(" ".join(f"s{j + 1} {v:.3f}" for j, v in enumerate(losses)
                                         if not math.isnan(v)))

    def check_finite(self, losses: list[float]) -> None:
        """Stop with an error naming the stage and epoch if a trained stage's loss is not finite."""
        for k, v in enumerate(losses):
            if not math.isfinite(v) and k in self.placement.stages and self.engine.trains(k, self.net):
                raise TrainingError(f"the loss of stage {k + 1} became {v} in epoch "
                                    f"{self.epoch + 1}; lower optim.lr or check the data"
                                    + self._kept())

    def check_weights(self) -> None:
        """Stop if a weight of this rank's stages became non-finite or exploded (> 1e12)."""
        for k in self.placement.stages:
            for p in self.placement.parameters(self.net, k):
                top = float(p.detach().abs().max()) if p.numel() else 0.0
                if not math.isfinite(top) or top > EXPLODED:
                    raise TrainingError(f"a weight of stage {k + 1} became {top:.3g} in epoch "
                                        f"{self.epoch + 1}: training diverged; lower optim.lr"
                                        + self._kept())

    # -- the run ---------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs (from ``self.epoch`` on); the first rank returns
        the summary, the others an empty dict."""
        cfg = self.cfg
        ranks = self.comm.gather(self._rank_info())
        if self.run_dir is not None and ranks is not None and self.epoch == 0:
            runs.save_config(self.run_dir, cfg)
            env = runs.environment(str(self.device), torch.get_num_threads())
            env.update(precision.describe(self.choice))
            if self.comm.world > 1:
                env.update(engine=cfg.engine.name, placement=cfg.engine.placement,
                           workers=self.comm.world, ranks=ranks,
                           threads_per_worker=[r["threads"] for r in ranks])
            runs.write_json(self.run_dir / "env.json", env)
        if self.progress:
            log.info("training %s: %s", cfg.engine.name, precision.summary_line(self.choice))
        start = time.perf_counter()
        while self.epoch < cfg.train.epochs:
            schedule_row = self.apply_schedule()
            row = {"epoch": self.epoch + 1, **self.train_epoch(), **schedule_row}
            self.epoch += 1
            if self.epoch % cfg.train.eval_every == 0 or self.epoch == cfg.train.epochs:
                was = self.net.training
                self.net.eval()
                result = self.engine.evaluate(self.net, self.test_batches() if self.first else None,
                                              self.comm)
                self.net.train(was)
                row.update(result or {})
            if self.first:
                self.history.append(row)
                if self.progress:
                    log.info(epoch_line(row, cfg.train.epochs))
            self.record(row)
        self.engine.close()
        seconds = time.perf_counter() - start
        if self.comm.world > 1:  # the first rank takes every rank's stages: the summary sees all
            final = self.comm.gather(self.shard_state() if self.placement.saves else None)
            if final is not None:
                self.net.load_state_dict(self.merged_state(final)["net"])
                self.net.to(self.device)
        if ranks is None:
            return {}
        return self.summary(seconds, ranks)

    def _rank_info(self) -> dict[str, Any]:
        return {"rank": self.comm.rank, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device), "threads": torch.get_num_threads(),
                **self.placement.describe()}

    def apply_schedule(self) -> dict[str, Any]:
        """Set ``engine.active`` for this epoch (dynamic layer accumulation); the log fields."""
        if self.schedule is None:
            return {}
        active = self.schedule.active(self.epoch)
        self.engine.active = active
        if self._train_costs is None and self.first:
            x, y = next(iter(self.test_batches()))
            self._train_costs = stage_train_costs(self.net, map_tensors(lambda t: t[:32], x),
                                                  y[:32])
        if not self.first:
            return {}
        assert self._train_costs is not None
        return {"stages_trained": sorted(k + 1 for k in active),
                "stages_run": self.schedule.depth(self.epoch),
                "train_macs_fraction": compute_fraction(self._train_costs, active)}

    def record(self, row: dict[str, Any]) -> None:
        """Every rank saves its shard (when there are several); the first rank writes the
        metrics row, the standard checkpoint and the curves."""
        if self.folder is None:
            return
        shard = self.shard_state() if self.cfg.train.checkpoint and self.placement.saves else None
        if shard is not None and self.comm.world > 1:
            runs.save_checkpoint(shard_path(self.folder, self.comm.rank), shard)
        shards = self.comm.gather(shard)
        if shards is None or self.run_dir is None:
            return
        with _sigint_held():  # Ctrl-C between the two would leave the metrics an epoch ahead
            runs.append_metrics(self.run_dir, row)
            if shard is not None:
                runs.save_checkpoint(self.run_dir / runs.CHECKPOINT, self.merged_state(shards))
        runs.plot_curves(self.run_dir, final=self.epoch == self.cfg.train.epochs)

    def summary(self, seconds: float, ranks: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """The run's summary (written to ``summary.json`` with a run folder)."""
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
            "peak_rss": max([peak_rss_bytes()] + [r["peak_rss"] for r in self.history]),
            "stages": stage_costs(self.net, x), "threads": torch.get_num_threads(),
            "group_acc": last.get("group_acc"), **node_costs(self.net, x),
            **precision.describe(self.choice),
        }
        if self.comm.world > 1:
            eff = [r["pipeline_efficiency"] for r in self.history if "pipeline_efficiency" in r]
            out.update(workers=self.comm.world, placement=self.cfg.engine.placement,
                       threads_per_worker=[r["threads"] for r in ranks],
                       pipeline_efficiency=sum(eff) / len(eff) if eff else None)
        if is_self_supervised(self.net) and self.run_dir is not None:  # judge features by probes
            result = probe_net(self.net, self.data, device=self.device)
            out.update(result)
            record_probe(self.run_dir, result)
        if self.run_dir is not None:
            runs.write_json(self.run_dir / "summary.json", out)
        return out

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The standard checkpoint of this process's view of the run."""
        return {"config": to_dict(self.cfg), "epoch": self.epoch, "net": self.net.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "generator": self.generator.get_state(), "rng": torch.get_rng_state(),
                "history": self.history}

    def shard_state(self) -> dict[str, Any]:
        """This rank's stages, their optimizers and schedules, and its random state."""
        own = list(self.placement.stages)
        return {"config": to_dict(self.cfg), "epoch": self.epoch, "rank": self.comm.rank,
                "stages": own, **self.placement.weights(self.net),
                "optimizers": [_to_cpu(self.optimizers[k].state_dict()) for k in own],
                "schedulers": [self.schedulers[k].state_dict() for k in own],
                "rng": torch.get_rng_state(), "generator": self.generator.get_state()}

    def merged_state(self, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The standard checkpoint (:meth:`state_dict`) with every rank's shard in place."""
        state = self.state_dict()
        if self.comm.world == 1:
            return state
        return self.placement.merge(state, shards, self.net)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a standard checkpoint (in one process)."""
        self.net.load_state_dict(state["net"])
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"]):
            sch.load_state_dict(s)
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        self.epoch, self.history = state["epoch"], list(state["history"])

    def restore(self) -> None:
        """Continue from the run folder on every rank: its own shard if it matches, else the
        part the first rank cuts from the standard checkpoint."""
        assert self.folder is not None, "restore needs the run folder"
        comm = self.comm
        merged = runs.load_checkpoint(self.folder) if self.first else None
        if comm.world == 1:
            assert merged is not None
            self.load_state_dict(merged)
            return
        epoch = comm.broadcast(merged["epoch"] if merged is not None else None)
        shard = self._own_shard(epoch)
        missing = comm.all_gather(shard is None)
        parts = None
        if merged is not None:
            parts = [self.placement.part_of(merged, r, self.net) if missing[r] else None
                     for r in range(comm.world)]
        received = comm.scatter(parts)
        self._load_part(shard if shard is not None else received)
        if merged is not None:  # the first rank keeps every schedule in step (it logs the LR)
            for sched, state in zip(self.schedulers, merged["schedulers"]):
                sched.load_state_dict(state)
            self.generator.set_state(merged["generator"])
            self.history = list(merged["history"])
        self.epoch = epoch

    def _own_shard(self, epoch: int) -> dict[str, Any] | None:
        assert self.folder is not None
        try:
            shard = torch.load(shard_path(self.folder, self.comm.rank), map_location="cpu",
                               weights_only=True)
        except Exception:  # missing or unreadable: the first rank sends this rank's part
            return None
        ok = shard.get("epoch") == epoch and self.placement.fits(shard)
        return shard if ok else None

    def _load_part(self, part: dict[str, Any]) -> None:
        self.placement.load_weights(self.net, part, self.device)
        for k, opt, sched in zip(self.placement.stages, part["optimizers"], part["schedulers"]):
            self.optimizers[k].load_state_dict(opt)
            self.schedulers[k].load_state_dict(sched)
        torch.set_rng_state(part["rng"])
        self.generator.set_state(part["generator"])


def shard_path(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` saves its stages inside a run folder."""
    return Path(run_dir) / "ranks" / f"rank{rank}.pt"


def _to_cpu(obj: Any) -> Any:
    """Tensors of a nested state dict moved to the CPU (to gather and save them)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
