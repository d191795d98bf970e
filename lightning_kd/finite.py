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
    """Stops a fit whose losses grow by an order of magnitude within an initialisation stage.

    After every epoch of an initialisation stage it compares each watched epoch mean (the stage's loss) with its
    lowest epoch mean in the current stage; a mean ``factor`` times higher (10 by default) means the stage diverged:
    an FSP initialisation stage at too high a learning rate went 101 -> 58 -> 120 -> 252 -> 771 and left the student
    at 24.5 % after its main stage. A stage that wrecks the student's BatchNorm statistics without its loss growing
    shows as non-finite values, which the module's finiteness check reports.

    Args:
        factor: the growth that counts as divergence; ``None`` turns the check off.
    """

    def __init__(self, factor: float | None = 10.0) -> None:
        if factor is not None and not factor > 1:
            raise ValueError(f"divergence_factor must be > 1 (or None to turn the check off), got {factor}")
        self.factor = factor
        self.best: dict[str, float] = {}

    def new_stage(self) -> None:
        """Forget the previous stage's values (a new stage has other losses)."""
        self.best = {}

    def check(self, epoch_means: dict[str, float], epoch: int, stage: Any) -> None:
        """Record one epoch's means; raise :class:`StageDivergedError` when one of them diverged."""
        if self.factor is None:
            return
        for name, value in epoch_means.items():
            if not math.isfinite(value):
                continue
            best = self.best.get(name)
            if best is not None and value > self.factor * max(best, 1e-12):
                raise self._error(name, value, best, epoch, stage)
            self.best[name] = value if best is None else min(best, value)

    def _error(self, name: str, value: float, best: float, epoch: int, stage: Any) -> StageDivergedError:
        stage_name = getattr(stage, "name", str(stage))
        if getattr(stage, "is_main", True):
            advice = "lower the learning rate"
        else:
            advice = f"lower the stage's learning rate (stage_lr of {stage_name.removesuffix('_init')})"
        what = f"the mean {name}"
        return StageDivergedError(
            f"stage {stage_name!r} diverged: {what} in epoch {epoch} is {value:.4g}, more than {self.factor:g}x its "
            f"best epoch so far ({best:.4g}); {advice}, or pass divergence_factor=null to go on anyway"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = dict(best) if isinstance(best, dict) else {}


class StageDivergedError(FloatingPointError):
    """A stage's loss grew by an order of magnitude: the fit is stopped before it wrecks the student."""
