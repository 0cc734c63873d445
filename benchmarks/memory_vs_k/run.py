"""Peak activation memory of BP versus local training for K = 1, 2, 4, 8, 16.

For each model and K, one training step on a batch of 128 random 32x32 images is run
in a fresh process (so peak RSS belongs to that configuration alone), with
memory-balanced cuts. Saved-activation bytes are the peak bytes of tensors autograd
holds for backward (``locallearn.measure.SavedTensorsMeter``), parameters excluded.

Usage: python benchmarks/memory_vs_k/run.py [--batch 128] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"resnet32": {"head": "0c1f", "opts": {}}, "vgg11": {"head": "mlp", "opts": {}}}


def one(model: str, engine: str, k: int, batch: int, steps: int) -> dict:
    """Measure one configuration in this process and return its figures."""
    import torch

    from locallearn.engines import build_engine
    from locallearn.measure import SavedTensorsMeter, peak_rss_bytes
    from locallearn.models import build_model
    from locallearn.network import LocalNet
    from locallearn.optim import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = build_model(model, (3, 32, 32), 10, **MODELS[model]["opts"])
    net = LocalNet.from_backbone(backbone, k, by="memory" if k > 1 else "count",
                                 head=MODELS[model]["head"], split_batch=8)
    opts = [build_optimizer(s.parameters(), "sgd", 0.01) for s in net.stages]
    eng = build_engine(engine, aux_heads=False)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    peak = 0
    for _ in range(steps):
        with SavedTensorsMeter(net) as meter:
            eng.step(net, opts, x, y)
        peak = max(peak, meter.peak_bytes)
    return {"model": model, "engine": engine, "k": k, "saved_bytes": peak,
            "peak_rss": peak_rss_bytes(), "blocks": len(backbone)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--one", nargs=3, metavar=("MODEL", "ENGINE", "K"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], int(a.one[2]), a.batch, a.steps)))
        return
    from locallearn.report import mib, write_results

    results = []
    for model in MODELS:
        configs = [("backprop", 1)] + [("local", k) for k in (1, 2, 4, 8, 16)]
        for engine, k in configs:
            out = subprocess.run([sys.executable, __file__, "--one", model, engine, str(k),
                                  "--batch", str(a.batch), "--steps", str(a.steps)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{model} {engine} K={k}: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(model, engine, k, f"{mib(r['saved_bytes']):.1f} MiB", flush=True)
    rows = []
    for r in results:
        bp = next(b for b in results if b["model"] == r["model"] and b["engine"] == "backprop")
        rows.append([r["model"], r["engine"], r["k"], mib(r["saved_bytes"]),
                     100.0 * r["saved_bytes"] / bp["saved_bytes"], mib(r["peak_rss"])])
    meta = {"what": f"one SGD step, batch {a.batch} of 3x32x32, memory-balanced cuts, CE heads "
                    "(0c1f for resnet32, mlp for vgg11); BP without aux heads",
            "saved act": "peak bytes saved for backward (parameters excluded)",
            "peak RSS": "peak resident set of a fresh process for that configuration",
            "note": "vgg11 has 8 blocks, so its K=16 is not possible (reported as an error)",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1",
            "command": "python benchmarks/memory_vs_k/run.py"}
    print(write_results(HERE, "results", ["model", "engine", "K", "saved act MiB",
                                          "% of BP", "peak RSS MiB"], rows, meta))


if __name__ == "__main__":
    main()
