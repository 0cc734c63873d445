"""Starting the pipeline's workers: on this machine by itself, or under torchrun.

``locallearn train ... engine=pipeline engine.workers=W`` starts W worker processes
under torch's elastic agent (``elastic_launch``, c10d rendezvous on a free local port)::

    launcher (agent) ──► rank 0 (data, stages 1..)  ──►  rank 1  ──►  …  ──►  rank W-1
        │                    ╰── each writes ranks/rank<r>.pt; rank 0 the run folder
        ╰── waits; when one worker fails the agent stops the others, restarts the group
            (``engine.max_restarts``) or raises PipelineError naming the rank to blame

With ``engine.placement=groups`` (and ``split.groups=G``) there are K x G workers, one
per (stage, group) node (:mod:`locallearn.distributed.group_worker`).

Under ``torchrun --nnodes N --nproc-per-node M -m locallearn train ...`` every process
is already a worker: rank, world size and rendezvous come from torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and torchrun
is the launcher that watches them.

Each worker sets ``torch.set_num_threads(engine.threads or cores // workers-per-node)``,
picks its device (``engine.devices``, default ``cuda:<local rank>`` when CUDA is
available, else the CPU) and joins two process groups: *control* (gloo, for set-up,
metrics and checkpoints) and *data* (NCCL when every rank has a GPU, else gloo) for
the activations. Every wait has ``engine.timeout``, so no worker waits forever for a
dead or frozen peer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from locallearn import runs
from locallearn.build import build_net
from locallearn.config import EngineConfig, RunConfig
from locallearn.distributed import under_torchrun
from locallearn.distributed.comm import Control, Inbox, Outbox, PeerError, name_hosts
from locallearn.distributed.faults import PipelineError, describe_failure, error_text, write_report
from locallearn.distributed.group_worker import build_group_trainer
from locallearn.distributed.wire import WireError
from locallearn.distributed.worker import Setup, data_spec, placeholder_data, prepare
from locallearn.engines.base import StageUpdate
from locallearn.engines.pipeline import PipelineEngine, assign_stages
from locallearn.errors import ConfigError, UserError
from locallearn.loop import Placement, Trainer
from locallearn.precision import resolve_config


@dataclass(frozen=True)
class WorkerEnv:
    """A worker's place in the job and how to reach the others."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    init_method: str = "env://"

    @classmethod
    def from_environ(cls) -> WorkerEnv:
        """Read torchrun's environment variables."""
        e = os.environ
        world = int(e["WORLD_SIZE"])
        return cls(int(e["RANK"]), world, int(e.get("LOCAL_RANK", e["RANK"])),
                   int(e.get("LOCAL_WORLD_SIZE", world)))


# -- the launcher -----------------------------------------------------------------------

def run_pipeline(cfg: RunConfig, resume: str | Path | None = None,
                 run_dir: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Train with ``engine: pipeline``: spawn the workers here, or be one under torchrun.

    Args:
        cfg: the run's config.
        resume: the run folder to continue, if any.
        run_dir: the run folder (made by the caller; under torchrun rank 0 makes it).

    Returns:
        The run summary (empty on ranks other than 0 under torchrun) and the run folder.

    Raises:
        PipelineError: if a worker fails (the message names it).
        ConfigError: for a config the pipeline cannot run.
    """
    if under_torchrun():
        return _torchrun_worker(cfg, resume)
    assert run_dir is not None, "the launcher is given the run folder"
    if cfg.engine.name != "pipeline":
        raise ConfigError(f"run {run_dir} uses engine={cfg.engine.name}, not pipeline")
    try:  # fail here, not in W processes (placement=groups is checked by the config)
        if cfg.engine.placement == "stages":
            assign_stages(cfg.split.k, cfg.engine.workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    spawn_workers(cfg, resume, run_dir)
    return json.loads((run_dir / "summary.json").read_text()), run_dir


@dataclass
class Shipped:
    """A net the user built in Python, shipped to the workers (pickled once, whole).

    The net and its optimizers travel in one pickle, so the optimizers keep pointing at
    the net's parameters; rank 0 also gets the data (or the user's batches), the other
    ranks only the data's shape.
    """

    net: Any
    optimizers: Any
    data: Any
    spec: dict[str, Any]
    train_data: Any


def train_in_workers(net: Any, data: Any, cfg: RunConfig, run_dir: Path | None = None,
                     **options: Any) -> dict[str, Any]:
    """Train a net built in Python on ``cfg.engine.workers`` worker processes.

    Each rank trains the stages the config places on it, exactly as a run from a
    config does; the trained weights (and optimizer states) come back into ``net``.

    Returns:
        The run summary.

    Raises:
        ConfigError: if something cannot be shipped to the workers (names it and why).
        PipelineError: if a worker fails.
    """
    unknown = set(options) - {"optimizers", "train_data"}
    if unknown:
        raise ConfigError(f"engine=pipeline starts its own workers: {sorted(unknown)} cannot be "
                          f"given to Trainer with it")
    if cfg.engine.placement != "stages":
        raise ConfigError("a net built in Python trains on the pipeline with "
                          "engine.placement=stages; placement=groups builds its nodes from a "
                          "registered model (use ll.run(cfg))")
    try:
        assign_stages(net.k, cfg.engine.workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ship = Shipped(net, options.get("optimizers"), data, data_spec(data), options.get("train_data"))
    check_shippable(ship)
    keep = run_dir is not None
    folder = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="locallearn-run-"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint=True))
    try:
        spawn_workers(cfg, None, folder, ship=ship)
        state = runs.load_checkpoint(folder)
        net.load_state_dict(state["net"])
        for opt, s in zip(options.get("optimizers") or [], state["optimizers"]):
            opt.load_state_dict(s)
        return json.loads((folder / "summary.json").read_text())
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


def check_shippable(ship: Shipped) -> None:
    """Refuse, naming it, what cannot be pickled to a worker process.

    Raises:
        ConfigError: naming the object and the reason (e.g. a class defined inside a
            function, or a lambda).
    """
    for what, obj in (("the net", ship.net), ("the optimizers", ship.optimizers),
                      ("the training batches", ship.train_data)):
        try:
            pickle.dumps(obj)
        except Exception as e:
            raise ConfigError(
                f"engine=pipeline cannot ship {what} to its worker processes: {e}. Workers "
                f"receive the net by pickling, so define your modules at module level of a "
                f"script or module (not inside a function, no lambdas), or train with "
                f"engine=local") from None


def spawn_workers(cfg: RunConfig, resume: str | Path | None, run_dir: Path,
                  ship: Shipped | None = None) -> None:
    """Start ``cfg.engine.workers x engine.replicas`` workers on this machine under torch's
    elastic agent and wait for all of them.

    The agent (``torch.distributed.launcher.api.elastic_launch``, c10d rendezvous on a free
    local port) starts the workers from a fork server, records each one's error in its
    error file (``@record``) and, on a failure, stops the others. With
    ``engine.max_restarts=N`` it then restarts the whole group up to N times; every restart
    continues from the run folder's last checkpoint (:func:`_elastic_worker`), so the run
    finishes by itself. (A hand-written launcher did this before; on a quiet machine both
    start and stop a tiny run in 1.9 s: benchmarks/pipeline_throughput/launch.md.)

    Args:
        ship: a net built in Python to train (default: each rank builds the config's).

    Raises:
        PipelineError: if a worker fails (once the restarts are used up), naming the rank
            to blame, its stage and the checkpoint to resume from.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    world = cfg.engine.workers * cfg.engine.replicas
    reports = Path(tempfile.mkdtemp(prefix="locallearn-ranks-"))
    method = worker_context().get_start_method()  # a fork server that preloads torch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world,
                          run_id=f"locallearn-{os.getpid()}", rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{free_port()}",
                          max_restarts=cfg.engine.max_restarts, monitor_interval=0.2,
                          start_method=method)
    levels = _quiet_agent()  # its warnings and tracebacks: the launcher says it in one line
    try:
        elastic_launch(config, _elastic_worker)(cfg, resume, str(run_dir), str(reports), ship,
                                                dict(os.environ))
    except SignalException as e:  # the agent has stopped the workers by now
        if e.sigval == signal.SIGINT:  # Ctrl-C: the caller says what was saved
            raise KeyboardInterrupt from None
        raise PipelineError(f"the launcher got signal {e.sigval.name}; its workers were "
                            f"stopped (resume with: locallearn train --resume {run_dir})") from None
    except ChildFailedError as e:
        attempt = max((int(p.name[7:]) for p in reports.glob("attempt*")), default=0)
        last = reports / f"attempt{attempt}"
        found = {r: json.loads((last / f"rank{r}.json").read_text())
                 for r in range(world) if (last / f"rank{r}.json").is_file()}
        codes: list[int | None] = [e.failures[r].exitcode if r in e.failures else 0
                                   for r in range(world)]
        died = {r: float(f.timestamp) for r, f in e.failures.items()}
        raise PipelineError(describe_failure(codes, died, set(), found, cfg, run_dir)) from None
    finally:
        for log, level in levels.items():
            log.setLevel(level)
        shutil.rmtree(reports, ignore_errors=True)


def _quiet_agent() -> dict[logging.Logger, int]:
    """Silence the elastic agent's loggers (each sets its own level); returns their levels."""
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend  # noqa: F401 (its loggers)
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous  # noqa: F401

    logs = [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
            if name.startswith("torch.distributed.elastic")]
    levels = {log: log.level for log in logs}
    for log in logs:
        log.setLevel(logging.CRITICAL)
    return levels


PEER_WAIT = 1.0  # s a worker whose peer failed waits before failing itself (5 agent polls)
# what the elastic agent sets for each worker (kept over the launcher's environment)
AGENT_VARS = ("RANK", "LOCAL_", "WORLD_", "GROUP_", "ROLE_", "MASTER_", "TORCHELASTIC_",
              "TORCH_NCCL_", "OMP_NUM_THREADS")


@record
def _elastic_worker(cfg: RunConfig, resume: str | None, run_dir: str, reports: str,
                    ship: Shipped | None, environ: dict[str, str] | None = None) -> None:
    """A worker started by the elastic agent; a restarted one continues from the checkpoint.

    ``environ``: the launcher's environment at the launch (a fork server's own is that of
    its start); the agent's variables (RANK, MASTER_ADDR, ...) are kept over it.
    """
    if environ is not None:
        ours = {k: v for k, v in os.environ.items() if k.startswith(AGENT_VARS)}
        os.environ.clear()
        os.environ.update(environ)
        os.environ.update(ours)
    env = WorkerEnv.from_environ()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt and (Path(run_dir) / runs.CHECKPOINT).is_file():
        resume = run_dir
    report = Path(reports) / f"attempt{attempt}" / f"rank{env.rank}.json"
    try:
        run_worker(cfg, resume, Path(run_dir), env, _for_rank(ship, env.rank))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the launcher speaks
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent's own SIGINT follows
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # without a traceback (checkpoints are written whole by now)
    except BaseException as e:
        report.parent.mkdir(parents=True, exist_ok=True)
        write_report(report, env.rank, e)
        if isinstance(e, PeerError):  # a consequence: the failed peer prints the cause
            print(f"pipeline worker rank {env.rank}: {e}", file=sys.stderr)
            # the agent reports the first failure it polls: let a peer that died (exit code,
            # signal) be seen first, so the message blames it with its own exit
            time.sleep(PEER_WAIT)
        elif not isinstance(e, UserError) or isinstance(e, WireError):
            traceback.print_exc()  # user errors (bad config, data, model) are the launcher's one line
        raise


def _for_rank(ship: Shipped | None, rank: int) -> Shipped | None:
    """What rank ``rank`` gets of a shipped net: rank 0 the data, the others its shape."""
    if ship is None or rank == 0:
        return ship
    return dataclasses.replace(ship, data=None, train_data=None)


def worker_context() -> Any:
    """Processes forked from a server that has imported torch and locallearn once.

    Starting a worker then costs milliseconds instead of seconds of imports (the
    server lives as long as the launcher, so repeated launches share it; workers
    take the launcher's environment of the moment, see ``_elastic_worker``). Where
    ``forkserver`` does not exist, workers are spawned.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["locallearn.distributed.launch", "torch._dynamo"])
    return ctx


def free_port() -> int:
    """A TCP port that is free on this machine right now (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_worker(cfg: RunConfig, resume: str | Path | None) -> tuple[dict[str, Any], Path]:
    env = WorkerEnv.from_environ()
    try:
        run_dir = None
        if env.rank == 0:  # under torchrun rank 0 makes the run folder
            run_dir = Path(resume) if resume is not None else runs.new_run_dir(cfg)
        return run_worker(cfg, resume, run_dir, env)
    except (ConfigError, PipelineError):
        raise
    except BaseException as e:
        traceback.print_exc()
        raise PipelineError(f"pipeline worker rank {env.rank} ({socket.gethostname()}) failed: "
                            f"{error_text(e)}") from e


def run_worker(cfg: RunConfig, resume: str | Path | None, run_dir: Path | None,
               env: WorkerEnv, ship: Shipped | None = None) -> tuple[dict[str, Any], Path]:
    """Everything one worker does: join the groups, set up, train, leave.

    Args:
        cfg: the run config (rank 0's is the one used; see :func:`prepare`).
        resume: the run folder to continue, if any.
        run_dir: the run folder (rank 0 always has it; other ranks under torchrun do not).
        env: this worker's rank and rendezvous.
        ship: a net built in Python (default: build the config's model).
    """
    set_threads(cfg.engine.threads, env.local_world)
    tqdm.set_lock(threading.RLock())  # not tqdm's default process lock: workers end by os._exit
    device = pick_device(cfg.engine, env.rank, env.local_rank, env.world)
    timeout = timedelta(seconds=cfg.engine.timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt not in (None, "0"):  # a restarted group: keys of the last attempt are in the store
        store = dist.PrefixStore(f"locallearn/attempt{attempt}", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timeout))
        dist.init_process_group("gloo", store=store, rank=env.rank, world_size=env.world,
                                timeout=timeout)
    else:
        dist.init_process_group("gloo", init_method=env.init_method, rank=env.rank,
                                world_size=env.world, timeout=timeout)
    control = Control(dist.group.WORLD, env.rank, env.world)
    name_hosts(control.all_gather(socket.gethostname()))  # failures name the peer's host
    backend = choose_backend(cfg.engine.backend, device, control)
    data_group = dist.new_group(backend=backend, timeout=timeout)
    data = None
    if ship is not None:
        setup = Setup(cfg, str(run_dir), torch.get_rng_state(), ship.spec)
        data = ship.data
    elif env.rank == 0:
        assert run_dir is not None
        setup, data = prepare(cfg, run_dir)
        control.broadcast(setup)
    else:
        setup = control.broadcast()
    trainer: Trainer
    if setup.cfg.engine.placement == "groups":
        trainer = build_group_trainer(setup, data, env.rank, env.world, device, backend,
                                      control, data_group, timeout)
    else:
        trainer = build_trainer(setup, data, env, device, control, data_group, ship)
    if resume is not None:
        trainer.restore()
    summary = trainer.fit()
    control.barrier()
    dist.destroy_process_group()
    return summary, Path(setup.run_dir)


def build_trainer(setup: Setup, data: Any, env: WorkerEnv, device: torch.device,
                  control: Control, data_group: Any, ship: Shipped | None = None) -> Trainer:
    """Build this rank's network, links, engine and trainer from rank 0's set-up."""
    cfg = setup.cfg
    if ship is not None:
        net = ship.net
    else:
        torch.set_rng_state(setup.rng)  # every rank initialises the net as one process would
        net = build_net(cfg, data if data is not None else placeholder_data(setup.data))
    data = data if data is not None else placeholder_data(setup.data)
    e = cfg.engine
    if env.world % e.replicas:
        raise ConfigError(f"engine.replicas={e.replicas} copies of every worker need a world size "
                          f"that is a multiple of {e.replicas}, not {env.world}")
    workers, replicas = env.world // e.replicas, e.replicas
    d, w = divmod(env.rank, workers)  # replica d of worker w; replica 0 is ranks 0..W-1
    ranges = assign_stages(net.k, workers)
    replica_groups = [dist.new_group([r * workers + j for r in range(replicas)])
                      for j in range(workers)] if replicas > 1 else [None] * workers
    wire = device if data_group_backend(data_group) == "nccl" else torch.device("cpu")

    def inbox(src: int) -> Inbox:
        return Inbox(src, data_group, wire, device, e.queue, e.timeout)

    def outbox(dst: int) -> Outbox:
        return Outbox(dst, data_group, wire, e.queue, e.timeout)

    mine = ranges[w]
    needs = {j for k in range(mine.stop, net.k) for j in net.needs(k)} if net.needs_trail else set()
    update = StageUpdate(resolve_config(cfg.train, device))
    engine = PipelineEngine(
        mine, inbox(env.rank - 1) if w else None,
        outbox(env.rank + 1) if w < workers - 1 else None, e.micro_batches, sorted(needs),
        device, update, control, e.share_every, replicas=replicas, replica=d,
        replica_group=replica_groups[w],
        shard_out=[outbox(r * workers) for r in range(1, replicas)] if env.rank == 0 else [],
        shard_in=inbox(0) if w == 0 and d > 0 else None)
    return Trainer(net, data, cfg, Path(setup.run_dir), engine,
                   optimizers=ship.optimizers if ship is not None else None,
                   train_data=ship.train_data if ship is not None else None,
                   comm=control, placement=Placement(mine, [ranges[r % workers]
                                                            for r in range(env.world)], d == 0),
                   device=device)


def data_group_backend(group: Any) -> str:
    """The backend name of a process group (``nccl`` or ``gloo``)."""
    return str(dist.get_backend(group))


def set_threads(requested: int, workers_here: int) -> int:
    """Set and return this worker's torch threads: ``requested``, else cores // workers here."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    n = requested or max(1, cores // max(1, workers_here))
    torch.set_num_threads(n)
    return n


def pick_device(e: EngineConfig, rank: int, local_rank: int, world: int) -> torch.device:
    """This rank's device: ``engine.devices[rank]`` (or the one entry for all), else
    ``engine.device`` unless it is the default ``cpu``, else ``cuda:<local rank>`` when
    CUDA is available, else the CPU. A bare ``cuda`` means ``cuda:<local rank>``.

    Raises:
        ConfigError: if ``engine.devices`` lists neither one device nor one per worker.
    """
    devices = list(e.devices)
    if devices and len(devices) not in (1, world):
        raise ConfigError(f"engine.devices lists {len(devices)} devices for {world} workers: "
                          f"give one for all or one per worker")
    name = str(devices[rank] if len(devices) > 1 else devices[0]) if devices else (
        e.device if e.device != "cpu" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "cuda":
        name = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def choose_backend(requested: str, device: torch.device, control: Control) -> str:
    """NCCL if every rank has a GPU (``auto``), else gloo; check an explicit choice.

    Raises:
        ConfigError: for ``nccl`` when some rank has no GPU.
    """
    gpus = control.all_gather(device.type == "cuda")
    if requested == "nccl" and not all(gpus):
        without = [r for r, g in enumerate(gpus) if not g]
        raise ConfigError(f"engine.backend=nccl needs a GPU on every rank, but ranks {without} "
                          f"have none; use engine.backend=gloo or auto")
    if requested == "auto":
        return "nccl" if all(gpus) and dist.is_nccl_available() else "gloo"
    return requested
