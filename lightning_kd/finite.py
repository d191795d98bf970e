"""Finiteness of the loss components, checked without a host-device synchronisation at every step.

``bool(torch.isfinite(loss))`` at every step makes the host wait for the accelerator, so it can no longer
queue the next step's kernels while the current one runs; on a GPU with small networks that stall costs
more than the check. :class:`DeferredFiniteCheck` instead keeps the detached loss components of each step
on their device and looks at all of them at once when the host synchronises anyway (when the loggers read
the values, at the end of an epoch, before a checkpoint is written). A non-finite value still raises with
the exact step, epoch, stage and component where it first appeared; it is only reported a few steps later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Step:
    step: int
    epoch: int
    stage: str
    names: tuple[str, ...]
    values: Tensor  # 1-D, one detached value per component, on the loss's device


class DeferredFiniteCheck:
    """Collects the loss components of each step; :meth:`check` raises on the first non-finite one."""

    def __init__(self) -> None:
        self._pending: list[_Step] = []

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, step: int, epoch: int, stage: str, losses: dict[str, Tensor]) -> None:
        """Keep this step's components (no synchronisation: one small stack on their device). An entry named
        ``"total"`` (the weighted sum) is reported only when no other component is non-finite."""
        values = torch.stack([value.detach().float().reshape(()) for value in losses.values()])
        self._pending.append(_Step(step, epoch, stage, tuple(losses), values))

    def check(self) -> None:
        """Look at every recorded step (one transfer to the host) and forget them.

        Raises:
            FloatingPointError: naming the first step with a non-finite component, the component(s) and the
                values of that step.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.cat([entry.values for entry in pending]).cpu().tolist()
        start = 0
        for entry in pending:
            step_values = values[start : start + len(entry.names)]
            start += len(entry.names)
            bad = [name for name, value in zip(entry.names, step_values) if not math.isfinite(value)]
            if len(bad) > 1 and "total" in bad:
                bad.remove("total")  # the sum is non-finite because a component is
            if bad:
                shown = dict(zip(entry.names, step_values))
                raise non_finite_error(entry.step, entry.epoch, entry.stage, bad, shown)


def non_finite_error(
    step: int, epoch: int, stage: str, bad: list[str], values: dict[str, float]
) -> FloatingPointError:
    """The error raised for a non-finite loss: where it happened and which component(s) produced it."""
    shown = ", ".join(f"{name}={value:.4g}" for name, value in values.items())
    return FloatingPointError(
        f"non-finite loss at global step {step} (epoch {epoch}, stage {stage!r}) from component(s) {bad}: {shown}"
    )
