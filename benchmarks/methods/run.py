"""Benchmark: the field's local-learning methods against BP on CIFAR-10, at one short equal budget.

Group ``resnet32`` (ResNet-32 at width ``RESNET_WIDTH``, memory-balanced cuts, K = 4 and 8):
BP, checkpointed BP (``engine.checkpoint=blocks``, and ``stages`` at each K), DGL (CE of
1c2f heads), InfoPro softmax / contrast, ContSup E, AugLocal, MAN (DGL + momentum aux).
Group ``vgg8b`` (VGG8B at width ``VGG_WIDTH``): BP versus layer-wise PredSim (K = 7).

Every run of a group gets the same data, epochs, batch, optimiser, precision (the library
default, ``train.precision=auto``) and seed list. Per run: test accuracy, wall time of
training, and, measured on one training step of a fresh copy of the net with one batch:
peak bytes saved for backward (``SavedTensorsMeter``, in float32; for checkpointed BP plus
the largest recomputed segment, which the meter cannot see; on CUDA also the allocator's
peak), and the forward MACs
per sample of the auxiliary networks (local objectives and context encoders of stages
1..K-1) relative to the backbone's. Results go to ``results.json`` (or
``results_smoke.json``) after every run; finished runs are skipped on a rerun, so the
benchmark resumes where it stopped. The table (mean +- std over seeds) goes to
``results.md`` and stdout.

Usage:
    python benchmarks/methods/run.py --data-dir ../shared/data [--epochs 10] [--seeds 0 1]
        [--device cuda] [--only dgl-k4 ...] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import locallearn as ll
from locallearn.measure import SavedTensorsMeter, macs
from locallearn.report import table

HERE = Path(__file__).resolve().parent
MIB = 2**20

# The budget, in one place (every run of a group gets it).
EPOCHS = 10               # short: the published tables train 160 (InfoPro) to 400 epochs
BATCH = 128
SGD = ["optim.name=sgd", "optim.lr=0.1", "optim.momentum=0.9", "optim.nesterov=true",
       "optim.weight_decay=5e-4", "optim.schedule=cosine"]   # InfoPro / ContSup recipe
ADAM = ["optim.name=adam", "optim.lr=5e-4", "optim.weight_decay=0", "optim.schedule=cosine"]
RESNET_WIDTH = 0.5        # ResNet-32 channels 8/16/32 instead of 16/32/64
VGG_WIDTH = 0.25          # VGG8B channels 32..128 and FC 256 instead of 128..512 and 1024

RESNET = ["model=resnet32", f"model.options={{width: {RESNET_WIDTH}}}", "split.by=memory", *SGD]
VGG = ["model=vgg8b", f"model.options={{width: {VGG_WIDTH}}}", *ADAM]
BP = ["engine=backprop", "engine.aux_heads=false", "objective.head=1c2f"]
LOCAL = ["engine=local"]
RESNET_METHODS: dict[str, list[str]] = {   # name -> overrides (with split.k added)
    "dgl": [*LOCAL, "objective=ce", "objective.head=1c2f"],
    "infopro-softmax": [*LOCAL, "objective=infopro", "objective.head=1c2f",
                        "objective.options={variant: softmax}"],
    "infopro-contrast": [*LOCAL, "objective=infopro", "objective.head=1c2f",
                         "objective.options={variant: contrast}"],
    "contsup-E": [*LOCAL, "objective=ce", "objective.head=1c2f", "context=E"],
    "auglocal": [*LOCAL, "objective=auglocal", "objective.head=0c1f",
                 "objective.options={depth: 3, min_depth: 1}"],
    "man": [*LOCAL, "objective=ce", "objective.head=1c2f",
            "objective.options={momentum_aux: 0.995}"],
    "bp-ckpt-stages": [*BP, "engine.checkpoint=stages"],
}


def plan(ks: list[int]) -> dict[str, list[str]]:
    """Every run of the benchmark (without the seed): name -> overrides."""
    runs = {"resnet32-bp": [*RESNET, *BP, "split.k=4"],
            "resnet32-bp-ckpt-blocks": [*RESNET, *BP, "engine.checkpoint=blocks", "split.k=4"]}
    for k in ks:
        for method, extra in RESNET_METHODS.items():
            runs[f"resnet32-{method}-k{k}"] = [*RESNET, *extra, f"split.k={k}"]
    runs["vgg8b-bp"] = [*VGG, *BP, "objective.head=linear", "split.k=7"]
    runs["vgg8b-predsim-layerwise"] = [*VGG, *LOCAL, "objective=predsim", "objective.head=linear",
                                       "split.k=7"]
    return runs


def load(cfg: Any, train_subset: int, test_subset: int) -> Any:
    """The configured data set, cut to the subsets (0 = all)."""
    data = ll.load_data(cfg.data.name, cfg.data.data_dir, **cfg.data.options)
    if train_subset:
        data = dataclasses.replace(data, train=data.train.subset(train_subset))
    if test_subset:
        data = dataclasses.replace(data, test=data.test.subset(test_subset))
    return data


def first_batch(data: Any, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training images as a normalised float batch, and their labels."""
    from locallearn.data import batches

    return next(batches(data.train, n, shuffle=False, generator=None, device=device,
                        mean=data.meta.get("mean"), std=data.meta.get("std")))


def step_memory(net: Any, cfg: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Peak saved-for-backward bytes of one training step of ``net`` (a copy is trained)."""
    net = copy.deepcopy(net).to(x.device).train()
    e = cfg.engine
    engine = ll.build_engine(e.name, aux_heads=e.aux_heads, checkpoint=e.checkpoint)
    opts = [torch.optim.SGD(s.parameters(), lr=0.0) for s in net.stages]
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
    with SavedTensorsMeter(net) as meter:
        engine.step(net, opts, x, y)
    segment = segment_bytes(net, e.checkpoint, x, y) if e.checkpoint != "none" else 0
    out = {"saved_bytes": meter.peak_bytes + segment, "checkpoint_segment_bytes": segment}
    if cuda:
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(x.device) - base
    return out


def segment_bytes(net: Any, mode: str, x: torch.Tensor, y: torch.Tensor) -> int:
    """The largest saved-for-backward bytes of one checkpointed segment (a block or a stage).

    In backward a checkpoint recomputes one segment at a time, and the meter cannot see
    that recomputation: its peak is estimated as the largest segment's saved bytes,
    measured by a plain forward and backward of each segment alone.
    """
    largest, trail, h = 0, [], x
    for stage in net.stages:
        trail.append(h)
        parts = ([lambda t, s=stage: s(t, trail)] if mode == "stages" else
                 ([lambda t, s=stage: s.context(t, trail)] if stage.context is not None else [])
                 + list(stage.body))
        for part in parts:
            inp = h.detach().requires_grad_()
            with SavedTensorsMeter(net) as meter:
                out = part(inp)
                out.float().sum().backward()
            largest = max(largest, meter.peak_bytes)
            h = out.detach()
    net.zero_grad(set_to_none=True)
    return largest


@torch.no_grad()
def aux_macs(net: Any, x: torch.Tensor, y: torch.Tensor, bp_only: bool) -> dict[str, float]:
    """Forward MACs per sample: backbone bodies, and auxiliary nets of stages 1..K-1.

    ``bp_only``: BP without auxiliary heads trains no auxiliary net (only context counts).
    """
    net = copy.deepcopy(net).eval()
    body = aux = 0
    trail: list[Any] = []
    h = x
    for k, stage in enumerate(net.stages):
        trail.append(h)
        if stage.context is not None:
            aux += macs(lambda: stage.context(h, trail))
            inp = stage.context(h, trail)
        else:
            inp = h
        body += macs(lambda: stage.body(inp))
        h = stage.body(inp)
        if k < net.k - 1 and not bp_only:
            out = h
            aux += macs(lambda: stage.objective.loss(out, y))
    n = len(x)
    return {"body_macs": body / n, "aux_macs": aux / n, "aux_overhead": aux / max(body, 1)}


def ema_moved(net: Any, initial: Any) -> bool | None:
    """Whether MAN's EMA copies moved during training (None: no MAN stage)."""
    pairs = [(s.objective.ema, i.objective.ema) for s, i in zip(net.stages, initial.stages)
             if hasattr(s.objective, "ema")]
    if not pairs:
        return None
    return any(not torch.equal(a.cpu(), b.cpu()) for m, i in pairs
               for a, b in zip(m.parameters(), i.parameters()))


def train_one(name: str, overrides: list[str], data: Any, a: argparse.Namespace) -> dict[str, Any]:
    """Train one run; its figures."""
    cfg = ll.load_config(None, overrides)
    torch.manual_seed(cfg.train.seed)
    net = ll.build_net(cfg, data)
    initial = copy.deepcopy(net)
    device = torch.device(cfg.engine.device)
    x, y = first_batch(data, BATCH, device)
    bp_only = cfg.engine.name == "backprop" and not cfg.engine.aux_heads
    row: dict[str, Any] = {"name": name, "seed": cfg.train.seed, "k": net.k,
                           **step_memory(net, cfg, x, y),
                           **aux_macs(net, x.cpu(), y.cpu(), bp_only)}
    start, cpu = time.perf_counter(), time.process_time()
    summary = ll.Trainer(net, data, cfg).fit()
    cpu = time.process_time() - cpu  # all threads' CPU seconds: less sensitive to other load
    row.update(final_acc=summary["final_acc"], stage_acc=summary["stage_acc"],
               train_seconds=summary["train_seconds"], wall_seconds=time.perf_counter() - start,
               cpu_seconds=cpu,
               epochs=summary["epochs"], precision=summary.get("precision"),
               ema_moved=ema_moved(net, initial), threads=torch.get_num_threads(),
               load_avg_1min=os.getloadavg()[0])
    return row


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(results: dict[str, dict[str, Any]], runs: dict[str, list[str]], meta: str) -> str:
    """Markdown table: one row per run name, mean ± std over its seeds."""
    rows = []
    for name in runs:
        done = [r for key, r in results.items() if key.rsplit("-s", 1)[0] == name]
        if not done:
            continue
        r0 = done[0]
        rows.append([name, r0["k"], len(done), mean_std([r["final_acc"] for r in done]),
                     f"{r0['saved_bytes'] / MIB:.1f}",
                     f"{r0['cuda_peak_bytes'] / MIB:.1f}" if "cuda_peak_bytes" in r0 else "-",
                     f"{100 * r0['aux_overhead']:.0f}%",
                     mean_std([r["train_seconds"] for r in done]),
                     mean_std([r["cpu_seconds"] for r in done if "cpu_seconds" in r])])
    head = ["run", "K", "seeds", "test acc %", "saved MiB/step", "CUDA peak MiB", "aux MACs",
            "train s (wall)", "CPU s (fit)"]
    notes = ""
    if any(r.get("ema_moved") is False for r in results.values()):
        notes = ("\nNote: in the MAN runs the EMA copies did not move (the training loop did not "
                 "call LocalNet.update_momentum()): they are DGL with a frozen copy of the next "
                 "block.\n")
    return f"{meta}\n\n{table(head, rows)}\n{notes}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(HERE.parents[1] / ".." / "shared" / "data"))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--train-subset", type=int, default=0, help="train on N images (0 = all)")
    p.add_argument("--only", nargs="*", default=[], help="run names to run (default: all)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny budget (256 images, 1 epoch, 1 seed, K=4) into results_smoke.*")
    a = p.parse_args()
    train_subset, test_subset = a.train_subset, 0
    if a.smoke:
        a.epochs, a.seeds, a.ks, train_subset, test_subset = 1, a.seeds[:1], [4], 256, 128
    stem = "results_smoke" if a.smoke else "results"
    out = HERE / f"{stem}.json"
    if a.train_subset and not a.smoke:
        stem = f"results_n{a.train_subset}"
        out = HERE / f"{stem}.json"
    results: dict[str, dict[str, Any]] = json.loads(out.read_text()) if out.exists() else {}
    common = ["data=cifar10", f"data.data_dir={a.data_dir}", f"data.batch_size={BATCH}",
              "data.augment=basic", f"train.epochs={a.epochs}", f"train.eval_every={a.epochs}",
              "train.progress=false", "train.checkpoint=false", f"engine.device={a.device}"]
    runs = plan(a.ks)
    data = load(ll.load_config(None, common), train_subset, test_subset)
    for name, overrides in runs.items():
        if a.only and name not in a.only:
            continue
        for seed in a.seeds:
            key = f"{name}-s{seed}"
            if key in results:
                continue  # finished earlier: resume
            row = train_one(name, [*common, *overrides, f"train.seed={seed}"], data, a)
            results[key] = row
            out.write_text(json.dumps(results, indent=1, default=float))
            print(f"{key}: acc {row['final_acc']:.2f}  saved {row['saved_bytes'] / MIB:.1f} MiB  "
                  f"aux {100 * row['aux_overhead']:.0f}%  {row['train_seconds']:.0f} s", flush=True)
    images = f" ({train_subset} training images)" if train_subset else ""
    meta = (f"CIFAR-10{images}, {a.epochs} epochs, batch "
            f"{BATCH}, crop+flip, seeds {a.seeds}, device {a.device}; ResNet-32 width "
            f"{RESNET_WIDTH} with SGD lr 0.1 nesterov cosine, VGG8B width {VGG_WIDTH} with Adam "
            f"lr 5e-4 cosine. Command: python benchmarks/methods/run.py --data-dir "
            f"{a.data_dir}{' --smoke' if a.smoke else ''}"
            f"{f' --train-subset {a.train_subset}' if a.train_subset and not a.smoke else ''}"
            f"{f' --epochs {a.epochs}' if a.epochs != EPOCHS and not a.smoke else ''}")
    loads = [r["load_avg_1min"] for r in results.values() if "load_avg_1min" in r]
    threads = sorted({r["threads"] for r in results.values() if "threads" in r})
    if loads:
        meta += (f"\n\nHost: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"torch threads {threads}, 1-min load average at the end of each run "
                 f"{min(loads):.1f}-{max(loads):.1f}.")
    text = report(results, runs, meta)
    (HERE / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
