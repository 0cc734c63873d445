"""Worker failures: what a failed worker reports, and which rank the launcher blames.

A worker that fails writes a small JSON report (its rank, the error, and for a
communication failure the peer it was talking to) before it exits. When the run
fails, the launcher picks the rank to blame, in order: a worker's own error (the
earliest), a worker that died without a report (killed, or a crash in native code),
then the peer the other workers' errors name (a peer that stopped answering is still
alive until the launcher stops it).
"""

from __future__ import annotations

import json
import math
import signal
import time
import traceback
from pathlib import Path
from typing import Any

from locallearn import runs
from locallearn.config import RunConfig
from locallearn.distributed.comm import PeerError
from locallearn.engines.pipeline import assign_stages
from locallearn.errors import TrainingError


class PipelineError(TrainingError):
    """A pipeline worker failed; the message names the rank, its error and the checkpoint."""


def describe_failure(codes: list[int | None], died: dict[int, float], stopped: set[int],
                     reports: dict[int, dict[str, Any]], cfg: RunConfig, run_dir: Path) -> str:
    """One message naming the rank that failed first, its error and the checkpoint to resume."""
    rank, error = root_cause(codes, died, stopped, reports)
    if cfg.engine.placement == "groups":
        stage, group = divmod(rank, cfg.split.groups)
        where = f"stage {stage + 1}, group {group + 1}"
    else:
        replica, worker = divmod(rank, cfg.engine.workers)
        stages = assign_stages(cfg.split.k, cfg.engine.workers)[worker]
        where = f"stage {stages.start + 1}" if len(stages) == 1 else \
            f"stages {stages.start + 1}-{stages.stop}"
        if cfg.engine.replicas > 1:
            where += f", replica {replica + 1}"
    try:
        epoch = runs.load_checkpoint(run_dir)["epoch"]
        saved = (f"the last good checkpoint (epoch {epoch}) is in {run_dir}; continue with "
                 f"`locallearn train --resume {run_dir}`")
    except runs.RunError:
        saved = f"no checkpoint had been written yet in {run_dir}"
    return (f"pipeline worker rank {rank} ({where}) failed: {error}. All {len(codes)} workers "
            f"were stopped; {saved}")


def root_cause(codes: list[int | None], died: dict[int, float], stopped: set[int],
               reports: dict[int, dict[str, Any]]) -> tuple[int, str]:
    """The rank to blame and why, from exit codes and the workers' own reports.

    In order: a worker's own error (the earliest); a worker that died without a report
    (killed, or a native crash); the peer that the other workers' errors name (a
    peer that stopped answering is still alive until the launcher stops it).
    """
    own = [rep for rep in reports.values() if rep["kind"] == "error"]
    if own:
        rep = min(own, key=lambda r: r["time"])
        return rep["rank"], rep["message"]
    silent = [r for r, c in enumerate(codes) if c not in (0, None) and r not in reports
              and r not in stopped]
    if silent:
        r = min(silent, key=lambda r: died.get(r, math.inf))
        return r, _exit_text(codes[r])
    blamed = [rep for rep in reports.values() if rep.get("peer") is not None]
    if blamed:
        rep = min(blamed, key=lambda r: r["time"])
        what = "stopped answering" if rep["timed_out"] else "failed"
        return rep["peer"], f"it {what} (rank {rep['rank']}: {rep['message']})"
    r = min((r for r, c in enumerate(codes) if c != 0), key=lambda r: died.get(r, math.inf))
    return r, reports[r]["message"] if r in reports else _exit_text(codes[r])


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code} without a Python error (os._exit or a native crash)"


def write_report(path: Path, rank: int, e: BaseException) -> None:
    """Write what worker ``rank`` failed with to ``path`` (read by the launcher)."""
    peer = e.peer if isinstance(e, PeerError) else None
    report = {"rank": rank, "kind": "peer" if isinstance(e, PeerError) else "error",
              "peer": peer, "timed_out": bool(getattr(e, "timed_out", False)),
              "message": error_text(e), "time": time.time()}
    path.write_text(json.dumps(report))


def error_text(e: BaseException) -> str:
    """One line: the error's type, first line of its message and where it was raised."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    first = (str(e).strip().splitlines() or [""])[0][:400]
    return f"{type(e).__name__}: {first}{where}"
