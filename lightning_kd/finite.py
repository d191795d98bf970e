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
from typing import Any

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


class DivergenceGuard:
    """Stops a fit whose loss grows by an order of magnitude within a stage.

    After every epoch it compares the epoch's mean loss with the lowest epoch mean of the current stage so far; a
    mean ``factor`` times higher (10 by default) means the stage diverged (an FSP initialisation stage at too high
    a learning rate went 101 -> 58 -> 120 -> 252 -> 771 and left the student at 24.5 % after its main stage).

    Args:
        factor: the growth that counts as divergence; ``None`` turns the check off.
    """

    def __init__(self, factor: float | None = 10.0) -> None:
        if factor is not None and not factor > 1:
            raise ValueError(f"divergence_factor must be > 1 (or None to turn the check off), got {factor}")
        self.factor = factor
        self.best: float | None = None

    def new_stage(self) -> None:
        """Forget the previous stage's losses (a new stage has another loss)."""
        self.best = None

    def check(self, epoch_loss: float, epoch: int, stage: Any) -> None:
        """Record one epoch's mean loss; raise :class:`StageDivergedError` when it diverged."""
        if self.factor is None or not math.isfinite(epoch_loss):
            return
        if self.best is not None and epoch_loss > self.factor * max(self.best, 1e-12):
            name = getattr(stage, "name", str(stage))
            advice = (
                f"lower its learning rate (stage_lr of the distiller, e.g. {name.removesuffix('_init')}'s stage_lr)"
                if not getattr(stage, "is_main", True)
                else "lower the learning rate"
            )
            raise StageDivergedError(
                f"stage {name!r} diverged: its mean loss in epoch {epoch} is {epoch_loss:.4g}, more than "
                f"{self.factor:g}x its best epoch so far ({self.best:.4g}); {advice}, or pass "
                "divergence_factor=null to go on anyway"
            )
        self.best = epoch_loss if self.best is None else min(self.best, epoch_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")


class StageDivergedError(FloatingPointError):
    """A stage's loss grew by an order of magnitude: the fit is stopped before it wrecks the student."""
