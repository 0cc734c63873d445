"""CIFAR-10, short equal budget: BP versus local learning (K = 2, 4, CE heads).

Every run trains the same model, data, optimizer and number of epochs through the
library's own ``locallearn.train.run`` and writes an ordinary run folder under
``benchmarks/cifar10_short/runs/`` (so ``locallearn compare`` works on them). The
table reports final and per-stage test accuracy, wall time and images/s.

Usage: python benchmarks/cifar10_short/run.py [--data-dir ../shared/data] [--epochs 2]
       [--models vgg6a resnet20] [--engines backprop local2 local4 pipe2 pipe4]
       [--extra key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {  # reduced widths keep a run within minutes on one core; heads as in DGL
    "vgg6a": ["model=vgg6a", "model.options={width: 0.25}", "objective.head=mlp"],
    "resnet20": ["model=resnet20", "model.options={width: 0.5}", "objective.head=0c1f"],
}
ENGINES = {"backprop": ["engine=backprop", "split.k=4"], "local2": ["engine=local", "split.k=2"],
           "local4": ["engine=local", "split.k=4"],
           # the same updates as local2 / local4, on 2 worker processes x --threads threads
           "pipe2": ["engine=pipeline", "split.k=2", "engine.workers=2"],
           "pipe4": ["engine=pipeline", "split.k=4", "engine.workers=2"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(HERE.parents[1] / ".." / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--engines", nargs="+", default=list(ENGINES))
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import torch

    from locallearn.config import load_config
    from locallearn.report import write_results
    from locallearn.train import run

    torch.set_num_threads(a.threads)
    common = ["data=cifar10", f"data.data_dir={a.data_dir}", "data.batch_size=128",
              "data.augment=basic", f"train.epochs={a.epochs}", "optim=sgd", "optim.lr=0.05",
              "optim.weight_decay=5e-4", "optim.schedule=cosine", "split.by=memory",
              f"train.out_dir={HERE / 'runs'}", "train.progress=false",
              f"engine.threads={a.threads}"]
    results_file = HERE / "results_runs.jsonl"
    for model in a.models:
        for engine in a.engines:
            name = f"{model}-{engine}"
            cfg = load_config(None, common + MODELS[model] + ENGINES[engine] +
                              [f"train.name={name}"] + a.extra)
            summary, run_dir = run(cfg)
            summary["bench_name"] = name
            with open(results_file, "a") as f:
                f.write(json.dumps(summary, default=float) + "\n")
            print(name, summary["final_acc"], summary["stage_acc"], flush=True)
    latest = {}  # a rerun of a configuration replaces its earlier result
    for line in results_file.read_text().splitlines():
        s = json.loads(line)
        latest[s["bench_name"]] = s
    rows = []
    for s in latest.values():
        rows.append([s["bench_name"], s["engine"], s["k"], s["epochs"], s["final_acc"],
                     s["stage_acc"], s["ens_weighted"], s["train_seconds"], s["samples_per_s"]])
    meta = {"budget": f"{a.epochs} epochs of the 50k CIFAR-10 training images (JPEG copy in "
                      "../shared/data), batch 128, SGD lr 0.05 momentum 0.9 wd 5e-4, cosine, "
                      "crop+flip; memory-balanced cuts",
            "models": "; ".join(f"{m}: {' '.join(v[1:])}" for m, v in MODELS.items()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"torch threads {a.threads} per process (pipeline: per worker)",
            "command": "python benchmarks/cifar10_short/run.py"}
    print(write_results(HERE, "results", ["run", "engine", "K", "epochs", "final acc %",
                                          "stage acc %", "ens 2^k %", "train s", "images/s"],
                        rows, meta))


if __name__ == "__main__":
    main()
