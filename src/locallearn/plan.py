"""A scale model: predicted images/s and memory per device of one training step.

Schemes, from per-stage costs and a link (latency + bandwidth):

=================  ===========================================================================
``local``           our pipeline (gradient-isolated stages, no backward locking): a node's
                    time per micro-batch is the forward + backward of its stages and heads
                    plus the send of its output; a step is m micro-batches of the slowest
                    node; with D replicas a node works on 1/D of the batch and all-reduces
                    its stages' gradients once per step
``gpipe``/``1f1b``  end-to-end BP as a K-stage pipeline (activations forward, gradients
                    back): a step is (m + K - 1) micro-batch slots of the slowest stage, so
                    the bubble is (K - 1) / (m + K - 1); GPipe keeps the activations of all
                    m micro-batches, 1F1B of at most K - k on stage k
``ddp``             the full model on every device, a 1/D shard of the batch, a ring
                    all-reduce of all gradients per step
=================  ===========================================================================

Why analytic rather than a discrete-event simulation: with bounded queues between
ranks and no backward dependency, the steady state of the local pipeline is a flow
line whose rate is set by its slowest node (compute plus its link), which a closed form
gives exactly; GPipe/1F1B are fixed schedules with a known bubble; the one transient
(the fill and drain of each epoch) is a correction of one traversal per epoch. A
simulator would add event noise (queue sizes, send ordering) that the measurements
here cannot resolve, and the closed forms can be tested by hand.

Everything is plain floats: no torch import, so the CLI's ``plan`` and the tests are
fast. Costs per sample come either from measured seconds (calibration on this machine)
or from FLOPs at a stated device throughput (:func:`costs_on`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from locallearn.errors import ConfigError


@dataclass(frozen=True)
class Link:
    """A point-to-point link: ``latency_s + bytes / bandwidth_Bps`` per message."""

    latency_s: float
    bandwidth_Bps: float

    def seconds(self, nbytes: float) -> float:
        """Time to move one message of ``nbytes`` (zero bytes: nothing is sent)."""
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bandwidth_Bps


LINKS = {  # stated figures: NVLink 4 (H100, ~450 GB/s one way), 100 Gb/s Ethernet
    "nvlink": Link(2e-6, 450e9),
    "ethernet": Link(10e-6, 12.5e9),
}


def parse_link(text: str) -> Link:
    """``nvlink``, ``ethernet`` or ``<latency_us>,<GB/s>`` (e.g. ``5,25``).

    Raises:
        ConfigError: for anything else.
    """
    if text in LINKS:
        return LINKS[text]
    try:
        latency_us, gbps = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--link {text!r} is not allowed: use {', '.join(LINKS)} or "
                          f"<latency_us>,<GBps> (e.g. 5,25)") from None
    if latency_us < 0 or gbps <= 0:
        raise ConfigError(f"--link {text!r}: latency must be >= 0 and bandwidth > 0")
    return Link(latency_us / 1e6, gbps * 1e9)


def ring_allreduce_seconds(nbytes: float, devices: int, link: Link) -> float:
    """Ring all-reduce of ``nbytes`` over ``devices``: 2(D-1) steps of nbytes/D each.

    Reduce-scatter then all-gather; every step pays the latency once, so the time is
    ``2(D-1) * latency + 2(D-1)/D * nbytes / bandwidth`` (0 for one device).
    """
    if devices <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (devices - 1)
    return steps * link.latency_s + steps / devices * nbytes / link.bandwidth_Bps


def bubble_fraction(k: int, micro_batches: int) -> float:
    """Idle fraction of a GPipe/1F1B step of K stages and m micro-batches: (K-1)/(m+K-1)."""
    return (k - 1) / (micro_batches + k - 1)


@dataclass(frozen=True)
class StageCost:
    """What one stage costs; ``*_seconds`` and ``*_bytes`` per sample unless named otherwise.

    ``seconds`` is the forward + backward of the body, ``head_seconds`` of its local
    objective (BP pays only the last stage's head: it is the task head);
    ``fixed_seconds`` is paid once per call (a micro-batch: kernel launches, Python),
    ``update_seconds`` once per step (the optimizer).
    """

    seconds: float
    head_seconds: float = 0.0
    out_bytes: float = 0.0      # activation sent to the next stage (targets included)
    param_bytes: float = 0.0    # body parameters
    head_param_bytes: float = 0.0
    saved_bytes: float = 0.0    # activations saved for backward by body (and head)
    fixed_seconds: float = 0.0
    update_seconds: float = 0.0


def merge_stages(blocks: Sequence[StageCost], cuts: Sequence[int],
                 heads: Sequence[StageCost] | None = None) -> list[StageCost]:
    """Per-block costs summed into the stages cut at ``cuts``.

    A stage takes its ``out_bytes`` from its last block and, when ``heads`` (one per
    block: the objective a stage ending there carries) is given, that block's head.
    """
    edges = [0, *cuts, len(blocks)]
    out = []
    for a, b in zip(edges, edges[1:]):
        part = blocks[a:b]
        head = heads[b - 1] if heads is not None else StageCost(0.0)
        out.append(StageCost(
            seconds=sum(c.seconds for c in part), head_seconds=head.head_seconds,
            out_bytes=part[-1].out_bytes, param_bytes=sum(c.param_bytes for c in part),
            head_param_bytes=head.head_param_bytes,
            saved_bytes=sum(c.saved_bytes for c in part) + head.saved_bytes,
            fixed_seconds=sum(c.fixed_seconds for c in part) + head.fixed_seconds,
            update_seconds=sum(c.update_seconds for c in part) + head.update_seconds))
    return out


@dataclass(frozen=True)
class Prediction:
    """One scheme's predicted step: images/s and the largest memory of one device."""

    scheme: str
    k: int                 # stages (1 for DDP)
    workers: int           # pipeline nodes (devices of one replica)
    replicas: int          # data-parallel copies
    micro_batches: int
    batch: int             # global batch of one step
    step_seconds: float
    images_per_s: float
    memory_bytes: float    # parameters, gradients, optimizer state, activations, queues
    bubble: float          # idle fraction of a step (mean over devices; DDP: waiting on comms)

    @property
    def devices(self) -> int:
        return self.workers * self.replicas


def contiguous(k: int, workers: int) -> list[range]:
    """Contiguous near-equal runs of K stages on ``workers`` nodes, later nodes larger.

    The rule of :func:`locallearn.engines.pipeline.assign_stages` (tested equal), kept
    here so that this module needs no torch.
    """
    if not 1 <= workers <= k:
        raise ConfigError(f"workers={workers} is not allowed with K={k}: use 1 to {k}")
    sizes = [k // workers + (r >= workers - k % workers) for r in range(workers)]
    starts = [sum(sizes[:r]) for r in range(workers)]
    return [range(s, s + n) for s, n in zip(starts, sizes)]


def _check(batch: int, micro_batches: int, replicas: int) -> None:
    if batch < micro_batches * replicas:
        raise ConfigError(f"batch {batch} is smaller than micro_batches x replicas = "
                          f"{micro_batches * replicas}: every part needs a sample")


def local_pipeline(stages: Sequence[StageCost], batch: int, link: Link, workers: int | None = None,
                   micro_batches: int = 1, replicas: int = 1, steps_per_epoch: int | None = None,
                   cores: float | None = None, param_copies: float = 3.0, queue: int = 2,
                   overlap_send: bool = False, data_seconds: float = 0.0) -> Prediction:
    """Our pipeline: the slowest node sets the rate; nothing travels backwards.

    Args:
        stages: per-stage costs (each stage with its local head).
        batch: global batch of one step (every replica takes ``batch / replicas``).
        link: the link between consecutive nodes and inside a replica group.
        workers: nodes per replica (contiguous runs of stages; default one per stage).
        micro_batches: parts per batch, sent on their own.
        replicas: data-parallel copies of every node (gradients all-reduced per step).
        steps_per_epoch: if given, every epoch's fill and drain is added (one traversal
            of one micro-batch, compute and sends, beside the slowest node's calls), as a
            measured epoch has it.
        cores: processors shared by all nodes (this machine's 2 CPU cores); ``None``:
            every node has its own device.
        param_copies: parameter bytes held per parameter byte (weights, gradients and
            optimizer state: 3 for SGD with momentum, 4 for Adam).
        queue: packets in flight per link (received activations a node holds).
        overlap_send: sends run beside compute (a separate stream or thread on their own
            link): a node is bounded by the larger of compute and send, not their sum.

    Returns:
        The prediction; ``bubble`` is the nodes' mean idle fraction of a steady step.
    """
    k = len(stages)
    runs = contiguous(k, workers or k)
    _check(batch, micro_batches, replicas)
    mb = batch / (replicas * micro_batches)  # samples per call on one device
    per_call, per_step, memory = [], [], []
    traversal = 0.0  # one micro-batch through every node: its sends never overlap its compute
    for i, run in enumerate(runs):
        own = [stages[j] for j in run]
        compute = sum(s.fixed_seconds + mb * (s.seconds + s.head_seconds) for s in own)
        send = link.seconds(mb * own[-1].out_bytes) if i < len(runs) - 1 else 0.0
        call = max(compute, send) if overlap_send else compute + send
        traversal += compute + send
        grads = sum(s.param_bytes + s.head_param_bytes for s in own)
        update = sum(s.update_seconds for s in own) + ring_allreduce_seconds(grads, replicas, link)
        update += data_seconds / replicas if i == 0 else 0.0  # each replica reads its shard
        per_call.append(call)
        per_step.append(micro_batches * call + update)
        inbox = queue * mb * stages[run[0] - 1].out_bytes if run[0] > 0 else 0.0
        memory.append(param_copies * grads + mb * max(s.saved_bytes for s in own) + inbox)
    step = max(per_step)
    if cores is not None and len(runs) * replicas > cores:  # processors shared: work / cores
        step = max(step, sum(per_step) * replicas / cores)
    epoch_extra = (traversal - per_call[per_step.index(max(per_step))]
                   if steps_per_epoch else 0.0)
    seconds = step + epoch_extra / (steps_per_epoch or 1)
    return Prediction("local", k, len(runs), replicas, micro_batches, batch, seconds,
                      batch / seconds, max(memory), 1 - sum(per_step) / (len(runs) * step))


def bp_pipeline(stages: Sequence[StageCost], batch: int, link: Link, micro_batches: int,
                schedule: str = "1f1b", replicas: int = 1, param_copies: float = 3.0) -> Prediction:
    """End-to-end BP pipelined over K devices (GPipe or 1F1B), one stage per device.

    A micro-batch slot on stage k is its forward + backward plus receiving the
    activation and sending the gradient back; a step is (m + K - 1) slots of the
    slowest stage (both schedules have the same bubble; 1F1B only holds fewer
    activations), then the update and the replicas' all-reduce.

    Raises:
        ConfigError: for a schedule other than ``gpipe`` or ``1f1b``.
    """
    if schedule not in ("gpipe", "1f1b"):
        raise ConfigError(f"schedule {schedule!r}: choose gpipe or 1f1b")
    k = len(stages)
    _check(batch, micro_batches, replicas)
    mb = batch / (replicas * micro_batches)
    slots, memory, updates = [], [], []
    for j, s in enumerate(stages):
        head = s.head_seconds if j == k - 1 else 0.0  # only the task head under BP
        comm = link.seconds(mb * s.out_bytes) if j < k - 1 else 0.0  # act out, grad back
        slots.append(s.fixed_seconds + mb * (s.seconds + head) + 2 * comm)
        params = s.param_bytes + (s.head_param_bytes if j == k - 1 else 0.0)
        updates.append(s.update_seconds + ring_allreduce_seconds(params, replicas, link))
        held = micro_batches if schedule == "gpipe" else min(micro_batches, k - j)
        memory.append(param_copies * params + held * mb * s.saved_bytes)
    step = (micro_batches + k - 1) * max(slots) + max(updates)
    return Prediction(schedule, k, k, replicas, micro_batches, batch, step, batch / step,
                      max(memory), bubble_fraction(k, micro_batches))


def ddp(stages: Sequence[StageCost], batch: int, link: Link, devices: int,
        param_copies: float = 3.0, overlap: bool = True) -> Prediction:
    """Data-parallel BP: the whole model per device, a ring all-reduce of every gradient.

    With ``overlap`` (torch DDP's gradient buckets) the all-reduce runs beside the
    backward pass (two thirds of the compute): a step is forward + max(backward,
    all-reduce) + update; without, their sum.
    """
    _check(batch, 1, devices)
    shard = batch / devices
    last = len(stages) - 1
    compute = sum(s.fixed_seconds + shard * (s.seconds + (s.head_seconds if j == last else 0.0))
                  for j, s in enumerate(stages))
    update = sum(s.update_seconds for s in stages)
    params = sum(s.param_bytes for s in stages) + stages[-1].head_param_bytes
    reduce = ring_allreduce_seconds(params, devices, link)
    step = (compute / 3 + max(2 * compute / 3, reduce) if overlap else compute + reduce) + update
    memory = param_copies * params + shard * sum(s.saved_bytes for s in stages)
    return Prediction("ddp", 1, 1, devices, 1, batch, step, batch / step, memory,
                      1 - (compute + update) / step)


def fastest(options: Sequence[Prediction], tolerance: float = 0.02) -> Prediction | None:
    """The fastest prediction; among those within ``tolerance`` of it, the least memory.

    Micro-batches barely change a local pipeline's rate but divide its activation
    memory, so a near tie goes to the smaller footprint.
    """
    if not options:
        return None
    top = max(p.images_per_s for p in options)
    near = [p for p in options if p.images_per_s >= (1 - tolerance) * top]
    return min(near, key=lambda p: (p.memory_bytes, -p.images_per_s))


CutFn = Callable[[int], Sequence[int]]  # K -> cut indices over the blocks


def balanced(blocks: Sequence[StageCost], heads: Sequence[StageCost] | None = None) -> CutFn:
    """Cuts minimising the slowest stage's compute (``locallearn.split.balanced_cuts``)."""
    from locallearn.split import balanced_cuts  # imported here: it needs torch

    costs = [b.seconds for b in blocks]
    ends = [h.head_seconds for h in heads] if heads is not None else None
    return lambda k: balanced_cuts(costs, k, ends)


@dataclass(frozen=True)
class Plan:
    """The recommended local-pipeline placement and every scheme's best for comparison."""

    best: Prediction
    cuts: list[int]
    others: list[Prediction]


def recommend(blocks: Sequence[StageCost], heads: Sequence[StageCost], devices: int,
              global_batch: int, link: Link, memory_bytes: float = math.inf,
              ks: Sequence[int] | None = None, micro: Sequence[int] = (1, 2, 4, 8),
              cut_fn: CutFn | None = None, param_copies: float = 3.0,
              overlap_send: bool = True) -> Plan:
    """Search K (stages = workers), replicas D = devices // K and micro-batches.

    Keeps the placements whose memory fits ``memory_bytes`` per device and picks the
    fastest local pipeline (:func:`fastest`); also the best GPipe, 1F1B and DDP on the
    same devices. ``overlap_send``: the pipeline's sends run beside compute, as the
    asynchronous links do on GPUs (see :func:`local_pipeline`).

    Raises:
        ConfigError: if nothing fits in memory.
    """
    cut_fn = cut_fn or balanced(blocks, heads)
    ks = ks or [k for k in range(1, len(blocks) + 1) if k <= devices]
    found: dict[str, list[tuple[Prediction, list[int]]]] = {}

    def offer(p: Prediction, cuts: list[int]) -> None:
        if p.memory_bytes <= memory_bytes:
            found.setdefault(p.scheme, []).append((p, cuts))

    for k in ks:
        d = devices // k
        if d < 1:
            continue
        cuts = list(cut_fn(k))
        stages = merge_stages(blocks, cuts, heads)
        for m in micro:
            if global_batch < m * d:
                continue
            offer(local_pipeline(stages, global_batch, link, micro_batches=m, replicas=d,
                                 param_copies=param_copies, overlap_send=overlap_send), cuts)
            if k > 1:
                for sched in ("gpipe", "1f1b"):
                    offer(bp_pipeline(stages, global_batch, link, m, sched, d, param_copies), cuts)
    if global_batch >= devices:
        offer(ddp(merge_stages(blocks, [], heads), global_batch, link, devices, param_copies), [])
    if "local" not in found:
        raise ConfigError(f"no local placement fits {memory_bytes / 2**30:.1f} GiB per device; "
                          "raise the memory, the devices or lower the batch")
    picked = {}
    for scheme, options in found.items():
        p = fastest([o for o, _ in options])
        picked[scheme] = next(o for o in options if o[0] is p)
    best, cuts = picked.pop("local")
    return Plan(best, cuts, [p for p, _ in picked.values()])


# -- costs on a device, from a model's blocks -----------------------------------------------

@dataclass(frozen=True)
class Device:
    """A stated accelerator: achievable FLOP/s, memory, per-block overhead, memory bandwidth.

    ``call_seconds`` is paid by every block on every call (forward + backward of one
    micro-batch: kernel launches and framework time, which small micro-batches cannot
    hide); ``hbm_Bps`` sets the optimizer's time (it reads and writes every state copy).
    """

    name: str
    flops_per_s: float
    memory_bytes: float
    call_seconds: float = 40e-6
    hbm_Bps: float = 3.35e12
    act_bytes: float = 2.0      # bytes per activation element (bf16)


H100 = Device("H100 SXM (bf16 autocast; 300 TFLOP/s achievable = 30% of 989 dense peak)",
              300e12, 80e9)
TARGET_BYTES = 8.0  # the int64 label that travels with every sample


@dataclass(frozen=True)
class BlockFigures:
    """What a block (or the head a stage ending there carries) is, per sample."""

    macs: float
    out_elems: float
    params: float
    saved_elems: float   # elements saved for backward (fp32 bytes / 4)


def measure_blocks(backbone: Any, make_head: Callable[[tuple[int, ...], bool], Any],
                   batch: int = 2) -> tuple[list[BlockFigures], list[BlockFigures]]:
    """Per-sample figures of every block, and of the head a stage ending at each block carries.

    MACs from :func:`locallearn.measure.macs`, saved activations from
    :class:`locallearn.measure.SavedTensorsMeter`, both on ``batch`` random inputs on
    the CPU in fp32, in train mode (the backbone's BatchNorm statistics move: pass a
    backbone built for planning). Imports torch (only this function does).
    """
    import torch

    from locallearn.measure import SavedTensorsMeter, macs, param_count
    from locallearn.types import detach, first_tensor

    h: Any = torch.randn(batch, *backbone.shapes[0])
    y = torch.randint(backbone.num_classes, (batch,))
    blocks, heads = [], []
    for i, block in enumerate(backbone.blocks):
        count = macs(lambda: block(h)) / batch
        with SavedTensorsMeter(block) as meter:
            out = block(h)
            first_tensor(out).float().sum().backward()
        out = detach(out)
        blocks.append(BlockFigures(count, first_tensor(out).numel() / batch,
                                   float(param_count(block)), meter.peak_bytes / 4 / batch))
        head = make_head(tuple(backbone.shapes[i + 1]), i == len(backbone.blocks) - 1)
        head_macs = macs(lambda: head.loss(out, y)) / batch
        with SavedTensorsMeter(head) as meter:
            head.loss(out, y).backward()
        heads.append(BlockFigures(head_macs, 0.0, float(param_count(head)),
                                  meter.peak_bytes / 4 / batch))
        h = out
    return blocks, heads


def costs_on(device: Device, blocks: Sequence[BlockFigures],
             heads: Sequence[BlockFigures]) -> tuple[list[StageCost], list[StageCost]]:
    """Per-block and per-head :class:`StageCost` on ``device`` (for :func:`merge_stages`).

    Compute: 6 FLOPs per MAC (forward + backward: the backward computes the gradients of
    the inputs and of the weights, each about a forward) at ``device.flops_per_s``, plus
    ``call_seconds`` per block and call; activations in ``device.act_bytes`` per
    element; parameters in fp32 with an Adam update (weights, gradient and 2 moments,
    each read and written once per step at ``hbm_Bps``). Heads (one or two layers) are
    charged their compute and parameters only.
    """
    out_blocks = [StageCost(6 * f.macs / device.flops_per_s,
                            out_bytes=f.out_elems * device.act_bytes + TARGET_BYTES,
                            param_bytes=4 * f.params, saved_bytes=f.saved_elems * device.act_bytes,
                            fixed_seconds=device.call_seconds,
                            update_seconds=2 * 4 * 4 * f.params / device.hbm_Bps)
                  for f in blocks]
    out_heads = [StageCost(0.0, head_seconds=6 * f.macs / device.flops_per_s,
                           head_param_bytes=4 * f.params,
                           saved_bytes=f.saved_elems * device.act_bytes) for f in heads]
    return out_blocks, out_heads


def describe(p: Plan, blocks: Sequence[StageCost], heads: Sequence[StageCost], link: Link,
             device: Device) -> list[str]:
    """The plan as the CLI prints it: the recommendation, its stages, the other schemes."""
    from locallearn.report import table  # torch-free

    b = p.best
    mib = 2**20
    lines = [f"device {device.name}; link {link.latency_s * 1e6:g} us + "
             f"{link.bandwidth_Bps / 1e9:g} GB/s; global batch {b.batch}",
             f"recommended: local pipeline, K={b.k} stages on {b.workers} workers x "
             f"{b.replicas} replicas ({b.devices} devices), {b.micro_batches} micro-batch(es)",
             "  placement: one stage per worker (engine.placement=stages; width-group nodes "
             "are not modelled)",
             f"  predicted {b.images_per_s:,.0f} images/s, {b.memory_bytes / mib:,.1f} MiB "
             "per device (largest)",
             f"  cuts {p.cuts}: split.k={b.k} split.by=cuts split.cuts=[{','.join(map(str, p.cuts))}]"
             f" engine=pipeline engine.workers={b.workers} engine.replicas={b.replicas} "
             f"engine.micro_batches={b.micro_batches}"]
    stages = merge_stages(blocks, p.cuts, heads)
    edges = [0, *p.cuts, len(blocks)]
    mb = b.batch / (b.replicas * b.micro_batches)
    rows = [[j + 1, f"{a}-{z - 1}", (s.seconds + s.head_seconds) * mb * 1e3 + s.fixed_seconds * 1e3,
             s.out_bytes * mb / 2**20, link.seconds(s.out_bytes * mb) * 1e3 if j < len(stages) - 1
             else 0.0, (s.param_bytes + s.head_param_bytes) / 2**20]
            for j, (s, a, z) in enumerate(zip(stages, edges, edges[1:]))]
    lines += ["", table(["stage", "blocks", "compute ms/call", "send MiB/call", "send ms/call",
                         "params MiB"], rows), "", "best of each scheme on the same devices:"]
    others = [b, *sorted(p.others, key=lambda o: -o.images_per_s)]
    lines.append(table(["scheme", "K", "replicas", "micro-batches", "images/s", "MiB/device",
                        "bubble"],
                       [[o.scheme, o.k, o.replicas, o.micro_batches, round(o.images_per_s),
                         o.memory_bytes / mib, o.bubble] for o in others]))
    faster = [o for o in p.others if o.images_per_s > b.images_per_s]
    if faster:  # the plan is for engine=pipeline, but say when end-to-end BP would be faster
        top = max(faster, key=lambda o: o.images_per_s)
        lines.append(f"note: {top.scheme} (end-to-end BP) is predicted "
                     f"{top.images_per_s / b.images_per_s:.2f}x faster on these devices")
    return lines
