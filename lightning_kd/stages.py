"""Training stages: an initialisation stage per method that has one (AB, FT, FSP), then the main stage.

One fit runs them in order. The stage is a function of the epoch (:func:`stage_at`), so a resumed fit lands in the
right one. Each stage trains its own parameters with a fresh optimizer state, as the CRD benchmark creates a new
optimizer per stage, and the main stage's learning-rate schedule counts from the main stage's first epoch (30
initialisation epochs followed by 240 main epochs follow the reference recipe exactly: set ``trainer.max_epochs``
to the sum).

With Lightning this is one optimizer whose parameter groups are partitioned by the stages they train in
(:meth:`lightning_kd.core.Distillation.param_groups`); :func:`enter_stage` starts a stage in it by public
``torch.optim`` means only: the state of every parameter is dropped, the stage's groups get its learning rate and
the others 0. No optimizer is rebuilt in the middle of a fit, so every Lightning strategy keeps the optimizer it
set up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lightning_kd.distillers.base import Distiller

MAIN = "main"


@dataclass(frozen=True)
class Stage:
    """One stage: its name, its first epoch, its length (``None``: until the end), and its owner."""

    name: str
    start_epoch: int
    epochs: int | None
    distiller: Distiller | None = None

    @property
    def is_main(self) -> bool:
        return self.distiller is None


def plan_stages(distillers: Sequence[Distiller]) -> list[Stage]:
    """The stages of a fit: each distiller's initialisation stage (in list order), then ``main``."""
    stages: list[Stage] = []
    start = 0
    for distiller in distillers:
        if distiller.stage_epochs:
            stages.append(Stage(f"{distiller.name}_init", start, distiller.stage_epochs, distiller))
            start += distiller.stage_epochs
    stages.append(Stage(MAIN, start, None))
    return stages


def stage_at(stages: Sequence[Stage], epoch: int) -> Stage:
    """The stage that epoch ``epoch`` (0-based) belongs to."""
    for stage in stages:
        if stage.epochs is None or epoch < stage.start_epoch + stage.epochs:
            return stage
    return stages[-1]


def trains_in(group: dict[str, Any], stage: str) -> bool:
    """Whether a parameter group trains in ``stage`` (groups without a ``"stages"`` entry train in every stage)."""
    stages = group.get("stages")
    return stages is None or stage in stages


def enter_stage(
    optimizer: torch.optim.Optimizer,
    stage: str,
    lr: float | None = None,
    scheduler: Any = None,
) -> None:
    """Start ``stage`` in ``optimizer``.

    The groups that train in the stage get ``lr`` (an initialisation stage's own rate) or, when ``lr`` is None,
    the schedule's current rate (``scheduler.get_last_lr()``) or the group's base rate; every other group gets 0.
    When the optimizer was in another stage, the state of every parameter (momentum, Adam moments, step counts) is
    dropped, as if the optimizer had just been made. The stage is recorded in the groups (``"active_stage"``), so a
    checkpoint's optimizer state carries it and a resumed fit does not start the stage again.
    """
    if optimizer.param_groups[0].get("active_stage", stage) != stage:
        optimizer.state.clear()
    current = scheduler.get_last_lr() if scheduler is not None and hasattr(scheduler, "get_last_lr") else None
    for index, group in enumerate(optimizer.param_groups):
        base = group.setdefault("base_lr", group.get("initial_lr", group["lr"]))
        group["active_stage"] = stage
        if not trains_in(group, stage):
            group["lr"] = 0.0
        elif lr is not None:
            group["lr"] = lr
        else:
            group["lr"] = current[index] if current is not None else base


def active_stage(optimizer: torch.optim.Optimizer) -> str | None:
    """The stage ``optimizer`` was last started in (None: never)."""
    return optimizer.param_groups[0].get("active_stage")


def silence_idle_groups(optimizer: torch.optim.Optimizer, stage: str) -> None:
    """Set the learning rate of the groups that do not train in ``stage`` back to 0 (after a scheduler step,
    which recomputes every group's rate)."""
    for group in optimizer.param_groups:
        if not trains_in(group, stage):
            group["lr"] = 0.0


def active_lr(optimizer: torch.optim.Optimizer, stage: str) -> float:
    """The learning rate of the first group that trains in ``stage`` (what ``train/lr`` logs)."""
    for group in optimizer.param_groups:
        if trains_in(group, stage):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])
