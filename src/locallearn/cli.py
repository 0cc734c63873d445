"""The command line: a thin layer over the Python API.

Subcommands: ``train``, ``eval``, ``probe``, ``split``, ``plan``, ``list``, ``compare`` and ``demo`` (the
main job: BP beside local K=4 on the embedded data set). A user error (a
:class:`locallearn.errors.UserError`) prints one line naming the problem and exits with
status 2; any other exception is a bug and keeps its traceback. ``--help``, ``list`` and
``compare`` do not import torch (the subcommands that need it import it when they run).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from locallearn import catalog, runs
from locallearn.config import ConfigError, apply_overrides, load_config
from locallearn.errors import UserError, options_of
from locallearn.log import logger
from locallearn.log import setup as setup_logging
from locallearn.report import compare_table, fmt, mib, table


def _cmd_train(args: argparse.Namespace) -> int:
    from locallearn.runner import run

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    config = args.config
    if config and "=" in config:  # no file given: the first word is an override
        overrides.insert(0, config)
        config = None
    if args.resume:  # the saved config, changed only where the user said so
        if config:
            raise ConfigError(f"--resume continues the config saved in {args.resume}; give "
                              f"overrides only (not the file {config})")
        cfg, changes = runs.resume_config(args.resume, overrides)
        for change in changes:
            logger.info("resume: %s", change)
    else:
        cfg = load_config(config, overrides)
    # absolute, so that eval, probe and --resume from another folder find the same data
    summary, run_dir = run(runs.with_absolute_data_dir(cfg), resume=args.resume)
    if summary:  # empty on pipeline workers other than rank 0 (under torchrun)
        print(compare_table([summary]))
        print(f"run folder: {run_dir}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from locallearn.build import build_data, build_net
    from locallearn.config import from_dict
    from locallearn.evaluate import evaluate

    state = runs.load_checkpoint(args.run)
    overrides = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    cfg = from_dict(apply_overrides(state["config"], overrides))
    data = build_data(cfg)
    net = build_net(cfg, data)
    net.load_state_dict(state["net"])
    test_batches, device = _test_batches(cfg, data)
    net.to(device)
    result = evaluate(net, test_batches())
    print(table(["stage", "test acc %"], [[k + 1, a] for k, a in enumerate(result["stage_acc"])]))
    print(f"final {fmt(result['final_acc'])} %  ensemble uniform {fmt(result['ens_uniform'])} %"
          f"  ensemble 2^k {fmt(result['ens_weighted'])} %  ({result['n']} test samples)")
    if args.exit or args.exit_stage or args.threshold is not None:
        with options_of("eval"):  # a stage out of range or without a predictor
            _eval_exits(args, net, test_batches)
    return 0


def _test_batches(cfg: Any, data: Any) -> tuple[Callable[[], Any], Any]:
    """The test split batched as the run's trainer did (a fresh pass per call) and its
    device: ``eval`` needs the data alone, not a trainer with its optimizers."""
    import torch

    from locallearn.data import batches

    wanted = cfg.engine.device  # a CUDA run is evaluated on the CPU where there is no GPU
    device = torch.device(wanted if "cuda" not in wanted or torch.cuda.is_available() else "cpu")
    return functools.partial(batches, data.test, max(256, cfg.data.batch_size), shuffle=False,
                             generator=None, device=device, mean=data.meta.get("mean"),
                             std=data.meta.get("std")), device


def _eval_exits(args: argparse.Namespace, net: Any, test_batches: Callable[[], Any]) -> None:
    """Forward shortcut, early exit at one threshold, or the whole accuracy-vs-MACs curve."""
    from locallearn import exits

    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    thresholds = [args.threshold] if args.threshold is not None and not args.exit else None
    if args.exit_stage:
        exits.forward_shortcut(net, next(iter(test_batches()))[0][:1], args.exit_stage)  # checks
    report = exits.early_exit_report(net, test_batches(), thresholds=thresholds, kind=args.confidence,
                                     out_dir=run_dir if args.exit else None)
    if args.exit_stage:
        p = report["fixed"][[f["stage"] for f in report["fixed"]].index(args.exit_stage)]
        print(f"forward shortcut at stage {args.exit_stage}: acc {fmt(p['acc'])} %, "
              f"{100 * p['macs_fraction']:.1f} % of the MACs")
    rows = [[f"{p['threshold']:g}", p["acc"], 100 * p["macs_fraction"],
             " / ".join(f"{100 * s:.0f}" for s in p["exit_share"])] for p in report["curve"]]
    if args.threshold is not None and not args.exit:
        print(f"early exit ({args.confidence} confidence, threshold {args.threshold:g}): "
              f"acc {fmt(rows[0][1])} %, {rows[0][2]:.1f} % of the MACs, "
              f"exits per stage {rows[0][3]} %")
    if args.exit:
        print(table(["threshold", "acc %", "MACs %", "exits per stage %"], rows))
        print(f"exit curve: {run_dir / 'exit_curve.png'} and exit_curve.json")


def _cmd_probe(args: argparse.Namespace) -> int:
    from locallearn.probe import probe_run

    if args.grid < 1:
        raise ConfigError(f"--grid {args.grid} is not allowed: it must be at least 1")
    result = probe_run(args.run, data_dir=args.data_dir, train_subset=args.train_subset,
                       test_subset=args.test_subset, grid=args.grid, weight_decay=args.weight_decay)
    print(table(["stage", "probe acc %", "effective rank", "feature dim"],
                [[k + 1, a, r, d] for k, (a, r, d) in enumerate(zip(
                    result["probe_acc"], result["effective_rank"], result["feature_dim"]))]))
    print(f"linear probes on {result['n_train']} train / {result['n_test']} test samples; "
          f"probe.json and probe.png in the run folder")
    return 0


def _cmd_split(args: argparse.Namespace) -> int:
    import torch

    from locallearn.context import find_cuts_with_context
    from locallearn.measure import SavedTensorsMeter, macs, param_count
    from locallearn.models import build_model
    from locallearn.split import stage_ranges

    shape = tuple(int(s) for s in args.input_shape.split(","))
    with options_of(f"model {args.model!r}"):
        backbone = build_model(args.model, shape, args.classes,
                               **({"width": args.width} if args.width else {}))
    with options_of("split"):
        cuts = find_cuts_with_context(backbone, args.k, args.by,
                                      [int(c) for c in args.cuts.split(",")] if args.cuts else None,
                                      args.batch, args.context)
        nodes = _split_nodes(args, backbone, cuts)  # regroups the convs when --groups > 1
    rows = []
    for i, r in enumerate(stage_ranges(cuts, len(backbone))):
        body = torch.nn.Sequential(*backbone.blocks[r.start:r.stop])
        x = torch.randn(args.batch, *backbone.shapes[r.start])
        with SavedTensorsMeter(body) as meter:
            body(x.clone().requires_grad_()).sum().backward()
        rows.append([i + 1, f"{r.start}-{r.stop - 1}", param_count(body), mib(meter.peak_bytes),
                     macs(lambda: body(x)) / args.batch / 1e6, "x".join(map(str, backbone.shapes[r.stop]))])
    print(f"{args.model}, K={args.k}, split by {args.by}, cuts {cuts}, batch {args.batch}")
    print(table(["stage", "blocks", "params", "saved act MiB", "MMACs/sample", "output"], rows))
    print(f"\nnodes (stage, group) incl. head {args.head!r}, context {args.context}, "
          f"groups {args.groups}:")
    print(table(["stage", "group", "body MMACs", "head MMACs", "node MMACs"],
                [[r["stage"], r["group"], r["body_macs"] / 1e6, r["head_macs"] / 1e6,
                  r["macs"] / 1e6] for r in nodes["nodes"]]))
    print(f"largest node {tuple(nodes['largest_node'])}: {nodes['largest_node_macs'] / 1e6:.2f} "
          f"MMACs/sample; total {nodes['total_macs'] / 1e6:.2f} MMACs/sample")
    return 0


def _split_nodes(args: argparse.Namespace, backbone: Any, cuts: list[int]) -> dict:
    """Per-(stage, group) MACs of the split, with heads, groups and context as asked."""
    import torch

    from locallearn.groups import node_costs
    from locallearn.network import LocalNet

    net = LocalNet.from_backbone(backbone, args.k, by="cuts", cuts=cuts, head=args.head,
                                 groups=args.groups, context=args.context,
                                 group_options={"detach_ratio": args.detach_ratio})
    return node_costs(net, torch.randn(2, *backbone.shapes[0]))


def _cmd_plan(args: argparse.Namespace) -> int:
    """The scale model's recommendation for the configured model on ``--devices`` devices."""
    import dataclasses
    from types import SimpleNamespace

    from locallearn import plan
    from locallearn.build import _head_builder, build_backbone, build_data

    link = plan.parse_link(args.link)
    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices} is not allowed: it must be at least 1")
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # no file given: the first word is an override
        overrides.insert(0, config)
        config = None
    cfg = load_config(config, overrides)
    if args.input_shape:  # plan without the data set at hand: its shape is all a plan needs
        shape = tuple(int(s) for s in args.input_shape.split(","))
        data: Any = SimpleNamespace(input_shape=shape, num_classes=args.classes, meta={})
    else:
        data = build_data(cfg)
    backbone = build_backbone(cfg, data)
    device = dataclasses.replace(plan.H100, flops_per_s=args.tflops * 1e12,
                                 memory_bytes=args.memory_gb * 1e9, call_seconds=args.call_us * 1e-6,
                                 name=f"{args.tflops:g} TFLOP/s, {args.memory_gb:g} GB, "
                                      f"{args.call_us:g} us per block and call")
    blocks, heads = plan.costs_on(device, *plan.measure_blocks(backbone, _head_builder(cfg, backbone)))
    batch = args.batch or cfg.data.batch_size * args.devices
    result = plan.recommend(blocks, heads, args.devices, batch, link, device.memory_bytes)
    print(f"{cfg.model.name} on {cfg.data.name}, {len(blocks)} blocks, {args.devices} devices")
    print("\n".join(plan.describe(result, blocks, heads, link, device)))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for title, items in catalog.sections():
        print(f"{title}:")
        for name, help_ in sorted(items.items()):
            print(f"  {name:<16} {help_}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    summaries = []
    for path in args.runs:
        if not runs.is_finished(path):  # failed, still running, or not a run folder
            print(f"locallearn compare: skipping {path}: no summary.json (not a finished run)",
                  file=sys.stderr)
            continue
        summaries.append(json.loads((Path(path) / "summary.json").read_text()))
    if not summaries:
        raise runs.RunError("none of the folders holds a finished run (summary.json)")
    print(compare_table(summaries))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from locallearn.runner import run

    summaries = []
    for engine, k in (("backprop", 4), ("local", 4)):
        print(f"== {engine}, K={k} ==", flush=True)
        cfg = load_config(args.config, ["train.epochs=10", f"engine={engine}", f"split.k={k}",
                                        f"train.out_dir={args.out}", *args.overrides])
        summaries.append(run(cfg)[0])
    print(compare_table(summaries))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="locallearn", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a run from a YAML config and dotted overrides")
    t.add_argument("config", nargs="?", help="YAML run file (optional)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 split.k=4")
    t.add_argument("--data-dir", help="data root (default $LOCALLEARN_DATA_DIR or ./data)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a run folder or checkpoint on its test split")
    e.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    e.add_argument("--data-dir")
    e.add_argument("--exit", action="store_true",
                   help="early-exit curve over thresholds: table, exit_curve.png/.json in the run")
    e.add_argument("--exit-stage", type=int, metavar="K",
                   help="forward shortcut: answer with stage K's predictor")
    e.add_argument("--threshold", type=float, help="early exit at this confidence threshold")
    e.add_argument("--confidence", choices=("max", "entropy"), default="max",
                   help="early-exit confidence: max softmax or 1 - normalised entropy")
    e.set_defaults(fn=_cmd_eval)
    pr = sub.add_parser("probe", help="linear probe and effective rank of every stage's frozen "
                                      "features (probe.json, probe.png)")
    pr.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    pr.add_argument("--data-dir")
    pr.add_argument("--train-subset", type=int, help="train samples to fit on (default: the run's)")
    pr.add_argument("--test-subset", type=int, help="test samples to score (default: the run's)")
    pr.add_argument("--grid", type=int, default=2, help="conv features pooled to GRID x GRID")
    pr.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty of the probe")
    pr.set_defaults(fn=_cmd_probe)
    s = sub.add_parser("split", help="print the stages of a model split into K")
    s.add_argument("--model", required=True)
    s.add_argument("--k", type=int, default=4)
    s.add_argument("--by", default="count")
    s.add_argument("--cuts", default="", help="explicit cut indices, e.g. 4,8,12")
    s.add_argument("--input-shape", default="3,32,32")
    s.add_argument("--classes", type=int, default=10)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--width", type=float, default=0.0, help="model width multiplier (0: default)")
    s.add_argument("--groups", type=int, default=1, help="width groups per stage (GN-DGL)")
    s.add_argument("--head", default="mlp", help="auxiliary head kind of every node")
    s.add_argument("--detach-ratio", type=float, default=0.0,
                   help="fraction of other groups' channels a group head sees (detached)")
    s.add_argument("--context", default="none", help="context supply: none, E, R1..Rn, RnE")
    s.set_defaults(fn=_cmd_split)
    pl = sub.add_parser("plan", help="scale model: recommended K, placement, images/s and "
                                     "memory per device on N devices")
    pl.add_argument("config", nargs="?", help="YAML run file (optional)")
    pl.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=resnet110")
    pl.add_argument("--devices", type=int, required=True, help="devices to plan for")
    pl.add_argument("--link", default="nvlink",
                    help="nvlink (2 us, 450 GB/s), ethernet (10 us, 12.5 GB/s) or LATENCY_US,GBPS")
    pl.add_argument("--tflops", type=float, default=300.0,
                    help="achievable TFLOP/s per device (default: an H100 at ~30%% of bf16 peak)")
    pl.add_argument("--memory-gb", type=float, default=80.0, help="memory per device")
    pl.add_argument("--call-us", type=float, default=40.0,
                    help="overhead per block per call (launches, framework), microseconds")
    pl.add_argument("--batch", type=int, default=0,
                    help="global batch per step (default: data.batch_size x devices)")
    pl.add_argument("--input-shape", default="",
                    help="e.g. 3,32,32: plan for this input shape without loading the data set")
    pl.add_argument("--classes", type=int, default=10, help="classes (with --input-shape)")
    pl.set_defaults(fn=_cmd_plan)
    sub.add_parser("list", help="list models, objectives, engines, data sets").set_defaults(fn=_cmd_list)
    c = sub.add_parser("compare", help="table of finished runs side by side")
    c.add_argument("runs", nargs="+", metavar="RUN")
    c.set_defaults(fn=_cmd_compare)
    d = sub.add_parser("demo", help="the main job: BP and local K=4 on the embedded digits data")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--config", default=None)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(fn=_cmd_demo)
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; dotted overrides may also follow options (``--data-dir D k=v``)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if hasattr(args, "overrides"):
        words = [w for w in extra if "=" in w and not w.startswith("-")]
        args.overrides = [*args.overrides, *words]
        extra = [w for w in extra if w not in words]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``locallearn`` command."""
    args = _parse(argv)
    setup_logging()
    try:
        return int(args.fn(args))
    except UserError as e:
        print(f"locallearn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
