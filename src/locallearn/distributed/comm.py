"""Links between neighbouring ranks (the data plane) and collectives on rank 0 (the control plane).

Packets travel one way, from rank r to rank r+1, over the *data* process group (NCCL
when every rank has a GPU, else gloo)::

    rank r:  compute ──► Outbox ══ isend (at most `depth` in flight) ══►  Inbox ──► compute  :rank r+1
                                                            receive thread, queue of `depth`

The :class:`Outbox` returns as soon as a packet's sends are posted and waits only when
more than ``depth`` packets are still in flight, so a rank computes batch t+1 while
batch t is on the wire. The :class:`Inbox` receives in a background thread into a
bounded queue, so the next packet is already there when the rank wants it. Metrics,
checkpoints and set-up objects go through the *control* group (always gloo) with
:class:`Control`.

Every wait has a timeout: a peer that crashed, was killed or stopped answering makes
these calls raise :class:`PeerError` (naming the peer) within ``timeout`` seconds
instead of hanging.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from locallearn.distributed.wire import (
    HEADER_LEN,
    KIND_NAMES,
    STOP,
    Layout,
    Packet,
    WireError,
    encode,
)

T = TypeVar("T")


class PeerError(RuntimeError):
    """Talking to another rank failed: it crashed, was killed or stopped answering.

    Attributes:
        peer: the rank at the other end (``None`` for a collective of all ranks).
        timed_out: True if the peer did not answer within the timeout.
    """

    def __init__(self, peer: int | None, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.peer, self.timed_out = peer, timed_out


def _timed_out(e: BaseException) -> bool:
    return "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower()


_hosts: dict[int, str] = {}  # rank -> host name, for messages (set by name_hosts)


def name_hosts(hosts: list[str]) -> None:
    """Let messages about a peer name its host (``rank 2 on host-b``); once per worker."""
    _hosts.clear()
    _hosts.update(enumerate(hosts))


def who(peer: int | None) -> str:
    """``rank <peer> on <host>`` (``rank <peer>`` before :func:`name_hosts`)."""
    if peer is None:
        return "the other ranks"
    return f"rank {peer} on {_hosts[peer]}" if peer in _hosts else f"rank {peer}"


def guard(what: str, peer: int | None, fn: Callable[[], T]) -> T:
    """Run ``fn``; turn a communication failure into a :class:`PeerError` about ``peer``."""
    try:
        return fn()
    except (PeerError, WireError):
        raise
    except Exception as e:  # gloo and NCCL raise RuntimeError subclasses with their own text
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if _timed_out(e):
            raise PeerError(peer, f"{what}: {who(peer)} did not answer in time ({first})",
                            True) from e
        raise PeerError(peer, f"{what}: {who(peer)} failed ({first})") from e


class Outbox:
    """Asynchronous sends of packets to rank ``dst``, at most ``depth`` packets in flight.

    Args:
        dst: the receiving rank.
        group: the data process group.
        wire_device: where tensors must be to be sent (``cuda`` for NCCL, ``cpu`` for gloo).
        depth: packets that may be in flight before :meth:`put` waits (at least 1).
        timeout: seconds to wait for one packet's sends to complete.
    """

    def __init__(self, dst: int, group: Any, wire_device: torch.device, depth: int,
                 timeout: float) -> None:
        self.dst, self.group, self.wire_device = dst, group, wire_device
        self.depth, self.timeout = max(1, depth), timedelta(seconds=timeout)
        self._pending: deque[tuple[list[Any], list[torch.Tensor]]] = deque()
        self.wait_seconds = 0.0  # time blocked waiting for the receiver (idle time)

    def put(self, packet: Packet) -> None:
        """Post the sends of ``packet``; wait for the oldest packet if too many are in flight."""
        tensors = encode(packet, self.wire_device)
        works = guard("sending to the next stage", self.dst,
                       lambda: [dist.isend(t, self.dst, group=self.group) for t in tensors])
        self._pending.append((works, tensors))  # the tensors must live until sent
        while len(self._pending) > self.depth:
            self._wait_oldest()

    def flush(self) -> None:
        """Wait until every posted packet has been sent."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        import time

        works, _ = self._pending.popleft()
        start = time.perf_counter()
        guard("sending to the next stage", self.dst,
               lambda: [w.wait(timeout=self.timeout) for w in works])
        self.wait_seconds += time.perf_counter() - start


class Inbox:
    """Receives packets from rank ``src`` in a background thread into a queue of ``depth``.

    The thread stops after a ``STOP`` packet or a failure; a failure is raised by the
    next :meth:`get`.

    Args:
        src: the sending rank.
        group: the data process group.
        wire_device: where received tensors arrive (``cuda`` for NCCL, ``cpu`` for gloo).
        device: where the packets are handed out (this rank's compute device).
        depth: packets received ahead of the consumer.
        timeout: seconds to wait for a packet before the sender counts as failed.
    """

    def __init__(self, src: int, group: Any, wire_device: torch.device, device: torch.device,
                 depth: int, timeout: float) -> None:
        self.src, self.group, self.wire_device, self.device = src, group, wire_device, device
        self.timeout = timeout
        self._queue: queue.Queue[Packet | BaseException] = queue.Queue(maxsize=max(1, depth))
        self.wait_seconds = 0.0  # time the consumer blocked on an empty queue (idle time)
        self._thread = threading.Thread(target=self._receive_all, name=f"inbox-from-{src}",
                                        daemon=True)  # never keeps a failed worker alive
        self._thread.start()

    def get(self, kind: int) -> Packet:
        """The next packet, which must be of ``kind``.

        Raises:
            PeerError: if the sender failed or sent nothing within the timeout.
            WireError: if the packet is of another kind (the ranks disagree on the schedule).
        """
        import time

        start = time.perf_counter()
        try:  # the receive thread has its own timeout; this one only guards against a stuck thread
            item = self._queue.get(timeout=self.timeout + 10)
        except queue.Empty:
            raise PeerError(self.src, f"receiving from the previous stage: {who(self.src)} sent "
                                      f"nothing for {self.timeout + 10:.0f} s", True) from None
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        if item.kind != kind:
            raise WireError(f"expected a {KIND_NAMES[kind]} packet from rank {self.src}, got a "
                            f"{KIND_NAMES[item.kind]} packet: the ranks disagree on the schedule")
        return item

    def close(self, timeout: float = 10.0) -> None:
        """Wait for the receive thread to end (after the ``STOP`` packet)."""
        self._thread.join(timeout)

    def _receive_all(self) -> None:
        if self.wire_device.type == "cuda":
            torch.cuda.set_device(self.wire_device)  # the current CUDA device is per thread
        try:
            while True:
                packet = self._receive()
                self._queue.put(packet)
                if packet.kind == STOP:
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put(e)

    def _receive(self) -> Packet:
        wait = timedelta(seconds=self.timeout)
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire_device)
        what = "receiving from the previous stage"
        # irecv returns None only on a rank outside the group; this rank is in it
        guard(what, self.src,
              lambda: cast(dist.Work, dist.irecv(header, self.src, group=self.group)).wait(wait))
        layout = Layout.parse(header.cpu())
        buffers = layout.buffers(self.wire_device)
        works = guard(what, self.src,
                       lambda: [cast(dist.Work, dist.irecv(b, self.src, group=self.group))
                                for b in buffers])
        guard(what, self.src, lambda: [w.wait(wait) for w in works])
        return layout.packet(buffers, self.device)


def gather_siblings(group: Any, t: torch.Tensor, groups: int,
                    wire: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Every sibling's ``t`` (same shape on all) in group order, on ``t``'s device.

    The siblings are the G nodes of one stage (group placement); ``group`` is their
    process group (group rank = group index).

    Raises:
        PeerError: if a sibling failed or did not answer within the group's timeout.
    """
    if t.numel() == 0:  # nothing to exchange (the node sees only its own channels)
        return [t] * groups
    sent = t.detach().to(wire).contiguous()
    outs = [torch.empty_like(sent) for _ in range(groups)]
    guard("exchanging with the other nodes of this stage", None,
          lambda: dist.all_gather(outs, sent, group=group))
    return [o.to(t.device) for o in outs]


def average_gradients(group: Any, optimizer: torch.optim.Optimizer, replicas: int) -> None:
    """Replace the gradients ``optimizer`` steps with their mean over the ``replicas`` ranks
    of ``group`` (one all-reduce of all of them, flattened).

    Raises:
        PeerError: if a replica failed or did not answer within the group's timeout.
    """
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([t.flatten() for t in grads])
    guard("averaging gradients with the other replicas", None,
          lambda: dist.all_reduce(flat, group=group))
    flat /= replicas
    offset = 0
    for t in grads:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


class Control:
    """Collectives of all ranks over the control group (gloo): objects, barriers.

    Args:
        group: the control process group.
        rank: this process's rank.
        world: number of ranks.
    """

    def __init__(self, group: Any, rank: int, world: int) -> None:
        self.group, self.rank, self.world = group, rank, world

    def barrier(self) -> None:
        guard("waiting for all ranks", None, lambda: dist.barrier(group=self.group))

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        guard("receiving set-up from rank 0", None,
               lambda: dist.broadcast_object_list(box, src=0, group=self.group))
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); ``None`` elsewhere."""
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        guard("gathering results on rank 0", None,
               lambda: dist.gather_object(obj, out, dst=0, group=self.group))
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on every rank (in rank order)."""
        out: list[Any] = [None] * self.world
        guard("exchanging with all ranks", None,
               lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank r gets ``objs[r]`` of rank 0."""
        box: list[Any] = [None]
        guard("receiving from rank 0", None,
               lambda: dist.scatter_object_list(box, objs if self.rank == 0 else None, src=0,
                                                group=self.group))
        return box[0]
