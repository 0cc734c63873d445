"""Local SimCLR with constant versus depth-increasing difficulty, against end-to-end SimCLR.

CIFAR-10 from ../shared/data, VGG6a at width 0.25, K = 2 and 4, one short budget shared
by every run (same data, epochs, batch, optimizer, seed). Five runs:

=================  ========  =====================================================
run                engine    objective
=================  ========  =====================================================
``e2e``            backprop  NT-Xent on the last stage only (K=4 cuts; its stage 2
                             and 4 outputs are the K=2 boundaries)
``const-k2/k4``    local     NT-Xent per stage, the same settings at every stage
``sched-k2/k4``    local     NT-Xent per stage, easier early (``SCHEDULE``)
=================  ========  =====================================================

Each run ends with linear probes on every stage's frozen features (train subset ->
test subset) and their effective rank. Writes ``results.json``, ``results.md`` and
``probe_all.png`` here; run folders go to ``runs/`` (git-ignored). A finished run
folder is reused, so an interrupted benchmark picks up where it stopped.

Usage: PYTHONPATH=src python3 benchmarks/selfsup/run.py [--epochs 3] [--train-subset 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / ".." / "shared" / "data"

# The shared budget, one place (every run gets exactly this).
BUDGET = [
    "model=vgg6a", "model.options={width: 0.25}",   # convs 32 M 64 M 128 M 128
    "data=cifar10", "data.augment=strong",           # SimCLR crop/flip/jitter/grey (kornia)
    "data.batch_size=256",                           # 256 images = 512 views, 510 negatives
    "optim=adam", "optim.lr=0.001", "optim.weight_decay=0.000001", "optim.schedule=cosine",
    "train.seed=0", "train.progress=false", "train.eval_every=1000",  # nothing to evaluate
    "train.checkpoint=true",
]
# Constant difficulty: SimCLR's CIFAR settings at every stage.
CONSTANT = {"temperature": 0.5, "neg_fraction": 1.0, "projector": "mlp", "proj_hidden": 512,
            "proj_dim": 128}
# Depth-increasing difficulty: easy early stages, the last stage as CONSTANT.
SCHEDULE = {
    "temperature": {"rule": "geometric", "first": 1.0, "last": 0.5},     # soft -> sharp
    "neg_fraction": {"rule": "geometric", "first": 0.0625, "last": 1.0},  # 32 -> 510 negatives
    "proj_hidden": {"rule": "geometric", "first": 2048, "last": 512},    # wide -> narrow projector
}
RUNS = [("e2e", "backprop", 4, False), ("const-k2", "local", 2, False),
        ("const-k4", "local", 4, False), ("sched-k2", "local", 2, True),
        ("sched-k4", "local", 4, True)]


def flow(d: dict) -> str:
    """A dict as a YAML flow mapping for a dotted override."""
    return json.dumps(d)


def overrides(name: str, engine: str, k: int, scheduled: bool, args: argparse.Namespace) -> list[str]:
    """The dotted overrides of one run: the shared budget plus what the run varies."""
    out = BUDGET + [
        f"data.data_dir={DATA}", f"data.train_subset={args.train_subset}",
        f"data.test_subset={args.test_subset}", f"train.epochs={args.epochs}",
        f"engine={engine}", "engine.aux_heads=false", f"split.k={k}", "objective=simclr",
        f"objective.options={flow(CONSTANT)}", f"train.out_dir={args.out}", f"train.name={name}",
    ]
    return out + ([f"objective.difficulty={flow(SCHEDULE)}"] if scheduled else [])


def run_one(name: str, engine: str, k: int, scheduled: bool, args: argparse.Namespace) -> dict:
    """Train (or reuse) one run and return its summary with the probe figures."""
    from locallearn.config import load_config
    from locallearn.train import run

    folder = Path(args.out) / name
    if (folder / "summary.json").is_file():
        summary = json.loads((folder / "summary.json").read_text())
        if "probe_acc" in summary:
            return summary
    summary, _ = run(load_config(None, overrides(name, engine, k, scheduled, args)))
    return summary


def random_init(args: argparse.Namespace) -> dict:
    """Probe figures of the untrained net (K=4 cuts): the floor that training must beat."""
    from locallearn.config import load_config
    from locallearn.probe import probe_net
    from locallearn.train import build_data, build_net

    path = Path(args.out) / "random-init.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = load_config(None, overrides("random-init", "local", 4, False, args))
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    result = {"k": 4, "train_seconds": 0.0, **probe_net(build_net(cfg, data), data)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def table(results: dict[str, dict]) -> str:
    """The markdown results table: probe accuracy (effective rank) per stage."""
    lines = ["| run | K | probe acc % per stage | effective rank per stage | train s |",
             "|---|---|---|---|---|"]
    for name, s in results.items():
        acc = " / ".join(f"{a:.1f}" for a in s["probe_acc"])
        rank = " / ".join(f"{r:.1f}" for r in s["effective_rank"])
        lines.append(f"| {name} | {s['k']} | {acc} | {rank} | {s['train_seconds']:.0f} |")
    return "\n".join(lines)


def at_k2(r: dict) -> dict:
    """A K=4 result read at the K=2 boundaries (the count split's cuts are [2] and [1, 2, 3])."""
    return {**r, "k": 2, "probe_acc": r["probe_acc"][1::2], "effective_rank": r["effective_rank"][1::2]}


def goal(results: dict[str, dict]) -> dict:
    """Share of the K=4 last-stage gap (const local -> e2e) the schedule closes."""
    e2e, const, sched = (results[n]["probe_acc"][-1] for n in ("e2e", "const-k4", "sched-k4"))
    gap = e2e - const
    return {"e2e": e2e, "const": const, "sched": sched, "gap": gap,
            "closed": (sched - const) / gap if gap > 0 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=5000)
    p.add_argument("--out", default=str(HERE / "runs"))
    a = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {}
    for name, engine, k, scheduled in RUNS:
        t = time.perf_counter()
        results[name] = run_one(name, engine, k, scheduled, a)
        print(f"{name}: probe {' / '.join(f'{v:.1f}' for v in results[name]['probe_acc'])}, "
              f"rank {' / '.join(f'{v:.1f}' for v in results[name]['effective_rank'])} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    e2e, rnd = results["e2e"], random_init(a)
    results = {"random-init-k2": at_k2(rnd), "e2e-k2": at_k2(e2e),
               **{n: r for n, r in results.items() if n != "e2e"}, "e2e-k4": e2e,
               "random-init-k4": rnd}
    out = {"budget": BUDGET, "constant": CONSTANT, "schedule": SCHEDULE, "epochs": a.epochs,
           "train_subset": a.train_subset, "test_subset": a.test_subset,
           "threads": torch.get_num_threads(),
           "train_seconds_total": sum(r["train_seconds"] for n, r in results.items()
                                      if not n.endswith("-k2") or not n.startswith(("e2e", "random"))),
           "wall_seconds_this_call": time.perf_counter() - start,  # finished runs are reused
           "results": {n: {k: r[k] for k in ("k", "probe_acc", "effective_rank", "train_seconds")}
                       for n, r in results.items()},
           "goal": goal({"e2e": e2e, **results})}
    (HERE / "results.json").write_text(json.dumps(out, indent=2))
    (HERE / "results.md").write_text(table(results) + "\n")
    from locallearn.probe import plot_probe

    plot_probe({n: r for n, r in results.items() if r["k"] == 4}, HERE / "probe_all.png",
               title=f"CIFAR-10, VGG6a x0.25, {a.epochs} epochs on {a.train_subset} images, K=4")
    print(table(results))
    print(json.dumps(out["goal"]))


if __name__ == "__main__":
    main()
