"""Logging: the ``locallearn`` logger, the command line's handler and the per-epoch line.

The library only logs (``logging.getLogger("locallearn")``) and never configures
logging itself; the CLI calls :func:`setup` once, so a program that imports locallearn
keeps its own handlers. Messages go to stderr through ``tqdm.write``, so they do not
tear a progress bar that is being drawn. :func:`epoch_line` is the one per-epoch line
every engine prints, built from the row the loop appends to ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger("locallearn")


class _TqdmHandler(logging.Handler):
    """Writes records to stderr above any progress bar (tqdm is imported on first use)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never stop a run
            self.handleError(record)


def setup(level: int = logging.INFO) -> None:
    """Show the library's messages on stderr (idempotent): the CLI's default.

    Args:
        level: the lowest level shown (``logging.INFO``: progress notes and warnings).
    """
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def _num(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def epoch_line(row: Mapping[str, Any], epochs: int | None = None, unit: str = "img/s") -> str:
    """One line for one epoch, the same for every engine.

    Example: ``epoch 3/10 | loss s1 1.234 s2 0.987 | test acc 81.20% | 1234 img/s | 12.3 s``.

    Args:
        row: a metrics row: ``epoch``, ``train_loss`` (one per stage; NaN for a stage not
            trained), and where known ``final_acc`` (None or missing: not evaluated this
            epoch), ``samples_per_s`` and ``epoch_seconds``.
        epochs: the run's number of epochs (shown as ``epoch 3/10``), if known.
        unit: the throughput's unit (``samples/s`` for text).
    """
    parts = [f"epoch {row['epoch']}" + (f"/{epochs}" if epochs else "")]
    losses = row.get("train_loss") or []
    if losses:
        parts.append("loss " + " ".join(f"s{k + 1} {_num(v, 3)}" for k, v in enumerate(losses)))
    if row.get("final_acc") is not None:
        parts.append(f"test acc {_num(row['final_acc'], 2)}%")
    if row.get("samples_per_s") is not None:
        parts.append(f"{row['samples_per_s']:.0f} {unit}")
    if row.get("epoch_seconds") is not None:
        parts.append(f"{row['epoch_seconds']:.1f} s")
    return " | ".join(parts)
