"""Small helpers of :class:`lightning_kd.core.Distillation`: the undo handle of its ``revertible()``, and the eval
mode and the logits check of its probe forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_kd.distillers.base import Distiller


class _Revert:
    """Undo handle of :meth:`~lightning_kd.core.Distillation.revertible`."""

    def __init__(self, buffers: list[Tensor], saved: list[Tensor], distillers: list[Distiller], states: list) -> None:
        self.buffers, self.saved, self.distillers, self.states = buffers, saved, distillers, states

    @torch.no_grad()
    def revert(self) -> None:
        for buffer, value in zip(self.buffers, self.saved):
            buffer.copy_(value)
        for distiller, state in zip(self.distillers, self.states):
            distiller.restore_state(state)


@contextmanager
def _eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    modes = [(m, m.training) for m in modules if m is not None]
    for module, _ in modes:
        module.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)


def _num_outputs(logits: Tensor, who: str) -> int:
    if logits.dim() != 2:
        raise ValueError(f"the {who} must return (batch, classes) logits, returned shape {tuple(logits.shape)}")
    return int(logits.shape[1])
