"""Measure, don't guess: memory, time and compute, used by every engine and benchmark.

* :class:`SavedTensorsMeter` counts the bytes of tensors autograd saves for backward
  (the activation memory that local learning frees early), as a running peak.
  Parameters are not activations and are left out; a storage saved by several ops
  counts once.
* :func:`peak_rss_bytes` is the process's peak resident set size.
* :func:`macs` counts multiply-accumulates with PyTorch's own FLOP counter.
* :class:`Timer` measures wall time and samples per second.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class _Saved:
    """What the pack hook stores in the graph; releasing it releases the count."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: SavedTensorsMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorsMeter:
    """Context manager: current and peak bytes of tensors saved for backward.

    Args:
        exclude: modules whose parameters (and buffers) are not counted.

    Example:
        >>> with SavedTensorsMeter(model) as m:
        ...     model(x).sum().backward()
        >>> m.peak_bytes
    """

    def __init__(self, *exclude: nn.Module) -> None:
        self._skip = {p.untyped_storage().data_ptr() for mod in exclude
                      for p in list(mod.parameters()) + list(mod.buffers())}
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [references, bytes]
        self.current_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or isinstance(t, nn.Parameter):
            return t
        ref = self._refs.setdefault(key, [0, storage.nbytes()])
        if ref[0] == 0:
            self.current_bytes += ref[1]
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        ref[0] += 1
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: int) -> None:
        ref = self._refs[key]
        ref[0] -= 1
        if ref[0] == 0:
            self.current_bytes -= ref[1]
            del self._refs[key]

    def __enter__(self) -> SavedTensorsMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cuda_peak_bytes(device: torch.device | str) -> int | None:
    """Peak CUDA memory allocated on ``device``, or ``None`` off GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def param_count(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def macs(fn: Callable[[], Any]) -> int:
    """Multiply-accumulates performed by ``fn()`` (PyTorch FLOP counter / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


class Timer:
    """Wall-clock timer with a sample counter; ``rate`` is samples per second."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


class StageClock:
    """Compute time per stage without a host-device sync on the hot path.

    On CUDA every timed region records a start and an end event on the current
    stream (no ``synchronize``); :meth:`seconds` waits once for the last event and sums
    the event pairs. On other devices it is ``time.perf_counter`` (the work is done
    when the region ends).

    Example:
        >>> clock = StageClock("cpu")
        >>> with clock.time(0):
        ...     pass
        >>> clock.seconds()[0] >= 0
        True
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._host: dict[int, float] = {}
        self._events: dict[int, list[tuple[Any, Any]]] = {}

    def time(self, k: int) -> Any:
        """A context manager timing one region of stage ``k``."""
        return _Region(self, k)

    def _start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _stop(self, k: int, start: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.setdefault(k, []).append((start, end))
        else:
            self._host[k] = self._host.get(k, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[int, float]:
        """Seconds per stage so far (one sync on CUDA, here and only here)."""
        out = dict(self._host)
        if self._events:
            torch.cuda.synchronize()
            for k, pairs in self._events.items():
                out[k] = out.get(k, 0.0) + sum(a.elapsed_time(b) for a, b in pairs) / 1000.0
        return out

    def reset(self) -> None:
        self._host.clear()
        self._events.clear()


class _Region:
    __slots__ = ("clock", "k", "start")

    def __init__(self, clock: StageClock, k: int) -> None:
        self.clock, self.k = clock, k

    def __enter__(self) -> None:
        self.start = self.clock._start()

    def __exit__(self, *exc: Any) -> None:
        self.clock._stop(self.k, self.start)


class LossTally:
    """Per-stage losses summed on their device and read once per log interval.

    ``add(k, loss)`` keeps a detached running sum (no ``.item()``, so no sync per
    step); :meth:`read` moves the sums to the host in one transfer, returns the means
    since the last read and starts afresh; :meth:`epoch` returns the means of
    everything read since the last ``epoch()`` (it reads what is pending first).
    A float loss is taken as it is; NaN (a stage that did not train) is skipped.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._sums: dict[int, torch.Tensor | float] = {}
        self._counts = [0] * k
        self._epoch_sums = [0.0] * k
        self._epoch_counts = [0] * k

    def add(self, k: int, loss: torch.Tensor | float) -> None:
        if isinstance(loss, torch.Tensor):
            value: torch.Tensor | float = loss.detach().float()
        elif math.isnan(loss):
            return
        else:
            value = float(loss)  # a float stays a Python float: no tensor per step
        self._sums[k] = self._sums[k] + value if k in self._sums else value
        self._counts[k] += 1

    def read(self) -> list[float]:
        """The mean loss of every stage since the last read (NaN where none)."""
        out = [float("nan")] * self.k
        if self._sums:
            keys = sorted(self._sums)
            tensors = {k: s for k, s in self._sums.items() if isinstance(s, torch.Tensor)}
            moved = (dict(zip(tensors, torch.stack([t.cpu() for t in tensors.values()]).tolist()))
                     if tensors else {})  # every tensor sum in one transfer
            values = [float(moved.get(k, self._sums[k])) for k in keys]
            for k, v in zip(keys, values):
                out[k] = v / self._counts[k]
                self._epoch_sums[k] += v
                self._epoch_counts[k] += self._counts[k]
        self._sums.clear()
        self._counts = [0] * self.k
        return out

    def epoch(self) -> dict[int, float]:
        """The mean loss of every stage that trained since the last ``epoch()``."""
        self.read()
        out = {k: self._epoch_sums[k] / n for k, n in enumerate(self._epoch_counts) if n}
        self._epoch_sums, self._epoch_counts = [0.0] * self.k, [0] * self.k
        return out
