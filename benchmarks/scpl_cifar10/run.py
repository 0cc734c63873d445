"""SCPL and DASCPL on CIFAR-10 (VGG8, K=4) against BP at a short equal budget, with early exit.

Every method trains the same VGG8 (reduced width), data subset, optimizer (Adam 1e-3
cosine-decayed to 1e-5), augmentation and number of epochs through the library's own
``locallearn.train.run``, writing an ordinary run folder under ``runs/``. Then each
trained net is reloaded from its checkpoint and scored for early exit
(``locallearn.exits``: ``exit_curve.png`` / ``.json`` in its run folder).

Methods (all K=4 with the SCPL cuts [2, 4, 5] of ``configs/scpl_vgg8.yaml``):

==============  ================================================================
``bp``           end-to-end BP of VGG8's task head; per-stage avg-pool+linear heads on
                 detached features (the "BP + per-stage predictors" baseline)
``multiexit``    classic early-exit network: BP of the sum of the CE losses of all exits
``scpl``         SCPL, sequential local engine (configs/scpl_vgg8.yaml)
``scpl_pipe``    SCPL on the pipeline engine (2 processes), if the library has it wired
``dascpl``       SCPL stages + per-stage predictors (configs/dascpl_vgg8.yaml) without
                 accumulation
``dascpl_grow``  the same with dynamic layer accumulation: stages 2-4 join after 1/4,
                 2/4, 3/4 of the epochs (the thesis' 50/100/150 of 200)
==============  ================================================================

Usage: python benchmarks/scpl_cifar10/run.py [--epochs 4] [--width 0.25]
       [--train-subset 4000] [--test-subset 2000] [--methods bp scpl ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CE_HEADS = ["objective.name=ce", "objective.head=0c1f", "objective.options={}",
            "objective.predictor="]
METHODS = {
    "bp": ("scpl_vgg8.yaml", ["engine=backprop", *CE_HEADS]),
    "multiexit": ("scpl_vgg8.yaml", ["engine=multiexit", *CE_HEADS]),
    "scpl": ("scpl_vgg8.yaml", ["engine=local"]),
    "scpl_pipe": ("scpl_vgg8.yaml", ["engine=pipeline", "engine.workers=2"]),
    "dascpl": ("dascpl_vgg8.yaml", ["engine=local", "train.accumulate=none", "train.triggers=[]"]),
    "dascpl_grow": ("dascpl_vgg8.yaml", ["engine=local"]),
}


def _overrides(a: argparse.Namespace, method: str) -> list[str]:
    common = [f"data.data_dir={a.data_dir}", f"model.options={{width: {a.width}}}",
              f"data.batch_size={a.batch}", f"data.train_subset={a.train_subset}",
              f"data.test_subset={a.test_subset}", f"data.augment={a.augment}",
              f"train.epochs={a.epochs}", f"train.eval_every={a.epochs}", "train.progress=false",
              f"train.out_dir={HERE / 'runs'}", f"train.name={method}", f"train.seed={a.seed}",
              f"engine.threads={a.threads}"]
    if method == "dascpl_grow":  # the thesis' triggers 50/100/150 of 200, scaled to the budget
        triggers = [min(max(1, round(a.epochs * q)), a.epochs - 1) for q in (0.25, 0.5, 0.75)]
        common.append(f"train.triggers={triggers}")
    return common + METHODS[method][1]


def _exit_report(run_dir: Path, data_dir: str) -> dict:
    """Reload the trained net from its checkpoint and write its early-exit curve."""
    from locallearn import runs
    from locallearn.config import apply_overrides, from_dict
    from locallearn.exits import early_exit_report
    from locallearn.train import Trainer, build_data, build_net

    state = runs.load_checkpoint(run_dir)
    cfg = from_dict(apply_overrides(state["config"], [f"data.data_dir={data_dir}"]))
    data = build_data(cfg)
    net = build_net(cfg, data)
    net.load_state_dict(state["net"])
    return early_exit_report(net, Trainer(net, data, cfg).test_batches(), out_dir=run_dir)


def _train(a: argparse.Namespace, method: str) -> dict:
    from locallearn import runs
    from locallearn.config import load_config
    from locallearn.train import run

    cfg = load_config(ROOT / "configs" / METHODS[method][0], _overrides(a, method))
    start = time.perf_counter()
    summary, run_dir = run(cfg)
    summary["bench_wall_seconds"] = time.perf_counter() - start
    rows = runs.read_metrics(run_dir)
    fractions = [r.get("train_macs_fraction", 1.0) for r in rows]
    summary["train_macs_fraction"] = sum(fractions) / len(fractions)
    summary["exit"] = _exit_report(run_dir, a.data_dir)
    summary["method"] = method
    return summary


def _tables(results: list[dict]) -> tuple[list, list]:
    main_rows, exit_rows = [], []
    for s in results:
        if "error" in s:
            main_rows.append([s["method"], "-", None, None, None, None, None, s["error"][:60]])
            continue
        main_rows.append([s["method"], s["engine"], s["final_acc"], s["stage_acc"],
                          s["train_seconds"], s["samples_per_s"], 100 * s["train_macs_fraction"], ""])
        e = s["exit"]
        best = e["best_within_1pt"]
        fixed = " ".join(f"{f['stage']}:{f['acc']:.1f}@{100 * f['macs_fraction']:.0f}%"
                         for f in e["fixed"])
        exit_rows.append([s["method"], e["full_acc"], fixed,
                          None if best is None or len(e["fixed"]) < 2 else best["threshold"],
                          None if best is None or len(e["fixed"]) < 2 else best["acc"],
                          None if best is None or len(e["fixed"]) < 2
                          else 100 * best["macs_fraction"]])
    return main_rows, exit_rows


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s in results:
        if "error" in s or len(s["exit"]["fixed"]) < 2:
            continue  # a net whose shallow stages cannot predict has no curve
        pts = sorted(s["exit"]["curve"], key=lambda p: p["macs_fraction"])
        ax.plot([p["macs_fraction"] for p in pts], [p["acc"] for p in pts], "o-", ms=3,
                label=s["method"])
    ax.set_xlabel("fraction of the full network's MACs (per test image)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("early exit by max-softmax threshold, CIFAR-10 VGG8 K=4")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data"))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=4000)
    p.add_argument("--test-subset", type=int, default=2000)
    p.add_argument("--augment", default="basic", choices=["none", "basic", "strong"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fresh", action="store_true",
                   help="forget earlier results (default: rerun methods replace their rows)")
    p.add_argument("--exit-only", action="store_true",
                   help="no training: recompute the early-exit curves of the saved runs")
    a = p.parse_args()

    import torch

    from locallearn.report import write_results

    torch.set_num_threads(a.threads)
    store = HERE / "results_runs.json"
    done = {} if a.fresh or not store.is_file() else {
        r["method"]: r for r in json.loads(store.read_text())}
    for method in [] if a.exit_only else a.methods:
        print(f"== {method}", flush=True)
        try:
            r = _train(a, method)
        except Exception as e:  # e.g. an engine the library does not wire into `run` yet
            r = {"method": method, "error": f"{type(e).__name__}: {e}"}
        done[method] = r
        print(r.get("error") or f"final {r['final_acc']:.2f} stages {r['stage_acc']} "
              f"{r['train_seconds']:.0f} s", flush=True)
        store.write_text(json.dumps(list(done.values()), indent=1, default=float))
    results = [done[m] for m in METHODS if m in done]
    if a.exit_only:
        for r in results:
            if "error" not in r:
                r["exit"] = _exit_report(HERE / "runs" / (r.get("name") or r["method"]), a.data_dir)
        store.write_text(json.dumps(results, indent=1, default=float))
    main_rows, exit_rows = _tables(results)
    meta = {"budget": f"{a.epochs} epochs of the first {a.train_subset} CIFAR-10 training images "
                      f"(JPEG copy in ../shared/data), tested on the first {a.test_subset} test "
                      f"images; VGG8 width {a.width}, K=4 cuts [2, 4, 5]; batch {a.batch}; Adam "
                      f"1e-3 cosine to 1e-5, no weight decay; augmentation {a.augment}",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                       f"(shared with other work while measured), torch threads {a.threads}",
            "command": "python benchmarks/scpl_cifar10/run.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                if k not in ("data_dir", "methods", "fresh", "exit_only")) + " --methods " + " ".join(a.methods)}
    print(write_results(HERE, "results", ["method", "engine", "final acc %", "stage acc %",
                                          "train s", "images/s", "train MACs %", "note"],
                        main_rows, meta))
    print(write_results(HERE, "results_exit",
                        ["method", "full acc %", "shortcut stage:acc@MACs", "best thr (<=1 pt)",
                         "acc %", "MACs %"], exit_rows, {"confidence": "max softmax"}))
    _plot(results, HERE / "exit_curves.png")


if __name__ == "__main__":
    main()
