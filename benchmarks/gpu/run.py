"""GPU throughput and peak memory: fp32 / bf16 / bf16 + compile, for BP, local K=4 and checkpointed BP.

Each measurement trains one model through the library's engine step (the engine's
``StageUpdate`` carries the precision, channels-last and compilation a run would
resolve) on fixed synthetic batches on ``cuda:0``: W warm-up steps (compilation
happens there), then T timed steps between two CUDA events; images/s = batch x T /
time, and ``torch.cuda.max_memory_allocated`` over the timed steps.

Usage: python benchmarks/gpu/run.py OUT_DIR [--models resnet20 resnet32] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

SETTINGS = {"fp32": ("fp32", "false", "false"), "bf16": ("bf16", "true", "false"),
            "bf16+compile": ("bf16", "true", "true")}
ENGINES = {"BP": ("backprop", 1, "none"), "local K=4": ("local", 4, "none"),
           "checkpointed BP": ("backprop", 1, "blocks")}


def measure(model: str, engine_name: str, setting: str, batch: int, warmup: int,
            steps: int) -> dict[str, Any]:
    from locallearn import precision
    from locallearn.engines import build_engine
    from locallearn.engines.base import StageUpdate
    from locallearn.models import build_model
    from locallearn.network import LocalNet

    kind, k, checkpoint = ENGINES[engine_name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    choice = precision.resolve(*SETTINGS[setting], device="cuda")
    net = LocalNet.from_backbone(build_model(model, (3, 32, 32), 10), k, head="0c1f").cuda()
    net = precision.prepare(net, choice)
    update = StageUpdate(choice)
    options: dict[str, Any] = {"update": update, "aux_heads": False}
    if kind == "backprop":
        options["checkpoint"] = checkpoint
    engine = build_engine(kind, **options)
    opts = [torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9) for s in net.stages]
    g = torch.Generator(device="cuda").manual_seed(0)
    data = [(update.input(torch.randn(batch, 3, 32, 32, device="cuda", generator=g)),
             torch.randint(0, 10, (batch,), device="cuda", generator=g)) for _ in range(2)]
    t0 = time.perf_counter()
    for i in range(warmup):
        engine.step(net, opts, *data[i % 2])
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        engine.step(net, opts, *data[i % 2])
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return {"model": model, "engine": engine_name, "setting": setting, "batch": batch,
            "images_per_s": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps,
            "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
            "warmup_s": warm, "choice": precision.describe(choice)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="folder for results.json and results.md")
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet32"])
    p.add_argument("--compile-models", nargs="*", default=["resnet20"],
                   help="the models also measured compiled (compiling takes a minute each)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: nothing to measure")
    from locallearn.report import table

    a.out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "batch": a.batch,
            "steps": f"{a.warmup} warm-up + {a.steps} timed", "load": os.getloadavg()[0],
            "command": " ".join(["python", *sys.argv])}
    records = []
    for model in a.models:
        for engine in ENGINES:
            for setting in SETTINGS:
                if "compile" in setting and model not in a.compile_models:
                    continue
                try:
                    r = measure(model, engine, setting, a.batch, a.warmup, a.steps)
                except Exception as e:  # noqa: BLE001 - record it, go on
                    r = {"model": model, "engine": engine, "setting": setting,
                         "error": f"{type(e).__name__}: {e}"[:300]}
                print(json.dumps({k: v for k, v in r.items() if k != "choice"}), flush=True)
                records.append(r)
                (a.out / "results.json").write_text(json.dumps({"meta": meta, "records": records},
                                                               indent=2))
    rows = [[r["model"], r["engine"], r["setting"], r.get("images_per_s"), r.get("ms_per_step"),
             r.get("max_memory_allocated_mib"), r.get("warmup_s"), r.get("error")]
            for r in records]
    text = table(["model", "engine", "setting", "images/s", "ms/step", "max allocated MiB",
                  "warm-up s", "error"], rows)
    (a.out / "results.md").write_text(text + "\n\n" + "\n".join(f"- {k}: {v}"
                                                                 for k, v in meta.items()) + "\n")
    print(text)


if __name__ == "__main__":
    main()
