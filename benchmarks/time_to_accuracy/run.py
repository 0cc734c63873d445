"""Time to accuracy: training seconds until CIFAR-10 test accuracy first reaches 80 % and 85 %.

ResNet-20 at full width, the fastest layout of each way of training it on this 2-core machine,
2 seeds each, one recipe (README.md: why this one)::

    bp        end-to-end BP, 1 process x 2 threads
    ddp       data-parallel BP, 2 ranks x 1 thread (engine=pipeline, split.k=1, 1 worker,
              engine.replicas=2: each rank on half of every batch, gradients all-reduced)
    local     local learning K=2 (DGL's 1c2f heads), 1 process x 2 threads
    pipeline  the same K=2 on 2 worker processes x 1 thread (engine=pipeline, 2 micro-batches)

Every run is an ordinary run folder of the library's CLI, ``runs/<protocol>/<name>/``, made and
advanced by the reproduce driver (``benchmarks/reproduce/run.py``, imported, not copied): done
runs are skipped, interrupted ones resumed from their checkpoint, running ones (pid files) left
alone, so the matrix is advanced in as many sittings as it takes. Beside each folder,
``<name>.host.jsonl`` records each sitting's start and end (load average, the other processes
using the CPU, the sitting's wall seconds). The report reads each run's ``metrics.jsonl``:
training time is the sum of ``epoch_seconds`` up to the epoch (evaluation excluded).

Commands (README.md)::

    python benchmarks/time_to_accuracy/run.py --commit     # advance; commit each finished run
    python benchmarks/time_to_accuracy/run.py --status     # done / running / left, hours needed
    python benchmarks/time_to_accuracy/run.py --report     # results.md, results.json, tta.png
    python benchmarks/time_to_accuracy/run.py --measure    # one epoch of each configuration
    python benchmarks/time_to_accuracy/run.py --smoke      # seconds-long end-to-end check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = HERE / "runs"


def _driver() -> Any:
    """The reproduce driver as a module (loaded by path: both files are called run.py)."""
    if "reproduce_run" in sys.modules:
        return sys.modules["reproduce_run"]
    spec = importlib.util.spec_from_file_location("reproduce_run",
                                                  ROOT / "benchmarks" / "reproduce" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_run"] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


rp = _driver()

# -- the configurations: method name -> overrides (the driver adds split.k / split.by) -----------
CONFIGS: dict[str, tuple[str, ...]] = {
    "bp": ("engine=backprop", "engine.aux_heads=false"),
    # K=1 local is BP (the model's own head is the last stage's objective), so one stage on one
    # pipeline worker with 2 replicas is data-parallel BP: rank 0 reads the batch and sends
    # half to rank 1, both all-reduce their gradients before every step
    "ddp": ("engine=pipeline", "engine.workers=1", "engine.replicas=2"),
    "local": ("engine=local", "objective=ce", "objective.head=1c2f"),  # DGL (InfoPro T2)
    # micro-batches 2: 439 vs 390 images/s for m=1 (pipeline_throughput's main table, ResNet-20)
    "pipeline": ("engine=pipeline", "engine.workers=2", "engine.micro_batches=2",
                 "objective=ce", "objective.head=1c2f"),
}
THREADS = {"bp": 2, "ddp": 1, "local": 2, "pipeline": 1}  # engine.threads of each process
LAYOUT = {"bp": "1 process x 2 threads", "ddp": "2 ranks x 1 thread",
          "local": "1 process x 2 threads", "pipeline": "2 workers x 1 thread, 2 micro-batches"}

EPOCHS = 30  # the cap: cosine over it (README: why 30)
PROTOCOL = rp.Protocol(
    "tta", "time to 80 / 85 % test accuracy, ResNet-20, 2 cores", ("resnet20",), width=1.0,
    epochs=EPOCHS, batch=128, lr=0.1,
    cells=(("bp", 1), ("ddp", 1), ("local", 2), ("pipeline", 2)), seeds=(0, 1),
    optim=("optim=sgd", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=5e-4",
           "optim.schedule=cosine"),
    methods=CONFIGS, split_by="macs", extra=rp._fast_defaults())
# seconds long: 512 training images, 2 epochs (a kill after the first leaves a checkpoint)
SMOKE = replace(PROTOCOL, name="tta-smoke", about="a seconds-long check", epochs=2,
                data=(*PROTOCOL.data, "data.train_subset=512", "data.test_subset=256"),
                train_size=512)
THRESHOLDS: dict[str, tuple[float, ...]] = {"tta": (80.0, 85.0), "tta-smoke": (12.0, 20.0)}


# -- reading run folders -----------------------------------------------------------------------
def epoch_rows(folder: Path) -> list[dict[str, Any]]:
    """The run's epoch rows in epoch order, one per epoch (the last written wins)."""
    by_epoch = {r["epoch"]: r for r in rp.metrics(folder) if "epoch" in r}
    return [by_epoch[e] for e in sorted(by_epoch)]


def time_to(rows: Sequence[Mapping[str, Any]], threshold: float) -> tuple[float, int] | None:
    """(training seconds, epoch) at the first epoch whose test accuracy reaches ``threshold``:
    the sum of ``epoch_seconds`` up to and including that epoch. None: never reached."""
    seconds = 0.0
    for r in rows:
        seconds += r.get("epoch_seconds", 0.0)
        acc = r.get("final_acc")
        if acc is not None and acc >= threshold:
            return seconds, int(r["epoch"])
    return None


def images_per_s(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Training images over training seconds, all epochs together."""
    seconds = sum(r.get("epoch_seconds", 0.0) for r in rows)
    images = sum(r.get("samples_per_s", 0.0) * r.get("epoch_seconds", 0.0) for r in rows)
    return images / seconds if seconds else None


def host_records(run: Any, runs: Path) -> list[dict[str, Any]]:
    path = run.folder(runs).with_name(run.name + ".host.jsonl")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def run_row(run: Any, runs: Path, thresholds: Sequence[float]) -> dict[str, Any]:
    """One run's figures: times to each threshold, accuracy, speed, its curve and its machine."""
    folder = run.folder(runs)
    rows = epoch_rows(folder)
    accs = [r["final_acc"] for r in rows if r.get("final_acc") is not None]
    env = rp._read_json(folder / "env.json") or {}
    records = host_records(run, runs)
    ends = [h for h in records if h.get("event") == "end"]
    seconds, curve = 0.0, []
    for r in rows:
        seconds += r.get("epoch_seconds", 0.0)
        if r.get("final_acc") is not None:
            curve.append([round(seconds, 2), r["final_acc"]])
    return {"config": run.method, "seed": run.seed, "run": f"{folder.parent.name}/{folder.name}",
            "layout": LAYOUT.get(run.method, ""), "state": rp.state(run, runs),
            "epochs": len(rows), "planned_epochs": run.protocol.epochs,
            "to": {f"{t:g}": (None if (hit := time_to(rows, t)) is None
                              else {"seconds": hit[0], "epoch": hit[1]}) for t in thresholds},
            "final_acc": accs[-1] if accs else None, "best_acc": max(accs, default=None),
            "train_seconds": seconds, "images_per_s": images_per_s(rows),
            "wall_seconds": (rp._read_json(folder / "summary.json") or {}).get("wall_seconds"),
            "precision": env.get("precision"), "channels_last": env.get("channels_last"),
            "threads_per_process": env.get("threads_per_worker", env.get("torch_threads")),
            "load_at_end": ends[-1]["loadavg"] if ends else None,
            "others_at_end": ends[-1].get("others") if ends else None,
            "sittings": len(ends), "curve": curve,
            "trained": sorted({h["time"][:10] for h in records if h.get("time")})}


def paired_speedups(rows: Sequence[Mapping[str, Any]], threshold: float) -> dict[str, list[float]]:
    """Per configuration: BP's time to ``threshold`` divided by the configuration's, seed by
    seed (the runs of one seed share a sitting, so a machine that changes between sittings
    cancels out); only seeds where both reached it."""
    key = f"{threshold:g}"
    bp = {r["seed"]: r["to"][key]["seconds"] for r in rows
          if r["config"] == "bp" and r["to"][key] is not None}
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["to"][key] is not None and r["seed"] in bp:
            out.setdefault(r["config"], []).append(bp[r["seed"]] / r["to"][key]["seconds"])
    return out


# -- the report --------------------------------------------------------------------------------
def _stat(values: Sequence[float | None], digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean, std = rp.mean_std(vals)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(vals) > 1 else "")


def summarize(rows: Sequence[Mapping[str, Any]],
              thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Per configuration, over its finished runs: time to each threshold (seeds that reached
    it), how many reached it, accuracy and speed."""
    out, speedups = [], {t: paired_speedups(rows, t) for t in thresholds}
    for config in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == config]
        item: dict[str, Any] = {"config": config, "layout": LAYOUT.get(config, ""), "n": len(rs)}
        for t in thresholds:
            hits = [r["to"][f"{t:g}"] for r in rs if r["to"][f"{t:g}"] is not None]
            item[f"to_{t:g}"] = {"seconds": [h["seconds"] for h in hits],
                                 "epochs": [h["epoch"] for h in hits], "reached": len(hits),
                                 "bp_over_this": speedups[t].get(config, [])}
        for key in ("final_acc", "best_acc", "images_per_s"):
            item[key] = [r[key] for r in rs]
        out.append(item)
    return out


def markdown(protocol: Any, rows: Sequence[Mapping[str, Any]], thresholds: Sequence[float]) -> str:
    """results.md: the per-configuration table, the per-run table and what is left."""
    p = protocol
    head = [f"# Time to accuracy: {p.models[0]}, CIFAR-10, protocol `{p.name}`", "",
            f"{p.epochs} epochs at most (cosine over them), batch {p.batch}, SGD lr {p.lr:g} "
            "Nesterov 0.9, wd 5e-4, crop + flip; test accuracy evaluated after every epoch. "
            "**Training time** is the sum of the runs' `epoch_seconds` up to the first epoch "
            "at the threshold: evaluation, start-up and checkpointing are excluded. Mean ± std "
            "over the seeds that reached the threshold (reached / runs in brackets); "
            f"`not reached` means not within the {p.epochs}-epoch cap.", ""]
    done = [r for r in rows if r["state"] == "done"]
    if not done:
        return "\n".join(head + ["**Not run yet at this budget**: no run has finished.", ""]
                         + _left(rows))
    summary = summarize(done, thresholds)
    cols = " | ".join(f"s to {t:g} % | epoch" for t in thresholds)
    ratio_cols = " | ".join(f"BP's time / this, to {t:g} %" for t in thresholds)
    out = [*head, "BP's time / this is taken seed by seed (the runs of a seed share one sitting, "
           "so a machine that differs between sittings cancels out), then mean ± std.", "",
           f"| configuration | layout | n | {cols} | {ratio_cols} | final % | best % | images/s |",
           "|---|---|---|" + "---|---|" * len(thresholds) + "---|" * len(thresholds)
           + "---|---|---|"]
    for s in summary:
        cells = []
        for t in thresholds:
            hit = s[f"to_{t:g}"]
            bracket = f" ({hit['reached']}/{s['n']})" if hit["reached"] < s["n"] else ""
            cells += [(_stat(hit["seconds"], 0) + bracket) if hit["reached"] else "not reached",
                      _stat(hit["epochs"], 1) if hit["reached"] else "-"]
        ratios = " | ".join(_stat(s[f"to_{t:g}"]["bp_over_this"], 2) for t in thresholds)
        out.append(f"| {s['config']} | {s['layout']} | {s['n']} | {' | '.join(cells)} | {ratios} | "
                   f"{_stat(s['final_acc'], 2)} | {_stat(s['best_acc'], 2)} | "
                   f"{_stat(s['images_per_s'], 0)} |")
    out += ["", "Per run (load: 1/5/15-min load average at the run's end, its own processes "
            "included: about 2 on an otherwise quiet machine):", "",
            "| run | " + " | ".join(f"s to {t:g} %" for t in thresholds)
            + " | final % | best % | images/s | precision | trained (UTC) | load at end "
            "| others at end |",
            "|---|" + "---|" * len(thresholds) + "---|---|---|---|---|---|---|"]
    for r in done:
        times = [("-" if r["to"][f"{t:g}"] is None else f"{r['to'][f'{t:g}']['seconds']:.0f}")
                 for t in thresholds]
        load = "-" if r["load_at_end"] is None else " / ".join(f"{v:.2f}" for v in r["load_at_end"])
        others = ", ".join(f"`{o['command'][:48]}` {o['cpu_percent']:.0f} %"
                           for o in (r["others_at_end"] or [])[:3]) or "none"
        out.append(f"| {r['run']} | {' | '.join(times)} | {r['final_acc']:.2f} | "
                   f"{r['best_acc']:.2f} | {r['images_per_s']:.0f} | {r['precision']}"
                   f"{' channels-last' if r['channels_last'] else ''} | "
                   f"{', '.join(r['trained']) or '-'} | {load} | {others} |")
    return "\n".join(out + ["", f"![accuracy vs training seconds]({PLOT})", ""] + _left(rows))


def _left(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    left = [f"{r['run']} ({r['state']}, {r['epochs']}/{r['planned_epochs']} epochs)"
            for r in rows if r["state"] != "done"]
    return [f"Not finished yet: {', '.join(left)}.", ""] if left else []


PLOT = "tta.png"


def plot(rows: Sequence[Mapping[str, Any]], thresholds: Sequence[float], path: Path,
         title: str) -> Path:
    """Test accuracy against cumulative training seconds: a line per run, a colour per
    configuration, the thresholds dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(CONFIGS, ("black", "tab:blue", "tab:orange", "tab:green")))
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker=".", color=colours.get(r["config"]),
                    ls="-" if r["seed"] == 0 else "--", label=f"{r['config']} s{r['seed']}")
    for t in thresholds:
        ax.axhline(t, color="grey", ls=":", lw=1)
    ax.set(xlabel="cumulative training seconds (evaluation excluded)",
           ylabel="test accuracy (%)", title=title)
    return rp.save_figure(fig, ax, path)


def machine() -> dict[str, Any]:
    """This machine, for results.json."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in _lines("/proc/meminfo")
                if line.startswith("MemTotal")), None)
    return {"cpu": model, "cores": os.cpu_count(),
            "mem_gib": round(int(mem) / 2**20, 1) if mem else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def report(protocol: Any, runs: Path, out_dir: Path) -> str:
    """Re-render results.md, results.json and the plot of ``protocol`` into ``out_dir``."""
    thresholds = THRESHOLDS[protocol.name]
    rows = [run_row(r, runs, thresholds) for r in rp.matrix(protocol)]
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(protocol, rows, thresholds)
    (out_dir / "results.md").write_text(text)
    done = [r for r in rows if r["state"] == "done"]
    data = {"protocol": protocol.name, "thresholds": thresholds, "epochs_cap": protocol.epochs,
            "overrides": {m: [*protocol.overrides(protocol.models[0]),
                              *protocol.method_overrides(m, k), f"engine.threads={THREADS[m]}"]
                          for m, k in protocol.cells},
            "training_time": "sum of epoch_seconds up to the epoch; evaluation excluded",
            "machine": machine(), "summary": summarize(done, thresholds), "runs": rows}
    (out_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    if any(r["curve"] for r in rows):
        plot(rows, thresholds, out_dir / PLOT, f"{protocol.models[0]}, CIFAR-10 ({protocol.name})")
    return text


# -- the machine around a run ------------------------------------------------------------------
def others(window: float = 1.0, min_percent: float = 10.0) -> list[dict[str, Any]]:
    """Processes other than this one using at least ``min_percent`` of a core over ``window``
    seconds (what else is running), busiest first."""
    def ticks() -> dict[int, tuple[int, str]]:
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if fields[0] == "Z":  # exited, not yet reaped (the run's own workers at its end)
                    continue
                ticks_used = int(fields[11]) + int(fields[12])  # utime + stime
                out[int(stat.parent.name)] = (ticks_used, _command(stat.parent))
            except (OSError, ValueError, IndexError):
                continue
        return out

    before = ticks()
    time.sleep(window)
    after, hz = ticks(), os.sysconf("SC_CLK_TCK")
    busy = [{"pid": pid, "cpu_percent": round(100 * (t - before[pid][0]) / hz / window, 1),
             "command": cmd[:160]} for pid, (t, cmd) in after.items()
            if pid in before and pid != os.getpid()]
    return sorted((b for b in busy if b["cpu_percent"] >= min_percent),
                  key=lambda b: -b["cpu_percent"])


def _command(proc: Path) -> str:
    """A process's command line without its interpreter's path (``python -m pytest ...``), or
    its name when it has none."""
    args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
    args = [a for a in args if a]
    if not args:
        return f"[{(proc / 'comm').read_text().strip()}]"
    return " ".join([Path(args[0]).name, *args[1:]])


def record(run: Any, runs: Path, event: str, **extra: Any) -> None:
    """Append a sitting's start or end to ``<name>.host.jsonl`` beside the run folder."""
    path = run.folder(runs).with_name(run.name + ".host.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"event": event, "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "loadavg": [round(v, 2) for v in os.getloadavg()], "others": others(), **extra}
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def commit(paths: Sequence[Path], message: str) -> None:
    """``git add`` and commit exactly ``paths`` (the repository's ignores keep checkpoints out);
    a failure (another engineer's git holding the index) is reported, never fatal."""
    rel = [str(p.relative_to(ROOT)) for p in paths if p.exists()]
    for cmd in (["git", "add", "--", *rel], ["git", "commit", "-q", "-m", message, "--", *rel]):
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(f"not committed ({' '.join(cmd[:2])}): {(done.stderr or done.stdout).strip()}")
            return
    print(f"committed: {message}")


def advance(protocol: Any, plan: Sequence[Any], runs: Path, out_dir: Path, device: str,
            commit_runs: bool) -> int:
    """Train what is left of ``plan`` one run at a time (each uses both cores), each with its
    configuration's threads; record the machine around each sitting; re-render the report
    (and commit, with ``commit_runs``) after each finished run. Returns the failures."""
    failures = 0
    for run in plan:
        if rp.state(run, runs) in ("done", "running"):
            continue
        record(run, runs, "start")
        start = time.perf_counter()
        try:
            failures += rp.advance([run], runs, 1, THREADS[run.method], device)
        finally:  # also when interrupted: the sitting's end is part of the record
            record(run, runs, "end", state=rp.state(run, runs),
                   wall_seconds=round(time.perf_counter() - start, 1))
        report(protocol, runs, out_dir)
        if commit_runs and rp.state(run, runs) == "done":
            folder = run.folder(runs)
            acc = (epoch_rows(folder) or [{}])[-1].get("final_acc")
            commit([folder, folder.with_name(run.name + ".host.jsonl"), *(
                out_dir / n for n in ("results.md", "results.json", PLOT))],
                f"time_to_accuracy: {protocol.name}/{run.name} finished ({run.protocol.epochs} "
                f"epochs, final test accuracy {acc}%)")
    return failures


# -- one epoch of each configuration: the estimate ---------------------------------------------
def measure(protocol: Any, runs: Path, images: int, max_load: float,
            device: str) -> dict[str, Any] | None:
    """Train one epoch of ``images`` training images of each configuration (seed 0) and write
    ``runs/<protocol>/measure.json`` (seconds per full epoch: ``--status`` estimates from it).
    Skipped when the 1-min load average is ``max_load`` or more (another run would skew it)."""
    load = os.getloadavg()[0]
    if load >= max_load:
        print(f"measure skipped: the 1-min load average is {load:.2f} (>= {max_load:g}); "
              "measure on a quieter machine (or raise --max-load)")
        return None
    scratch, before = runs / f"{protocol.name}-measure", others()
    cells: dict[str, Any] = {}
    for run in [r for r in rp.matrix(protocol) if r.seed == protocol.seeds[0]]:
        threads = THREADS[run.method]
        cmd = [sys.executable, "-m", "locallearn", "train",
               *run.overrides(scratch, threads, device),
               "train.epochs=1", "train.checkpoint=false", f"data.train_subset={images}"]
        shutil.rmtree(run.folder(scratch), ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        load_before, start = os.getloadavg(), time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rows = epoch_rows(run.folder(scratch))
        if done.returncode or not rows:
            print(f"{run.cell}: failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            continue
        per_image = rows[0]["epoch_seconds"] / images
        fit = (rp._read_json(run.folder(scratch) / "summary.json") or {}).get("wall_seconds", wall)
        cells[run.cell] = {
            "epoch_seconds": per_image * protocol.train_size,  # a full epoch, for --status
            "images_per_s": 1 / per_image, "measured_images": images, "threads": threads,
            "eval_seconds": fit - rows[0]["epoch_seconds"],  # the test set, once
            "startup_seconds": wall - fit,  # the process: imports, data, workers
            "load_before": load_before, "load_after": os.getloadavg()}
        c = cells[run.cell]
        print(f"{run.cell}: {c['images_per_s']:.0f} images/s -> {c['epoch_seconds']:.0f} s per "
              f"epoch, + {c['eval_seconds']:.0f} s evaluation, + {c['startup_seconds']:.0f} s "
              "start-up", flush=True)
    per_seed = sum(c["startup_seconds"] + protocol.epochs * (c["epoch_seconds"] + c["eval_seconds"])
                   for c in cells.values())
    out = {"time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "others_before": before, "others_after": others(), "cells": cells,
           "estimate_hours": per_seed * len(protocol.seeds) / 3600,
           "estimate": "sum over the runs of start-up + epochs x (epoch + evaluation), one run "
                       "at a time (checkpoints not counted)",
           "unmeasured": sorted({r.cell for r in rp.matrix(protocol)} - set(cells))}
    (runs / protocol.name).mkdir(parents=True, exist_ok=True)
    (runs / protocol.name / "measure.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"all {len(rp.matrix(protocol))} runs at {protocol.epochs} epochs: about "
          f"{out['estimate_hours']:.1f} h of machine time, one run at a time")
    return out


# -- command line ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="the seconds-long protocol (512 images, 2 epochs, thresholds 12/20 %%) "
                        "into runs/tta-smoke/ (ignored by git)")
    p.add_argument("--only", nargs="+", default=[], metavar="CONFIG/K/SEED",
                   help="only these runs (shell wildcards), e.g. 'pipeline/2/*' 'bp/1/0'")
    p.add_argument("--status", action="store_true", help="done, running, left; hours needed")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report", action="store_true", help="re-render results.* from the run folders")
    p.add_argument("--commit", action="store_true",
                   help="git-commit each finished run's folder and the report (not with --smoke)")
    p.add_argument("--measure", action="store_true",
                   help="time one epoch of each configuration; write runs/<protocol>/measure.json")
    p.add_argument("--measure-images", type=int, default=50000, metavar="N",
                   help="training images of the measured epoch (default: a full epoch)")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="--measure only below this 1-min load average")
    p.add_argument("--device", default="auto", help="engine.device (auto: cuda if torch sees one)")
    a = p.parse_args(argv)
    protocol = SMOKE if a.smoke else PROTOCOL
    out_dir = RUNS / protocol.name if a.smoke else HERE  # smoke: its report stays in its folder
    plan = rp.matrix(protocol, rp._filter(a.only))
    if a.report:
        print(report(protocol, RUNS, out_dir))
        return 0
    if a.status:
        rp.print_status(rp.status(protocol, a.only, RUNS), 1)
        return 0
    rp.check_plan(protocol, plan)
    if a.device == "auto":
        import torch

        a.device = "cuda" if torch.cuda.is_available() else ""
    if a.dry_run:
        for run in plan:
            print(f"# {run.name}: {rp.state(run, RUNS)} ({LAYOUT[run.method]})")
            print(shlex.join(rp.command(run, RUNS, THREADS[run.method], a.device)))
        return 0
    if a.measure:
        measure(protocol, RUNS, min(a.measure_images, protocol.train_size), a.max_load, a.device)
        return 0
    signal.signal(signal.SIGTERM, rp._interrupt)  # `kill <pid>` stops the runs like Ctrl-C
    signal.signal(signal.SIGINT, rp._interrupt)
    failures = advance(protocol, plan, RUNS, out_dir, a.device, a.commit and not a.smoke)
    report(protocol, RUNS, out_dir)
    rp.print_status(rp.status(protocol, a.only, RUNS), 1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
