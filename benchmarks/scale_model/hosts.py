"""The scale model across two "hosts": network namespaces joined by a veth pair, plain and shaped.

The hosts are ``tests/netns.py``'s (the multi-host tests' fixture: a namespace each, own
address and host name, gloo bound to the veth); :func:`netns.shaped` puts a qdisc on
both ends of the veth. For every link setting:

1. a gloo ping-pong between the hosts (``link.py``'s, one rank per host, 1 KB-4 MB) fitted
   to latency + bandwidth;
2. real two-host ``engine=pipeline`` runs, exactly as the multi-host tests run them
   (``torchrun`` on both namespaces, c10d rendezvous on host A's address), ResNet-20 with
   the loopback validation's settings; measured images/s beside the model's prediction
   from the run's own stage seconds and the link fitted in step 1.

The pipeline's sends are asynchronous (``Outbox``: isend, up to ``engine.queue`` packets
in flight), so these rows are predicted with ``overlap_send``: a node is bound by the
larger of its compute and its send (every row also has the serial sum). Everything the
part starts -- both namespaces, the qdiscs, every process in them -- is removed on
leaving it, also on errors (the context managers of ``netns``); a SIGTERM ends it the
same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))  # the multi-host tests' namespace helper

import netns  # noqa: E402
from link import fit  # noqa: E402
from run import calibrate, epoch_figures, make_row, overrides, predict, stage_bytes  # noqa: E402

from locallearn import plan, runs  # noqa: E402

LIMIT = 300  # seconds for one two-host run or ping-pong (6 processes on 2 shared cores)
MAX_BYTES = 4 * 2**20  # ping-pong sizes up to 4 MB: a K=2 ResNet-20 batch sends 2.1 MB
SHAPES: list[tuple[float, float] | None] = [None, (200.0, 0.0), (50.0, 0.0)]  # (Mbit/s, ms)
CONFIGS = {  # link setting -> (K, workers, micro-batches, ranks per host)
    None: [(2, 2, 1, 1)],
    (200.0, 0.0): [(2, 2, 1, 1)],
    (50.0, 0.0): [(2, 2, 1, 1), (2, 2, 2, 1), (4, 2, 1, 1)],
}


def describe(shape: tuple[float, float] | None) -> str:
    """``veth`` or e.g. ``veth, 50 Mbit/s`` / ``veth, 200 Mbit/s + 5 ms``."""
    if shape is None:
        return "veth"
    rate, delay = shape
    return f"veth, {rate:g} Mbit/s" + (f" + {delay:g} ms" if delay else "")


def ping_pong_hosts(a: netns.Host, b: netns.Host, folder: Path, port: int,
                    repeats: int = 10) -> dict[str, Any]:
    """``link.py``'s ping-pong with rank 0 on host A and rank 1 on host B; rows and fit.

    Raises:
        RuntimeError: if a rank fails or the pair does not finish within ``LIMIT`` s.
    """
    out = folder / f"pingpong-{port}.json"
    logs = [folder / f"pingpong-{port}-{r}.log" for r in (0, 1)]
    load = os.getloadavg()[0]
    procs = [h.popen([sys.executable, str(HERE / "link.py"), "--rank", str(r), "--init",
                      f"tcp://{a.addr}:{port}", "--repeats", str(repeats), "--max-bytes",
                      str(MAX_BYTES), "--out", str(out)], log)
             for r, (h, log) in enumerate(zip((a, b), logs))]
    if netns.wait_all(procs, LIMIT) != [0, 0]:
        raise RuntimeError("the ping-pong between the hosts failed:\n" + tails(logs))
    rows = json.loads(out.read_text())
    latency, bandwidth = fit(rows)
    return {"rows": rows, "latency_s": latency, "bandwidth_Bps": bandwidth, "load": load}


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())


def two_host_run(a: netns.Host, b: netns.Host, folder: Path, name: str, cfg: list[str],
                 per_host: int, port: int) -> list[dict[str, Any]]:
    """``torchrun`` of ``locallearn train cfg`` on both hosts (as tests/test_multihost.py);
    the run's metrics rows (rank 0, host A, writes the run folder).

    Raises:
        RuntimeError: if either host's torchrun fails or outlasts ``LIMIT`` s.
    """
    args = [*cfg, f"train.name={name}"]
    logs = [folder / f"{name}-{side}.log" for side in "ab"]
    procs = [h.torchrun(per_host, f"{a.addr}:{port}", name, args, log)
             for h, log in zip((a, b), logs)]
    if netns.wait_all(procs, LIMIT) != [0, 0]:
        raise RuntimeError(f"the two-host run {name} failed:\n" + tails(logs))
    return runs.read_metrics(folder / name)


def netem_refused(host: netns.Host) -> str | None:
    """Why ``tc netem`` (a delay) cannot shape ``host``'s veth here, or None if it can."""
    try:
        with netns.shaped([host], 1000, 1):
            return None
    except RuntimeError as e:
        return str(e)


def validate_hosts(out: str, shapes: list[tuple[float, float] | None] = SHAPES,
                   quick: bool = False) -> dict[str, Any]:
    """Ping-pong and two-host pipeline runs under every link setting of ``shapes``.

    Returns:
        ``{"links": [...], "rows": [...], "netem": ...}``: one fitted link per setting, one
        validation row (:func:`run.make_row`, plus the link) per run, and ``tc``'s answer
        to a netem qdisc (or ``available``).
    """
    if (why := netns.unavailable()) is not None:
        raise RuntimeError(f"two hosts cannot be made here: {why}")
    folder = Path(out)
    alone = {k: calibrate(k, out) for k in sorted({c[0] for s in shapes for c in CONFIGS[s]})}
    links, rows = [], []
    ports = iter(range(netns.RDZV_PORT, netns.RDZV_PORT + 100))
    with netns.host_pair() as (a, b):
        netem = netem_refused(a)
        if netem is not None:
            print(f"netem is not available, links are shaped by rate only: {netem}")
        for shape in shapes:
            with netns.shaped((a, b), *shape) if shape else contextlib.nullcontext("none") as qdisc:
                fitted = ping_pong_hosts(a, b, folder, next(ports), 3 if quick else 10)
                fitted.update(link=describe(shape), qdisc=qdisc)
                links.append(fitted)
                link = plan.Link(fitted["latency_s"], fitted["bandwidth_Bps"])
                print(f"{describe(shape)} ({qdisc}): latency {link.latency_s * 1e6:.0f} us, "
                      f"bandwidth {link.bandwidth_Bps / 1e6:.1f} MB/s", flush=True)
                for k, w, m, per_host in CONFIGS[shape]:
                    load, start = os.getloadavg()[0], time.time()
                    port = next(ports)
                    metrics = two_host_run(a, b, folder, f"hosts{port}",
                                           overrides(k, w, m, 1, out), per_host, port)
                    fig = epoch_figures(metrics, k, w)
                    row = make_row((k, w, m, 1), fig, alone[k], link, load, start,
                                   overlap_send=True)
                    serial = predict(fig["stage_seconds"], fig["data_seconds"], stage_bytes(k),
                                     link, w, m, 1, None, overlap_send=False)
                    row.update(hosts=2, ranks_per_host=per_host, link=describe(shape),
                               qdisc=qdisc, link_latency_s=link.latency_s,
                               link_bandwidth_Bps=link.bandwidth_Bps, overlap_send=True,
                               predicted_serial_send=serial,
                               error_serial_send_pct=100 * (serial / fig["images_per_s"] - 1))
                    rows.append(row)
    return {"links": links, "rows": rows, "netem": netem or "available"}
