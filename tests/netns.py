"""Two "hosts" on one machine: network namespaces joined by a veth pair, for multi-host tests.

::

    namespace ll<pid>a<n>  (host ll-<pid>-<n>-a)        namespace ll<pid>b<n>  (host ...-b)
      lo 127.0.0.1                                        lo 127.0.0.1
      va<pid>n<n> 10.77.<n>.1/24  ◄──── veth pair ────►   vb<pid>n<n> 10.77.<n>.2/24

Each host is a namespace with its own loopback, its own interface and address, and (through
``unshare --uts``) its own host name, which ``/etc/netns/<ns>/hosts`` resolves to its address
(``ip netns exec`` mounts that file over ``/etc/hosts``). A namespace has no route but its
/24 and loopback, so test traffic cannot leave the pair. The filesystem is shared: a run
folder written by rank 0 on host A is read by host B's ranks.

What pins torch to one interface of a host (checked in torch 2.13; here the hosts file
would resolve the names right anyway, and the tests pass both to run the README's command
verbatim): ``--local-addr <address>`` for
torchrun, so the rendezvous advertises the address rather than the host's FQDN as
MASTER_ADDR (the workers' store) and sorts host A (the lower address) first, i.e. node 0 =
ranks 0..M-1 (the c10d rendezvous ignores ``--node-rank``); and
``GLOO_SOCKET_IFNAME=<veth>``, so gloo binds its pairs to the veth's address instead of
what the host name resolves to.

:func:`host_pair` is a context manager; on leaving it (also on an error) it kills the
process group of every process it started, then every process left in either namespace,
deletes both namespaces (which deletes the veth pair) and their ``/etc/netns`` folders;
namespaces left by a test process that was killed outright are swept by the next one.
:func:`shaped` limits the pair's rate (and with netem adds a delay) inside it, for the
scale model's shaped-link runs (``benchmarks/scale_model/hosts.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
RDZV_PORT = 29500  # free by construction: the namespaces are new
_count = itertools.count()


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run the multihost tests as root)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (install {package})"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """One namespace: its name, interface, address and host name, and what runs in it."""

    ns: str
    ifname: str
    addr: str
    hostname: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process on this host: gloo on the veth, one thread."""
        return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
                "GLOO_SOCKET_IFNAME": self.ifname, **extra}

    def popen(self, cmd: Sequence[str], log: Path, **env: str) -> subprocess.Popen:
        """Start ``cmd`` on this host, in its own process group, stdout+stderr into ``log``."""
        wrapped = ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c",
                   'hostname "$0" && exec "$@"', self.hostname, *cmd]
        with open(log, "w") as out:
            p = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT,
                                 env=self.env(**env), start_new_session=True)
        self.procs.append(p)
        return p

    def torchrun(self, nproc: int, endpoint: str, run_id: str, args: Sequence[str], log: Path,
                 **env: str) -> subprocess.Popen:
        """``torchrun`` of ``locallearn train args`` as one of two nodes (the README's command).

        The c10d rendezvous ignores ``--node-rank``: it orders the nodes by their
        ``--local-addr`` (as strings), so host A (10.77.n.1) is node 0 (ranks 0..nproc-1).
        """
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", endpoint, "--rdzv-id", run_id, "--local-addr", self.addr,
               "-m", "locallearn", "train", *args]
        return self.popen(cmd, log, **env)

    def kill(self) -> None:
        """SIGKILL every process this host runs: the process groups it started, then any
        process left in its namespace."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        for pid in pids(self.ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def pids(ns: str) -> list[int]:
    """The processes running in namespace ``ns``."""
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def sweep_orphans() -> list[str]:
    """Delete the namespaces of test processes that are gone (killed before their
    teardown could run, e.g. by a CI timeout), with whatever still runs in them."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    gone = []
    for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
        m = re.fullmatch(r"ll(\d+)n\d+[ab]", name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        for pid in pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", name)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        gone.append(name)
    return gone


@contextlib.contextmanager
def host_pair() -> Iterator[tuple[Host, Host]]:
    """Two hosts joined by a veth pair; everything is removed on exit, also on errors.

    Raises:
        RuntimeError: if ``ip`` refuses a step (the message is ip's).
    """
    sweep_orphans()
    n = next(_count) % 256
    tag = f"{os.getpid()}n{n}"
    hosts = tuple(Host(f"ll{tag}{side}", f"v{side}{tag}"[:15], f"10.77.{n}.{i}",
                       f"ll-{os.getpid()}-{n}-{side}") for i, side in ((1, "a"), (2, "b")))
    made: list[Host] = []
    try:
        for h in hosts:
            _ip("netns", "add", h.ns)
            made.append(h)
            etc = Path("/etc/netns") / h.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
                f"{o.addr} {o.hostname}\n" for o in hosts))
        a, b = hosts
        _ip("link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname,
            "netns", b.ns)
        for h in hosts:
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for h in made:
            h.kill()
        for h in made:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", h.ns)
            shutil.rmtree(Path("/etc/netns") / h.ns, ignore_errors=True)


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


def shaping(rate_mbit: float, delay_ms: float = 0.0) -> list[str]:
    """The qdisc (``tc`` words) that shapes a veth end to ``rate_mbit`` and ``delay_ms``.

    A delay needs ``netem`` (``delay X rate Y``, a queue of 100000 packets so that a burst
    is delayed, not dropped); a rate alone uses ``tbf``, which every kernel with traffic
    control has (netem is a module some kernels lack: ``tc`` then says "Specified qdisc
    kind is unknown"). tbf's bucket is 64 KB (a few GSO segments: a larger one would let
    a message pass at line rate) and its queue 4 MB, more than TCP keeps queued.
    """
    if delay_ms > 0:
        return ["netem", "delay", f"{delay_ms}ms", "rate", f"{rate_mbit}mbit", "limit", "100000"]
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", "64kb", "limit", "4mb"]


@contextlib.contextmanager
def shaped(hosts: Sequence[Host], rate_mbit: float, delay_ms: float = 0.0) -> Iterator[str]:
    """Shape what every host sends on its veth (:func:`shaping`); yields the qdisc as text.

    The qdiscs are deleted on exit, also on errors (deleting a namespace would delete
    them too; this leaves the pair as it was for what runs next).

    Raises:
        RuntimeError: if ``tc`` refuses (the message is tc's).
    """
    words = shaping(rate_mbit, delay_ms)
    done: list[Host] = []
    try:
        for h in hosts:
            _tc("-n", h.ns, "qdisc", "add", "dev", h.ifname, "root", *words)
            done.append(h)
        yield " ".join(words)
    finally:
        for h in done:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _tc("-n", h.ns, "qdisc", "del", "dev", h.ifname, "root")


def qdiscs(host: Host) -> str:
    """``tc qdisc show`` of the host's veth end."""
    return subprocess.run(["tc", "-n", host.ns, "qdisc", "show", "dev", host.ifname],
                          capture_output=True, text=True, timeout=30).stdout


def wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> list[int | None]:
    """Wait for ``procs`` up to ``timeout`` seconds in all; the exit codes (None: running)."""
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.0, deadline - time.monotonic()))
    return [p.poll() for p in procs]
