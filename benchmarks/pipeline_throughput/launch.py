"""Start-up cost of the two local launchers: the fork-server launcher vs torch's elastic agent.

Measured 2026-12-03 (launch.md) before the default changed: then ``engine=pipeline``
started its workers with a hand-written fork-server launcher unless
``engine.max_restarts > 0``, which ran them under
``torch.distributed.launcher.api.elastic_launch``; both took the same time, so every launch
now goes through the agent and both rows below run it (restarts 0 vs 1). This
times a whole tiny run (MLP on scikit-learn's digits, K=2 on 2 workers, 1 epoch of 256
images) with each launcher, several times, in this process as a user's script would, and
prints wall seconds, training seconds (the run's ``epoch_seconds``) and the difference,
which is the launcher's start-up and shut-down.

Usage: python benchmarks/pipeline_throughput/launch.py [--reps 3]
Writes launch.json and launch.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

LAUNCHERS = {"elastic agent, no restarts (default)": "engine.max_restarts=0",
             "elastic agent (engine.max_restarts=1)": "engine.max_restarts=1"}
TINY = ["model=mlp", "model.options={hidden: [32, 32, 32, 32]}", "data.train_subset=256",
        "data.test_subset=64", "data.batch_size=32", "train.progress=false", "split.k=2",
        "engine=pipeline", "engine.workers=2", "engine.threads=1", "train.epochs=1",
        "train.checkpoint=false"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    from locallearn.config import load_config
    from locallearn.report import table
    from locallearn.train import run

    meta = {"cpu cores": os.cpu_count(), "load average at start": os.getloadavg()[0],
            "command": "python " + " ".join(["benchmarks/pipeline_throughput/launch.py",
                                              *sys.argv[1:]])}
    rows, records = [], []
    with tempfile.TemporaryDirectory() as out:
        for name, override in LAUNCHERS.items():
            walls, trains = [], []
            for rep in range(a.reps):
                cfg = load_config(None, [*TINY, override, f"train.out_dir={out}",
                                         f"train.name={rep}-{override[-1]}"])
                start = time.perf_counter()
                _, run_dir = run(cfg)
                walls.append(time.perf_counter() - start)
                lines = (run_dir / "metrics.jsonl").read_text().splitlines()
                trains.append(sum(json.loads(line)["epoch_seconds"] for line in lines))
                print(f"{name}: rep {rep}: wall {walls[-1]:.2f} s, training {trains[-1]:.2f} s",
                      flush=True)
            over = [w - t for w, t in zip(walls, trains)]
            records.append({"launcher": name, "override": override, "wall_s": walls,
                            "train_s": trains, "load_1min": os.getloadavg()[0]})
            rows.append([name, f"{statistics.median(walls):.2f}",
                         f"{statistics.median(trains):.2f}", f"{statistics.median(over):.2f}",
                         f"{os.getloadavg()[0]:.2f}"])
    text = table(["launcher", "wall s (median)", "training s", "start + stop s", "load 1 min"],
                 rows)
    (HERE / "launch.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    (HERE / "launch.md").write_text(text + "\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in meta.items()) + "\n")
    print(text)


if __name__ == "__main__":
    main()
