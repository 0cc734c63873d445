"""Reproduce the field's reference table (the InfoPro protocol) as a resumable matrix of runs.

A *protocol* (data, below) names a recipe and a matrix of (model, method, K, seed) cells.
Every cell is an ordinary run folder made by the library's own CLI in a subprocess::

    python -m locallearn train <protocol, method and cell overrides> \\
        train.name=<model>-<method>-k<K>-s<seed> train.out_dir=benchmarks/reproduce/runs/<protocol>

so anything the driver reports can be re-checked with ``locallearn compare`` or ``eval``.
The matrix is advanced in as many sittings as needed: a run whose ``summary.json`` holds
the planned epochs is *done* and skipped; a run folder with a checkpoint and no such
summary is *interrupted* and continued with ``locallearn train --resume <folder>``; a folder
without a checkpoint (killed in its first epoch) is removed and started again. While a run
trains, ``<name>.pid`` beside its folder holds the training process's id, so ``--status``
tells *running* from *interrupted*, and a second driver never starts a run twice.

Commands (see README.md)::

    python benchmarks/reproduce/run.py --protocol cpu --jobs 2          # advance the matrix
    python benchmarks/reproduce/run.py --protocol cpu --status          # done / running / left
    python benchmarks/reproduce/run.py --protocol cpu --dry-run         # print the commands
    python benchmarks/reproduce/run.py --protocol cpu --only dgl/4/0 'man/*/*'
    python benchmarks/reproduce/run.py --report                         # results.json, .md, .png
    python benchmarks/reproduce/run.py --protocol cpu --measure 20      # time 20 steps per cell

Before a run starts its overrides are validated in-process (unknown keys, objectives and
heads that the library does not register are refused with one line naming the method).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs"
DATA_DIR = Path(os.environ.get("LOCALLEARN_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()
REPORTED = ("cpu", "full")  # protocols collected into results.json / results.md (not smoke)


def _fast_defaults() -> tuple[str, ...]:
    """``train.precision=auto`` where the library has the key (issue 13); else fp32 as before.
    Each run's config.yaml records what it used."""
    from dataclasses import fields

    from locallearn.config import TrainConfig

    return ("train.precision=auto",) if "precision" in {f.name for f in fields(TrainConfig)} else ()


# -- methods: name -> library overrides (the K-independent part) -------------------------------
# Each method is a configuration of stages x objectives x engines, written out here (not read
# from its preset) so a protocol's runs do not change when a preset's recipe does; the preset
# each follows is named, and tests/test_reproduce.py checks the objective section against it.
# `check_method` refuses any method whose keys, objective or head this library lacks.
METHODS: dict[str, tuple[str, ...]] = {
    "bp": ("engine=backprop", "engine.aux_heads=false"),
    "greedy": ("engine=local", "objective=ce", "objective.head=0c1f"),  # CE heads, no tricks
    "dgl": ("engine=local", "objective=ce", "objective.head=1c2f"),     # cifar10_resnet32_dgl
    # infopro_resnet32_contrast / _softmax: reconstruction + SupCon or CE, lambda schedules
    "infopro": ("engine=local", "objective=infopro", "objective.head=1c2f",
                "objective.options={variant: contrast}"),
    "infopro_softmax": ("engine=local", "objective=infopro", "objective.head=1c2f",
                        "objective.options={variant: softmax}"),
    # contsup_resnet32_cifar10 uses R1E; the matrix asks for context E (image encoder)
    "contsup": ("engine=local", "objective=ce", "objective.head=1c2f", "context=E"),
    # auglocal_resnet32_cifar10: later blocks as auxiliary nets, depth 3 falling to 1
    "auglocal": ("engine=local", "objective=auglocal", "objective.head=0c1f",
                 "objective.options={depth: 3, min_depth: 1}"),
    # man_resnet32_cifar10: 1c2f heads behind an EMA copy of the next stage's first block
    "man": ("engine=local", "objective=ce", "objective.head=1c2f",
            "objective.options={momentum_aux: 0.995}"),
    # gndgl_resnet32_cifar10 (there at K=1, default heads): G=2, stop-gradient + diversity,
    # here with DGL's 1c2f heads so that it differs from dgl by the groups only
    "gndgl": ("engine=local", "objective=ce", "objective.head=1c2f", "split.groups=2",
              "objective.detach_ratio=1.0", "objective.diversity_weight=0.5"),
}
PRESETS = {"dgl": "cifar10_resnet32_dgl", "infopro": "infopro_resnet32_contrast",
           "infopro_softmax": "infopro_resnet32_softmax", "auglocal": "auglocal_resnet32_cifar10",
           "man": "man_resnet32_cifar10"}  # configs/<name>.yaml with the same objective section


def method_overrides(method: str, k: int, methods: Mapping[str, tuple[str, ...]] = METHODS,
                     split_by: str = "memory") -> list[str]:
    """The overrides of ``method`` at K stages (BP is one stage; local methods cut by
    ``split_by``, memory-balanced as InfoPro's)."""
    if method not in methods:
        raise SystemExit(f"unknown method {method!r}; choose one of: {', '.join(methods)}")
    split = ["split.k=1"] if method == "bp" else [f"split.k={k}", f"split.by={split_by}"]
    return [*methods[method], *split]


# -- protocols ---------------------------------------------------------------------------------
def _sgd(lr: float) -> tuple[str, ...]:
    """InfoPro's optimizer: SGD, Nesterov momentum 0.9, weight decay 1e-4, cosine to 0."""
    return ("optim=sgd", f"optim.lr={lr:g}", "optim.momentum=0.9", "optim.nesterov=true",
            "optim.weight_decay=1e-4", "optim.schedule=cosine")


def _cells(methods: Sequence[str], ks: Sequence[int]) -> tuple[tuple[str, int], ...]:
    """BP once (K=1), every other method at every K."""
    return tuple([("bp", 1)] * ("bp" in methods)
                 + [(m, k) for m in methods if m != "bp" for k in ks])


@dataclass(frozen=True)
class Protocol:
    """A recipe and its matrix: every (model, cell, seed) is one run."""

    name: str
    about: str
    models: tuple[str, ...]
    width: float | None             # channel multiplier of the model (None: no width option)
    epochs: int
    batch: int
    lr: float
    cells: tuple[tuple[str, int], ...]  # (method, K)
    seeds: tuple[int, ...]
    data: tuple[str, ...] = ("data=cifar10", "data.augment=basic")  # basic: crop + flip
    optim: tuple[str, ...] = ()     # optimizer overrides besides lr (empty: InfoPro's SGD)
    extra: tuple[str, ...] = ()     # further overrides of every run
    methods: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: METHODS)
    split_by: str = "memory"        # how local methods place their K-1 cuts
    train_size: int = 50000         # training samples per epoch (for --measure's estimate)

    def overrides(self, model: str) -> list[str]:
        """Every override shared by this protocol's runs of ``model``."""
        width = [] if self.width is None else [f"model.options={{width: {self.width:g}}}"]
        optim = [*self.optim, f"optim.lr={self.lr:g}"] if self.optim else [*_sgd(self.lr)]
        return [f"model={model}", *width, *self.data, f"data.batch_size={self.batch}", *optim,
                f"train.epochs={self.epochs}", "train.eval_every=1", "train.progress=false",
                *self.extra]

    def method_overrides(self, method: str, k: int) -> list[str]:
        return method_overrides(method, k, self.methods, self.split_by)


ALL = tuple(METHODS)
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in [
    # InfoPro (Wang et al. 2021) §4 / appendix: 160 epochs, batch 1024, SGD lr 0.8 cosine,
    # Nesterov 0.9, wd 1e-4, crop + flip; 5 seeds. 2 models x 33 cells x 5 seeds = 330 runs.
    Protocol("full", "the InfoPro recipe at full budget (GPU)", ("resnet32", "resnet110"),
             width=1.0, epochs=160, batch=1024, lr=0.8, cells=_cells(ALL, (2, 4, 8, 16)),
             seeds=(0, 1, 2, 3, 4), extra=_fast_defaults()),
    # The same recipe scaled to ~8 h on 2 cores at 2 runs x 1 thread (README: how measured):
    # lr scaled linearly with the batch (0.8 x 128/1024 = 0.1). 22 runs.
    Protocol("cpu", "the InfoPro recipe scaled to 2 CPU cores", ("resnet32",),
             width=0.5, epochs=10, batch=128, lr=0.1,
             cells=_cells(("bp", "dgl", "infopro", "contsup", "auglocal", "man"), (4, 8)),
             seeds=(0, 1), extra=_fast_defaults()),
    # End-to-end check of the driver itself (seconds): 2 epochs so that a kill after the first
    # leaves a checkpoint to resume from.
    Protocol("smoke", "a seconds-long check of the driver", ("resnet32",), width=0.25,
             epochs=2, batch=32, lr=0.0125, cells=_cells(("bp", "dgl"), (2,)), seeds=(0,),
             data=("data=cifar10", "data.augment=basic", "data.train_subset=256",
                   "data.test_subset=128")),
]}


# -- the matrix --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One cell of a protocol's matrix at one seed."""

    protocol: Protocol = field(repr=False, compare=False)
    model: str
    method: str
    k: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.method}-k{self.k}-s{self.seed}"

    @property
    def cell(self) -> str:
        """The name without the seed: runs of one cell differ only by seed."""
        return f"{self.model}-{self.method}-k{self.k}"

    @property
    def key(self) -> str:
        """The ``--only`` form: METHOD/K/SEED (``matrix`` also accepts MODEL/METHOD/K/SEED)."""
        return f"{self.method}/{self.k}/{self.seed}"

    def folder(self, runs: Path = RUNS) -> Path:
        return runs / self.protocol.name / self.name

    def overrides(self, runs: Path = RUNS, threads: int = 1, device: str = "") -> list[str]:
        """Every override of a fresh start of this run."""
        out = [*self.protocol.overrides(self.model), *self.protocol.method_overrides(self.method, self.k),
               f"train.seed={self.seed}", f"train.name={self.name}",
               f"train.out_dir={runs / self.protocol.name}", f"data.data_dir={DATA_DIR}",
               f"engine.threads={threads}"]
        return out + ([f"engine.device={device}"] if device else [])


def matrix(protocol: Protocol, only: Sequence[str] = ()) -> list[Run]:
    """The protocol's runs (seed-major, so a partial matrix has every cell at seed 0 first),
    kept to those matching one of ``only`` (``METHOD/K/SEED`` or ``MODEL/METHOD/K/SEED``,
    shell wildcards allowed)."""
    runs = [Run(protocol, model, method, k, seed) for seed in protocol.seeds
            for model in protocol.models for method, k in protocol.cells]
    if not only:
        return runs
    return [r for r in runs if any(fnmatch.fnmatchcase(r.key, p)
                                   or fnmatch.fnmatchcase(f"{r.model}/{r.key}", p) for p in only)]


def _filter(only: Sequence[str]) -> Sequence[str]:
    bad = [p for p in only if p.count("/") not in (2, 3)]
    if bad:
        raise SystemExit(f"--only takes METHOD/K/SEED (or MODEL/METHOD/K/SEED), not {bad[0]!r}")
    return only


def check_method(method: str, protocol: Protocol | None = None, k: int = 4) -> None:
    """Refuse (SystemExit naming the method) a method the installed library cannot build."""
    from locallearn.config import ConfigError, load_config
    from locallearn.objectives import HEAD_KINDS, OBJECTIVES

    protocol = protocol or PROTOCOLS["cpu"]
    try:
        cfg = load_config(None, [*protocol.overrides(protocol.models[0]),
                                 *protocol.method_overrides(method, k)])
    except ConfigError as e:
        raise SystemExit(f"method {method!r} is not available in this locallearn: {e} "
                         f"(update METHODS in {Path(__file__).name} to the library's preset)") from e
    o = cfg.objective
    missing = ([f"objective {o.name!r}"] * (o.name not in OBJECTIVES)
               + [f"head {o.head!r}"] * (o.head not in HEAD_KINDS))
    if missing:
        raise SystemExit(f"method {method!r} needs {' and '.join(missing)}, which this locallearn "
                         f"does not register (`python -m locallearn list`); update METHODS in "
                         f"{Path(__file__).name} once it lands")


def check_protocol_keys(protocol: Protocol) -> None:
    """Refuse a protocol whose shared overrides name keys the library lacks."""
    from locallearn.config import ConfigError, load_config

    try:
        load_config(None, protocol.overrides(protocol.models[0]))
    except ConfigError as e:
        raise SystemExit(f"protocol {protocol.name!r}: {e}") from e


# -- run folders: state, times, results --------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def metrics(folder: Path) -> list[dict[str, Any]]:
    """The epoch rows of a run folder (a half-written last line is ignored)."""
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def _alive(pid: int, name: str) -> bool:
    """True if process ``pid`` runs and its command line names ``name`` (not a reused pid)."""
    try:
        return name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def pid_alive(folder: Path) -> int | None:
    """The pid of the process training ``folder``, if alive: from the driver's ``<name>.pid``
    beside it, or from the library's own ``.lock`` inside it ("pid N on HOST")."""
    for path, word in ((folder.with_name(folder.name + ".pid"), 0), (folder / ".lock", 1)):
        try:
            pid = int(path.read_text().split()[word])
        except (OSError, ValueError, IndexError):
            continue
        if _alive(pid, folder.name):
            return pid
    return None


def state(run: Run, runs: Path = RUNS) -> str:
    """``done``, ``running``, ``interrupted`` (resumable), ``stale`` (no checkpoint) or ``left``."""
    folder = run.folder(runs)
    summary = _read_json(folder / "summary.json")
    if summary and summary.get("epochs", 0) >= run.protocol.epochs:
        return "done"
    if pid_alive(folder):
        return "running"
    if (folder / "checkpoint.pt").is_file():
        return "interrupted"
    return "stale" if folder.exists() else "left"


def train_seconds(folder: Path) -> float:
    """Machine time of a run's training epochs so far (sum of ``epoch_seconds``)."""
    return sum(r.get("epoch_seconds", 0.0) for r in metrics(folder))


def result_row(run: Run, runs: Path = RUNS) -> dict[str, Any] | None:
    """The results.json row of a finished run, or None."""
    folder = run.folder(runs)
    summary = _read_json(folder / "summary.json")
    if not summary:
        return None
    accs = [r["final_acc"] for r in metrics(folder) if r.get("final_acc") is not None]
    p = run.protocol
    return {"protocol": p.name, "model": run.model, "width": p.width, "epochs": summary["epochs"],
            "method": run.method, "k": run.k, "seed": run.seed,
            "final_acc": summary.get("final_acc"), "best_acc": max(accs, default=None),
            "train_seconds": summary.get("train_seconds"),
            "saved_bytes_peak": summary.get("saved_bytes_peak")}


def epoch_estimate(run: Run, runs: Path, finished: list[tuple[Run, float]],
                   measured: dict[str, float]) -> float | None:
    """Seconds per epoch expected of ``run``: its own epochs so far, else finished runs of the
    same model/method/K, same model/method, then ``--measure`` figures, then any finished run."""
    own = [r["epoch_seconds"] for r in metrics(run.folder(runs)) if "epoch_seconds" in r]
    if own:
        return sum(own) / len(own)
    for same in (lambda o: (o.model, o.method, o.k) == (run.model, run.method, run.k),
                 lambda o: (o.model, o.method) == (run.model, run.method)):
        times = [t for o, t in finished if same(o)]
        if times:
            return sum(times) / len(times)
    if run.cell in measured:
        return measured[run.cell]
    return sum(t for _, t in finished) / len(finished) if finished else None


def status(protocol: Protocol, only: Sequence[str] = (), runs: Path = RUNS,
           jobs: int = 1) -> dict[str, Any]:
    """Counts, per-run lines, machine time spent and still needed (see ``epoch_estimate``)."""
    plan = matrix(protocol, only)
    states = {r.name: state(r, runs) for r in plan}
    finished = [(r, train_seconds(r.folder(runs)) / max(len(metrics(r.folder(runs))), 1))
                for r in plan if states[r.name] == "done"]
    measured = _read_json(runs / protocol.name / "measure.json") or {}
    measured = {k: v["epoch_seconds"] for k, v in measured.get("cells", {}).items()}
    spent, needed, unknown, lines = 0.0, 0.0, 0, []
    for r in plan:
        folder, s = r.folder(runs), states[r.name]
        done_epochs = len(metrics(folder)) if s != "stale" else 0
        spent += train_seconds(folder)
        left = 0 if s == "done" else protocol.epochs - done_epochs
        per_epoch = epoch_estimate(r, runs, finished, measured) if left else 0.0
        if per_epoch is None:
            unknown += 1
        else:
            needed += left * per_epoch
        lines.append(f"  {r.name:<34} {s:<12} {done_epochs:>4}/{protocol.epochs} epochs  "
                     f"{duration(train_seconds(folder)):>8}")
    counts = {s: sum(v == s for v in states.values())
              for s in ("done", "running", "interrupted", "stale", "left")}
    return {"protocol": protocol.name, "runs": len(plan), "counts": counts, "lines": lines,
            "spent_seconds": spent, "needed_seconds": needed,
            "needed_wall_seconds": needed / max(jobs, 1), "unestimated": unknown}


def duration(seconds: float) -> str:
    """``2h05m``, ``14m`` or ``9s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 60)}m" if seconds >= 60 else f"{seconds:.0f}s"


def print_status(s: dict[str, Any], jobs: int) -> None:
    counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items() if n)
    print(f"protocol {s['protocol']}: {s['runs']} runs: {counts}")
    print("\n".join(s["lines"]))
    print(f"machine time spent: {duration(s['spent_seconds'])} of training epochs; still needed: "
          f"{duration(s['needed_seconds'])} (~{duration(s['needed_wall_seconds'])} wall at "
          f"{jobs} jobs)"
          + (f"; {s['unestimated']} runs not estimated (no finished run or --measure yet)"
             if s["unestimated"] else ""))


# -- launching ---------------------------------------------------------------------------------
def command(run: Run, runs: Path = RUNS, threads: int = 1, device: str = "") -> list[str]:
    """The CLI command that starts ``run`` afresh or continues it from its checkpoint."""
    base = [sys.executable, "-m", "locallearn", "train"]
    folder = run.folder(runs)
    if (folder / "checkpoint.pt").is_file():  # resumed runs keep their saved config, but the
        # data may have moved (another machine) and the threads are this invocation's
        return [*base, "--resume", str(folder), f"train.epochs={run.protocol.epochs}",
                f"data.data_dir={DATA_DIR}", f"engine.threads={threads}"]
    return [*base, *run.overrides(runs, threads, device)]


def start(run: Run, runs: Path, threads: int, device: str) -> subprocess.Popen[bytes]:
    """Start ``run`` in a subprocess (log beside its folder); a pid file marks it running."""
    folder = run.folder(runs)
    if folder.exists() and not (folder / "checkpoint.pt").is_file():
        shutil.rmtree(folder)  # killed before its first checkpoint: nothing to resume
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = open(folder.with_name(folder.name + ".log"), "ab")
    proc = subprocess.Popen(command(run, runs, threads, device), cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
    log.close()
    _pid_file(run, runs).write_text(f"{proc.pid}\n")
    return proc


def _default_sigint() -> None:
    """In the child before exec: let SIGINT reach it even when the driver runs in the
    background (where the shell starts it with SIGINT ignored, which children inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def advance(plan: list[Run], runs: Path, jobs: int, threads: int, device: str,
            after_each: Callable[[], None] | None = None) -> int:
    """Run what is not done or running, ``jobs`` at a time; returns the number of failures.

    Ctrl-C stops the running runs too (each keeps its last epoch's checkpoint) and exits 130.
    """
    todo = [r for r in plan if state(r, runs) in ("interrupted", "stale", "left")]
    print(f"{len(todo)} runs to train ({len(plan) - len(todo)} done or running)", flush=True)
    active: dict[subprocess.Popen[bytes], Run] = {}
    failures = 0
    try:
        while todo or active:
            while todo and len(active) < jobs:
                r = todo.pop(0)
                how = "resume" if (r.folder(runs) / "checkpoint.pt").is_file() else "fresh"
                print(f"start {r.name} ({how})", flush=True)
                active[start(r, runs, threads, device)] = r
            time.sleep(1.0)
            for proc in [p for p in active if p.poll() is not None]:
                r = active.pop(proc)
                _pid_file(r, runs).unlink(missing_ok=True)
                ok = proc.returncode == 0 and state(r, runs) == "done"
                failures += not ok
                print(f"{'done' if ok else 'FAILED'} {r.name} (exit {proc.returncode}; log "
                      f"{_pid_file(r, runs).with_suffix('.log')})", flush=True)
                if after_each:
                    after_each()
    except KeyboardInterrupt:
        print("interrupted: stopping the running runs (rerun the same command to resume)")
        _stop(active, runs)
        raise SystemExit(130) from None
    return failures


def _pid_file(run: Run, runs: Path) -> Path:
    return run.folder(runs).with_name(run.name + ".pid")


def _stop(active: dict[subprocess.Popen[bytes], Run], runs: Path) -> None:
    """Interrupt runs the terminal's Ctrl-C did not reach, wait for them, remove pid files."""
    time.sleep(2.0)
    for proc in active:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc, r in active.items():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _pid_file(r, runs).unlink(missing_ok=True)


def measure(protocol: Protocol, steps: int, only: Sequence[str], threads: int, device: str = "",
            budget_hours: float = 8.0, jobs: int = 2) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of each cell (seed 0) through the CLI; write measure.json.

    Each cell trains one epoch of ``steps x batch`` training images (so its ``epoch_seconds``
    is the time of ``steps`` steps, one of them under the saved-tensor meter), evaluated on 256
    test images, into ``runs/<protocol>-measure/``. On a shared machine a process gets only a
    share of its core: the step time is also given scaled by that share (the training process's
    CPU seconds over its wall seconds), the time it would take on a core of its own. Per-epoch
    figures scale the step to ``protocol.train_size`` samples; evaluation (about 7 % more) is not included.
    """
    scratch = RUNS / f"{protocol.name}-measure"
    shutil.rmtree(scratch, ignore_errors=True)
    cells: dict[str, Any] = {}
    steps_per_epoch = math.ceil(protocol.train_size / protocol.batch)
    for run in [r for r in matrix(protocol, only) if r.seed == protocol.seeds[0]]:
        cmd = [sys.executable, "-m", "locallearn", "train", *run.overrides(scratch, threads, device),
               "train.epochs=1", "train.checkpoint=false", f"data.train_subset={steps * protocol.batch}",
               "data.test_subset=256"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = metrics(scratch / protocol.name / run.name)
        if done.returncode or not rows:
            print(f"{run.name}: failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            continue
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        share = 1.0 if device.startswith("cuda") else min(1.0, cpu / wall / threads)  # GPU: as is
        step = rows[0]["epoch_seconds"] / steps
        cells[run.cell] = {"step_seconds_measured": step, "cpu_share": share,
                           "step_seconds": step * share,
                           "epoch_seconds": step * share * steps_per_epoch}
        print(f"{run.cell}: {step:.3f} s/step at {100 * share:.0f} % of a core -> "
              f"{step * share:.3f} s/step on its own -> "
              f"{step * share * steps_per_epoch / 60:.1f} min/epoch", flush=True)
    per_epoch = sum(cells[r.cell]["epoch_seconds"] for r in matrix(protocol, only) if r.cell in cells)
    out = {"steps": steps, "threads": threads, "batch": protocol.batch, "epochs": protocol.epochs,
           "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average": os.getloadavg(), "cells": cells,
           "matrix_train_hours": per_epoch * protocol.epochs / 3600,
           f"epochs_in_{budget_hours:g}h_at_{jobs}_jobs": math.floor(budget_hours * 3600 * jobs
                                                                    / max(per_epoch, 1e-9)),
           "unmeasured_cells": sorted({r.cell for r in matrix(protocol, only)} - set(cells))}
    (RUNS / protocol.name).mkdir(parents=True, exist_ok=True)
    (RUNS / protocol.name / "measure.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"matrix at {protocol.epochs} epochs: {out['matrix_train_hours']:.1f} h of training "
          f"({out['matrix_train_hours'] / jobs:.1f} h wall at {jobs} jobs); "
          f"{out[f'epochs_in_{budget_hours:g}h_at_{jobs}_jobs']} epochs fit {budget_hours:g} h; "
          f"not measured: {out['unmeasured_cells'] or 'none'}")
    return out


# -- report ------------------------------------------------------------------------------------
# InfoPro (Wang et al., "Revisiting Locally Supervised Learning", ICLR 2021), Table 2: CIFAR-10
# test error (%), mean of 5 runs, 160 epochs; K = 2, 4, 8, 16. Shown as accuracy = 100 - error.
PUBLISHED_ERROR: dict[tuple[str, str], dict[int, float]] = {
    ("resnet32", "bp"): {1: 7.37},
    ("resnet32", "greedy"): {2: 10.30, 4: 16.07, 8: 21.19, 16: 24.59},
    ("resnet32", "dgl"): {2: 8.69, 4: 11.48, 8: 14.17, 16: 16.21},
    ("resnet32", "infopro_softmax"): {2: 8.13, 4: 8.64, 8: 11.40, 16: 14.23},
    ("resnet32", "infopro"): {2: 7.76, 4: 8.58, 8: 11.13, 16: 12.75},
    ("resnet110", "bp"): {1: 6.50},
    ("resnet110", "dgl"): {2: 7.70, 4: 10.50, 8: 12.46, 16: 13.80},
    ("resnet110", "infopro"): {2: 6.42, 4: 7.30, 8: 8.93, 16: 9.90},
}
OTHER_PUBLISHED = (
    "Not in InfoPro's table, and at other budgets, so not put beside our cells: MAN (Su et al., "
    "ECCV 2024) reports ResNet-32 K=16 error 9.11 with DGL+MAN vs E2E 6.37 at 400 epochs; "
    "AugLocal (Ma et al., ICLR 2024) ResNet-110 layer-wise 93.96% vs BP 94.61% at 400 epochs "
    "(both from secondary sources: check before quoting); GN-DGL (Patel et al. 2023) ResNet-32 "
    "G=2 K=1 about 91.4% vs BP about 93%.")


def published_acc(model: str, method: str, k: int) -> float | None:
    err = PUBLISHED_ERROR.get((model, method), {}).get(k)
    return None if err is None else round(100 - err, 2)


def collect(runs: Path = RUNS, protocols: Iterable[str] = REPORTED) -> list[dict[str, Any]]:
    """The results rows of every finished run of ``protocols``, in matrix order."""
    rows = []
    for name in protocols:
        for r in matrix(PROTOCOLS[name]):
            row = result_row(r, runs)
            if row is not None and row["epochs"] >= PROTOCOLS[name].epochs:
                rows.append(row)
    return rows


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], list[dict[str, Any]]]:
    """Rows by (protocol, model, method, K), in first-seen order."""
    out: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["protocol"], row["model"], row["method"], row["k"]), []).append(row)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """results.md: mean ± std per (method, K) beside InfoPro's Table 2, gaps to BP in points."""
    if not rows:
        return "# Reproduce: results\n\nNo run of the cpu or full protocol has finished yet.\n"
    groups = grouped(rows)
    out = ["# Reproduce: results", "",
           "CIFAR-10 test accuracy (%), mean ± std over seeds (n), final epoch; `best` is the "
           "best epoch's. Published: InfoPro (Wang et al., ICLR 2021) Table 2, 100 - error, "
           "160 epochs, batch 1024, full width, mean of 5 runs. Gaps are to BP of the same "
           "protocol and model, in points. Our CIFAR-10 is the JPEG re-encoding in shared/data.",
           ""]
    for protocol, model in dict.fromkeys((p, m) for p, m, _, _ in groups):
        bp = groups.get((protocol, model, "bp", 1))
        bp_mean = mean_std([r["final_acc"] for r in bp])[0] if bp else None
        p = PROTOCOLS[protocol]
        width = "" if p.width is None else f", width {p.width:g}"
        out += [f"## {protocol}: {model}{width}, {p.epochs} epochs, batch {p.batch}, lr {p.lr:g}", "",
                "| method | K | n | acc % | best % | gap to BP | published % | published gap "
                "| train h / run | saved act MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (pr, mo, method, k), rs in groups.items():
            if (pr, mo) != (protocol, model):
                continue
            mean, std = mean_std([r["final_acc"] for r in rs])
            spread = f" ± {std:.2f}" if len(rs) > 1 else ""
            best = mean_std([r["best_acc"] for r in rs if r["best_acc"] is not None] or [math.nan])[0]
            pub, pub_bp = published_acc(model, method, k), published_acc(model, "bp", 1)
            gap = "" if method == "bp" or bp_mean is None else f"{mean - bp_mean:+.2f}"
            pub_gap = "" if method == "bp" or pub is None or pub_bp is None else f"{pub - pub_bp:+.2f}"
            hours = mean_std([r["train_seconds"] / 3600 for r in rs])[0]
            saved = max((r["saved_bytes_peak"] or 0) for r in rs) / 2**20
            out.append(f"| {method} | {k} | {len(rs)} | {mean:.2f}{spread} | {best:.2f} | {gap} "
                       f"| {'' if pub is None else f'{pub:.2f}'} | {pub_gap} | {hours:.2f} "
                       f"| {saved:.1f} |")
        out += ["", f"![accuracy vs K]({plot_name(protocol, model)})", ""]
    return "\n".join(out + [OTHER_PUBLISHED, ""])


def plot_name(protocol: str, model: str) -> str:
    return f"acc_vs_k_{protocol}_{model}.png"


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One PNG per (protocol, model): accuracy vs K per method, BP and published dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    groups, paths = grouped(rows), []
    for protocol, model in dict.fromkeys((p, m) for p, m, _, _ in groups):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(m for p, mo, m, _ in groups if (p, mo) == (protocol, model)):
            cells = sorted((k, mean_std([r["final_acc"] for r in rs]))
                           for (p, mo, m, k), rs in groups.items()
                           if (p, mo, m) == (protocol, model, method))
            if method == "bp":
                ax.axhline(cells[0][1][0], color="black", label="bp (ours)")
                pub_bp = published_acc(model, "bp", 1)
                if pub_bp is not None:
                    ax.axhline(pub_bp, color="black", ls="--", alpha=0.6, label="bp (InfoPro T2)")
                continue
            line = ax.errorbar([k for k, _ in cells], [ms[0] for _, ms in cells],
                               yerr=[ms[1] for _, ms in cells], marker="o", capsize=3, label=method)
            pub = sorted(PUBLISHED_ERROR.get((model, method), {}).items())
            if pub:
                ax.plot([k for k, _ in pub], [100 - e for _, e in pub], ls="--",
                        color=line[0].get_color(), alpha=0.6, label=f"{method} (InfoPro T2)")
        ax.set(xscale="log", xlabel="K (stages)", ylabel="test accuracy (%)",
               title=f"{model}, protocol {protocol}")
        ax.set_xticks([2, 4, 8, 16], ["2", "4", "8", "16"])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / plot_name(protocol, model)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def report(runs: Path = RUNS, out_dir: Path = HERE, protocols: Iterable[str] = REPORTED) -> str:
    """Re-render results.json, results.md and the plots from the run folders."""
    rows = collect(runs, protocols)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = markdown(rows)
    (out_dir / "results.md").write_text(text)
    if rows:
        plot(rows, out_dir)
    return text


# -- command line ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="cpu")
    p.add_argument("--only", nargs="+", default=[], metavar="METHOD/K/SEED",
                   help="only these runs (shell wildcards, e.g. 'dgl/*/0'; MODEL/METHOD/K/SEED too)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=1, help="engine.threads of each run")
    p.add_argument("--device", default="auto",
                   help="engine.device of fresh runs (auto: cuda if torch sees a GPU, else cpu)")
    p.add_argument("--status", action="store_true", help="done, running, left; time spent and needed")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report", action="store_true", help="re-render results.* from the run folders")
    p.add_argument("--measure", type=int, default=0, metavar="STEPS",
                   help="time STEPS optimizer steps of each cell; write runs/<protocol>/measure.json")
    a = p.parse_args(argv)
    protocol = PROTOCOLS[a.protocol]
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else ""
    plan = matrix(protocol, _filter(a.only))
    smoke = protocol.name not in REPORTED  # its report stays in its (ignored) run folder

    def rerender() -> None:
        if smoke:
            report(RUNS, RUNS / protocol.name, [protocol.name])
        else:
            report()

    if a.report:
        rerender()
        print((RUNS / protocol.name / "results.md" if smoke else HERE / "results.md").read_text())
        return 0
    if a.status:
        print_status(status(protocol, a.only, jobs=a.jobs), a.jobs)
        return 0
    check_protocol_keys(protocol)
    for method in dict.fromkeys(r.method for r in plan):
        check_method(method, protocol)
    if a.measure:
        measure(protocol, a.measure, a.only, a.threads, a.device)
        return 0
    if a.dry_run:
        for r in plan:
            s = state(r)
            print(f"# {r.name}: {s}")
            if s not in ("done", "running"):
                print(" ".join(f"'{c}'" if " " in c or "{" in c else c
                               for c in command(r, threads=a.threads, device=a.device)))
        return 0
    # SIGTERM (`kill <pid>`) and SIGINT, even in the background, stop the runs like Ctrl-C
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    failures = advance(plan, RUNS, a.jobs, a.threads, a.device, rerender)
    rerender()
    print_status(status(protocol, a.only, jobs=a.jobs), a.jobs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
