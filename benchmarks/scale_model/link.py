"""Gloo ping-pong: one-way time per message size, fitted to latency + bytes / bandwidth.

Two processes (1 thread each) send a float32 tensor back and forth; the one-way time
of a size is half the median round trip. The fit is least squares of ``t = a + n / b``
over the sizes (1 KB to 16 MB), which is the :class:`locallearn.plan.Link` model.
:func:`ping_pong` runs both ranks here over loopback; ``python link.py --rank R --init
tcp://ADDR:PORT --out FILE`` is one rank on its own, which ``hosts.py`` starts on each of
two network namespaces.
"""

from __future__ import annotations

import os
import statistics
import time
from datetime import timedelta
from typing import Any

SIZES = [2**p for p in range(10, 25, 2)]  # 1 KB .. 16 MB


def measure(rank: int, init: str, repeats: int, sizes: list[int] = SIZES) -> list[dict[str, Any]]:
    """One rank of the ping-pong (rank 0 starts each round trip); the rows of every size."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    rows = []
    for n in sizes:
        t = torch.zeros(n // 4)
        times = []
        for i in range(repeats + 2):  # two warm-up round trips
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)
            if i >= 2:
                times.append(time.perf_counter() - start)
        rows.append({"bytes": n, "one_way_s": statistics.median(times) / 2})
    dist.destroy_process_group()
    return rows


def _worker(rank: int, init: str, repeats: int, queue: Any) -> None:
    rows = measure(rank, init, repeats)
    if rank == 0:
        queue.put(rows)


def fit(rows: list[dict[str, float]]) -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of ``t = a + n / b``.

    The bandwidth is the least-squares slope over all sizes (the large messages set
    it); the latency the median of what is left of the small messages' times (<= 64 KB),
    since an intercept fitted on absolute times is dominated by the 16 MB point's noise.
    """
    xs, ys = [r["bytes"] for r in rows], [r["one_way_s"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    small = [y - x * slope for x, y in zip(xs, ys) if x <= 65536]
    return max(statistics.median(small), 0.0), 1.0 / slope


def ping_pong(repeats: int = 20) -> dict[str, Any]:
    """Measure, fit and return ``{"rows", "latency_s", "bandwidth_Bps", "load"}``."""
    import multiprocessing as mp

    from locallearn.distributed.launch import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    init = f"tcp://127.0.0.1:{free_port()}"
    load = os.getloadavg()[0]
    procs = [ctx.Process(target=_worker, args=(r, init, repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    latency, bandwidth = fit(rows)
    return {"rows": rows, "latency_s": latency, "bandwidth_Bps": bandwidth, "load": load}


def main() -> None:
    """Loopback (no arguments), or one rank of a ping-pong between two hosts."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, help="this rank (0 or 1); omit for both over loopback")
    p.add_argument("--init", help="tcp://ADDR:PORT of rank 0")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--max-bytes", type=int, default=SIZES[-1])
    p.add_argument("--out", help="rank 0 writes its rows (JSON) here")
    a = p.parse_args()
    if a.rank is None:
        print(json.dumps(ping_pong(a.repeats), indent=1))
        return
    rows = measure(a.rank, a.init, a.repeats, [n for n in SIZES if n <= a.max_bytes])
    if a.rank == 0:
        with open(a.out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
