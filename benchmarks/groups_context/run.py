"""Benchmark: neuron groups (GN-DGL) and context supply (ContSup) on CIFAR-10, short equal budget.

Parts (``--part``, default all, in this order):

``cuts``  memory-balanced cut points of ResNet-32/110, K = 2/4/8/16, without context and
          with E / R1 / R1E (the cuts count the encoders' saved activations).
``a``     VGG6a (reduced width), K=4: DGL versus G = 2, 4 width groups, each with none /
          diversity / stop-gradient + diversity: accuracy and largest-node MACs.
``b``     ResNet-20 (reduced width), K = 4 and 8: plain local versus context E, R1, R1E,
          with BP as reference: accuracy, peak saved-activation bytes, context tensors,
          wall time.

Every run of a part gets the same data, epochs, batch, optimiser and seed. Results go to
``results.json`` beside this file after every run (so a partial run keeps its figures)
and as markdown tables to ``results.md``.

Command: ``PYTHONPATH=src python3 benchmarks/groups_context/run.py`` (see README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from locallearn.config import load_config
from locallearn.context import (
    encoder_memory,
)
from locallearn.data import load_data
from locallearn.models import build_model
from locallearn.report import table
from locallearn.runs import environment
from locallearn.split import balanced_cuts, block_costs, find_cuts
from locallearn.train import Trainer, build_net

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE.parents[1] / ".." / "shared" / "data"
MIB = 2**20

# The budget, in one place. Chosen to keep the whole benchmark near 30 CPU minutes on
# one shared core: a 5,000-image training subset, 2 epochs, no augmentation. Adam, because
# SGD at lr 0.05 diverged with the flatten-linear auxiliary heads in a first attempt.
BUDGET = {
    "train_subset": 5000,       # first N CIFAR-10 training images
    "test_subset": 2000,        # first N test images
    "epochs": 2,
    "batch_size": 64,
    "optim": ["optim.name=adam", "optim.lr=1e-3", "optim.weight_decay=0",
              "optim.schedule=cosine"],
}
VGG_WIDTH = 0.25      # VGG6a channels 32/64/128/128 instead of 128/256/512/512
RESNET_WIDTH = 0.5    # ResNet-20 channels 8/16/32 instead of 16/32/64
AUX_HEAD = "linear"   # flatten -> linear: a cheap auxiliary head that keeps spatial detail
GROUP_VARIANTS = {    # name -> (detach_ratio, diversity_weight)
    "none": (0.0, 0.0),
    "diversity": (0.0, 0.5),
    "stopgrad+diversity": (1.0, 0.5),
}


def base_overrides() -> list[str]:
    b = BUDGET
    return ["data.name=cifar10", f"data.data_dir={DATA_DIR}", f"data.batch_size={b['batch_size']}",
            f"data.train_subset={b['train_subset']}", f"data.test_subset={b['test_subset']}",
            f"train.epochs={b['epochs']}", f"train.eval_every={b['epochs']}",
            "train.progress=false", "train.checkpoint=false", "train.seed=0",
            f"objective.head={AUX_HEAD}", *b["optim"]]


def train_one(data: Any, overrides: list[str]) -> dict[str, Any]:
    """Build and train one configuration on the shared data; return its summary."""
    cfg = load_config(None, base_overrides() + overrides)
    torch.manual_seed(cfg.train.seed)
    net = build_net(cfg, data)
    trainer = Trainer(net, data, cfg, run_dir=None)
    start = time.perf_counter()
    summary = trainer.fit()
    summary["wall_seconds"] = time.perf_counter() - start
    summary["context_bytes"] = context_bytes(net, cfg.data.batch_size)
    summary["overrides"] = overrides
    return summary


def context_bytes(net: Any, batch: int) -> int:
    """Bytes of trail tensors the neediest stage receives besides its input (per batch)."""
    shapes = [s.in_shape for s in net.stages]
    return max((sum(4 * math.prod(shapes[j]) * batch for j in net.needs(k))
                for k in range(net.k)), default=0)


# -- part cuts ---------------------------------------------------------------------------

def cuts_table(batch: int = 32) -> list[dict[str, Any]]:
    """Memory-balanced cuts of ResNet-32/110 with and without context supply."""
    rows = []
    for model in ("resnet32", "resnet110"):
        backbone = build_model(model, (3, 32, 32), 10)
        costs = block_costs(backbone, "memory", batch)
        for mode in ("none", "E", "R1", "R1E"):
            start = [encoder_memory(backbone, mode, i, batch) for i in range(len(costs))]
            for k in (2, 4, 8, 16):
                cuts = (balanced_cuts(costs, k) if mode == "none"
                        else balanced_cuts(costs, k, start_costs=start))
                edges = [0, *cuts, len(costs)]
                per_stage = [sum(costs[a:b]) + start[a] for a, b in zip(edges, edges[1:])]
                rows.append({"model": model, "mode": mode, "k": k, "cuts": cuts,
                             "max_stage_mib": max(per_stage) / MIB,
                             "bp_mib": sum(costs) / MIB,
                             "encoders_mib": sum(start[a] for a in edges[:-1]) / MIB})
                print(f"cuts {model} {mode} K={k}: {cuts}", flush=True)
    return rows


# -- parts a and b -----------------------------------------------------------------------

def part_a(data: Any, record: Any) -> None:
    common = ["model.name=vgg6a", f"model.options={{width: {VGG_WIDTH}}}", "split.k=4"]
    record("a", "DGL (G=1)", train_one(data, common))
    for groups in (2, 4):
        for name, (ratio, weight) in GROUP_VARIANTS.items():
            run = [*common, f"split.groups={groups}", f"objective.detach_ratio={ratio}",
                   f"objective.diversity_weight={weight}"]
            record("a", f"G={groups} {name}", train_one(data, run))


LONG_A = {"DGL (G=1)": (1, 0.0, 0.0), "G=4 none": (4, 0.0, 0.0),
          "G=4 stopgrad+diversity": (4, 1.0, 0.5), "G=4 diversity": (4, 0.0, 0.5),
          "G=4 stopgrad": (4, 1.0, 0.0)}  # name -> (groups, detach_ratio, diversity_weight)


def part_a_long(data: Any, record: Any, variants: list[str], seeds: tuple[int, ...] = (0, 1)) -> None:
    """Part (a) at a larger budget and several seeds (``--variants`` of ``LONG_A``)."""
    common = ["model.name=vgg6a", f"model.options={{width: {VGG_WIDTH}}}", "split.k=4"]
    for seed in seeds:
        for name in variants:
            groups, ratio, weight = LONG_A[name]
            record("a", f"{name} seed {seed}", train_one(data, [
                *common, f"split.groups={groups}", f"objective.detach_ratio={ratio}",
                f"objective.diversity_weight={weight}", f"train.seed={seed}"]))


def part_b_long(data: Any, record: Any) -> None:
    """Part (b) at the larger budget: BP, and K=8 plain versus the recomputed encoders E, R1E."""
    common = ["model.name=resnet20", f"model.options={{width: {RESNET_WIDTH}}}"]
    record("b", "BP", train_one(data, [*common, "engine.name=backprop", "engine.aux_heads=false",
                                       "split.k=1"]))
    backbone = build_model("resnet20", (3, 32, 32), 10, width=RESNET_WIDTH)
    cuts = find_cuts(backbone, 8, "memory")
    for mode in ("none", "E", "R1E"):
        run = [*common, "split.k=8", "split.by=cuts", f"split.cuts={cuts}", f"context.name={mode}"]
        if mode != "none":
            run.append("context.recompute=true")
        record("b", f"K=8 {'plain' if mode == 'none' else mode + ' recompute'}", train_one(data, run))


def part_b(data: Any, record: Any) -> None:
    common = ["model.name=resnet20", f"model.options={{width: {RESNET_WIDTH}}}"]
    record("b", "BP", train_one(data, [*common, "engine.name=backprop", "engine.aux_heads=false",
                                       "split.k=1"]))
    backbone = build_model("resnet20", (3, 32, 32), 10, width=RESNET_WIDTH)
    for k in (4, 8):
        # The same memory-balanced cuts for every mode, so only the context differs.
        cuts = find_cuts(backbone, k, "memory")
        for mode in ("none", "E", "R1", "R1E"):
            run = [*common, f"split.k={k}", "split.by=cuts", f"split.cuts={cuts}",
                   f"context.name={mode}"]
            record("b", f"K={k} {'plain' if mode == 'none' else mode}", train_one(data, run))
    for mode in ("E", "R1", "R1E"):  # K=8 again with checkpointed (recomputed) encoders
        run = [*common, "split.k=8", "split.by=cuts", f"split.cuts={cuts}", f"context.name={mode}",
               "context.recompute=true"]
        record("b", f"K=8 {mode} recompute", train_one(data, run))


# -- reporting ---------------------------------------------------------------------------

def seed_means(runs: dict[str, Any]) -> list[list[Any]]:
    """Mean ± std over seeds of the runs named "<variant> seed <n>" (airbench-style reporting)."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for name, s in runs.items():
        if " seed " in name:
            by_variant.setdefault(name.rsplit(" seed ", 1)[0], []).append(s)

    def pm(values: list[float]) -> str:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
        return f"{mean:.2f} ± {std:.2f}"

    return [[variant, len(ss), pm([s["final_acc"] for s in ss]), pm([s["ens_weighted"] for s in ss]),
             ss[0]["largest_node_macs"] / 1e6, ss[0]["total_macs"] / 1e6]
            for variant, ss in by_variant.items()]


def markdown(results: dict[str, Any]) -> str:
    out = []
    means = seed_means(results.get("a", {}))
    if means:
        out += ["### (a) mean ± std over seeds", "",
                table(["run", "seeds", "final acc %", "ens 2^k %", "largest node MMACs",
                       "total MMACs"], means), ""]
    if results.get("cuts"):
        out += ["### Memory-balanced cuts (batch 32, full width)", "",
                table(["model", "context", "K", "cuts", "max stage MiB", "BP MiB", "encoders MiB"],
                      [[r["model"], r["mode"], r["k"], " ".join(map(str, r["cuts"])),
                        r["max_stage_mib"], r["bp_mib"], r["encoders_mib"]]
                       for r in results["cuts"]]), ""]
    if results.get("a"):
        out += ["### (a) VGG6a, K=4, width groups", "",
                table(["run", "final acc %", "ens 2^k %", "group acc % (last stage)",
                       "largest node MMACs", "total MMACs", "train s"],
                      [[name, s["final_acc"], s["ens_weighted"],
                        (s.get("group_acc") or [None])[-1], s["largest_node_macs"] / 1e6,
                        s["total_macs"] / 1e6, s["train_seconds"]]
                       for name, s in results["a"].items()]), ""]
    if results.get("b"):
        out += ["### (b) ResNet-20, context supply", "",
                table(["run", "final acc %", "ens 2^k %", "saved act MiB", "context MiB",
                       "largest node MMACs", "train s"],
                      [[name, s["final_acc"], s["ens_weighted"], s["saved_bytes_peak"] / MIB,
                        s["context_bytes"] / MIB, s["largest_node_macs"] / 1e6,
                        s["train_seconds"]] for name, s in results["b"].items()]), ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "cuts", "a", "b"], default="all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 256 train / 128 test images, 1 epoch, results_quick.*")
    p.add_argument("--long", action="store_true",
                   help="parts a (seeds 0, 1) and b (K=8) at 20k train / 5k test images x 4 "
                        "epochs: results_long.*")
    p.add_argument("--variants", nargs="+", choices=list(LONG_A), default=list(LONG_A)[:3],
                   help="with --long: the part (a) runs (added to results_long.*)")
    p.add_argument("--report", action="store_true",
                   help="only rewrite the markdown tables from the saved JSON (with --long/--quick)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    stem = "results_quick" if args.quick else "results_long" if args.long else "results"
    if args.quick:
        BUDGET.update(train_subset=256, test_subset=128, epochs=1)
    if args.long:
        BUDGET.update(train_subset=20000, test_subset=5000, epochs=4)
    out = HERE / f"{stem}.json"
    results: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    results["environment"] = environment("cpu", args.threads)
    results["budget"] = {**BUDGET, "vgg_width": VGG_WIDTH, "resnet_width": RESNET_WIDTH,
                         "aux_head": AUX_HEAD}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1, default=str))
        (HERE / f"{stem}.md").write_text(markdown(results) + "\n")

    if args.report:
        (HERE / f"{stem}.md").write_text(markdown(results) + "\n")
        print(markdown(results))
        return

    def record(part: str, name: str, summary: dict[str, Any]) -> None:
        keep = {k: v for k, v in summary.items() if k != "stages"}
        results.setdefault(part, {})[name] = keep
        print(f"[{part}] {name}: acc {summary['final_acc']:.2f}  "
              f"{summary['train_seconds']:.0f}s", flush=True)
        save()

    if args.part in ("all", "cuts") and not (args.quick or args.long):
        results["cuts"] = cuts_table()
        save()
    if args.part in ("all", "a", "b"):
        data = load_data("cifar10", str(DATA_DIR))
        data = dataclasses.replace(data, train=data.train.subset(BUDGET["train_subset"]),
                                   test=data.test.subset(BUDGET["test_subset"]))
        if args.part in ("all", "a"):
            if args.long:  # long runs add to what earlier long runs measured
                results.setdefault("a", {})
                part_a_long(data, record, args.variants)
            else:
                results["a"] = {}
                part_a(data, record)
        if args.part in ("all", "b"):
            results["b"] = {} if not args.long else results.get("b", {})
            (part_b_long if args.long else part_b)(data, record)
    print(markdown(results))


if __name__ == "__main__":
    main()
