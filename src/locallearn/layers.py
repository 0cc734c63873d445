"""Layers shared by models and objectives (the bottom layer, beside :mod:`locallearn.types`)."""

from __future__ import annotations

import torch
from torch import nn

from locallearn.types import Activation, Masked

POOL_MODES = ("mean", "last", "cls", "bilast")


class SequencePool(nn.Module):
    """Pool a token sequence (B, L, D) into (B, D).

    A :class:`~locallearn.types.Masked` sequence is pooled over its real tokens; a plain
    (B, L, D) tensor (a vision transformer's tokens) has no padding: every token is real.

    Modes:
        ``mean``: mean of ``h`` over real positions.
        ``last``: ``h`` at the last real position. For a bidirectional LSTM the
            backward half there has only seen the last token; prefer ``bilast``.
        ``bilast``: first half of D from the last real position, second half from
            position 0: the final states of both directions of a bidirectional RNN.
        ``cls``: ``h`` at position 0 (a CLS token).

    A sequence without real tokens pools to zeros.
    """

    def __init__(self, mode: str = "mean") -> None:
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"unknown pool mode {mode!r}; choose one of: {', '.join(POOL_MODES)}")
        self.mode = mode

    def extra_repr(self) -> str:
        return repr(self.mode)

    def forward(self, x: Activation) -> torch.Tensor:
        if isinstance(x, tuple):
            h, mask = x
        else:
            h, mask = x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        m = mask.unsqueeze(-1).to(h.dtype)
        if self.mode == "mean":
            return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        if self.mode == "cls":
            return h[:, 0] * m[:, 0]
        n = mask.sum(dim=1)
        rows = torch.arange(h.shape[0], device=h.device)
        last = h[rows, (n - 1).clamp(min=0)] * (n > 0).unsqueeze(-1).to(h.dtype)
        if self.mode == "last":
            return last
        half = h.shape[-1] // 2
        return torch.cat([last[:, :half], h[:, 0, half:] * m[:, 0]], dim=-1)


__all__ = ["POOL_MODES", "Masked", "SequencePool"]
