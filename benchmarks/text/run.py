"""Text: end-to-end BP against local learning (CE heads, SCPL) on SST-2 and IMDB, K=4.

Every run trains a 4-layer LSTM or Transformer encoder (embedding + positions in the
first block, one block per layer), cut into K=4 stages (embedding + layer 1 | layer 2 |
layer 3 | layer 4), through the library's own ``locallearn.train.run`` from the
``configs/text_<data>_<model>.yaml`` files, with overrides for a short budget that is
the same for every method of a data set (same subset, epochs, batch, optimizer, sizes):

========  ===========================================================================
``bp``     end-to-end BP of the task head; per-stage CE heads on detached features
           (they report each stage's accuracy without changing the trunk's gradients)
``local``  sequential local learning: each stage trains by CE through its own
           mean-pooled MLP head on its detached input
``scpl``   SCPL: supervised contrastive loss (tau 0.1) on an MLP projector of each
           stage's mean-pooled output, CE classifier on the last stage; linear
           predictors on the detached outputs give the per-stage accuracies
========  ===========================================================================

Reported per run: test accuracy of every stage and of the final output, training time
(training steps only), wall time (training and evaluation), CPU time of the process,
samples/s and tokens/s (real, non-padding tokens of the training batches per second of
training) and tokens per CPU second of the whole run (a lower bound that contention on
a shared machine does not change much). Writes
``results.json`` and ``results.md`` next to this file; run folders go to ``runs/``.

Usage: python benchmarks/text/run.py [--datasets sst2 imdb] [--models lstm transformer]
       [--methods bp local scpl] [--threads 1] [--quick] [--long]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# The short equal budget of each data set: every model and method gets exactly this.
BUDGETS: dict[str, dict[str, Any]] = {
    # 30k of the 67,349 training sentences, 1 epoch; tested on the whole dev set (872)
    "sst2": {"max_len": 15, "train_subset": 30000, "test_subset": 0, "epochs": 1, "dim": 128},
    # IMDB reviews average ~270 tokens: max_len 128 (SCPL uses 350), 6k of the 25k
    # training reviews, 1 epoch, the first 2k of the (shuffled) test reviews
    "imdb": {"max_len": 128, "train_subset": 6000, "test_subset": 2000, "epochs": 1, "dim": 64},
}
QUICK = {"train_subset": 256, "test_subset": 128, "epochs": 1, "dim": 16}  # smoke test
# --long: 4x the training samples seen on IMDB (half the reviews, twice), 5k test reviews
LONG = {"imdb": {"train_subset": 12500, "test_subset": 5000, "epochs": 2}}
BATCH, LR = 64, 1e-3

METHODS: dict[str, list[str]] = {
    "bp": ["engine=backprop", "engine.aux_heads=true", "objective.name=ce", "objective.predictor="],
    "local": ["engine=local", "objective.name=ce", "objective.predictor="],
    "scpl": ["engine=local", "objective.name=supcon", "objective.predictor=linear"],
}


def model_options(model: str, dim: int) -> str:
    """The ``model.options`` override: 4 layers of width ``dim``, mean pooling."""
    if model == "lstm":
        return f"model.options={{embed_dim: {dim}, hidden: {dim}, layers: 4, pool: mean}}"
    return (f"model.options={{dim: {dim}, heads: 4, ff: {2 * dim}, layers: 4, dropout: 0.1, "
            f"norm_first: true, pool: mean}}")


def overrides(data: str, model: str, method: str, budget: dict[str, Any], data_dir: str,
              seed: int) -> list[str]:
    """Every override of one run on top of its YAML config."""
    out = [model_options(model, budget["dim"]), f"data.data_dir={data_dir}",
           f"data.batch_size={BATCH}", f"data.train_subset={budget['train_subset']}",
           f"data.test_subset={budget['test_subset']}",
           f"data.options={{max_len: {budget['max_len']}, vocab_size: 30000}}",
           f"optim.lr={LR}", f"train.epochs={budget['epochs']}", "train.progress=false",
           "train.checkpoint=false", f"train.seed={seed}", f"train.out_dir={HERE / 'runs'}",
           f"train.name={data}-{model}-{method}", *METHODS[method]]
    if method == "scpl":
        out.append(f"objective.options={{temperature: 0.1, projector: mlp, "
                   f"proj_dim: {budget['dim']}, proj_hidden: {2 * budget['dim']}}}")
    return out


def real_tokens_per_sample(cfg: Any) -> float:
    """Mean number of non-padding tokens of the training samples a run uses."""
    from locallearn.train import build_data

    x = build_data(cfg).train.x  # cached: the encoded arrays are read, not re-tokenized
    return float((x != 0).sum(1).float().mean())


def train_one(data: str, model: str, method: str, budget: dict[str, Any], a: Any) -> dict:
    """Train one configuration; returns the run summary plus benchmark figures."""
    from locallearn.config import load_config
    from locallearn.train import run

    cfg = load_config(ROOT / "configs" / f"text_{data}_{model}.yaml",
                      overrides(data, model, method, budget, a.data_dir, a.seed))
    tokens = real_tokens_per_sample(cfg)
    load_before = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    summary, run_dir = run(cfg)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    # the machine is shared: CPU seconds of this process are steadier than wall time; they
    # include evaluation and set-up, so tokens/CPU-s is a lower bound of training speed
    trained = summary["samples_per_s"] * summary["train_seconds"]
    summary.update(method=method, data=data, model=model, run_dir=str(run_dir),
                   bench_wall_seconds=wall, cpu_seconds=cpu, real_tokens_per_sample=tokens,
                   tokens_per_s=summary["samples_per_s"] * tokens,
                   tokens_per_cpu_s=trained * tokens / max(cpu, 1e-9),
                   load_avg_1min=[load_before, os.getloadavg()[0]], budget=budget)
    return summary


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: list[dict]) -> str:
    """A markdown table of the results, with each local method's gap to BP."""
    bp = {(r["data"], r["model"]): r["final_acc"] for r in results if r["method"] == "bp"}
    lines = ["| data | model | method | final acc % | vs BP | stage acc % (1/2/3/4) | "
             "train s | wall s | CPU s | samples/s | tokens/s | tokens/CPU-s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = bp.get((r["data"], r["model"]))
        gap = "" if r["method"] == "bp" or ref is None else f"{r['final_acc'] - ref:+.1f}"
        stages = "/".join(_fmt(v) for v in r["stage_acc"])
        lines.append(f"| {r['data']} | {r['model']} | {r['method']} | {_fmt(r['final_acc'])} | "
                     f"{gap} | {stages} | {_fmt(r['train_seconds'], 0)} | "
                     f"{_fmt(r['bench_wall_seconds'], 0)} | {_fmt(r['cpu_seconds'], 0)} | "
                     f"{_fmt(r['samples_per_s'], 0)} | {_fmt(r['tokens_per_s'], 0)} | "
                     f"{_fmt(r['tokens_per_cpu_s'], 0)} |")
    return "\n".join(lines)


def environment(threads: int) -> dict[str, Any]:
    """Machine, versions and threads, for the README."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data"))
    p.add_argument("--datasets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--models", nargs="+", default=["lstm", "transformer"],
                   choices=["lstm", "transformer"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny subsets and sizes (smoke test)")
    p.add_argument("--long", action="store_true",
                   help="the larger budget of LONG (IMDB only); default stem results_long")
    p.add_argument("--out", default=None, help="results file stem (default results)")
    a = p.parse_args()
    a.out = a.out or str(HERE / ("results_long" if a.long else "results"))
    if a.long:
        a.datasets = [d for d in a.datasets if d in LONG]

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(a.threads)
    results = []
    previous = Path(f"{a.out}.json")
    if a.long and previous.is_file():  # long runs add to (or redo) what earlier ones measured
        planned = {(d, m, me) for d in a.datasets for m in a.models for me in a.methods}
        results = [r for r in json.loads(previous.read_text())["results"]
                   if (r["data"], r["model"], r["method"]) not in planned]
    for data in a.datasets:
        budget = {**BUDGETS[data], **(LONG.get(data, {}) if a.long else {}),
                  **(QUICK if a.quick else {})}
        for model in a.models:
            for method in a.methods:
                r = train_one(data, model, method, budget, a)
                results.append(r)
                print(f"{data} {model} {method}: final {r['final_acc']:.2f}% stages "
                      f"{r['stage_acc']} in {r['bench_wall_seconds']:.0f} s", flush=True)
                out = {"command": " ".join(["python", "benchmarks/text/run.py", *sys.argv[1:]]),
                       "environment": environment(a.threads), "batch_size": BATCH, "lr": LR,
                       "results": results}
                Path(f"{a.out}.json").write_text(json.dumps(out, indent=2, default=float))
                Path(f"{a.out}.md").write_text(table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
