"""Plain-text tables for the terminal and the READMEs (markdown pipe tables)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt(v: Any, digits: int = 2) -> str:
    """Format one cell: floats rounded, lists joined, ``None`` as a dash."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return "/".join(fmt(x, 1) for x in v)
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with aligned columns (readable in a terminal too)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def mib(n: float | None) -> float | None:
    """Bytes to MiB."""
    return None if n is None else n / 2**20


def compare_table(summaries: Sequence[dict[str, Any]]) -> str:
    """Runs side by side: accuracy per stage and final, time, throughput, memory."""
    headers = ["run", "engine", "K", "epochs", "final acc %", "stage acc %", "ens 2^k %",
               "train s", "samples/s", "saved act MiB", "peak RSS MiB"]
    rows = [[s.get("name"), s.get("engine"), s.get("k"), s.get("epochs"), s.get("final_acc"),
             s.get("stage_acc"), s.get("ens_weighted"), s.get("train_seconds"),
             s.get("samples_per_s"), mib(s.get("saved_bytes_peak")), mib(s.get("peak_rss"))]
            for s in summaries]
    return table(headers, rows)


def write_results(folder: str | Path, name: str, headers: Sequence[str],
                  rows: Sequence[Sequence[Any]], meta: dict[str, Any]) -> str:
    """Save a benchmark's rows as ``name.json`` and a markdown table ``name.md``; return the table.

    ``meta`` records what was measured and how (hardware, threads, settings, command).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = [dict(zip(headers, r)) for r in rows]
    (folder / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": records}, indent=2,
                                                    default=float))
    notes = "\n".join(f"- {k}: {fmt(v) if not isinstance(v, str) else v}" for k, v in meta.items())
    text = table(headers, rows) + "\n\n" + notes + "\n"
    (folder / f"{name}.md").write_text(text)
    return text
