"""The wire format of the pipeline: what one rank sends the next, as a list of tensors.

A :class:`Packet` is one batch (or micro-batch) on its way down the pipeline: the
activation ``h`` (a tensor, or a tuple such as a text model's ``(hidden, mask)``), the
targets ``y``, the *trail* of earlier boundaries that context supply reads (entries
the later stages do not read travel as ``None``), and ``extras``, running sums of an
evaluation. It travels as one fixed-size int64 header followed by its tensors::

    header = [kind, total, has_batch, n_trail, n_extras,
              arity of every slot ...,                  # slots: h, y, trail..., extras...
              dtype code, ndim, *shape of every tensor ...,  0 ...]

``arity`` is 0 for a bare tensor, n for an n-tuple and -1 for ``None``. ``total`` is
the size of the whole batch a micro-batch belongs to (its loss weight). Booleans
travel as uint8, which gloo and NCCL both send. This module is the only place that
knows the layout; :mod:`locallearn.distributed.comm` moves the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from locallearn.types import Masked

HEADER_LEN = 1024  # int64 words: room for ~150 tensors of 4 dimensions
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)

TRAIN, EVAL, STOP = 1, 2, 3  # packet kinds
KIND_NAMES = {TRAIN: "train", EVAL: "eval", STOP: "stop"}


class WireError(ValueError):
    """A packet cannot be encoded or a header is not a packet header."""


@dataclass
class Packet:
    """One batch between two ranks (see the module doc)."""

    kind: int
    h: Any = None                     # Activation: a tensor or a tuple of tensors
    y: torch.Tensor | None = None
    trail: list[Any] = field(default_factory=list)
    extras: list[torch.Tensor] = field(default_factory=list)
    total: int = 0                    # samples of the whole batch (micro-batching)

    @property
    def slots(self) -> list[Any]:
        batch = [self.h, self.y] if self.h is not None else []
        return [*batch, *self.trail, *self.extras]


def _parts(slot: Any) -> tuple[int, list[torch.Tensor]]:
    """The arity code of a slot and its tensors."""
    if slot is None:
        return -1, []
    if isinstance(slot, tuple):
        if not slot or not all(isinstance(t, torch.Tensor) for t in slot):
            raise WireError("a tuple activation must hold one or more tensors (and nothing else)")
        return len(slot), list(slot)
    if not isinstance(slot, torch.Tensor):
        raise WireError(f"cannot send a {type(slot).__name__}: only tensors and tuples of tensors")
    return 0, [slot]


def encode(packet: Packet, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The header and the tensors of ``packet``, contiguous and on ``device``.

    Raises:
        WireError: for a slot that is not a tensor, a tuple of tensors or None, an
            unsupported dtype, or a packet too large for the header.
    """
    words = [packet.kind, packet.total, int(packet.h is not None), len(packet.trail),
             len(packet.extras)]
    tensors: list[torch.Tensor] = []
    for slot in packet.slots:
        arity, parts = _parts(slot)
        words.append(arity)
        tensors += parts
    for t in tensors:
        if t.dtype not in DTYPES:
            raise WireError(f"cannot send dtype {t.dtype}; supported: {DTYPES}")
        words += [DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(words) > HEADER_LEN:
        raise WireError(f"a packet of {len(tensors)} tensors needs {len(words)} header words; "
                        f"the header holds {HEADER_LEN}")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[: len(words)] = torch.tensor(words, dtype=torch.int64)
    wire = [(t.to(torch.uint8) if t.dtype == torch.bool else t).to(device).contiguous()
            for t in tensors]
    return [header.to(device), *wire]


@dataclass
class Layout:
    """A decoded header: the packet's kind and the dtype and shape of every tensor."""

    kind: int
    total: int
    has_batch: bool
    n_trail: int
    n_extras: int
    arities: list[int]
    specs: list[tuple[torch.dtype, tuple[int, ...]]]

    @classmethod
    def parse(cls, header: torch.Tensor) -> Layout:
        """Decode a header received from :func:`encode`.

        Raises:
            WireError: if it is not a packet header.
        """
        w = header.tolist()
        kind, total, has_batch, n_trail, n_extras = w[:5]
        if kind not in KIND_NAMES:
            raise WireError(f"not a packet header (kind {kind}): the ranks disagree on the protocol")
        n_slots = 2 * has_batch + n_trail + n_extras
        arities = w[5: 5 + n_slots]
        pos, specs = 5 + n_slots, []
        for _ in range(sum(max(a, 1) for a in arities if a >= 0)):
            code, ndim = w[pos], w[pos + 1]
            specs.append((DTYPES[code], tuple(w[pos + 2: pos + 2 + ndim])))
            pos += 2 + ndim
        return cls(kind, total, bool(has_batch), n_trail, n_extras, arities, specs)

    def buffers(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Empty tensors on ``device`` to receive this packet's tensors into."""
        return [torch.empty(shape, dtype=torch.uint8 if dt == torch.bool else dt, device=device)
                for dt, shape in self.specs]

    def packet(self, tensors: list[torch.Tensor], device: torch.device | str = "cpu") -> Packet:
        """Rebuild the packet from its received tensors, moved to ``device``."""
        it = iter(t.to(device).to(dt) for t, (dt, _) in zip(tensors, self.specs))
        slots: list[Any] = []  # as Packet.slots: None, a tensor or a tuple of tensors
        for arity in self.arities:
            if arity < 0:
                slots.append(None)
            elif arity == 0:
                slots.append(next(it))
            else:
                parts = tuple(next(it) for _ in range(arity))
                slots.append(Masked(*parts) if arity == 2 else parts)  # a tuple activation is Masked
        h, y = (slots[0], slots[1]) if self.has_batch else (None, None)
        rest = slots[2 * self.has_batch:]
        return Packet(self.kind, h, y, rest[: self.n_trail], rest[self.n_trail:], self.total)
