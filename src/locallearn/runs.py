"""Run folders: resolved config, environment, metrics, summary, checkpoints, plots.

A run folder holds::

    config.yaml       the resolved configuration
    env.json          versions, device, threads, machine
    metrics.jsonl     one line per epoch
    summary.json      final figures
    checkpoint.pt     the last good checkpoint (written atomically)
    curves.png        per-stage accuracy and loss curves

Checkpoints hold only tensors and plain data and load with ``weights_only=True``, so
opening one cannot run code.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from locallearn.config import RunConfig, from_dict, to_dict

CHECKPOINT = "checkpoint.pt"


class RunError(ValueError):
    """A run folder or checkpoint is missing or unreadable; the message names the path."""


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Versions, device and threads of this process, for the run record."""
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


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    atomic_write(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


def load_run_config(run_dir: Path) -> RunConfig:
    """The resolved config saved in a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run folder: {path} is missing")
    return from_dict(yaml.safe_load(path.read_text()))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row, default=float) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Keep only the metric rows of the first ``epochs`` epochs (used on resume)."""
    rows = [r for r in read_metrics(run_dir) if r["epoch"] <= epochs]
    atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save ``state`` atomically: a crash while saving never destroys the last good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (a file, or a run folder holding ``checkpoint.pt``) without unpickling code.

    Raises:
        RunError: if the file is missing or not a valid locallearn checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise RunError(f"no checkpoint at {path} (a run folder holds {CHECKPOINT} after its first epoch)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise RunError(f"checkpoint {path} is corrupt or not a locallearn checkpoint: {e}") from e
    if not isinstance(state, dict) or "net" not in state or "config" not in state:
        raise RunError(f"checkpoint {path} is not a locallearn checkpoint (no 'net'/'config')")
    return state


def plot_curves(run_dir: Path) -> Path | None:
    """Plot per-stage test accuracy and training loss per epoch into ``curves.png``."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(len(rows[-1]["train_loss"])):
        ax_loss.plot(epochs, [r["train_loss"][k] for r in rows], marker="o", label=f"stage {k + 1}")
        acc = [r.get("stage_acc", [None] * (k + 1))[k] for r in rows]
        if any(a is not None for a in acc):
            ax_acc.plot(epochs, [a if a is not None else float("nan") for a in acc], marker="o",
                        label=f"stage {k + 1}")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="per-stage test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="per-stage local loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:  # a self-supervised run has no accuracy curves
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
