"""Training stages: an initialisation stage per method that has one (AB, FT, FSP, ...), then the main stage.

One ``fit`` runs them in order. Each stage gets a fresh optimizer; the main stage also gets its own learning
rate schedule counted from its first epoch, so ``30`` initialisation epochs followed by ``240`` main epochs
follow the reference recipe exactly (set ``trainer.max_epochs`` to the sum). The stage is a function of the
epoch, so a resumed fit lands in the right one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
