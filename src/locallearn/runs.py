"""Run folders: resolved config, environment, metrics, summary, checkpoints, plots.

A run folder holds::

    config.yaml       the resolved configuration (``data.data_dir`` absolute)
    env.json          versions, device, threads, machine
    metrics.jsonl     one line per epoch
    summary.json      final figures
    checkpoint.pt     the last good checkpoint (written atomically)
    curves.png        per-stage accuracy and loss curves
    .lock             while a process owns the folder (:func:`claim`): its pid and host

Every file is written world-readable (0644 under the usual umask), also those written
atomically through a private temporary file. Checkpoints hold only tensors and plain
data and load with ``weights_only=True``, so opening one cannot run code. This module
imports torch only where it reads or writes tensors, so the CLI's ``compare`` and
``list`` start without it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from locallearn.config import RunConfig, apply_overrides, from_dict, to_dict, yaml_problem
from locallearn.errors import RunError

CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
log = logging.getLogger("locallearn")


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Versions, device and threads of this process, for the run record."""
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def new_run_dir(cfg: RunConfig) -> Path:
    """Create a fresh run folder under ``cfg.train.out_dir``."""
    name = cfg.train.name or f"{cfg.model.name}-{cfg.engine.name}-k{cfg.split.k}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.train.out_dir) / name
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path(cfg.train.out_dir) / f"{name}-{suffix}"
    path.mkdir(parents=True)
    return path


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write(path, json.dumps(data, indent=2, default=float).encode())


def _readable(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would (0666 less the umask): mkstemp makes
    files 0600, which would hide a run's files from the other users of a shared machine."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it (os.umask sets
    it, which would briefly change it for every thread of the process)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    """Write ``cfg`` as ``config.yaml``, with ``data.data_dir`` made absolute, so that
    ``eval``/``probe``/``--resume`` from another working directory find the same data."""
    data = to_dict(cfg)
    data["data"]["data_dir"] = absolute_data_dir(cfg.data.data_dir)
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False).encode())


def with_absolute_data_dir(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data.data_dir`` made absolute (see :func:`absolute_data_dir`)."""
    data = dataclasses.replace(cfg.data, data_dir=absolute_data_dir(cfg.data.data_dir))
    return dataclasses.replace(cfg, data=data)


def absolute_data_dir(data_dir: str | None) -> str:
    """The data root a run read (``data_dir``, ``$LOCALLEARN_DATA_DIR`` or ``./data``), absolute."""
    from locallearn.data.core import resolve_data_dir

    return str(resolve_data_dir(data_dir).resolve())


def _saved_config_dict(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder: {path} is missing")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RunError(f"{path} is not valid YAML ({yaml_problem(e)})") from e
    if not isinstance(data, dict):
        raise RunError(f"{path} does not hold a run configuration")
    return data


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config saved in a run folder."""
    return from_dict(_saved_config_dict(run_dir))


def resume_config(run_dir: str | Path, overrides: list[str]) -> tuple[RunConfig, list[str]]:
    """The config a resumed run continues with: the saved one, with only ``overrides`` applied.

    A run resumed without overrides trains on to the epochs it was configured for;
    ``train.epochs=20`` raises that, ``data.data_dir=...`` moves the data, and so on.

    Args:
        run_dir: the run folder being resumed.
        overrides: only the dotted overrides the user gave with ``--resume``.

    Returns:
        The config, and one ``"key: old -> new"`` line per value that changed (for the log).

    Raises:
        RunError: if ``run_dir`` holds no config; ConfigError: for a bad override.
    """
    saved = _saved_config_dict(Path(run_dir))
    old = from_dict(copy.deepcopy(saved))
    new = from_dict(apply_overrides(copy.deepcopy(saved), list(overrides)))
    before, after = _flat(to_dict(old)), _flat(to_dict(new))
    changes = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
               for k in after if before.get(k) != after.get(k)]
    return new, changes


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}`` (dict-valued options stay whole below a section)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Append one epoch's row to ``metrics.jsonl``."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` (none if it is missing).

    A torn last line (the process was killed while appending) is dropped with a warning:
    that epoch is trained again on resume, as its checkpoint was not written either.

    Raises:
        RunError: for an unreadable line other than the last (names the file and line).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [(i + 1, line) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    rows = []
    for n, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                log.warning("dropping the torn last line %d of %s (%s)", number, path, e)
                break
            raise RunError(f"{path} line {number} is not valid JSON ({e}); delete that line "
                           "to go on") from e
    return rows


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Keep only the metric rows of the first ``epochs`` epochs (used on resume)."""
    rows = [r for r in read_metrics(run_dir) if r["epoch"] <= epochs]
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` atomically: a crash while saving never destroys the last good one."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(state, tmp)
        _readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (a file, or a run folder holding ``checkpoint.pt``) without unpickling code.

    Raises:
        RunError: if the file is missing or not a valid locallearn checkpoint.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise RunError(f"no checkpoint at {path} (a run folder holds {CHECKPOINT} after its first epoch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise RunError(f"{path} is not a locallearn checkpoint: torch cannot load it safely "
                       f"(truncated, corrupt or foreign file; {type(e).__name__})") from e
    if not isinstance(state, dict) or "net" not in state or "config" not in state:
        raise RunError(f"{path} is not a locallearn checkpoint (no 'net'/'config')")
    return state


# --- ownership of a run folder ---------------------------------------------------------


@contextlib.contextmanager
def claim(run_dir: str | Path) -> Iterator[Path]:
    """Own ``run_dir`` for the duration of the block: no other process may write it.

    The lock is an ``fcntl.flock`` on ``run_dir/.lock``, which holds the owner's pid and
    host; the kernel releases it when the owner dies, so a killed run never leaves a stale
    lock. On entry, temporary files that a killed writer left (``.checkpoint.pt.*``, ...)
    are removed. If the block raises before the run finished an epoch (no metrics row and
    no checkpoint), the folder is removed: a run that failed at start leaves nothing.

    Raises:
        RunError: if another process owns the folder (names its pid and host).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(run_dir)
    try:
        sweep_temp_files(run_dir)
        yield run_dir
    except BaseException:
        if not read_metrics(run_dir) and not (run_dir / CHECKPOINT).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info("removed %s: the run stopped before its first epoch", run_dir)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(run_dir / LOCK).st_ino == os.fstat(fd).st_ino:
                os.unlink(run_dir / LOCK)
        os.close(fd)


def _lock(run_dir: Path) -> int:
    """Take the folder's lock (retrying if its file was replaced meanwhile); the open fd."""
    path = run_dir / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"{run_dir} is in use by {holder}: wait for it to finish or stop it "
                           "(one process may write a run folder at a time)") from None
        try:  # the owner we waited on may have unlinked the file: lock the new one instead
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)


def sweep_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes (``.<name>.<random>``)."""
    swept = [p for p in Path(run_dir).glob(".*.*") if p.is_file() and p.name != LOCK]
    for p in swept:
        p.unlink(missing_ok=True)
    if swept:
        log.info("removed %d temporary file(s) of an interrupted write in %s", len(swept), run_dir)
    return swept


def is_finished(run_dir: str | Path) -> bool:
    """True if ``run_dir`` holds the ``summary.json`` of a finished run."""
    return (Path(run_dir) / "summary.json").is_file()


PLOT_EVERY = 60.0  # seconds between redraws of curves.png during a run (drawing is slow)
_last_plot: dict[str, float] = {}


def plot_curves(run_dir: Path, final: bool = False, every: float = PLOT_EVERY) -> Path | None:
    """Plot per-stage test accuracy and training loss per epoch into ``curves.png``.

    Called after every epoch, it redraws only every ``every`` seconds, and always when
    ``final`` is set or the last row is the configured last epoch, so a short run draws
    once. Epoch ticks are integers, losses on a log scale, and the title names the run.

    Returns:
        The file, or ``None`` if nothing was drawn.
    """
    rows = read_metrics(run_dir)
    if not rows:
        return None
    key, now = str(Path(run_dir).resolve()), time.monotonic()
    last = _last_plot.setdefault(key, now)
    if not (final or now - last >= every or _is_last_epoch(run_dir, rows[-1]["epoch"])):
        return None
    _last_plot[key] = now
    return _draw_curves(Path(run_dir), rows)


def _is_last_epoch(run_dir: Path, epoch: int) -> bool:
    try:
        return epoch >= int(_saved_config_dict(run_dir)["train"]["epochs"])
    except (RunError, KeyError, TypeError, ValueError):
        return False


def _draw_curves(run_dir: Path, rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    losses: list[float] = []
    for k in range(len(rows[-1]["train_loss"])):
        loss = [r["train_loss"][k] if k < len(r["train_loss"]) else None for r in rows]
        losses += [v for v in loss if v is not None]
        ax_loss.plot(epochs, [float("nan") if v is None else v for v in loss], marker="o",
                     label=f"stage {k + 1}")
        acc = [(r.get("stage_acc") or [None] * (k + 1))[k] for r in rows]
        if any(a is not None for a in acc):
            ax_acc.plot(epochs, [a if a is not None else float("nan") for a in acc], marker="o",
                        label=f"stage {k + 1}")
    if losses and all(v > 0 for v in losses):  # contrastive losses may be negative: keep linear
        ax_loss.set_yscale("log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="per-stage test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="per-stage local loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:  # a self-supervised run has no accuracy curves
            ax.legend(fontsize=8)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    _readable(out)
    return out
