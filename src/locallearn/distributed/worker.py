"""One pipeline worker: set-up from rank 0, the epoch loop, metrics and checkpoints.

Rank 0 resolves the run (config, run folder), loads the data with the run's seed,
measures the split once (so every rank builds the same stages) and broadcasts what
the others need: the config, the random state after loading the data (so every rank
initialises the network exactly as a single-process run does) and the shape of the
data. Other ranks never load data: they hold a placeholder of the right shape and
length that holds no memory.

:class:`PipelineTrainer` is the :class:`~locallearn.train.Trainer` of one rank. Per
epoch it trains its stages (rank 0 reads and augments the batches in the order of a
single-process run), evaluates through the pipeline, gathers every rank's figures on
rank 0, which writes the one run folder, and checkpoints: every rank saves its own
stages to ``ranks/rank<r>.pt`` and rank 0 writes the merged, standard
``checkpoint.pt`` that ``locallearn eval`` and ``--resume`` read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from locallearn import runs
from locallearn.config import ConfigError, RunConfig, to_dict
from locallearn.data import ArrayData, DataSplits
from locallearn.distributed.comm import Control
from locallearn.engines.pipeline import EvalTally, PipelineEngine, merge_tallies
from locallearn.measure import SavedTensorsMeter, cuda_peak_bytes, peak_rss_bytes
from locallearn.probe import is_self_supervised, probe_net, record_probe
from locallearn.train import Trainer, TrainingError, build_data, resolve_run, split_cuts

FAULT_ENV = "LOCALLEARN_FAULT"  # tests: "rank:step:kind" with kind exit, raise or hang
MEASURED_SPLITS = ("time", "memory")  # splits that measure, so may differ between processes
DATA_META = ("vocab_size", "mean", "std")  # what building the net and the batches reads


@dataclass
class Session:
    """Where this worker stands: its rank, device, groups and stages."""

    rank: int
    world: int
    device: torch.device
    threads: int
    backend: str
    control: Control
    ranges: list[range]          # the stages of every rank

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def stages(self) -> range:
        return self.ranges[self.rank]


@dataclass
class Setup:
    """What rank 0 broadcasts: the resolved run and the data's shape."""

    cfg: RunConfig
    run_dir: str
    rng: torch.Tensor
    data: dict[str, Any]


# -- set-up -----------------------------------------------------------------------------

def prepare(cfg: RunConfig, resume: str | Path | None, run_dir: Path | None) -> tuple[Setup, DataSplits]:
    """Rank 0: resolve the run, load the data, fix the split; what every rank needs to start."""
    if run_dir is None:  # under torchrun rank 0 makes the run folder
        cfg, run_dir = resolve_run(cfg, resume)
    if cfg.engine.name != "pipeline":
        raise ConfigError(f"workers started by torchrun run engine=pipeline, not {cfg.engine.name}")
    torch.manual_seed(cfg.train.seed)  # the same order of random draws as `train.run`
    data = build_data(cfg)
    if "vocab" in data.meta:  # text: the encoder fitted on the train split, as `train.run` saves
        runs.write_json(Path(run_dir) / "vocab.json", data.meta["vocab"])
    rng = torch.get_rng_state()
    if cfg.split.by in MEASURED_SPLITS and not cfg.split.cuts:
        cfg = dataclasses.replace(cfg, split=dataclasses.replace(
            cfg.split, cuts=tuple(split_cuts(cfg, data))))
    return Setup(cfg, str(run_dir), rng, data_spec(data)), data


def data_spec(data: DataSplits) -> dict[str, Any]:
    """Name, classes, sizes, shapes and dtypes of a data set, without its samples."""
    def split(a: ArrayData) -> tuple[int, tuple[int, ...], torch.dtype]:
        return len(a), tuple(a.x.shape[1:]), a.x.dtype

    return {"name": data.name, "classes": list(data.train.classes), "train": split(data.train),
            "test": split(data.test), "meta": {k: data.meta[k] for k in DATA_META if k in data.meta}}


def placeholder_data(spec: dict[str, Any]) -> DataSplits:
    """Data of the right name, classes, length and shape that holds no memory (zeros, expanded)."""
    def split(n: int, shape: tuple[int, ...], dtype: torch.dtype) -> ArrayData:
        x = torch.zeros((), dtype=dtype).expand(n, *shape)
        return ArrayData(x, torch.zeros((), dtype=torch.int64).expand(n), list(spec["classes"]))

    return DataSplits(spec["name"], split(*spec["train"]), split(*spec["test"]), dict(spec["meta"]))


def inject_fault(rank: int, step: int) -> None:
    """Fail on purpose where ``$LOCALLEARN_FAULT`` says (``rank:step:kind``), for fault tests."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    r, s, kind = spec.split(":")
    if int(r) != rank or int(s) != step:
        return
    if kind == "exit":
        os._exit(13)
    if kind == "hang":
        time.sleep(10**6)
    raise RuntimeError(f"fault injected by ${FAULT_ENV} at step {step}")


# -- the trainer of one rank ------------------------------------------------------------

class PipelineTrainer(Trainer):
    """Trains the stages of one rank; rank 0 also records the run.

    Args:
        net: the whole network (every rank builds it; a rank trains only its stages).
        data: the data (rank 0) or a placeholder of its shape (other ranks).
        cfg: the run configuration.
        run_dir: the run folder (every rank saves its stages there).
        session: this worker's rank, device and groups.
        engine: this rank's pipeline engine.
    """

    def __init__(self, net: Any, data: DataSplits, cfg: RunConfig, run_dir: Path,
                 session: Session, engine: PipelineEngine) -> None:
        local = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine,
                                                                    device=str(session.device)))
        super().__init__(net, data, local, run_dir if session.first else None, engine)
        self.run_cfg, self.folder, self.session = cfg, Path(run_dir), session
        self.engine: PipelineEngine = engine
        from locallearn.objectives.groups import find_group_objective

        self.group_heads = [find_group_objective(s.objective) for s in net.stages]
        if not session.first:
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train,
                                                                               progress=False))

    def place(self, net: Any) -> Any:
        """Only this rank's stages go to its device; the rest of the net (which every rank
        builds, to initialise it as one process would) stays on the CPU, untouched."""
        for k in self.engine.stages:
            net.stages[k].to(self.device)
        return net

    def _trained(self, k: int) -> bool:
        return k in self.engine.stages and super()._trained(k)

    # -- training ----------------------------------------------------------------------
    def train_epoch(self) -> dict[str, Any]:
        """Train one epoch on this rank; rank 0 returns the epoch's figures of all ranks."""
        s, engine = self.session, self.engine
        s.control.barrier()  # start together, so that the ranks' wall times compare
        engine.reset_clock()
        start = time.perf_counter()
        data = iter(self.train_batches()) if s.first else None
        sums, counts = [0.0] * self.net.k, [0] * self.net.k
        saved_peak, data_seconds = 0, 0.0
        steps = tqdm(range(self.steps_per_epoch), leave=False, disable=not self.cfg.train.progress,
                     desc=f"epoch {self.epoch + 1}")
        for i in steps:
            x = y = None
            if data is not None:
                t = time.perf_counter()
                x, y = next(data)
                data_seconds += time.perf_counter() - t
            inject_fault(s.rank, self.epoch * self.steps_per_epoch + i)
            if i == 0:  # one measured step per epoch, as in the single-process trainer
                with SavedTensorsMeter(self.net) as meter:
                    losses = engine.step(self.net, self.optimizers, x, y)
                saved_peak = meter.peak_bytes
            else:
                losses = engine.step(self.net, self.optimizers, x, y)
            self.check_finite(losses)
            self.step_schedules()
            for k, v in enumerate(losses):
                if not math.isnan(v):
                    sums[k], counts[k] = sums[k] + v, counts[k] + 1
        engine.flush()
        mine = {"losses": {k: sums[k] / counts[k] for k in engine.stages if counts[k]},
                "stage_seconds": dict(engine.stage_seconds), "wall": time.perf_counter() - start,
                "data_seconds": data_seconds, "saved": saved_peak, "rss": peak_rss_bytes(),
                "cuda": cuda_peak_bytes(s.device)}
        parts = s.control.gather(mine)
        return self._epoch_row(parts) if parts is not None else {}

    def _epoch_row(self, parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The metrics row of an epoch from every rank's figures (rank 0)."""
        k = self.net.k
        loss, seconds = [math.nan] * k, [0.0] * k
        for p in parts:  # one rank per stage, or (group placement) G ranks: their shares add up
            for j, v in p["losses"].items():
                loss[j] = v if math.isnan(loss[j]) else loss[j] + v
            for j, v in p["stage_seconds"].items():
                seconds[j] = max(seconds[j], v)
        wall = max(p["wall"] for p in parts)
        busy_stages = sum(sum(p["stage_seconds"].values()) for p in parts)
        busy = [sum(p["stage_seconds"].values()) + p["data_seconds"] for p in parts]
        cuda = [p["cuda"] for p in parts if p["cuda"] is not None]
        return {"train_loss": loss, "epoch_seconds": wall,
                "samples_per_s": len(self.data.train) / max(wall, 1e-9),
                "saved_bytes_peak": max(p["saved"] for p in parts),
                "peak_rss": max(p["rss"] for p in parts), "cuda_peak": max(cuda) if cuda else None,
                "lr": self.schedulers[-1].get_last_lr()[0],
                "stage_seconds": seconds, "stage_idle": [1 - t / max(wall, 1e-9) for t in seconds],
                "worker_busy": [b / max(wall, 1e-9) for b in busy],
                "pipeline_efficiency": busy_stages / (len(parts) * max(wall, 1e-9))}

    # -- evaluation --------------------------------------------------------------------
    def evaluate_pipeline(self) -> dict[str, Any] | None:
        """Test accuracy through the pipeline; rank 0 gets the result of ``evaluate``."""
        was = self.net.training
        self.net.eval()
        tally = EvalTally()
        batches = self.test_batches() if self.session.first else None
        self.engine.evaluate(self.net, tally, batches, self.group_heads)
        self.engine.flush()
        self.net.train(was)
        tallies = self.session.control.gather(tally)
        return merge_tallies(tallies, self.net.k) if tallies is not None else None

    # -- the run -----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs on every rank; rank 0 returns the summary."""
        s, cfg = self.session, self.cfg
        ranks = s.control.gather(self._rank_info())
        if ranks is not None and self.epoch == 0 and self.run_dir is not None:
            runs.save_config(self.run_dir, self.run_cfg)
            env = runs.environment(str(s.device), s.threads)
            env.update(engine="pipeline", placement=self.run_cfg.engine.placement,
                       workers=s.world, backend=s.backend,
                       threads_per_worker=[r["threads"] for r in ranks], ranks=ranks)
            runs.write_json(self.run_dir / "env.json", env)
        start = time.perf_counter()
        while self.epoch < cfg.train.epochs:
            schedule_row = self.apply_schedule() if hasattr(self, "apply_schedule") else {}
            row = {"epoch": self.epoch + 1, **self.train_epoch(), **schedule_row}
            self.epoch += 1
            if self.epoch % cfg.train.eval_every == 0 or self.epoch == cfg.train.epochs:
                row.update(self.evaluate_pipeline() or {})
            if s.first:
                self.history.append(row)
                self._log(row)
            self.record(row)
        self.engine.close()
        seconds = time.perf_counter() - start
        final = s.control.gather((self.shard_state(), peak_rss_bytes()))
        if final is None:
            return {}
        # rank 0 takes every rank's trained stages: summaries and probes see the whole net
        self.net.load_state_dict(self.merged_state([f[0] for f in final])["net"])
        self.net.to(self.device)
        rss = [f[1] for f in final]
        out = self.summary(seconds)
        eff = [r["pipeline_efficiency"] for r in self.history if "pipeline_efficiency" in r]
        out.update(peak_rss=max(rss), workers=s.world, backend=s.backend,
                   placement=self.run_cfg.engine.placement,
                   threads_per_worker=[r["threads"] for r in ranks or []],
                   pipeline_efficiency=sum(eff) / len(eff) if eff else None)
        if is_self_supervised(self.net) and self.run_dir is not None:  # as `train.run` does
            result = probe_net(self.net, self.data, device=self.device)
            out.update(result)
            record_probe(self.run_dir, result)
        if self.run_dir is not None:
            runs.write_json(self.run_dir / "summary.json", out)
        return out

    def _rank_info(self) -> dict[str, Any]:
        s = self.session
        return {"rank": s.rank, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(s.device), "threads": s.threads,
                "stages": [k + 1 for k in s.stages], **self.rank_place()}

    def rank_place(self) -> dict[str, Any]:
        """More about what this rank holds, for env.json (the group trainer names its group)."""
        return {}

    def _log(self, row: dict[str, Any]) -> None:
        if not self.cfg.train.progress:
            return
        times = "/".join(f"{t:.2f}" for t in row["stage_seconds"])
        idle = "/".join(f"{100 * t:.0f}%" for t in row["stage_idle"])
        acc = f" | final acc {row['final_acc']:.2f}%" if row.get("final_acc") is not None else ""
        print(f"epoch {row['epoch']}: {row['samples_per_s']:.0f} samples/s | stage s {times} | "
              f"idle {idle} | efficiency {100 * row['pipeline_efficiency']:.0f}%{acc}", flush=True)

    # -- checkpoints -------------------------------------------------------------------
    def record(self, row: dict[str, Any]) -> None:
        """Every rank saves its stages; rank 0 writes metrics, the merged checkpoint and plots."""
        s = self.session
        shard = self.shard_state() if self.cfg.train.checkpoint else None
        if shard is not None:
            runs.save_checkpoint(shard_path(self.folder, s.rank), shard)
        shards = s.control.gather(shard)
        if shards is None or self.run_dir is None:
            return
        runs.append_metrics(self.run_dir, row)
        if shard is not None:
            runs.save_checkpoint(self.run_dir / runs.CHECKPOINT, self.merged_state(shards))
        runs.plot_curves(self.run_dir)

    def shard_state(self) -> dict[str, Any]:
        """This rank's stages, their optimizers and schedules, and its random state."""
        own = list(self.engine.stages)
        return {"config": to_dict(self.run_cfg), "epoch": self.epoch, "rank": self.session.rank,
                "stages": own, **self.own_weights(),
                "optimizers": [_to_cpu(self.optimizers[k].state_dict()) for k in own],
                "schedulers": [self.schedulers[k].state_dict() for k in own],
                "rng": torch.get_rng_state(), "generator": self.generator.get_state()}

    def own_weights(self) -> dict[str, Any]:
        """The weights this rank trains, as saved in its shard."""
        prefixes = tuple(f"stages.{k}." for k in self.engine.stages)
        return {"net": {n: t.detach().cpu() for n, t in self.net.state_dict().items()
                        if n.startswith(prefixes)}}

    def merged_state(self, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The single-process checkpoint (:meth:`Trainer.state_dict`) from every rank's shard."""
        state = super().state_dict()
        net: dict[str, torch.Tensor] = {}
        for sh in shards:
            net.update(sh["net"])
            for k, opt, sched in zip(sh["stages"], sh["optimizers"], sh["schedulers"]):
                state["optimizers"][k], state["schedulers"][k] = opt, sched
        state["net"] = {name: net[name] for name in state["net"]}  # the standard key order
        state["config"] = to_dict(self.run_cfg)
        return state

    def restore(self) -> None:
        """Resume every rank from the run folder: its own shard if it matches, else rank 0's merged checkpoint."""
        s = self.session
        merged = runs.load_checkpoint(self.folder) if s.first else None
        epoch = s.control.broadcast(merged["epoch"] if merged is not None else None)
        shard = self._own_shard(epoch)
        missing = s.control.all_gather(shard is None)
        parts = None
        if merged is not None:
            parts = [self.part_of(merged, r) if missing[r] else None for r in range(s.world)]
        received = s.control.scatter(parts)
        self.load_part(shard if shard is not None else received)
        if merged is not None:  # rank 0 keeps every schedule in step (it logs the last stage's LR)
            for sched, state in zip(self.schedulers, merged["schedulers"]):
                sched.load_state_dict(state)
            self.generator.set_state(merged["generator"])
            self.history = list(merged["history"])
            runs.truncate_metrics(self.folder, epoch)
            runs.save_config(self.folder, self.run_cfg)  # train.epochs may have been raised
        self.epoch = epoch

    def _own_shard(self, epoch: int) -> dict[str, Any] | None:
        path = shard_path(self.folder, self.session.rank)
        try:
            shard = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # missing or unreadable: rank 0 sends this rank's part instead
            return None
        ok = shard.get("epoch") == epoch and self.shard_fits(shard)
        return shard if ok else None

    def shard_fits(self, shard: dict[str, Any]) -> bool:
        """True if a saved shard holds what this rank trains."""
        return shard.get("stages") == list(self.engine.stages)

    def part_of(self, state: dict[str, Any], rank: int) -> dict[str, Any]:
        """The shard of rank ``rank`` cut from a merged checkpoint (rank 0)."""
        return _part_of(state, self.session.ranges[rank])

    def load_weights(self, part: dict[str, Any]) -> None:
        """Load the weights of a shard into what this rank trains."""
        result = self.net.load_state_dict(part["net"], strict=False)
        own = tuple(f"stages.{k}." for k in self.engine.stages)
        lost = [n for n in result.missing_keys if n.startswith(own)]
        if lost or result.unexpected_keys:
            raise TrainingError(f"the checkpoint does not fit stages {list(self.engine.stages)}: "
                                f"missing {lost[:3]}, unexpected {result.unexpected_keys[:3]}")

    def load_part(self, part: dict[str, Any]) -> None:
        self.load_weights(part)
        for k, opt, sched in zip(self.engine.stages, part["optimizers"], part["schedulers"]):
            self.optimizers[k].load_state_dict(opt)
            self.schedulers[k].load_state_dict(sched)
        torch.set_rng_state(part["rng"])
        self.generator.set_state(part["generator"])


def shard_path(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` saves its stages inside a run folder."""
    return Path(run_dir) / "ranks" / f"rank{rank}.pt"


def _part_of(state: dict[str, Any], stages: range) -> dict[str, Any]:
    """The shard of ``stages`` cut from a merged checkpoint."""
    prefixes = tuple(f"stages.{k}." for k in stages)
    return {"net": {n: t for n, t in state["net"].items() if n.startswith(prefixes)},
            "optimizers": [state["optimizers"][k] for k in stages],
            "schedulers": [state["schedulers"][k] for k in stages],
            "rng": state["rng"], "generator": state["generator"]}


def _to_cpu(obj: Any) -> Any:
    """Tensors of a nested state dict moved to the CPU (to gather and save them)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
