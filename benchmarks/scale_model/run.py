"""Calibrate and validate the scale model (``locallearn.plan``) here, then project it to GPUs.

Parts (``--parts``):

============  ==================================================================================
``link``       gloo ping-pong over loopback, 1 KB-16 MB, fitted to latency + bandwidth
``validate``   short real ``engine=pipeline`` runs (ResNet-20, synthetic data, batch 64):
               measured images/s beside two predictions --
               ``from_run``: the run's own per-stage compute seconds (``stage_seconds``) and
               data seconds, the fitted link and the fill/drain term: tests the flow-line
               model (rate = batch / slowest node + its send);
               ``from_alone``: per-stage seconds of a separate 1-worker run of the same K
               (every stage timed alone on one thread), processor sharing over 2 cores: a
               prediction that sees nothing of the measured run
``hosts``      (not run by default; root and iproute2) the same across two network
               namespaces joined by a veth pair (``tests/netns.py``), plain and rate-shaped
               (``tc``): a gloo ping-pong between them and two-host ``engine=pipeline`` runs
               under torchrun (``hosts.py``), stored as ``link_hosts`` and ``validation_hosts``
``project``    ResNet-110 (CIFAR, 32x32) and ViT-B/16 (224x224; and a 64-layer ViT-B to reach
               K=64) on 8..1024 devices from MACs per block at a stated GPU throughput,
               NVLink and 100 Gb/s Ethernet: throughput and memory per device of each scheme
============  ==================================================================================

The machine has 2 cores shared with other engineers' work; every measurement carries
the 1-minute load average at its start. Usage:
``OMP_NUM_THREADS=1 nice -n 10 python benchmarks/scale_model/run.py [--parts link validate project]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from locallearn import plan  # noqa: E402

MODEL, BATCH, STEPS, EPOCHS = "resnet20", 64, 8, 3  # 1 warm-up epoch, median of the rest
CONFIGS = [  # (K, workers, micro-batches, replicas)
    (2, 1, 1, 1), (2, 2, 1, 1), (2, 2, 2, 1), (3, 3, 1, 1), (3, 2, 2, 1),
    (4, 2, 1, 1), (4, 4, 1, 1), (4, 4, 2, 1), (2, 1, 1, 2),
]
TARGET_BYTES = 8  # int64 label per sample travels with the activation


def overrides(k: int, workers: int, micro: int, replicas: int, out: str) -> list[str]:
    """One short pipeline run: synthetic images, SGD, cuts balanced by MACs, no checkpoint."""
    return [f"model={MODEL}", "data=synthetic",
            f"data.options={{n_train: {BATCH * STEPS}, n_test: 64, shape: [3, 32, 32], "
            "num_classes: 10}", f"data.batch_size={BATCH}", "objective.head=0c1f",
            "optim=sgd", "optim.lr=0.01", "optim.schedule=constant", "split.by=macs",
            f"split.k={k}", "engine=pipeline", f"engine.workers={workers}", "engine.threads=1",
            f"engine.micro_batches={micro}", f"engine.replicas={replicas}",
            f"train.epochs={EPOCHS}", f"train.eval_every={EPOCHS}", "train.checkpoint=false",
            "train.progress=false", f"train.out_dir={out}", "train.precision=fp32"]


def train(cfg: list[str]) -> list[dict[str, Any]]:
    from locallearn import runs
    from locallearn.config import load_config
    from locallearn.runner import run

    _, run_dir = run(load_config(None, cfg))
    return runs.read_metrics(run_dir)


def stage_bytes(k: int) -> tuple[list[float], list[float]]:
    """Per stage: bytes per sample it sends (float32 output and the label), parameter bytes."""
    from locallearn.build import split_cuts
    from locallearn.config import load_config
    from locallearn.models import build_model

    backbone = build_model(MODEL, (3, 32, 32), 10)
    cfg = load_config(None, overrides(k, 1, 1, 1, "unused"))
    cuts = split_cuts(cfg, _FakeData(), backbone)
    sizes, params, edges = [], [], [0, *cuts, len(backbone.blocks)]
    for start, stop in zip(edges, edges[1:]):
        n = 1
        for s in backbone.shapes[stop]:
            n *= s
        sizes.append(4.0 * n + TARGET_BYTES)
        params.append(4.0 * sum(p.numel() for b in backbone.blocks[start:stop]
                                for p in b.parameters()))
    return sizes, params


class _FakeData:  # split_cuts needs only the shapes of the data
    input_shape, num_classes, meta = (3, 32, 32), 10, {}


def epoch_figures(rows: list[dict[str, Any]], k: int, workers: int) -> dict[str, Any]:
    """Median over the epochs after the first: images/s, stage seconds, rank 0's data seconds."""
    rest = rows[1:]
    first = plan.contiguous(k, workers)[0]
    med = statistics.median
    stage = [med(r["stage_seconds"][j] for r in rest) for j in range(k)]
    data = med(r["worker_busy"][0] * r["epoch_seconds"]
               - sum(r["stage_seconds"][j] for j in first) for r in rest)
    return {"images_per_s": med(r["samples_per_s"] for r in rest), "stage_seconds": stage,
            "data_seconds": data, "efficiency": med(r["pipeline_efficiency"] for r in rest)}


def predict(stage_seconds: list[float], data_seconds: float,
            sizes: tuple[list[float], list[float]], link: plan.Link, workers: int, micro: int, replicas: int,
            cores: float | None, overlap_send: bool = False) -> float:
    """Images/s of the local pipeline from per-epoch stage and data seconds of one rank."""
    samples = BATCH * STEPS / replicas  # what one rank of a replica group computed per epoch
    stages = [plan.StageCost(seconds=s / samples, out_bytes=b, param_bytes=p)
              for s, b, p in zip(stage_seconds, *sizes)]
    return plan.local_pipeline(stages, BATCH, link, workers, micro, replicas, STEPS, cores,
                               overlap_send=overlap_send,
                               data_seconds=data_seconds * replicas / STEPS).images_per_s


def bottleneck_only(stage_seconds: list[float], k: int, workers: int, replicas: int) -> float:
    """Images/s of the bare bound batch / slowest node's compute (no link, data, fill/drain)."""
    per_node = [sum(stage_seconds[j] for j in run) for run in plan.contiguous(k, workers)]
    return BATCH * STEPS / max(per_node)


def calibrate(k: int, out: str) -> dict[str, Any]:
    """Per-stage seconds of a 1-worker run of K stages (every stage timed alone, one thread)."""
    load = os.getloadavg()[0]
    alone = {**epoch_figures(train(overrides(k, 1, 1, 1, out)), k, 1), "load": load}
    print(f"calibration K={k} W=1: {alone['images_per_s']:.1f} images/s, load {load:.2f}",
          flush=True)
    return alone


def make_row(config: tuple[int, int, int, int], fig: dict[str, Any], alone: dict[str, Any],
             link: plan.Link, load: float, start: float,
             overlap_send: bool = False) -> dict[str, Any]:
    """One validation row: the run's measured images/s beside the model's predictions."""
    k, w, m, d = config
    sizes = stage_bytes(k)
    from_run = predict(fig["stage_seconds"], fig["data_seconds"], sizes, link, w, m, d, None,
                       overlap_send)
    from_alone = predict(alone["stage_seconds"], alone["data_seconds"], sizes, link,
                         w, m, d, cores=2, overlap_send=overlap_send)
    bare = bottleneck_only(fig["stage_seconds"], k, w, d)
    row = {"model": MODEL, "k": k, "workers": w, "micro_batches": m, "replicas": d,
           "batch": BATCH, "steps_per_epoch": STEPS, "measured": fig["images_per_s"],
           "predicted": from_run, "predicted_from_alone": from_alone,
           "error_pct": 100 * (from_run / fig["images_per_s"] - 1),
           "error_from_alone_pct": 100 * (from_alone / fig["images_per_s"] - 1),
           "predicted_bottleneck_only": bare,
           "error_bottleneck_only_pct": 100 * (bare / fig["images_per_s"] - 1),
           "stage_seconds": fig["stage_seconds"], "data_seconds": fig["data_seconds"],
           "calibration_stage_seconds": alone["stage_seconds"],
           "calibration_load": alone["load"], "pipeline_efficiency": fig["efficiency"],
           "load": load, "run_seconds": time.time() - start}
    print(f"K={k} W={w} m={m} D={d}: measured {row['measured']:.1f}, predicted "
          f"{from_run:.1f} ({row['error_pct']:+.1f} %), from alone {from_alone:.1f} "
          f"({row['error_from_alone_pct']:+.1f} %), load {load:.2f}", flush=True)
    return row


def validate(link: plan.Link, out: str, fresh: bool = False) -> list[dict[str, Any]]:
    """Every config measured and predicted; ``fresh``: a new 1-worker calibration run right
    before each config (closer in time, so nearer the same machine share)."""
    alone: dict[int, dict[str, Any]] = {}
    rows = []
    for k, w, m, d in CONFIGS:
        if k not in alone or fresh:
            alone[k] = calibrate(k, out)
        load = os.getloadavg()[0]
        start = time.time()
        fig = epoch_figures(train(overrides(k, w, m, d, out)), k, w)
        rows.append(make_row((k, w, m, d), fig, alone[k], link, load, start))
    return rows


def print_host_table(results: dict[str, Any]) -> None:
    """The two-host link fits and validation rows (markdown)."""
    print("\n| link | qdisc | latency us | bandwidth MB/s | load |\n|---|---|---|---|---|")
    for f in results["link_hosts"]:
        print(f"| {f['link']} | {f['qdisc']} | {f['latency_s'] * 1e6:.0f} | "
              f"{f['bandwidth_Bps'] / 1e6:.1f} | {f['load']:.1f} |")
    print("\n| link | K | workers | micro-batches | measured images/s | predicted | error % | "
          "serial-send predicted | error % | bottleneck-only error % | from-alone predicted "
          "| error % | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["validation_hosts"]:
        print(f"| {r['link']} | {r['k']} | {r['workers']} | {r['micro_batches']} | "
              f"{r['measured']:.1f} | {r['predicted']:.1f} | {r['error_pct']:+.1f} | "
              f"{r['predicted_serial_send']:.1f} | {r['error_serial_send_pct']:+.1f} | "
              f"{r['error_bottleneck_only_pct']:+.1f} | {r['predicted_from_alone']:.1f} | "
              f"{r['error_from_alone_pct']:+.0f} | {r['load']:.1f} |")
    errs = [abs(r["error_pct"]) for r in results["validation_hosts"]]
    print(f"mean |error| {statistics.fmean(errs):.1f} %, max {max(errs):.1f} %")


def print_tables(results: dict[str, Any]) -> None:
    """The README's tables (markdown) from ``results.json``."""
    if "validation_hosts" in results:
        print_host_table(results)
    for part in ("validation", "validation_repeat"):
        if part not in results:
            continue
        print(f"\n{part}:\n| K | workers | micro-batches | replicas | measured images/s | "
              "predicted | error % | bottleneck-only error % | from-alone predicted | error % "
              "| load |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results[part]:
            print(f"| {r['k']} | {r['workers']} | {r['micro_batches']} | {r['replicas']} | "
                  f"{r['measured']:.1f} | {r['predicted']:.1f} | {r['error_pct']:+.1f} | "
                  f"{r['error_bottleneck_only_pct']:+.1f} | {r['predicted_from_alone']:.1f} | "
                  f"{r['error_from_alone_pct']:+.0f} | {r['load']:.1f} |")
        errs = [abs(r["error_pct"]) for r in results[part]]
        print(f"mean |error| {statistics.fmean(errs):.1f} %, max {max(errs):.1f} %")
    rows = results["projection"]["rows"]
    from project import DEVICES, MODELS

    print("\n| model | link | devices | local (K, m) | local images/s | local GiB | 1F1B (K, m) "
          "| 1F1B images/s | 1F1B GiB | GPipe GiB | DDP images/s | DDP GiB | local / best BP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for link in plan.LINKS:
            for n in DEVICES:
                top = {}
                for scheme in ("local", "1f1b", "gpipe", "ddp"):
                    sel = [r for r in rows if (r["model"], r["link"], r["devices"], r["scheme"])
                           == (model, link, n, scheme)]
                    top[scheme] = max(sel, key=lambda r: r["images_per_s"])
                lo, ob, gp, dp = top["local"], top["1f1b"], top["gpipe"], top["ddp"]
                bp = max(ob["images_per_s"], dp["images_per_s"])
                print(f"| {model} | {link} | {n} | {lo['k']}, {lo['micro_batches']} | "
                      f"{lo['images_per_s']:,.0f} | {lo['memory_gib']:.2f} | {ob['k']}, "
                      f"{ob['micro_batches']} | {ob['images_per_s']:,.0f} | {ob['memory_gib']:.2f} "
                      f"| {gp['memory_gib']:.2f} | {dp['images_per_s']:,.0f} | "
                      f"{dp['memory_gib']:.2f} | {lo['images_per_s'] / bp:.2f} |")
    print("\n| model | link | K | local images/s | local GiB | 1F1B images/s | 1F1B GiB | "
          "GPipe GiB | (N = 64 devices, D = 64 / K replicas) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for link in plan.LINKS:
            for r in [r for r in rows if (r["model"], r["link"], r["devices"], r["scheme"])
                      == (model, link, 64, "local")]:
                same = {s: next(x for x in rows if (x["model"], x["link"], x["devices"], x["k"],
                                                   x["scheme"]) == (model, link, 64, r["k"], s))
                        for s in ("1f1b", "gpipe")}
                print(f"| {model} | {link} | {r['k']} | {r['images_per_s']:,.0f} | "
                      f"{r['memory_gib']:.2f} | {same['1f1b']['images_per_s']:,.0f} | "
                      f"{same['1f1b']['memory_gib']:.2f} | {same['gpipe']['memory_gib']:.2f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["link", "validate", "project"],
                   help="link validate project tables hosts; 'repeat': validate again with a fresh "
                        "calibration run before every config (stored as validation_repeat)")
    a = p.parse_args()
    results_path = HERE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "link" in a.parts:
        from link import ping_pong

        results["link"] = ping_pong()
        print(f"link: latency {results['link']['latency_s'] * 1e6:.1f} us, bandwidth "
              f"{results['link']['bandwidth_Bps'] / 1e9:.2f} GB/s", flush=True)
    link = plan.Link(results["link"]["latency_s"], results["link"]["bandwidth_Bps"])
    if "validate" in a.parts:
        with tempfile.TemporaryDirectory() as out:
            results["validation"] = validate(link, out)
        results["validation_meta"] = {
            "machine": f"{os.cpu_count()} CPU cores shared with other engineers' work; "
                       "1 torch thread per worker; nice 10",
            "model": f"{MODEL}, synthetic 3x32x32, batch {BATCH}, {STEPS} steps/epoch, "
                     f"{EPOCHS} epochs (median of the last {EPOCHS - 1}), split.by=macs, 0c1f heads",
            "predicted": "from the run's own stage_seconds + data seconds, fitted link, fill/drain",
            "predicted_from_alone": "stage seconds of a 1-worker run of the same K, 2 shared cores",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if "repeat" in a.parts:
        with tempfile.TemporaryDirectory() as out:
            results["validation_repeat"] = validate(link, out, fresh=True)
    if "hosts" in a.parts:
        from hosts import validate_hosts

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the namespaces' teardown runs
        load, began = os.getloadavg(), time.gmtime()
        with tempfile.TemporaryDirectory() as out:
            found = validate_hosts(out)
        results["link_hosts"], results["validation_hosts"] = found["links"], found["rows"]
        results["validation_hosts_meta"] = {
            "machine": f"{os.cpu_count()} CPU cores shared with other engineers' work; "
                       "1 torch thread per worker; both namespaces on this machine",
            "hosts": "tests/netns.py: 2 network namespaces joined by a veth pair, torchrun "
                     "--nnodes 2 on each, c10d rendezvous on host A, gloo on the veth",
            "shaping": "tc on both veth ends (netns.shaping: tbf for a rate alone, netem "
                       "with a delay)", "netem": found["netem"],
            "kernel": platform.release(),
            "predicted": "the run's own stage_seconds + data seconds, the link fitted by the "
                         "ping-pong under the same shaping, sends overlapped with compute",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", began),
            "load average at start (1/5/15 min)": "/".join(f"{v:.2f}" for v in load)}
    if "project" in a.parts:
        from project import plot, project

        results["projection"] = project()
        plot(results["projection"]["rows"], HERE / "projection.png")
    if "tables" in a.parts:
        print_tables(results)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
