"""Project the scale model to GPU clusters: ResNet-110 and ViT-B at K = 4..64 on 8..1024 devices.

Per-block MACs, activations and parameters are measured once on the CPU
(:func:`locallearn.plan.measure_blocks`, cached in ``blocks.json``); the device is a
stated H100 and the links are the stated NVLink and 100 Gb/s Ethernet figures of
:data:`locallearn.plan.LINKS`. For every (model, link, devices N, K) the best
micro-batch count of each scheme is taken. Global batch = ``PER_DEVICE`` x N (weak
scaling: every device has the same share of a step), so K stages leave D = N / K
replicas.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from locallearn import plan

HERE = Path(__file__).resolve().parent
DEVICES = [8, 16, 64, 256, 1024]
KS = [4, 8, 16, 32, 64]
MODELS: dict[str, dict[str, Any]] = {
    # CIFAR ResNet-110 has 16-64-channel convs: stated at 100 TFLOP/s (~10 % of peak)
    "resnet110": {"build": ("resnet110", (3, 32, 32), 10, {}), "head": "0c1f",
                  "tflops": 100, "per_device": 128},
    # ViT-B/16 at 224x224 (12 encoder layers, 13 blocks): large GEMMs, 300 TFLOP/s
    "vit-b16": {"build": ("vit", (3, 224, 224), 1000,
                          {"dim": 768, "depth": 12, "heads": 12, "patch": 16, "mlp_ratio": 4.0}),
                "head": "linear", "tflops": 300, "per_device": 32},
    # the same layers 63 deep (64 blocks): the only ViT here with room for K = 64
    "vit-b16-depth63": {"like": "vit-b16", "depth": 63, "tflops": 300, "per_device": 32},
}


def figures(name: str) -> tuple[list[plan.BlockFigures], list[plan.BlockFigures]]:
    """Per-block and per-head figures of ``name``, measured once and cached."""
    cache = HERE / "blocks.json"
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    spec = MODELS[name]
    if "like" in spec:  # identical encoder layers: repeat the measured one
        blocks, heads = figures(spec["like"])
        depth = spec["depth"]
        return ([blocks[0], *[blocks[1]] * depth],
                [heads[0], *[heads[1]] * (depth - 1), heads[-1]])
    if name not in saved:
        import locallearn.objectives  # noqa: F401  (registers the objectives)
        from locallearn.models import build_model
        from locallearn.objectives.base import build_objective

        model, shape, classes, options = spec["build"]
        bb = build_model(model, shape, classes, **options)
        saved[name] = [[asdict(f) for f in part] for part in plan.measure_blocks(
            bb, lambda s, last: build_objective("ce", s, classes, last=last,
                                                head=bb.head if last else spec["head"]))]
        cache.write_text(json.dumps(saved, indent=1) + "\n")
    blocks, heads = ([plan.BlockFigures(**f) for f in part] for part in saved[name])
    return blocks, heads


def micro_options(replica_batch: int) -> list[int]:
    return [2**i for i in range(int(math.log2(replica_batch)) + 1)]


def project() -> dict[str, Any]:
    rows = []
    for name, spec in MODELS.items():
        blocks_f, heads_f = figures(name)
        device = replace(plan.H100, flops_per_s=spec["tflops"] * 1e12,
                         name=f"H100 SXM, bf16, {spec['tflops']} TFLOP/s achievable, 80 GB, "
                              f"{plan.H100.call_seconds * 1e6:.0f} us per block and call")
        blocks, heads = plan.costs_on(device, blocks_f, heads_f)
        cut = plan.balanced(blocks, heads)
        for link_name, link in plan.LINKS.items():
            for n in DEVICES:
                batch = spec["per_device"] * n
                dp = plan.ddp(plan.merge_stages(blocks, [], heads), batch, link, n)
                rows.append(_row(name, link_name, n, dp, []))
                for k in KS:
                    if k > min(n, len(blocks)):
                        continue
                    cuts = list(cut(k))
                    stages = plan.merge_stages(blocks, cuts, heads)
                    d = n // k
                    ms = micro_options(batch // d)
                    for _scheme, fn in (
                            ("local", lambda m: plan.local_pipeline(stages, batch, link, None, m, d,
                                                                    param_copies=4,
                                                                    overlap_send=True)),
                            ("gpipe", lambda m: plan.bp_pipeline(stages, batch, link, m, "gpipe",
                                                                 d, param_copies=4)),
                            ("1f1b", lambda m: plan.bp_pipeline(stages, batch, link, m, "1f1b",
                                                                d, param_copies=4))):
                        p = plan.fastest([fn(m) for m in ms])
                        if p is not None:
                            rows.append(_row(name, link_name, n, p, cuts))
    return {"rows": rows, "device": {k: v["tflops"] for k, v in MODELS.items()},
            "assumptions": ("H100 SXM bf16 (activations 2 bytes/element), fp32 Adam state "
                            "(16 bytes/param), 40 us per block per call, optimizer at "
                            "3.35 TB/s; local pipeline sends overlap compute (async links), its replicas' "
                            "all-reduce does not (as implemented); DDP's all-reduce overlaps "
                            "backward (buckets); GPipe/1F1B transfers on the critical path; NVLink 450 GB/s + 2 us, Ethernet 12.5 GB/s + 10 us; "
                            "global batch = per-device batch x N; best micro-batch count per "
                            "scheme (ties within 2 % to the least memory); cuts balance "
                            "compute (locallearn.split.balanced_cuts)")}


def _row(model: str, link: str, n: int, p: plan.Prediction, cuts: list[int]) -> dict[str, Any]:
    return {"model": model, "link": link, "devices": n, "scheme": p.scheme, "k": p.k,
            "replicas": p.replicas, "micro_batches": p.micro_batches, "batch": p.batch,
            "images_per_s": p.images_per_s, "memory_gib": p.memory_bytes / 2**30,
            "bubble": p.bubble, "cuts": cuts}


def plot(rows: list[dict[str, Any]], path: Path, memory_at: int = 64) -> None:
    """Top rows: images/s against devices (best K of each scheme), per model and link.
    Bottom rows: memory per device against K on ``memory_at`` devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, links = list(MODELS), list(plan.LINKS)
    fig, axes = plt.subplots(2 * len(links), len(models), squeeze=False,
                             figsize=(5 * len(models), 3.6 * 2 * len(links)))
    schemes = ("local", "1f1b", "gpipe", "ddp")

    def pick(model: str, link: str, n: int, scheme: str) -> list[dict[str, Any]]:
        return [r for r in rows if (r["model"], r["link"], r["devices"], r["scheme"])
                == (model, link, n, scheme)]

    for i, link in enumerate(links):
        for j, model in enumerate(models):
            ax, mem = axes[i][j], axes[len(links) + i][j]
            for scheme in schemes:
                pts = [(n, max(r["images_per_s"] for r in sel)) for n in DEVICES
                       if (sel := pick(model, link, n, scheme))]
                ax.plot(*zip(*pts), marker="o", label=scheme)
                sel = sorted(pick(model, link, memory_at, scheme), key=lambda r: r["k"])
                if scheme == "ddp":
                    mem.axhline(sel[0]["memory_gib"], color="C3", ls="--", label="ddp")
                else:
                    mem.plot([r["k"] for r in sel], [r["memory_gib"] for r in sel], marker="o",
                             label=scheme)
            ax.set(xscale="log", yscale="log", title=f"{model}, {link}", xlabel="devices",
                   ylabel="images/s (best K)")
            mem.set(xscale="log", title=f"{model}, {link}, {memory_at} devices", xlabel="K",
                    ylabel="GiB per device (largest)")
            for a in (ax, mem):
                a.grid(True, which="both", alpha=0.3)
                a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    out = project()
    plot(out["rows"], HERE / "projection.png")
    print(len(out["rows"]), "rows")
