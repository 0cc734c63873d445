"""Training throughput (images/s) of BP, sequential local learning, the pipeline and DDP on one machine.

Every mode trains the same model on the same batches of synthetic 32x32 images (a
throughput benchmark: the pixels do not matter) with SGD:

=============  ===========================================================================
``bp``          end-to-end BP in one process (K=1), with 1 and with 2 threads
``local``       sequential local learning in one process, K=2 (same cuts as the pipeline)
``pipeline``    engine=pipeline, K=2 stages on 2 worker processes x 1 thread
``ddp``         BP with torch DistributedDataParallel (gloo), 2 workers x 1 thread, each
                worker half of the global batch
=============  ===========================================================================

A measurement is one run of 1 + R epochs of S steps; the first epoch warms up, the
figure is the median over the other R epochs (R = 3). Every epoch of the pipeline
includes its fill and drain (one step of K=2 stages), as in real training. Pipeline efficiency is the sum
of the stages' compute time over (workers x wall time). The strong-scaling table
keeps the global batch fixed and grows the workers (pipeline: K = workers stages;
DDP: the batch is shared out); the weak-scaling table grows the global batch with
the workers. The load average of the machine is recorded with every measurement.

The ``replicas`` part (not run by default) compares, on 2 processes x 1 thread and K=2,
data-parallel stages (``engine.replicas=2`` with 1 worker: each rank holds both stages and
half of every batch, gradients all-reduced), the stage pipeline (2 workers, one stage
each) and DDP.

The ``groups`` part (not run by default) trains a net with G=2 width groups three ways:
sequentially, with the K stages on K workers, and with every (stage, group) node on its
own worker (``engine.placement=groups``, K x G workers).

Usage: python benchmarks/pipeline_throughput/run.py [--quick] [--parts main strong weak groups peers replicas]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODELS = {  # VGG at half width keeps a step near ResNet-20's cost on one core
    "vgg11-w0.5": ["model=vgg11", "model.options={width: 0.5}"],
    "resnet20": ["model=resnet20"],
    "resnet32": ["model=resnet32"],
}
SCALING_MODEL = "resnet20"


def overrides(model: str, batch: int, steps: int, epochs: int, out: str) -> list[str]:
    """The config shared by every mode: synthetic data, SGD, no checkpoints, one final eval."""
    return [*MODELS[model], "data=synthetic",
            f"data.options={{n_train: {batch * steps}, n_test: 64, shape: [3, 32, 32], "
            f"num_classes: 10}}", f"data.batch_size={batch}", "objective.head=0c1f",
            "optim=sgd", "optim.lr=0.01", "optim.schedule=constant", "split.by=time",
            f"train.epochs={epochs}", f"train.eval_every={epochs}", "train.checkpoint=false",
            "train.progress=false", f"train.out_dir={out}"]


def median_rate(rows: list[dict[str, Any]], key: str = "samples_per_s") -> float:
    """Median of ``key`` over the epochs after the warm-up epoch."""
    return statistics.median(r[key] for r in rows[1:])


# -- single process (BP, local), in a fresh worker process --------------------------------

def _single(args: tuple[list[str], int], queue: Any) -> None:
    import torch

    from locallearn import runs
    from locallearn.config import load_config
    from locallearn.train import run

    cfg_overrides, threads = args
    torch.set_num_threads(threads)
    _, run_dir = run(load_config(None, cfg_overrides))
    queue.put(runs.read_metrics(run_dir))


def single(ctx: Any, cfg: list[str], threads: int) -> list[dict[str, Any]]:
    """Train in one new process with ``threads`` threads; its metrics rows."""
    queue = ctx.SimpleQueue()
    p = ctx.Process(target=_single, args=((cfg, threads), queue))
    p.start()
    rows = queue.get()
    p.join()
    return rows


def pipeline(cfg: list[str], workers: int, micro: int = 1, replicas: int = 1,
             k: int | None = None) -> list[dict[str, Any]]:
    """Train with engine=pipeline, K = ``k`` (default ``workers``) stages on ``workers`` x
    ``replicas`` processes x 1 thread; its metrics rows."""
    from locallearn import runs
    from locallearn.config import load_config
    from locallearn.train import run

    _, run_dir = run(load_config(None, [*cfg, "engine=pipeline", f"split.k={k or workers}",
                                        f"engine.workers={workers}", "engine.threads=1",
                                        f"engine.micro_batches={micro}",
                                        f"engine.replicas={replicas}"]))
    return runs.read_metrics(run_dir)


# -- DDP ----------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, init: str, cfg_overrides: list[str], queue: Any) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from locallearn.config import load_config
    from locallearn.data import batches
    from locallearn.engines import stage_loss
    from locallearn.train import build_data, build_net

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    cfg = load_config(None, [*cfg_overrides, "split.k=1"])
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    net = build_net(cfg, data)

    class Whole(nn.Module):  # DDP needs the loss computed inside its forward
        def __init__(self) -> None:
            super().__init__()
            self.stage = net.stages[0]

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return stage_loss(self.stage, self.stage(x), y)

    from locallearn import precision

    choice = precision.resolve_config(cfg.train, "cpu")  # the same choice as the library runs
    precision.prepare(net, choice)
    model = DistributedDataParallel(Whole())
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(cfg.train.epochs):
        dist.barrier()
        start, n = time.perf_counter(), 0
        for x, y in batches(data.train, cfg.data.batch_size, shuffle=True, generator=g,
                            mean=data.meta["mean"], std=data.meta["std"]):
            part = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
            opt.zero_grad(set_to_none=True)
            with precision.autocast(choice):
                loss = model(precision.input_channels_last(x[part])
                             if choice.channels_last else x[part], y[part])
            loss.backward()
            opt.step()
            n += len(y)
        dist.barrier()
        rates.append({"samples_per_s": n / (time.perf_counter() - start)})
    if rank == 0:
        queue.put(rates)
    dist.destroy_process_group()


def ddp(ctx: Any, cfg: list[str], workers: int) -> list[dict[str, Any]]:
    """Data-parallel BP on ``workers`` processes x 1 thread; one row per epoch."""
    from locallearn.distributed.launch import free_port

    queue = ctx.SimpleQueue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_ddp_worker, args=(r, workers, init, cfg, queue))
             for r in range(workers)]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    return rows


# -- peers: torch.distributed.pipelining (GPipe, 1F1B) and checkpointed BP -----------------------

def pinned_cut(model: str) -> int:
    """The K=2 cut of ``model`` balanced by MACs: fixed, so every peer splits alike."""
    from locallearn.models import build_model
    from locallearn.split import find_cuts

    (cut,) = find_cuts(build_model(model.split("-")[0], (3, 32, 32), 10,
                                   **({"width": 0.5} if "w0.5" in model else {})), 2, "macs")
    return cut


def _pipelining_worker(rank: int, world: int, init: str, cfg_overrides: list[str], schedule: str,
                       micro: int, queue: Any) -> None:
    """One rank of end-to-end BP as a 2-stage torch.distributed.pipelining pipeline."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from locallearn.config import load_config
    from locallearn.data import batches
    from locallearn.train import build_data, build_net

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    cfg = load_config(None, cfg_overrides)  # split.k=2 at the pinned cut
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg)
    net = build_net(cfg, data)
    from locallearn import precision

    choice = precision.resolve_config(cfg.train, "cpu")  # the same choice as the library runs
    precision.prepare(net, choice)
    last = net.stages[1]
    class Contiguous(nn.Module):  # gloo sends only contiguous tensors (not channels-last)
        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h.contiguous()

    part = nn.Sequential(net.stages[0].body, Contiguous()) if rank == 0 else \
        nn.Sequential(last.body, last.objective.head)
    mb = cfg.data.batch_size // micro
    # Explicit example tensors: with shape inference the warm-up runs stage 2 on an
    # uninitialised buffer, which leaves NaN BatchNorm running statistics.
    # In this static mode the examples' requires_grad is the metadata: outputs and stage 2's
    # input must require grad, or no gradient travels back to stage 1.
    example_in = torch.zeros(mb, *(net.stages[rank].in_shape), requires_grad=rank > 0)
    example_out = torch.zeros(mb, *(net.stages[0].out_shape) if rank == 0 else
                              (net.num_classes,), requires_grad=True)
    if choice.precision != "fp32":  # autocast: activations and logits travel in its dtype
        example_out = example_out.detach().to(choice.dtype).requires_grad_()
        if rank > 0:
            example_in = example_in.detach().to(choice.dtype).requires_grad_()
    stage = PipelineStage(part, rank, world, torch.device("cpu"), input_args=example_in,
                          output_args=example_out)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = kind(stage, n_microbatches=micro, loss_fn=F.cross_entropy)
    opt = torch.optim.SGD(part.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    g = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(cfg.train.epochs):
        dist.barrier()
        start, n = time.perf_counter(), 0
        for x, y in batches(data.train, cfg.data.batch_size, shuffle=True, generator=g,
                            mean=data.meta["mean"], std=data.meta["std"], drop_last=True):
            opt.zero_grad(set_to_none=True)
            with precision.autocast(choice):  # forward (and the schedule's backward) in it
                if rank == 0:
                    sched.step(precision.input_channels_last(x) if choice.channels_last else x)
                else:
                    sched.step(target=y, losses=[])
            opt.step()
            n += len(y)
        dist.barrier()
        rates.append({"samples_per_s": n / (time.perf_counter() - start)})
    finite = all(bool(torch.isfinite(b).all()) for b in part.buffers() if b.is_floating_point())
    if rank == world - 1:
        queue.put([{**r, "finite_bn": finite} for r in rates])
    dist.destroy_process_group()


def pipelining(ctx: Any, cfg: list[str], schedule: str, micro: int) -> list[dict[str, Any]]:
    """torch.distributed.pipelining BP on 2 workers x 1 thread; one row per epoch."""
    from locallearn.distributed.launch import free_port

    queue = ctx.SimpleQueue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_pipelining_worker, args=(r, 2, init, cfg, schedule, micro, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    return rows


def peers_table(ctx: Any, out: str, batch: int, steps: int, epochs: int,
                models: list[str], prec: str = "auto", layout: str = "auto") -> list[list[Any]]:
    """Our pipeline beside DDP, GPipe, 1F1B and checkpointed BP: same model, cut, workers, batch."""
    rows = []
    for model in models:
        cut = pinned_cut(model)
        cfg = [o for o in overrides(model, batch, steps, epochs, out) if o != "split.by=time"]
        cfg += [f"train.precision={prec}", f"train.channels_last={layout}"]
        pinned = [*cfg, "split.by=cuts", f"split.cuts=[{cut}]"]
        print(f"{model} (cut after block {cut}, precision {prec})", flush=True)
        bp = [*cfg, "engine=backprop", "split.k=1"]
        m = {"BP, 1 process x 1 thread": measure("bp 1x1", lambda: single(ctx, bp, 1)),
             "BP, 1 process x 2 threads": measure("bp 1x2", lambda: single(ctx, bp, 2)),
             "checkpointed BP (blocks), 1 x 1 thread": measure("ckpt bp 1x1", lambda: single(
                 ctx, [*bp, "engine.checkpoint=blocks"], 1)),
             "checkpointed BP (blocks), 1 x 2 threads": measure("ckpt bp 1x2", lambda: single(
                 ctx, [*bp, "engine.checkpoint=blocks"], 2)),
             "DDP BP, 2 workers x 1 thread": measure("ddp 2x1", lambda: ddp(ctx, cfg, 2))}
        for sched, name in (("gpipe", "GPipe"), ("1f1b", "1F1B")):
            for micro in (2, 4):
                m[f"{name} BP (torch pipelining), 2 x 1, m={micro}"] = measure(
                    f"{sched} m={micro}", lambda: pipelining(
                        ctx, [*pinned, "split.k=2"], sched, micro))
        for micro in (1, 2, 4):
            m[f"our pipeline K=2, 2 x 1, m={micro}"] = measure(
                f"pipeline m={micro}", lambda: pipeline(pinned, 2, micro))
        base = m["DDP BP, 2 workers x 1 thread"]["images_per_s"]
        for mode, r in m.items():
            rows.append([model, cut, mode, r["images_per_s"], r["images_per_s"] / base,
                         r["efficiency"], r["saved_mib"], r["finite_bn"], r["load"]])
    return rows


# -- the tables ---------------------------------------------------------------------------

def measure(name: str, fn: Any) -> dict[str, Any]:
    load = os.getloadavg()[0]
    rows = fn()
    out = {"images_per_s": median_rate(rows), "load": load,
           "efficiency": median_rate(rows, "pipeline_efficiency")
           if "pipeline_efficiency" in rows[0] else None,
           "saved_mib": max(r["saved_bytes_peak"] for r in rows) / 2**20
           if rows[0].get("saved_bytes_peak") else None,
           "finite_bn": rows[0].get("finite_bn")}
    print(f"  {name:<34} {out['images_per_s']:8.1f} images/s   load {load:.2f}", flush=True)
    return out


def main_table(ctx: Any, out: str, batch: int, steps: int, epochs: int) -> list[list[Any]]:
    rows = []
    for model in MODELS:
        print(model, flush=True)
        cfg = overrides(model, batch, steps, epochs, out)
        m = {"BP, 1 process x 1 thread": measure("bp 1x1", lambda: single(
                 ctx, [*cfg, "engine=backprop", "split.k=1"], 1)),
             "BP, 1 process x 2 threads": measure("bp 1x2", lambda: single(
                 ctx, [*cfg, "engine=backprop", "split.k=1"], 2)),
             "local K=2, 1 process x 1 thread": measure("local 1x1", lambda: single(
                 ctx, [*cfg, "engine=local", "split.k=2"], 1)),
             "pipeline K=2, 2 workers x 1 thread": measure("pipeline 2x1", lambda: pipeline(
                 cfg, 2)),
             "pipeline K=2, 2 x 1, 2 micro-batches": measure("pipeline 2x1 m=2", lambda: pipeline(
                 cfg, 2, 2)),
             "DDP BP, 2 workers x 1 thread": measure("ddp 2x1", lambda: ddp(ctx, cfg, 2))}
        best_bp = max(m["BP, 1 process x 1 thread"]["images_per_s"],
                      m["BP, 1 process x 2 threads"]["images_per_s"])
        for mode, r in m.items():
            rows.append([model, mode, r["images_per_s"], r["images_per_s"] / best_bp,
                         r["efficiency"], r["load"]])
    return rows


def scaling_table(ctx: Any, out: str, batch: int, steps: int, epochs: int,
                  weak: bool) -> list[list[Any]]:
    rows, base = [], {}
    for workers in (1, 2, 3, 4):
        global_batch = batch * workers if weak else batch
        cfg = overrides(SCALING_MODEL, global_batch, steps, epochs, out)
        print(f"{'weak' if weak else 'strong'} scaling, {workers} workers, batch {global_batch}",
              flush=True)
        for mode, fn in (("pipeline", lambda: pipeline(cfg, workers)),
                         ("DDP", lambda: ddp(ctx, cfg, workers))):
            r = measure(f"{mode} {workers}x1", fn)
            base.setdefault(mode, r["images_per_s"])
            speedup = r["images_per_s"] / base[mode]
            rows.append([mode, workers, global_batch, r["images_per_s"], speedup,
                         speedup / workers, r["efficiency"], r["load"]])
    return rows


GROUPS = ["split.groups=2", "objective.detach_ratio=1.0", "objective.diversity_weight=0.5"]


def group_nodes(cfg: list[str], k: int) -> list[dict[str, Any]]:
    """engine.placement=groups: K stages x 2 groups, one worker x 1 thread per node."""
    from locallearn import runs
    from locallearn.config import load_config
    from locallearn.train import run

    _, run_dir = run(load_config(None, [*cfg, *GROUPS, "engine=pipeline", f"split.k={k}",
                                        "engine.placement=groups", f"engine.workers={2 * k}",
                                        "engine.threads=1"]))
    return runs.read_metrics(run_dir)


def groups_table(ctx: Any, out: str, batch: int, steps: int, epochs: int) -> list[list[Any]]:
    """Width groups (G=2, stop-gradient + diversity) placed by stage or by (stage, group) node."""
    rows = []
    cfg = overrides(SCALING_MODEL, batch, steps, epochs, out)
    for k in (1, 2):
        print(f"{SCALING_MODEL} K={k} G=2", flush=True)
        m = {f"local K={k} G=2, 1 process x 1 thread": measure("local 1x1", lambda: single(
                 ctx, [*cfg, *GROUPS, "engine=local", f"split.k={k}"], 1)),
             f"local K={k} G=2, 1 process x 2 threads": measure("local 1x2", lambda: single(
                 ctx, [*cfg, *GROUPS, "engine=local", f"split.k={k}"], 2)),
             f"nodes K={k} x G=2, {2 * k} workers x 1 thread": measure(
                 f"nodes {2 * k}x1", lambda: group_nodes(cfg, k))}
        if k == 2:
            m["stages K=2 G=2, 2 workers x 1 thread"] = measure("pipeline 2x1", lambda: pipeline(
                [*cfg, *GROUPS], 2))
        base = next(iter(m.values()))["images_per_s"]
        for mode, r in m.items():
            rows.append([mode, r["images_per_s"], r["images_per_s"] / base, r["efficiency"],
                         r["load"]])
    return rows


def replicas_table(ctx: Any, out: str, batch: int, steps: int, epochs: int) -> list[list[Any]]:
    """K=2 on 2 processes three ways: data-parallel stages (engine.replicas=2 on 1 worker:
    both stages on each rank, half the batch each, gradients all-reduced), the stage
    pipeline (one stage per rank) and DDP; the same model, batch and pinned cut."""
    cut = pinned_cut(SCALING_MODEL)  # one cut for both K=2 layouts (split.by=time moves)
    cfg = [o for o in overrides(SCALING_MODEL, batch, steps, epochs, out) if o != "split.by=time"]
    pinned = [*cfg, "split.by=cuts", f"split.cuts=[{cut}]"]
    print(f"{SCALING_MODEL} K=2 (cut after block {cut}) on 2 processes", flush=True)
    m = {"replicas D=2 x W=1 (K=2 on each rank, half the batch)": measure(
             "replicas D=2 W=1", lambda: pipeline(pinned, 1, replicas=2, k=2)),
         "pipeline W=2 x D=1 (one stage per rank)": measure(
             "pipeline W=2 D=1", lambda: pipeline(pinned, 2)),
         "DDP BP, 2 workers x 1 thread": measure("ddp 2x1", lambda: ddp(ctx, cfg, 2))}
    base = m["DDP BP, 2 workers x 1 thread"]["images_per_s"]
    return [[mode, r["images_per_s"], r["images_per_s"] / base, r["efficiency"], r["load"]]
            for mode, r in m.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["main", "strong", "weak"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="steps per epoch (main table)")
    p.add_argument("--scaling-steps", type=int, default=10, help="steps per epoch (scaling)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per measurement (1 warm-up)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 2 steps, 2 epochs")
    p.add_argument("--models", nargs="+", default=["vgg11-w0.5", "resnet20"],
                   help="models of the peers part")
    p.add_argument("--precision", default="auto", help="peers part: train.precision")
    p.add_argument("--channels-last", default="auto", help="peers part: train.channels_last")
    a = p.parse_args()
    if a.quick:
        a.steps, a.scaling_steps, a.epochs = 2, 2, 2

    from locallearn.distributed.launch import worker_context
    from locallearn.report import write_results

    ctx = worker_context()  # processes forked from one server that imported torch once
    ctx.set_forkserver_preload(["locallearn.distributed.launch", "torch._dynamo",
                                "matplotlib.pyplot"])  # and the plots of every run folder
    start = time.time()
    load = os.getloadavg()
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (2-core "
               f"machine shared with other engineers' work); torch threads as listed")
    common = {"data": f"synthetic 3x32x32 images, 10 classes, batch {a.batch}; median over "
                      f"{a.epochs - 1} epochs after 1 warm-up epoch",
              "training": "SGD lr 0.01 momentum 0.9 wd 5e-4; local/pipeline heads 0c1f; "
                          "cuts split.by=time (forward + backward + head time)",
              "machine": machine, "load average at start (1/5/15 min)": "/".join(
                  f"{v:.2f}" for v in load),
              "command": "python benchmarks/pipeline_throughput/run.py"}
    with tempfile.TemporaryDirectory() as out:
        if "main" in a.parts:
            rows = main_table(ctx, out, a.batch, a.steps, a.epochs)
            print(write_results(HERE, "results", [
                "model", "mode", "images/s", "speedup vs best 1-process BP",
                "pipeline efficiency", "load avg"], rows,
                {**common, "steps": f"{a.steps} steps per epoch"}))
        if "peers" in a.parts:
            rows = peers_table(ctx, out, a.batch, a.steps, a.epochs, a.models, a.precision,
                               a.channels_last)
            print(write_results(HERE, f"peers_{a.precision}", [
                "model", "cut", "mode", "images/s", "vs DDP", "pipeline efficiency",
                "saved act MiB (peak, 1 step)", "BN stats finite", "load avg"], rows,
                {**common, "steps": f"{a.steps} steps per epoch",
                 "cut": "K=2 cut pinned for every mode (balanced by MACs, split.by=cuts)",
                 "precision": f"train.precision={a.precision} train.channels_last="
                              f"{a.channels_last} for every mode (DDP and torch pipelining "
                              "workers apply the same locallearn.precision choice)",
                 "peers": "GPipe / 1F1B: torch.distributed.pipelining, end-to-end BP, 2 "
                          "stages on 2 workers x 1 thread over gloo, explicit example "
                          "inputs/outputs; checkpointed BP: engine.checkpoint=blocks "
                          "(torch.utils.checkpoint per block, use_reentrant=False)"}))
        if "groups" in a.parts:
            rows = groups_table(ctx, out, a.batch, a.steps, a.epochs)
            print(write_results(HERE, "groups", [
                "mode", "images/s", "speedup vs local 1 thread (same K)", "pipeline efficiency",
                "load avg"], rows,
                {**common, "steps": f"{a.steps} steps per epoch", "model": SCALING_MODEL,
                 "groups": "split.groups=2, objective.detach_ratio=1, diversity_weight=0.5; "
                           "the machine has 2 cores, so 4 node workers share them"}))
        if "replicas" in a.parts:
            rows = replicas_table(ctx, out, a.batch, a.steps, a.epochs)
            print(write_results(HERE, "replicas", [
                "mode", "images/s", "vs DDP", "pipeline efficiency", "load avg"], rows,
                {**common, "steps": f"{a.steps} steps per epoch", "model": SCALING_MODEL,
                 "training": common["training"].split("; cuts")[0],
                 "cut": "K=2 cut pinned (balanced by MACs, split.by=cuts) for both K=2 layouts",
                 "layouts": "2 processes x 1 thread each: engine=pipeline engine.workers=1 "
                            "engine.replicas=2 split.k=2 (rank 0 reads the batch and sends "
                            "rank 1 its half; stage gradients averaged over gloo before each "
                            "step); engine.workers=2 split.k=2; DDP (gloo) on 2 x half batch",
                 "precision": "train.precision auto for all three (DDP applies the same "
                              "locallearn.precision choice)"}))
        for part in ("strong", "weak"):
            if part in a.parts:
                rows = scaling_table(ctx, out, a.batch, a.scaling_steps, a.epochs, part == "weak")
                meta = {**common, "steps": f"{a.scaling_steps} steps per epoch",
                        "model": SCALING_MODEL, "scaling": (
                    f"global batch {a.batch} x workers" if part == "weak"
                    else f"fixed global batch {a.batch}") + "; pipeline K = workers; "
                    "1 thread per worker; the machine has 2 cores, so 3 and 4 workers "
                    "share them"}
                print(write_results(HERE, f"scaling_{part}", [
                    "mode", "workers", "global batch", "images/s", "speedup vs 1 worker",
                    "scaling efficiency", "pipeline efficiency", "load avg"], rows, meta))
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
