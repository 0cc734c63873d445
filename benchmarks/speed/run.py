"""Training speed (images/s) of the library's engine step in fp32, bf16, channels-last and compiled.

``--part main`` times one end-to-end BP training step (``BackpropEngine.step``, K=1:
forward, loss, backward, SGD step) of each model on synthetic batches, for each of
these settings (the same :mod:`locallearn.precision` choices a run makes):

==================  ==============================================================
``fp32``             today's default before ``train.precision``: fp32, contiguous
``fp32+cl``          ``train.precision=fp32 train.channels_last=true``
``bf16``             ``train.precision=bf16 train.channels_last=false``
``bf16+cl``          ``train.precision=bf16 train.channels_last=true`` (= ``auto`` on
                     AVX512-BF16 / AMX CPUs and bf16 GPUs)
``bf16+cl+compile``  the above with ``train.compile=true``
==================  ==============================================================

at 1 and 2 torch threads. A measurement is W warm-up steps (compilation happens
there; its time is recorded) and T timed steps; images/s = batch x T / time.

``--part parity`` trains CIFAR-10 (the shared copy) for 2 epochs with BP and with local
learning K=4, in fp32 and with the ``auto`` default, 2 seeds each, through
``locallearn.train.run``, and reports the final test accuracy as mean +- std.

Results go to ``results_<part>.json`` / ``.md`` beside this file after every
measurement; a rerun skips what is already there (``--fresh`` starts over).

Usage: python benchmarks/speed/run.py [--part main|parity] [--smoke] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
MODELS: dict[str, dict[str, Any]] = {  # name -> builder options; text models get token ids
    "resnet20": {}, "resnet32": {}, "vgg11": {}, "vgg8": {},
    "lstm": {"vocab_size": 5000, "embed_dim": 128, "hidden": 256, "layers": 2},
    "transformer": {"vocab_size": 5000, "dim": 256, "heads": 4, "ff": 512, "layers": 2,
                    "dropout": 0.0},
}
TEXT_LEN = 64
STEP_SHARE = {"vgg8": 0.2, "vgg11": 0.5}  # the slow models take fewer timed steps (at least 2)
SETTINGS = {  # name -> (precision, channels_last, compile)
    "fp32": ("fp32", "false", "false"),
    "fp32+cl": ("fp32", "true", "false"),
    "bf16": ("bf16", "false", "false"),
    "bf16+cl": ("bf16", "true", "false"),
    "bf16+cl+compile": ("bf16", "true", "true"),
}
BASELINE = "fp32"


# -- one measurement ------------------------------------------------------------------------------

def synthetic_batches(model: str, batch: int, n: int, seed: int = 0) -> list[tuple[Any, Any]]:
    """``n`` fixed batches: 3x32x32 images (normalised noise) or token ids of length 64."""
    g = torch.Generator().manual_seed(seed)
    text = model in ("lstm", "transformer")
    vocab = MODELS[model].get("vocab_size", 2)
    return [((torch.randint(1, vocab, (batch, TEXT_LEN), generator=g) if text
              else torch.randn(batch, 3, 32, 32, generator=g)),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def build(model: str) -> Any:
    """ResNet/VGG/LSTM/Transformer as one stage (K=1) with the model's own head."""
    from locallearn.models import build_model
    from locallearn.network import LocalNet

    shape = (TEXT_LEN,) if model in ("lstm", "transformer") else (3, 32, 32)
    torch.manual_seed(0)
    return LocalNet.from_backbone(build_model(model, shape, 10, **MODELS[model]), 1)


def stepper(net: Any, choice: Any) -> Callable[[Any, Any], list[float]]:
    """One ``BackpropEngine.step`` whose :class:`StageUpdate` carries ``choice``, as in a run."""
    from locallearn.engines import BackpropEngine
    from locallearn.engines.base import StageUpdate

    update = StageUpdate(choice)
    engine = BackpropEngine(aux_heads=False, update=update)
    opts = [torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            for s in net.stages]
    return lambda x, y: engine.step(net, opts, update.input(x), y)


def measure(model: str, setting: str, threads: int, batch: int, warmup: int,
            steps: int) -> dict[str, Any]:
    """images/s of ``steps`` timed training steps after ``warmup`` steps."""
    from locallearn import precision

    torch.set_num_threads(threads)
    torch._dynamo.reset()  # every compiled measurement compiles afresh
    p, cl, comp = SETTINGS[setting]
    text = model in ("lstm", "transformer")
    choice = precision.resolve(p, "false" if text else cl, comp, "cpu")
    net = precision.prepare(build(model), choice)
    data = synthetic_batches(model, batch, 4)
    step = stepper(net, choice)
    share = STEP_SHARE.get(model, 1.0)
    steps = max(2, round(steps * share))
    warmup = warmup if choice.compile else max(1, round(warmup * share))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    for i in range(warmup):
        step(*data[i % len(data)])
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        losses = step(*data[i % len(data)])
    seconds = time.perf_counter() - start
    return {"model": model, "setting": setting, "threads": threads, "batch": batch,
            "images_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps,
            "warmup_s": warm, "load_1min": load, "loss": losses[-1],
            "choice": precision.describe(choice)}


# -- the main table -------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """Hardware, software and load, printed and saved with every table."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                  .splitlines() if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    from locallearn.precision import cpu_native_bf16

    return {"cpu": model, "cores": os.cpu_count(), "native bf16": cpu_native_bf16()[1]
            if cpu_native_bf16()[0] else "no", "torch": torch.__version__,
            "python": platform.python_version(),
            "load average at start (1/5/15 min)": "/".join(f"{v:.2f}" for v in os.getloadavg())}


def load_done(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["records"] if path.exists() else []


def save(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"meta": meta, "records": records}, indent=2, default=str))


def suffix(a: argparse.Namespace) -> str:
    """The result files' suffix: ``_<tag>`` for a named machine, ``_smoke`` for smoke runs."""
    return (f"_{a.tag}" if a.tag else "") + ("_smoke" if a.smoke else "")


def main_part(a: argparse.Namespace, meta: dict[str, Any]) -> None:
    path = HERE / f"results_main{suffix(a)}.json"
    records = [] if a.fresh else load_done(path)
    done = {(r["model"], r["setting"], r["threads"]) for r in records}
    for threads in a.threads:
        for model in a.models:
            for setting in a.settings:
                if (model, setting, threads) in done:
                    continue
                try:
                    r = measure(model, setting, threads, a.batch, a.warmup, a.steps)
                except Exception as e:  # noqa: BLE001 - record it and go on
                    r = {"model": model, "setting": setting, "threads": threads,
                         "error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{model:<12} {setting:<16} {threads} thr  "
                      + (f"{r['images_per_s']:8.1f} images/s  {r['ms_per_step']:7.1f} ms/step  "
                         f"warm-up {r['warmup_s']:5.1f} s  load {r['load_1min']:.2f}"
                         if "error" not in r else r["error"]), flush=True)
                records.append(r)
                save(path, meta, records)
    write_main_table(path, meta, records)


def write_main_table(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    from locallearn.report import table

    base = {(r["model"], r["threads"]): r["images_per_s"] for r in records
            if r["setting"] == BASELINE and "error" not in r}
    rows = [[r["model"], r["setting"], r["threads"], r.get("images_per_s"), r.get("ms_per_step"),
             (r["images_per_s"] / base[(r["model"], r["threads"])])
             if "error" not in r and (r["model"], r["threads"]) in base else None,
             r.get("warmup_s"), r.get("load_1min")] for r in records]
    text = table(["model", "setting", "threads", "images/s", "ms/step", "speed-up vs fp32",
                  "warm-up s", "load 1 min"], rows)
    notes = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    path.with_suffix(".md").write_text(text + "\n\n" + notes + "\n")
    print(text)


# -- accuracy parity ------------------------------------------------------------------------------

PARITY_RUNS = {  # name -> overrides
    "BP": ["engine=backprop", "split.k=1"],
    "local K=4": ["engine=local", "split.k=4", "objective.head=0c1f"],
}


def parity_overrides(a: argparse.Namespace, out: str) -> list[str]:
    return ["model=resnet20", "data=cifar10", f"data.data_dir={a.data_dir}",
            "data.augment=basic", f"data.batch_size={a.batch if not a.smoke else 64}",
            f"train.epochs={a.epochs}", "train.progress=false", "train.checkpoint=false",
            f"train.out_dir={out}", "optim=sgd", "optim.lr=0.05", "optim.schedule=cosine"] + (
        [f"data.train_subset={a.train_subset}"] if a.train_subset else []) + (
        ["data.train_subset=256", "data.test_subset=256"] if a.smoke else [])


def parity_part(a: argparse.Namespace, meta: dict[str, Any]) -> None:
    import tempfile

    from locallearn.config import load_config
    from locallearn.train import run

    path = HERE / f"results_parity{suffix(a)}.json"
    records = [] if a.fresh else load_done(path)
    done = {(r["run"], r["precision"], r["seed"]) for r in records}
    torch.set_num_threads(a.threads[-1])
    with tempfile.TemporaryDirectory() as out:
        for name, extra in PARITY_RUNS.items():
            for prec in ("fp32", "auto"):
                for seed in a.seeds:
                    if (name, prec, seed) in done:
                        continue
                    load = os.getloadavg()[0]
                    cfg = load_config(None, [*parity_overrides(a, out), *extra,
                                             f"train.precision={prec}",
                                             "train.channels_last="
                                             + ("auto" if prec == "auto" else "false"),
                                             f"train.seed={seed}"])
                    start = time.perf_counter()
                    summary, run_dir = run(cfg)
                    env = json.loads((run_dir / "env.json").read_text())
                    r = {"run": name, "precision": prec, "seed": seed,
                         "final_acc": summary["final_acc"], "wall_s": time.perf_counter() - start,
                         "samples_per_s": summary["samples_per_s"], "load_1min": load,
                         "recorded_choice": env.get("precision")}
                    print(f"{name:<10} {prec:<5} seed {seed}: {r['final_acc']:.2f} %  "
                          f"{r['wall_s']:.0f} s  ({r['recorded_choice']})", flush=True)
                    records.append(r)
                    save(path, meta, records)
    write_parity_table(path, meta, records)


def write_parity_table(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    from locallearn.report import table

    rows = []
    for name in PARITY_RUNS:
        for prec in ("fp32", "auto"):
            accs = [r["final_acc"] for r in records if (r["run"], r["precision"]) == (name, prec)]
            secs = [r["wall_s"] for r in records if (r["run"], r["precision"]) == (name, prec)]
            if accs:
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                rows.append([name, prec, len(accs), f"{statistics.mean(accs):.2f} ± {std:.2f}",
                             statistics.mean(secs)])
    text = table(["run", "train.precision", "seeds", "test acc % (mean ± std)", "wall s / run"],
                 rows)
    path.with_suffix(".md").write_text(text + "\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in meta.items()) + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["main", "parity"], default="main")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (compilation)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=2, help="parity: epochs per run")
    p.add_argument("--train-subset", type=int, default=0, help="parity: first N train images")
    p.add_argument("--data-dir", default=str(HERE.parents[1].parent / "shared" / "data"))
    p.add_argument("--fresh", action="store_true", help="ignore saved results")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny steps, separate files")
    p.add_argument("--tag", default="", help="results_<part>_<tag>.json: keep another machine's "
                   "results beside these")
    a = p.parse_args()
    if a.smoke:
        a.batch, a.warmup, a.steps, a.epochs, a.seeds = 8, 1, 1, 1, [0]
        if a.part == "main" and a.settings == list(SETTINGS):
            a.settings = [s for s in SETTINGS if "compile" not in s]  # compiling takes minutes
    meta = {**machine(), "threads": a.threads, "batch": a.batch,
            "steps": f"{a.warmup} warm-up + {a.steps} timed ({', '.join(f'{m} x{v}' for m, v in STEP_SHARE.items())})",
            "part": a.part,
            "note": "2-core machine shared with other engineers' agents: load column per row",
            "command": "python " + " ".join(["benchmarks/speed/run.py", *sys.argv[1:]])}
    print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    (main_part if a.part == "main" else parity_part)(a, meta)


if __name__ == "__main__":
    main()
