"""The bottom layer: what flows between blocks and stages.

An *activation* is either a plain tensor of any rank (an image batch (B, C, H, W), a
flat batch (B, D), a token sequence (B, N, D) of a vision transformer) or a
:class:`Masked` sequence: text models pass ``Masked(h, mask)`` so that padding is
declared by the model, never guessed from a shape. Nothing else is routed between
blocks; :func:`check_activation` says so at build time, naming the block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class Masked(NamedTuple):
    """A token sequence with its padding mask.

    Attributes:
        h: float (B, L, D) hidden states.
        mask: bool (B, L), True on real tokens.
    """

    h: torch.Tensor
    mask: torch.Tensor


Activation = torch.Tensor | Masked


def first_tensor(a: Activation) -> torch.Tensor:
    """The main tensor of an activation (the hidden states of a masked sequence)."""
    return a.h if isinstance(a, Masked) else a


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 if it is in a low precision (bf16, fp16); fp32 and fp64 stay as they are.

    Losses that need range (log-softmax, temperature-scaled similarities) take their
    inputs through this under autocast; a float64 test reference stays float64.
    """
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], a: Activation) -> Activation:
    """``fn`` applied to every tensor of ``a``, keeping its kind (tensor or Masked)."""
    if isinstance(a, tuple):
        return Masked(*(fn(t) for t in a))
    return fn(a)


def detach(a: Activation) -> Activation:
    """Cut ``a`` from the autograd graph: the one place gradient isolation happens."""
    return map_tensors(torch.Tensor.detach, a)


def as_activation(parts: tuple[torch.Tensor, ...] | torch.Tensor) -> Activation:
    """An activation from its tensors (a bare tensor, or the two tensors of a Masked)."""
    if isinstance(parts, torch.Tensor):
        return parts
    if len(parts) != 2:
        raise ValueError(f"an activation is a tensor or Masked(h, mask), not {len(parts)} tensors")
    return Masked(*parts)


def check_activation(a: object, where: str) -> None:
    """Refuse what the library cannot route between blocks.

    Raises:
        ValueError: naming ``where`` (the block) and what is allowed.
    """
    if isinstance(a, Masked) and all(isinstance(t, torch.Tensor) for t in a):
        return
    if isinstance(a, torch.Tensor):
        return
    kind = type(a).__name__ + (f" of {len(a)}" if isinstance(a, (tuple, list)) else "")
    raise ValueError(
        f"{where} returns a {kind}: a block must return a tensor (any rank, batch first) or "
        f"locallearn.Masked(h, mask) for padded token sequences; wrap other outputs in a "
        f"module that returns one of these")
