"""Where a CPU training epoch spends its time: py-spy samples of one CLI run, summed per call.

Runs ``python -m locallearn train`` (ResNet-20, CIFAR-10 subset, local K=4, 1 thread by
default) under ``py-spy record`` and prints, as shares of ``Trainer.train_epoch``, the
functions it and ``LocalEngine.step`` call: what is compute (backward, the modules'
forward, the local losses, the optimizer step) and what is Python bookkeeping around
it. ``--src DIR`` profiles another checkout's ``src`` (e.g. a ``git worktree`` of an older
commit) for a before/after comparison. Needs ``pip install py-spy``.

Usage:
    python benchmarks/speed/profile_epoch.py [--src /tmp/before/src] [--out profile.md] [-- key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / ".." / "shared" / "data"
RUN = ["model=resnet20", "data=cifar10", "data.train_subset=2560", "data.test_subset=256",
       "data.batch_size=128", "data.augment=basic", "split.k=4", "engine=local",
       "engine.threads=1", "train.epochs=1", "train.progress=false", "train.checkpoint=false"]
EPOCH, STEP = "Trainer.train_epoch (loop.py)", "LocalEngine.step (sequential.py)"


def frame_name(frame: str) -> str:
    """``function (file.py)`` of one py-spy raw frame ``function (path/file.py:line)``."""
    if " (" not in frame:
        return frame
    function, where = frame.split(" (", 1)
    return f"{function} ({where.split(':')[0].rsplit('/', 1)[-1]})"


def shares(raw: Path) -> tuple[int, dict[str, float]]:
    """Samples in the epoch, and each callee of the epoch and of the step as its share."""
    calls: collections.Counter[str] = collections.Counter()
    epoch = 0
    for line in raw.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        names = [frame_name(f) for f in stack.split(";")]
        for parent, label in ((EPOCH, "epoch"), (STEP, "step")):
            if parent in names:
                i = names.index(parent)
                calls[f"{label} > {names[i + 1] if i + 1 < len(names) else '(itself)'}"] += int(count)
                epoch += int(count) if label == "epoch" else 0
    return epoch, {k: v / max(epoch, 1) for k, v in calls.most_common()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default=None, help="profile this src folder instead of the installed one")
    p.add_argument("--data-dir", default=str(DATA))
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("overrides", nargs="*", help="more key=value overrides of the run")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if a.src:
        env["PYTHONPATH"] = a.src
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        cmd = ["py-spy", "record", "-r", str(a.rate), "-f", "raw", "-o", str(raw), "--",
               sys.executable, "-m", "locallearn", "train", *RUN, f"data.data_dir={a.data_dir}",
               f"train.out_dir={tmp}", *a.overrides]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        samples, table = shares(raw)
    lines = [f"py-spy at {a.rate} Hz of `{' '.join(RUN + a.overrides)}` (src: {a.src or 'installed'}); "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
             f"{os.getloadavg()[0]:.1f}; {samples} samples in the epoch", "",
             "| share of the epoch | call |", "|---|---|"]
    lines += [f"| {100 * v:.2f}% | `{k}` |" for k, v in table.items() if v >= 0.0002]
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
